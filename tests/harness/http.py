"""Plain HTTP calls to the collector's API, as a user's script makes them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def get(url: str, path: str, token: str | None = None, method: str = "GET") -> tuple[int, dict]:
    """(status, JSON body, or text for other content types)."""
    req = urllib.request.Request(url + path, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            is_json = resp.headers.get_content_type() == "application/json"
            return resp.status, (json.loads(body) if is_json else body.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(url: str, path: str, token: str | None = None) -> tuple[int, dict]:
    return get(url, path, token, method="POST")


def get_json(url: str, timeout: float = 5.0):
    """The JSON body of a GET; HTTP errors raise."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def post_json(url: str, timeout: float = 5.0):
    """The JSON body of an empty POST; HTTP errors raise."""
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=timeout) as resp:
        return json.load(resp)
