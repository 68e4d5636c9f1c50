"""Bearer-token check shared by gRPC ingest and the HTTP API (`--token-file`)."""
from __future__ import annotations

import hmac

HEADER = "authorization"


def load_token(path: str | None) -> str | None:
    """The token in `path` (surrounding whitespace ignored), or None when no file is given."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def bearer_ok(header_value: str | None, token: str | None) -> bool:
    """True when no token is configured or the header is `Bearer <token>`; constant time."""
    if token is None:
        return True
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest((header_value or "").encode(), expected)


def grpc_header(metadata) -> str | None:
    """The authorization value among gRPC invocation metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == HEADER:
            return value
    return None
