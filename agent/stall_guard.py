"""A thread that answers the health listener while the event loop is stalled.

``/healthz`` is served by the event loop it checks: when the loop is blocked (a CPU-bound bug,
a blocking call in a plugin) nobody accepts the connection and a liveness probe sees a
timeout, not the promised 503. This guard watches the loop's heartbeat (``last_tick``, set by
the runtime's ticker) from a plain thread and, only while the heartbeat is older than
``stall_after``, accepts connections on the same listening socket itself and answers::

    /healthz, /readyz   503 {"status": "stalled", "tick_age_s": ...}
    anything else       503 {"error": "event loop stalled", "tick_age_s": ...}
                        (GET and HEAD, and POST for reason entry; other methods 405)

States::

    watching --heartbeat older than stall_after--> answering --heartbeat fresh--> watching
        \\--stop()--> stopped <--stop()--/

While watching it never touches the socket, so the loop's server serves every request. The
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
            age = self._age()
            if age <= self._stall_after:
                if stalled:
                    log.info("event loop turns again; the health endpoint answers normally")
                stalled = False
                self._stop.wait(_POLL)
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
        if method not in (b"GET", b"HEAD") and not (method == b"POST"
                                                    and path.startswith("/machines/")):
            # (A reason entry POST gets the 503 below: the operator's terminal should say
            # "try again", not that the command was wrong.)
            status, doc = 405, {"error": "method not allowed"}
        elif exact <= self._stall_after and path == "/healthz":
            status, doc = 200, {"status": "ok"}
        elif path in ("/healthz", "/readyz"):
            status, doc = 503, {"status": "stalled", "tick_age_s": age}
        else:
            status, doc = 503, {"error": "event loop stalled", "tick_age_s": age}
        body = json.dumps(doc).encode()
        reason = {200: "OK", 405: "Method Not Allowed"}.get(status, "Service Unavailable")
        head_only = method == b"HEAD"
        response = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                    "Cache-Control: no-store\r\n\r\n").encode() + (b"" if head_only else body)
        with contextlib.suppress(OSError):
            conn.sendall(response)
        self.answered += 1

