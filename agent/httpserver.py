"""A small asyncio HTTP/1.1 server for the health endpoint and the reference receiver.

Parsing is h11's (a complete, strict HTTP/1.1 state machine; it comes with httpx): request
line, header syntax, ``Content-Length`` and keep-alive rules are its, not ours.

Design:

- One task per connection; requests on a connection are served one after another (keep-alive,
  no pipelining concurrency). HTTP/1.1 keeps the connection open unless the client says
  ``Connection: close``; HTTP/1.0 closes. Versions other than 1.0/1.1 get 505.
- Limits (each a clear status, then the connection is closed):

  ==========================  ==============================================================
  request head                ``max_header_bytes`` (431), within ``header_timeout`` once the
                              first byte is in (408)
  request body                ``body_limit(method, path)`` bytes: by default none at all for
                              GET/HEAD/OPTIONS/DELETE (a GET with a body is refused, never
                              read), ``max_body_bytes`` otherwise (413, not read); the whole
                              body within ``header_timeout`` (408); chunked bodies 411
  bodies of all connections   at most ``max_bodies_bytes`` (default 4 x ``max_body_bytes``)
                              being read or handled at once: past it 503, not read
  writing the answer          within ``write_timeout``: a client that does not read (while
                              pipelining requests) loses its connection, not our memory
  idle keep-alive             closed after ``idle_timeout``
  connections                 at most ``max_connections``: past it, the longest-idle
                              keep-alive connection is closed to make room, else the one
                              that has been sending its request longest if that is more
                              than ``SLOW_REQUEST`` (a slow-loris client; a real client sends
                              its head in one packet); if there is none the newcomer gets
                              503 and is closed
  ==========================  ==============================================================

- Anything malformed gets a 4xx (never a traceback) and the connection is closed. A handler
  that raises gets 500 and a log line with the traceback; the server keeps serving.

Connection states::

    idle --first byte--> reading head --(timeout 408 | too big 431 | bad 400/505)--> closed
                              |
                              v
                         reading body --(413 / 411 / 408 / short)--> closed
                              |
                              v
                          handling --(raise -> 500)--> writing --(write timeout)--> closed
                                                          |--keep-alive--> idle
                                                          +--close-------> closed

The public interface (``HttpServer(handler, host, port, ...)``, and ``Request``, ``Response``,
``Handler`` from ``agent/httpmessages.py``, re-exported here) is what the health endpoint, the
receiver and the tests build on; routing is the handler's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

from agent.httpmessages import (
    BodyLimit,
    Handler,
    Request,
    Response,
    canned,
    default_body_limit,
)
from config.tasks import cancel_all, within

__all__ = ["BodyLimit", "Handler", "HttpServer", "Request", "Response", "default_body_limit"]

log = logging.getLogger(__name__)

# A client still sending its request after this long may be closed to make room at the
# connection cap: a real client sends a request head in one packet.
SLOW_REQUEST = 1.0
_READ_CHUNK = 65536
_SEND_BUFFER = 65536


class _Refuse(Exception):
    """The request cannot be served; answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Gone(Exception):
    """The client went away or stalled; close without an answer."""


