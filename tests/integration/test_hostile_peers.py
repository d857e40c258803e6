"""A central API or token endpoint that answers hostile bodies (a real server on loopback):
the sink turns each into a retry with a clear detail, never an exception out of ``deliver``
(which logged a traceback on every attempt)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.httpserver import HttpServer, Request, Response
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import HttpSinkConfig
from agent.sinks.http import HttpSink

SOURCE = "/sites/s/lines/l/machines/m1"
DEEP = b"[" * 50000 + b"]" * 50000  # deeper than json.loads can recurse


def event(i: int) -> OutboundEvent:
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": SOURCE,
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "data": {"quantity": i}}
    return OutboundEvent(str(doc["id"]), SOURCE, json.dumps(doc))


async def hostile(req: Request) -> Response:
    if req.path == "/token":
        return Response(200, DEEP)
    if req.path == "/token-refused":
        return Response(400, b'{"error": ' + DEEP + b"}")
    return Response(207, b'{"results": ' + DEEP + b"}")


@pytest.fixture
async def base() -> AsyncIterator[str]:
    server = HttpServer(hostile, "127.0.0.1", 0)
    port = await server.start()
    yield f"http://127.0.0.1:{port}"
    await server.aclose()


def sink(base: str, tmp: Path, token_path: str | None = None) -> HttpSink:
    cfg: dict[str, object] = {"type": "http", "url": f"{base}/events", "timeout": "2s",
                              "mode": "batch"}
    if token_path is not None:
        (tmp / "secret").write_text("Client-Secret-42")
        cfg["auth"] = {"oauth2": {"token_url": f"{base}{token_path}", "client_id": "edge",
                                  "client_secret": f"${{file:{tmp / 'secret'}}}"}}
    return HttpSink("erp", HttpSinkConfig.model_validate(cfg))


@pytest.mark.parametrize("token_path, outcome", [
    (None, Outcome.RETRY), ("/token", Outcome.RETRY), ("/token-refused", Outcome.HOLD)])
async def test_json_nested_too_deep_is_an_answer_not_an_exception(
        base: str, tmp_path: Path, token_path: str | None, outcome: Outcome) -> None:
    s = sink(base, tmp_path, token_path)
    try:
        delivery = await s.deliver([event(1), event(2)])
    finally:
        await s.aclose()
    assert delivery.outcome is outcome, delivery
    assert "RecursionError" not in delivery.detail  # understood, not an unexpected failure


async def _endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP peer that answers every request with a body that never ends."""
    with contextlib.suppress(ConnectionError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
        for _ in range(2**14):  # 1 GiB if nobody stops reading
            writer.write(chunk)
            await writer.drain()


@pytest.mark.parametrize("token", [False, True])
async def test_an_endless_answer_is_not_read_into_memory(tmp_path: Path, token: bool) -> None:
    server = await asyncio.start_server(_endless, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    s = sink(base, tmp_path, "/token" if token else None)
    before = _rss_mib()
    try:
        delivery = await asyncio.wait_for(s.deliver([event(1), event(2)]), 30)
    finally:
        await s.aclose()
        server.close()
    assert delivery.outcome is Outcome.RETRY, delivery
    assert "larger than" in delivery.detail
    assert _rss_mib() - before < 64  # the whole answer would be 1 GiB


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_a_compressed_answer_is_read_once_decoded() -> None:
    """The bounded read decodes gzip; the response it builds must not decode again."""
    async def gzipped(_req: Request) -> Response:
        return Response(422, gzip.compress(b'{"error": "quantity must be positive"}'),
                        {"Content-Encoding": "gzip"})

    server = HttpServer(gzipped, "127.0.0.1", 0)
    port = await server.start()
    s = HttpSink("erp", HttpSinkConfig.model_validate(
        {"type": "http", "url": f"http://127.0.0.1:{port}/events", "timeout": "2s"}))
    try:
        delivery = await s.deliver([event(1)])
    finally:
        await s.aclose()
        await server.aclose()
    assert delivery.outcome is Outcome.REJECTED, delivery
    assert "quantity must be positive" in delivery.detail


async def test_an_answer_dripped_inside_the_read_timeout_is_cut_off(tmp_path: Path) -> None:
    """A byte every half second never trips httpx's per-chunk read timeout; the whole answer
    must still arrive within the sink's timeout (the sink was held as long as the peer liked)."""
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 207 Multi-Status\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n")
            for _ in range(1000):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.5)

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    s = HttpSink("erp", HttpSinkConfig.model_validate({
        "type": "http", "url": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/e",
        "timeout": "1s"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        delivery = await asyncio.wait_for(s.deliver([event(1)]), 30)
    finally:
        await s.aclose()
        server.close()
    assert delivery.outcome is Outcome.RETRY and "timeout" in delivery.detail, delivery
    assert loop.time() - started < 5


async def test_the_fleet_heartbeat_reads_no_endless_answer() -> None:
    from agent.fleet import _Beat
    from agent.sinks.bounded import AnswerTooLarge
    from agent.wiring.schema import FleetConfig

    server = await asyncio.start_server(_endless, "127.0.0.1", 0)
    beat = _Beat(FleetConfig.model_validate({
        "url": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/fleet", "timeout": "5s"}))
    before = _rss_mib()
    try:
        with pytest.raises(AnswerTooLarge):
            await asyncio.wait_for(beat.send({"agent": "a"}), 30)
    finally:
        await beat.http.aclose()
        server.close()
    assert _rss_mib() - before < 64
