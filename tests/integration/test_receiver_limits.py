"""The reference receiver under hostile input (issue 11, #10): bounded memory, a per-item 400
for an item it cannot store, and nothing that blocks its event loop. Real sockets.

Before: every request was kept forever (20,000 rejected POSTs: +52 MiB), a 4 MiB batch of
``{}`` blocked the loop for 7 s, and one item with ``time={...}``, ``time=2**70`` or a lone
surrogate id turned the whole batch into a 500 that the agent retried forever."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.receiver import CE_BATCH, KEEP_REQUESTS, Receiver

SOURCE = "/sites/s/lines/l/machines/m1"


def event(i: int, **extra: object) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"ev-{i}", "source": SOURCE,
            "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
            "data": {"quantity": i}, **extra}


@pytest.fixture
async def rx(tmp_path: Path) -> AsyncIterator[Receiver]:
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    yield receiver
    await receiver.aclose()


async def test_an_item_that_cannot_be_stored_gets_its_own_400(rx: Receiver) -> None:
    body = ("[" + ",".join([
        json.dumps(event(1)),
        json.dumps(event(2, time={"nested": True})),
        json.dumps(event(3, time=2**70)),
        json.dumps(event(4)).replace('"ev-4"', '"ev-\\ud800"'),  # a lone surrogate
        json.dumps(event(5, id="x" * 5000)),
        json.dumps(event(6)),
    ]) + "]").encode()
    async with httpx.AsyncClient() as client:
        r = await client.post(rx.url, content=body, headers={"Content-Type": CE_BATCH})
    assert r.status_code == 207, r.text
    statuses = [item["status"] for item in r.json()["results"]]
    assert statuses == [201, 400, 400, 400, 400, 201]
    assert rx.stats()["received"] == 2


async def test_a_huge_batch_is_refused_without_stalling_other_requests(rx: Receiver) -> None:
    body = b"[" + b",".join([b"{}"] * (2 * 2**20 - 1)) + b"]"  # 4 MiB of {}
    async with httpx.AsyncClient(timeout=30) as client:
        post = asyncio.create_task(client.post(rx.url, content=body,
                                               headers={"Content-Type": CE_BATCH}))
        await asyncio.sleep(0)  # the POST is on its way (ordering, not timing)
        slowest = 0.0
        while not post.done():
            started = time.monotonic()
            assert (await client.get(rx.url.replace("/events", "/stats"))).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
        r = await post
    assert r.status_code == 413
    assert slowest < 1.0, f"a GET waited {slowest:.1f}s while the batch was read"


async def test_the_request_log_is_bounded(rx: Receiver) -> None:
    n = 2 * KEEP_REQUESTS + 100
    reader, writer = await asyncio.open_connection("127.0.0.1", rx.port)
    one = (b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
           b"Content-Length: 2\r\n\r\nhi")

    async def count_answers() -> int:
        seen = b""
        while seen.count(b"HTTP/1.1 415") < n:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, "the receiver closed the connection"
            seen += chunk
        return seen.count(b"HTTP/1.1 415")

    answering = asyncio.create_task(count_answers())  # read while writing, as a client must
    writer.write(one * n)
    await writer.drain()
    assert await answering == n
    writer.close()
    assert KEEP_REQUESTS <= len(rx.requests) < 2 * KEEP_REQUESTS
    assert rx.requests[-1].status == 415
