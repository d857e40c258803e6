"""A small asyncio HTTP/1.1 server (stdlib only) for the health endpoint and the reference receiver.

Design:

- One task per connection; requests on a connection are served one after another (keep-alive,
  no pipelining concurrency). HTTP/1.1 keeps the connection open unless the client says
  ``Connection: close``; HTTP/1.0 closes unless it says ``keep-alive``.
- Request bodies need ``Content-Length``. A chunked request body is refused with 411 (Length
  Required) and the connection closed: our clients (httpx, curl with a file) always send a
  length, and refusing keeps the parser small.
- Limits: the request line and headers must arrive within ``header_timeout`` seconds once the
  first byte is in and fit in ``max_header_bytes`` (else 431/408 and close); an idle keep-alive
  connection is closed after ``idle_timeout``; a body over ``max_body_bytes`` gets 413 and the
  connection is closed without reading the body.
- Anything malformed gets 400 and the connection is closed. A handler that raises gets 500 and a
  log line with the traceback; the server keeps serving (a bug in one request never kills it).

Connection states::

    idle --first byte--> reading head --(timeout 408 | too big 431 | bad 400)--> closed
                              |
                              v
                         reading body --(413 / 411 / short)--> closed
                              |
                              v
                          handling --(raise -> 500)--> writing --keep-alive--> idle
                                                          +--close-------------> closed
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Handler", "HttpServer", "Request", "Response"]

log = logging.getLogger(__name__)


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
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return cls(status, body, dict(headers or {}))

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode("utf-8"), {}, "text/plain; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]


class _BadRequest(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpServer:
    """``await start()`` binds (port 0 picks a free one) and returns the port; ``aclose()`` is
    idempotent and closes open connections too."""

    def __init__(self, handler: Handler, host: str, port: int, *,
                 max_body_bytes: int = 16 * 2**20, max_header_bytes: int = 64 * 2**10,
                 header_timeout: float = 10.0, idle_timeout: float = 75.0,
                 ssl: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl = ssl  # a server context makes it HTTPS (tests: TLS and mutual TLS sinks)
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.max_body_bytes = max_body_bytes
        self._max_header_bytes = max_header_bytes
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("HttpServer already started")
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self._requested_port,
            limit=self._max_header_bytes, reuse_address=True, ssl=self._ssl)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def listening_fds(self) -> list[int]:
        """File descriptors of the listening sockets (empty before ``start``); the health
        endpoint's stall guard answers on them while the event loop is blocked."""
        if self._server is None:
            return []
        return [s.fileno() for s in self._server.sockets]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while not self._closed:
                keep_alive = await self._serve_one(reader, writer)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except asyncio.CancelledError:
            pass  # server closing
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to keep the connection for another."""
        try:
            first = await asyncio.wait_for(reader.read(1), self._idle_timeout)
        except TimeoutError:
            return False
        if not first:
            return False  # clean close between requests
        try:
            request, keep_alive = await self._read_request(first, reader)
        except _BadRequest as exc:
            await _write(writer, Response.json({"error": exc.message}, exc.status), False)
            return False
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("HTTP handler failed for %s %s; answered 500",
                          request.method, request.path)
            response = Response.json({"error": "internal error"}, 500)
        await _write(writer, response, keep_alive, head_only=request.method == "HEAD")
        return keep_alive

    async def _read_request(self, first: bytes,
                            reader: asyncio.StreamReader) -> tuple[Request, bool]:
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._header_timeout)
        except TimeoutError:
            raise _BadRequest(408, "request head not received in time") from None
        except asyncio.LimitOverrunError:
            raise _BadRequest(431, "request head too large") from None
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("client closed mid-request") from exc
        head = (first + rest).decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if not method.isalpha() or not target:
            raise _BadRequest(400, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequest(400, "malformed header line")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(411, "chunked request bodies are not supported; "
                              "send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _BadRequest(400, "invalid Content-Length")
        length = int(length_text)
        if length > self.max_body_bytes:
            raise _BadRequest(413, f"body larger than {self.max_body_bytes} bytes")
        try:
            body = await asyncio.wait_for(reader.readexactly(length), self._header_timeout) \
                if length else b""
        except TimeoutError:
            raise _BadRequest(408, "request body not received in time") from None
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            keep_alive = "keep-alive" in connection
        else:
            keep_alive = "close" not in connection
        split = urlsplit(target)
        request = Request(method=method.upper(), path=unquote(split.path) or "/",
                          query=dict(parse_qsl(split.query, keep_blank_values=True)),
                          headers=headers, body=body)
        return request, keep_alive


async def _write(writer: asyncio.StreamWriter, response: Response, keep_alive: bool,
                 head_only: bool = False) -> None:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    names = {k.lower() for k in response.headers}
    if "content-type" not in names and response.status not in (204, 304):
        lines.append(f"Content-Type: {response.content_type}")
    lines.append(f"Content-Length: {len(response.body)}")
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    lines.extend(f"{k}: {v}" for k, v in response.headers.items())
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if not head_only:
        data += response.body
    writer.write(data)
    await writer.drain()