class _Conn:
    __slots__ = ("idle_since", "reading_since", "reserved", "task", "writer")

    def __init__(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        self.task, self.writer = task, writer
        self.idle_since: float | None = time.monotonic()
        self.reading_since: float | None = None  # first byte of a request not yet complete
        self.reserved = 0  # bytes of the body budget this connection's request holds

    def reading(self) -> None:
        self.idle_since = None
        if self.reading_since is None:
            self.reading_since = time.monotonic()


class HttpServer:
    """``await start()`` binds (port 0 picks a free one) and returns the port; ``aclose()`` is
    idempotent and closes open connections too."""

    def __init__(self, handler: Handler, host: str, port: int, *,
                 max_body_bytes: int = 16 * 2**20, max_header_bytes: int = 64 * 2**10,
                 header_timeout: float = 10.0, idle_timeout: float = 75.0,
                 write_timeout: float = 10.0, max_connections: int = 64,
                 body_limit: BodyLimit | None = None, max_bodies_bytes: int | None = None,
                 ssl: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._ssl = ssl  # a server context makes it HTTPS (tests: TLS and mutual TLS sinks)
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.max_body_bytes = max_body_bytes
        self._body_limit = body_limit or default_body_limit(max_body_bytes)
        # Each connection may send max_body_bytes; all of them at once would be
        # max_connections times that (64 x 16 MiB took the receiver past 1 GiB).
        self._max_bodies = max_bodies_bytes if max_bodies_bytes is not None \
            else 4 * max_body_bytes
        self._bodies = 0
        self._max_header_bytes = max_header_bytes
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Conn] = {}
        self._closed = False
        self.refused_connections = 0

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
        await cancel_all(list(self._connections))
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def connections(self) -> int:
        return len(self._connections)

    # ------------------------------------------------------------------ connections

    def _make_room(self) -> bool:
        """At the connection cap: close the longest-idle keep-alive connection, else the
        slowest sender of a request (for more than ``SLOW_REQUEST``); False if every
        connection is busy with a request or its answer."""
        if len(self._connections) < self.max_connections:
            return True
        idle = [c for c in self._connections.values() if c.idle_since is not None]
        if idle:
            oldest = min(idle, key=lambda c: c.idle_since or 0.0)
        else:
            since = time.monotonic() - SLOW_REQUEST
            slow = [c for c in self._connections.values()
                    if c.reading_since is not None and c.reading_since < since]
            if not slow:
                return False
            oldest = min(slow, key=lambda c: c.reading_since or 0.0)
        oldest.task.cancel()
        del self._connections[oldest.task]
        return True

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if not self._make_room():
            self.refused_connections += 1
            with contextlib.suppress(Exception):
                writer.write(canned(503, "too many connections"))
                writer.close()  # what did not fit into the socket at once is dropped
            return
        raw = writer.get_extra_info("socket")
        if raw is not None:
            # The kernel would buffer megabytes of answers for a client that pipelines
            # requests and never reads; a small send buffer makes the write timeout bite soon.
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        conn = _Conn(task, writer)
        self._connections[task] = conn
        try:
            await self._serve(conn, reader, writer)
        except (ConnectionError, _Gone, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away or stalled; nothing to answer
        except asyncio.CancelledError:
            pass  # server closing, or room made for a newer connection
        except Exception:  # a bug here must cost one connection, not the server
            log.exception("HTTP connection failed")
        finally:
            self._release(conn)
            self._connections.pop(task, None)
            # abort, not close: a client that does not read must not keep the socket in
            # the kernel's buffers (nor our write buffer) any longer.
            writer.transport.abort()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_header_bytes)
        while not self._closed:
            try:
                request = await self._read_request(h, conn, reader)
            except _Refuse as exc:
                await self._send_raw(writer, canned(exc.status, exc.message))
                return
            conn.reading_since = None
            if request is None:
                return  # clean close between requests
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("HTTP handler failed for %s %s; answered 500",
                              request.method, request.path)
                response = Response.json({"error": "internal error"}, 500)
            self._release(conn)
            keep_alive = h.our_state is h11.SEND_RESPONSE and _keep_alive(request, h)
            await self._send_response(h, writer, response, keep_alive,
                                      head_only=request.method == "HEAD")
            if not keep_alive or h.our_state is not h11.DONE \
                    or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()
            conn.idle_since = time.monotonic()

    def _release(self, conn: _Conn) -> None:
        self._bodies -= conn.reserved
        conn.reserved = 0

    async def _receive(self, h: h11.Connection, reader: asyncio.StreamReader,
                       timeout: float, what: str) -> None:
        try:
            data = await within(reader.read(_READ_CHUNK), timeout)
        except TimeoutError:
            raise _Refuse(408, f"{what} not received in time") from None
        h.receive_data(data)  # b"" is the end of the stream

    async def _read_request(self, h: h11.Connection, conn: _Conn,
                            reader: asyncio.StreamReader) -> Request | None:
        deadline: float | None = None
        try:
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    if deadline is None and not h.trailing_data[0]:
                        # Idle: waiting for the first byte of a request.
                        try:
                            data = await within(reader.read(_READ_CHUNK),
                                                self._idle_timeout)
                        except TimeoutError:
                            return None
                        if not data:
                            return None
                        conn.reading()
                        deadline = time.monotonic() + self._header_timeout
                        h.receive_data(data)
                        continue
                    if deadline is None:
                        conn.reading()
                        deadline = time.monotonic() + self._header_timeout
                    await self._receive(h, reader, max(0.0, deadline - time.monotonic()),
                                        "request head")
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return None
                if isinstance(event, h11.Request):
                    conn.reading()
                    size = len(event.target) + sum(len(n) + len(v) + 4
                                                   for n, v in event.headers.raw_items())
                    if size > self._max_header_bytes:
                        raise _Refuse(431, "request head too large")
                    deadline = deadline or time.monotonic() + self._header_timeout
                    return await self._read_body(h, event, conn, reader, deadline)
                raise _Refuse(400, "unexpected data")
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            if status == 400 and h.their_state is h11.SEND_BODY:
                raise _Gone() from None  # a body cut short: the client left
            raise _Refuse(status if 400 <= status < 500 else 400,
                          _PROTOCOL_MESSAGES.get(status, "malformed request")) from None

    async def _read_body(self, h: h11.Connection, event: h11.Request, conn: _Conn,
                         reader: asyncio.StreamReader, deadline: float) -> Request:
        method = event.method.decode("ascii", "replace").upper()
        if event.http_version not in (b"1.0", b"1.1"):
            raise _Refuse(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _Refuse(411, "chunked request bodies are not supported; send Content-Length")
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        path = unquote(split.path) or "/"
        limit = self._body_limit(method, path)
        length = int(headers.get("content-length", "0"))  # h11 checked it is digits
        if length > limit:
            raise _Refuse(413, "this request takes no body" if limit == 0
                          else f"body larger than {limit} bytes")
        if length and self._bodies + length > self._max_bodies:
            raise _Refuse(503, "too many request bodies at once; retry later")
        self._bodies += length
        conn.reserved = length
        body = bytearray()
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                await self._receive(h, reader, max(0.0, deadline - time.monotonic()),
                                    "request body")
                continue
            if isinstance(ev, h11.Data):
                body += ev.data
                continue
            if isinstance(ev, h11.EndOfMessage):
                break
            raise _Gone()  # ConnectionClosed mid-body
        return Request(method=method, path=path,
                       query=dict(parse_qsl(split.query, keep_blank_values=True)),
                       headers=headers, body=bytes(body))

    # ------------------------------------------------------------------ writing

    async def _send_response(self, h: h11.Connection, writer: asyncio.StreamWriter,
                             response: Response, keep_alive: bool, head_only: bool) -> None:
        headers = [(k, v) for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "connection")]
        names = {k.lower() for k, _ in headers}
        if "content-type" not in names and response.status not in (204, 304):
            headers.insert(0, ("Content-Type", response.content_type))
        if response.status not in (204, 304):
            headers.append(("Content-Length", str(len(response.body))))
        headers.append(("Connection", "keep-alive" if keep_alive else "close"))
        try:
            reason = HTTPStatus(response.status).phrase.encode("ascii")
        except ValueError:
            reason = b"Unknown"
        data = h.send(h11.Response(status_code=response.status, headers=headers,
                                   reason=reason)) or b""
        if response.body and not head_only and response.status not in (204, 304):
            data += h.send(h11.Data(data=response.body)) or b""
        data += h.send(h11.EndOfMessage()) or b""
        await self._send_raw(writer, data)

    async def _send_raw(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        try:
            await within(writer.drain(), self._write_timeout)
        except TimeoutError:
            raise _Gone() from None


_PROTOCOL_MESSAGES = {
    400: "malformed request",
    431: "request head too large",
}


def _keep_alive(request: Request, h: h11.Connection) -> bool:
    if h.their_http_version == b"1.0":
        return False  # HTTP/1.0 closes (we do not do 1.0 keep-alive)
    return "close" not in request.headers.get("connection", "").lower()
