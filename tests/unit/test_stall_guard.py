"""The stall guard on a real listening socket, with a heartbeat the test controls."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from agent.stall_guard import StallGuard


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)  # as the event loop's server leaves it
    yield sock
    sock.close()


def _request(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(raw)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer


def test_watching_a_ticking_loop_wakes_about_once_per_limit(listener: socket.socket) -> None:
    """While the heartbeat stays fresh the thread sleeps until it could first be stale, not
    every 0.1 s: over 1 s with a 5 s limit it looks once (a 10 Hz poll looked 10 times)."""
    guard = StallGuard(listener.fileno(), time.monotonic, stall_after=5.0)
    guard.start()
    try:
        time.sleep(1.0)  # the measured interval itself, not a synchronisation
    finally:
        guard.stop()
    assert 1 <= guard.wakeups <= 2 and guard.answered == 0


def test_a_stalled_loop_gets_503_for_every_method(listener: socket.socket) -> None:
    """A POST of a reason while the loop is stalled is 503 (retry later), never 405 (the
    method is allowed there: the loop's server takes it once it turns again)."""
    stale = time.monotonic() - 60
    guard = StallGuard(listener.fileno(), lambda: stale, stall_after=1.0)
    guard.start()
    port = listener.getsockname()[1]
    try:
        got = _request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503 ") and b'"status": "stalled"' in got
        body = b'{"reason_code": "20"}'
        got = _request(port, b"POST /machines/m1/episodes/open/reason HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body))
        assert got.startswith(b"HTTP/1.1 503 ") and b"event loop stalled" in got
        got = _request(port, b"HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503 ") and got.endswith(b"\r\n\r\n")
        assert guard.answered == 3
    finally:
        guard.stop()


def test_stop_ends_the_thread_promptly(listener: socket.socket) -> None:
    guard = StallGuard(listener.fileno(), time.monotonic, stall_after=30.0)
    guard.start()
    started = time.monotonic()
    guard.stop()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "health-stall-guard" and t.is_alive()
                   for t in threading.enumerate())


def test_status_of_a_stalled_agent_says_so_and_exits_1(
        listener: socket.socket, capsys: pytest.CaptureFixture[str]) -> None:
    """The stall guard answers; `status` must not call that "no agent answers" (exit 3)."""
    from agent.status_cli import status_main

    stale = time.monotonic() - 60
    guard = StallGuard(listener.fileno(), lambda: stale, stall_after=1.0)
    guard.start()
    try:
        code = status_main(f"http://127.0.0.1:{listener.getsockname()[1]}", False)
    finally:
        guard.stop()
    err = capsys.readouterr().err
    assert code == 1 and "answers HTTP 503" in err and "event loop stalled" in err


def test_the_status_page_keeps_refreshing_while_stalled(listener: socket.socket) -> None:
    """A wall screen showing / must come back by itself: the stand-in page refreshes too
    (a JSON error has no refresh, and the screen stayed on it)."""
    stale = time.monotonic() - 60
    guard = StallGuard(listener.fileno(), lambda: stale, stall_after=1.0)
    guard.start()
    try:
        got = _request(listener.getsockname()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        guard.stop()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Content-Type: text/html" in head
    assert b'http-equiv="refresh"' in body and b"stalled for 60s" in body
