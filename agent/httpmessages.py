"""Requests and answers of the small HTTP server (``agent/httpserver.py``): what a handler gets
and returns, the per-route body limit, and the canned answer a refused request gets.

Plain data, no I/O: the health endpoint, the reason entry, the reference receiver and the tests
build on these types; the server re-exports them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

__all__ = ["BodyLimit", "Handler", "Request", "Response", "canned", "default_body_limit"]

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE", "CONNECT"})


@dataclass(frozen=True, slots=True)
class Request:
    method: str  # upper case
    path: str  # percent-decoded, without the query string
    query: dict[str, str]  # last value wins for repeated keys
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        # backslashreplace: a lone surrogate (valid JSON, "\\ud800", from a plant value) is
        # written back as that escape instead of failing the whole answer with a 500.
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "backslashreplace")
        return cls(status, body, dict(headers or {}))

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode("utf-8", "backslashreplace"), {},
                   "text/plain; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]
# (method, path) -> the largest body accepted for that route, in bytes.
BodyLimit = Callable[[str, str], int]


def default_body_limit(max_body_bytes: int) -> BodyLimit:
    """No body for methods whose requests carry none; ``max_body_bytes`` for the others."""
    def limit(method: str, _path: str) -> int:
        return 0 if method in _BODYLESS else max_body_bytes
    return limit


def canned(status: int, message: str) -> bytes:
    """A whole ``Connection: close`` answer with ``{"error": message}``, for a request that
    is refused before a handler sees it."""
    body = json.dumps({"error": message}).encode("utf-8")
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body
