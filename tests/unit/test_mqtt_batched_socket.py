"""BatchedSocket over a real socket pair: pieces read from one large read, batched writes."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from protocols.mqtt.batched_socket import BatchedSocket


@pytest.fixture
def pair() -> Iterator[tuple[BatchedSocket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield BatchedSocket(a), b
    a.close()
    b.close()


def test_reads_pieces_from_one_buffer_and_says_what_is_pending(
        pair: tuple[BatchedSocket, socket.socket]) -> None:
    sock, peer = pair
    peer.sendall(b"\x30\x05hello\x30\x02ok")
    assert sock.recv(1) == b"\x30"
    assert sock.pending() == 10  # the rest came in the same read
    assert sock.recv(1) == b"\x05"
    assert sock.recv(5) == b"hello"
    assert sock.recv(1) == b"\x30"
    assert sock.recv(100) == b"\x02ok"  # never more than is buffered
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    peer.close()
    assert sock.recv(1) == b""  # closed by the peer


def test_writes_are_batched_until_flush_and_survive_a_full_socket(
        pair: tuple[BatchedSocket, socket.socket]) -> None:
    sock, peer = pair
    assert sock.send(b"\x40\x02\x00\x01") == 4
    assert sock.send(b"\x40\x02\x00\x02") == 4
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)  # nothing sent before flush
    assert sock.flush() is True
    assert peer.recv(100) == b"\x40\x02\x00\x01\x40\x02\x00\x02"
    big = b"x" * (4 * 1024 * 1024)
    sock.send(big)
    assert sock.flush() is False  # the kernel buffer is full: the rest waits
    received = bytearray()
    while len(received) < len(big):
        try:
            received += peer.recv(1 << 20)
        except BlockingIOError:
            assert sock.flush() in (True, False)
    assert sock.flush() is True and bytes(received) == big
