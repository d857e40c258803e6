"""A stand-in for paho's socket that batches system calls (used by ``bridge.py``)."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

__all__ = ["BatchedSocket"]


class BatchedSocket:
    """Stands in for paho's socket so that it costs one system call per burst, not several
    per packet.

    - Reading: paho reads a packet in pieces (1 byte of type, the length byte by byte, then
      the rest). ``recv`` serves them from one large read; ``pending`` counts what is buffered
      here (plus what TLS holds), and the read burst keeps going while it is non-zero, since
      the selector cannot see it.
    - Writing: what paho writes while we read a burst (a PUBACK per QoS 1 message, a
      SUBSCRIBE) goes into a buffer (``send`` always succeeds) and ``flush`` writes it out,
      saying whether everything went (else the connection waits for writability).

    Everything else (fileno, setblocking, getpeercert...) goes to the real socket.
    """

    __slots__ = ("_in", "_out", "_pos", "_sock")

    _CHUNK = 65536

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._in = b""
        self._pos = 0
        self._out = bytearray()

    def recv(self, size: int) -> bytes:
        data, pos = self._in, self._pos
        if pos >= len(data):
            data = self._sock.recv(max(size, self._CHUNK))  # BlockingIOError passes through
            if len(data) <= size:
                self._in, self._pos = b"", 0
                return bytes(data)
            self._in, pos = data, 0
        end = min(pos + size, len(data))
        self._pos = end
        return data[pos:end]

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._in) - self._pos + (inner() if inner is not None else 0)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self._out += data
        return len(data)

    def flush(self) -> bool:
        out = self._out
        while out:
            try:
                sent = self._sock.send(out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            del out[:sent]
        return True

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()  # a DISCONNECT paho just wrote
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
