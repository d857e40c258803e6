"""A thread that answers the health listener while the event loop is stalled.

``/healthz`` is served by the event loop it checks: when the loop is blocked (a CPU-bound bug,
a blocking call in a plugin) nobody accepts the connection and a liveness probe sees a
timeout, not the promised 503. This guard watches the loop's heartbeat (``last_tick``, set by
the runtime's ticker) from a plain thread and, only while the heartbeat is older than
``stall_after``, accepts connections on the same listening socket itself and answers::

    /healthz, /readyz   503 {"status": "stalled", "tick_age_s": ...}
    /                   503, a short HTML page that refreshes itself (a status page on a wall
                        screen comes back by itself once the loop turns again)
    anything else       503 {"error": "event loop stalled", "tick_age_s": ...}
                        (any method: a POST of a reason may be retried, it is not refused)

States::

    watching --heartbeat older than stall_after--> answering --heartbeat fresh--> watching
        \\--stop()--> stopped <--stop()--/

While watching it never touches the socket, so the loop's server serves every request, and it
sleeps until the heartbeat could first be stale (about once per ``stall_after`` while the loop
ticks, not at a fixed rate); while answering it polls the socket every 0.1 s. The
socket is shared (a duplicate descriptor of the same listening socket, which is non-blocking):
the thread waits with ``select`` and an ``accept`` the loop won is simply a
``BlockingIOError``. A connection accepted just as the loop recovers still gets a correct
answer: the heartbeat is read again when answering.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

__all__ = ["StallGuard"]

log = logging.getLogger(__name__)

_POLL = 0.1
_CLIENT_TIMEOUT = 2.0
_MAX_HEAD = 16 * 1024


class StallGuard:
    def __init__(self, listener_fd: int, last_tick: Callable[[], float],
                 stall_after: float) -> None:
        # Our own descriptor for the same listening socket: closing it leaves the loop's alone.
        self._sock = socket.socket(fileno=os.dup(listener_fd))
        self._last_tick = last_tick
        self._stall_after = stall_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-stall-guard",
                                        daemon=True)
        self.answered = 0  # requests this thread answered (tests, logs)
        self.wakeups = 0  # times the thread looked at the heartbeat (tests: it stays cheap)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _age(self) -> float:
        return time.monotonic() - self._last_tick()

    def _run(self) -> None:
        stalled = False
        while not self._stop.is_set():
            self.wakeups += 1
            age = self._age()
            if age <= self._stall_after:
                if stalled:
                    log.info("event loop turns again; the health endpoint answers normally")
                stalled = False
                # Nothing can be stale before the heartbeat is stall_after old: sleep till then.
                self._stop.wait(max(_POLL, self._stall_after - age + 0.01))
                continue
            if not stalled:
                log.error("event loop stalled for %.1fs; /healthz answers 503 from a watchdog "
                          "thread", age)
                stalled = True
            try:
                readable, _, _ = select.select([self._sock], [], [], _POLL)
            except (OSError, ValueError):
                return  # the socket was closed: stopping
            if not readable:
                continue
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the loop took it
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(_CLIENT_TIMEOUT)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) == 3 else ""
        exact = self._age()
        age = round(exact, 1)
        doc: dict[str, object]
        method = parts[0] if len(parts) == 3 else b""
        if exact <= self._stall_after and path == "/healthz" and method in (b"GET", b"HEAD"):
            status, doc = 200, {"status": "ok"}
        elif path in ("/healthz", "/readyz"):
            status, doc = 503, {"status": "stalled", "tick_age_s": age}
        else:
            status, doc = 503, {"error": "event loop stalled", "tick_age_s": age}
        body, kind = json.dumps(doc).encode(), "application/json"
        if path == "/" and status == 503:
            body, kind = _page(age), "text/html; charset=utf-8"
        reason = "OK" if status == 200 else "Service Unavailable"
        head_only = method == b"HEAD"
        response = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    "Cache-Control: no-store\r\n\r\n").encode() + (b"" if head_only else body)
        with contextlib.suppress(OSError):
            conn.sendall(response)
        self.answered += 1



def _page(age: float) -> bytes:
    """The status page's stand-in while the loop is stalled: it keeps refreshing, so the real
    page comes back by itself."""
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            '<meta http-equiv="refresh" content="5"><title>edge agent: stalled</title></head>'
            f"<body><h1>Edge agent: event loop stalled for {age:.0f}s</h1>"
            "<p>The agent does not answer; this page tries again every 5 seconds.</p>"
            "</body></html>").encode()
