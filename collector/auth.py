"""Bearer tokens for gRPC ingest and the HTTP API (`--token-file`), per job if wanted.

The token file holds either one token (it opens everything), or lines `JOB TOKEN`: that
token may write and read only the jobs its JOB pattern matches (shell-style, so `team-a-*`
works), and a line `* TOKEN` is the admin token that opens every job, /metrics and the
alert list. Blank lines and lines starting with `#` are ignored. Every comparison is
constant time, against every configured token, so timing says nothing about which is near.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging

HEADER = "authorization"
log = logging.getLogger("modtrack.collector.auth")


class Access:
    """What one presented token opens: job patterns, or everything."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = patterns
        self.admin = "*" in patterns

    def allows(self, job: str) -> bool:
        return self.admin or any(fnmatch.fnmatchcase(job, p) for p in self.patterns)


OPEN = Access(("*",))  # no token configured


class Tokens:
    """The configured tokens: token -> the job patterns it opens."""

    def __init__(self, grants: dict[str, tuple[str, ...]]):
        if not grants:
            raise ValueError("no token configured")
        self._grants = [(f"Bearer {t}".encode(), Access(p)) for t, p in grants.items()]

    @classmethod
    def single(cls, token: str) -> Tokens:
        return cls({token: ("*",)})

    @classmethod
    def parse(cls, text: str, where: str = "token file") -> Tokens:
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(lines) == 1 and len(lines[0].split()) == 1:
            return cls.single(lines[0])
        grants: dict[str, list[str]] = {}
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{where}: want 'JOB TOKEN' per line (entry {n} has {len(parts)} fields)")
            grants.setdefault(parts[1], []).append(parts[0])
        return cls({t: tuple(p) for t, p in grants.items()})

    def access(self, header_value: str | None) -> Access | None:
        """The Access of `Authorization: Bearer T`, or None for a missing or unknown token."""
        presented = (header_value or "").encode()
        found = None
        for expected, access in self._grants:  # no early exit: same time for every token
            if hmac.compare_digest(presented, expected):
                found = access
        return found


def as_tokens(token) -> Tokens | None:
    """ServeConfig.token may be None, one token string, or Tokens."""
    if token is None or isinstance(token, Tokens):
        return token
    return Tokens.single(token)


def load_token(path: str | None) -> str | None:
    """The token in `path` (surrounding whitespace ignored), or None when no file is given."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def load_tokens(path: str | None) -> Tokens | None:
    """The collector's --token-file: one token, or `JOB TOKEN` lines (see the module doc)."""
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"token file {path} is empty")
    return Tokens.parse(text, path)


def access(header_value: str | None, token) -> Access | None:
    """What the header opens under `token` (None, str or Tokens); None means refused."""
    tokens = as_tokens(token)
    if tokens is None:
        return OPEN
    return tokens.access(header_value)


def bearer_ok(header_value: str | None, token) -> bool:
    """True when no token is configured or the header carries a configured one; constant time."""
    return access(header_value, token) is not None


def grpc_header(metadata) -> str | None:
    """The authorization value among gRPC invocation metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == HEADER:
            return value
    return None


class RefusalLog:
    """Logs a refusal once per (peer address, reason), never the token; bounded memory."""

    def __init__(self, limit: int = 10_000):
        self._seen: set[tuple[str, str]] = set()
        self._limit = limit

    def refused(self, peer: str, reason: str) -> None:
        key = (peer_host(peer), reason)
        if key in self._seen:
            return
        if len(self._seen) < self._limit:
            self._seen.add(key)
        log.warning("refused %s: %s (logged once per peer)", key[0], reason)


def peer_host(peer: str | None) -> str:
    """'ipv4:127.0.0.1:5555' or '127.0.0.1' -> the address without port or scheme."""
    peer = peer or "?"
    for scheme in ("ipv4:", "ipv6:", "unix:"):
        if peer.startswith(scheme):
            peer = peer[len(scheme) :]
    host, sep, port = peer.rpartition(":")
    if sep and port.isdigit():
        peer = host
    return peer.strip("[]")
