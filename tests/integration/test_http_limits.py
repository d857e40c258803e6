"""The health listener and the HTTP server under hostile clients (issue 11, #6 and #12).

A real agent subprocess serves ``/healthz``; the clients are raw sockets. Before the fix a GET
body was read whole (24 x 16 MiB took the agent from ~54 to ~406 MiB), ``Content-Length: ²``
killed the connection handler with a traceback, ``HTTP/1.9junk`` was accepted, connections were
not capped and a client that never read kept its socket forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import AgentProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from bench_http_flood import flood_one, healthz, rss_mib, write_config  # noqa: E402

from agent.httpserver import HttpServer, Request, Response  # noqa: E402


class Agent:
    def __init__(self, proc: AgentProcess, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    write_config(cfg, tmp_path / "data", port)
    proc = AgentProcess(cfg, tmp_path / "agent.log")
    proc.start()
    try:
        await wait_until(lambda: _is(healthz(port, 1), 200), timeout=30, interval=0.1,
                         what="agent up")
        yield Agent(proc, port, tmp_path / "agent.log")
    finally:
        proc.terminate()
    assert "Traceback" not in (tmp_path / "agent.log").read_text(errors="replace")


async def _is(probe: object, status: int) -> bool:
    return await probe == status  # type: ignore[misc]


async def exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


@pytest.mark.slow
async def test_a_get_body_flood_costs_the_agent_no_memory(agent: Agent) -> None:
    before = rss_mib(agent.pid)
    peak = before
    flood = asyncio.gather(*(flood_one(agent.port, 16 * 2**20) for _ in range(24)))
    while not flood.done():
        peak = max(peak, rss_mib(agent.pid))
        await asyncio.sleep(0.02)
    await flood
    assert await healthz(agent.port) == 200
    assert peak - before < 40, f"RSS {before:.0f} -> {peak:.0f} MiB under the flood"


@pytest.mark.parametrize(("raw", "status"), [
    ("POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n".encode(), b"400"),
    (b"GET /healthz HTTP/1.9junk\r\nHost: x\r\n\r\n", b"400"),
    (b"GET /healthz HTTP/1.9\r\nHost: x\r\n\r\n", b"505"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789", b"413"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", b"400"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     b"400"),
    (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, b"400"),
])
async def test_malformed_requests_get_a_4xx_and_no_traceback(agent: Agent, raw: bytes,
                                                             status: bytes) -> None:
    answer = await exchange(agent.port, raw)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert await healthz(agent.port) == 200


async def test_idle_connections_are_capped_and_healthz_still_answers(agent: Agent) -> None:
    base = agent.fds()
    held = []
    for _ in range(100):
        held.append(await asyncio.open_connection("127.0.0.1", agent.port))
    try:
        assert await healthz(agent.port) == 200
        await wait_until(lambda: agent.fds() <= base + 32 + 2, timeout=5,
                         what="idle connections beyond the cap closed")
    finally:
        for _, w in held:
            w.close()


async def _pipeline_and_never_read(port: int, stop: asyncio.Event) -> None:
    with contextlib.suppress(OSError):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        _, writer = await asyncio.open_connection(sock=sock)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1000
        while not stop.is_set():
            writer.write(request)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                await stop.wait()  # the server stopped reading: hold the socket, read nothing
        writer.transport.abort()


@pytest.mark.slow
async def test_clients_that_never_read_lose_their_connections(agent: Agent) -> None:
    base = agent.fds()
    stop = asyncio.Event()
    hogs = [asyncio.create_task(_pipeline_and_never_read(agent.port, stop)) for _ in range(10)]
    try:
        await wait_until(lambda: agent.fds() >= base + 8, timeout=10, what="hogs connected")
        # Within the write timeout (5 s) the server drops them (the hogs keep their ends
        # open) and answers others again.
        await wait_until(lambda: agent.fds() <= base + 2, timeout=15, interval=0.2,
                         what="the sockets of clients that never read closed")
        assert await healthz(agent.port) == 200
    finally:
        stop.set()
        await asyncio.gather(*hogs)


async def test_body_limits_are_per_route_and_gets_take_none() -> None:
    seen: list[Request] = []

    async def handler(req: Request) -> Response:
        seen.append(req)
        return Response.json({"len": len(req.body)})

    def limit(method: str, path: str) -> int:
        return 100 if path == "/small" else 0 if method == "GET" else 10_000

    server = HttpServer(handler, "127.0.0.1", 0, body_limit=limit)
    port = await server.start()
    try:
        ok = await exchange(port, b"POST /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"Content-Length: 5000\r\n\r\n" + b"x" * 5000)
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b'{"len":5000}')
        small = await exchange(port, b"POST /small HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 5000\r\n\r\n")
        assert small.startswith(b"HTTP/1.1 413")
        get = await exchange(port, b"GET /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
        assert get.startswith(b"HTTP/1.1 413")
        assert len(seen) == 1
    finally:
        await server.aclose()
