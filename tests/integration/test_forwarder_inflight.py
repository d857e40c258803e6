"""Requests in flight at once, against the real receiver and the real SQLite buffer.

Two invariants, each with a check that can fail:

- no duplicate on the wire without a crash: an outage longer than the lease timeout during a
  backlog drain (rows leased ahead wait while the oldest request is retried) sends every event
  in exactly one accepted request;
- per machine order: no two requests in flight at once carry events of the same machine, and
  a machine's events arrive in append order, also around a poison event that is
  dead-lettered; yet more than one request does run at once.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from support import wait_until

from agent.receiver import Receiver
from agent.runtime.forwarder import Forwarder
from agent.sinks.base import Delivery, OutboundEvent, Sink
from agent.sinks.config import HttpSinkConfig, RetryPolicy
from agent.sinks.http import HttpSink
from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer

FAST = RetryPolicy(initial_backoff="20ms", max_backoff="100ms")


def event(i: int, machine: str) -> NewEvent:
    doc = {"specversion": "1.0", "id": f"ev-{i:04d}",
           "source": f"/sites/s/lines/l/machines/{machine}",
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "datacontenttype": "application/json", "sequence": str(i),
           "data": {"quantity": i}}
    return NewEvent(doc["id"], machine, doc["type"], "2026-01-01T00:00:00.000Z",
                    json.dumps(doc, separators=(",", ":"), sort_keys=True))


class Watched(Sink):
    """Delegates to the HTTP sink and records which machines are in flight."""

    def __init__(self, inner: HttpSink) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.flying: Counter[str] = Counter()
        self.overlaps: list[str] = []  # machines sent while already in flight (must stay [])
        self.most_at_once = 0
        self._at_once = 0

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @property
    def max_in_flight(self) -> int:
        return self.inner.max_in_flight

    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        machines = {e.source.rsplit("/", 1)[1] for e in events}
        self.overlaps += [m for m in machines if self.flying[m]]
        self.flying.update(machines)
        self._at_once += 1
        self.most_at_once = max(self.most_at_once, self._at_once)
        try:
            return await self.inner.deliver(events)
        finally:
            self._at_once -= 1
            self.flying.subtract(machines)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    rx = Receiver(tmp_path / "rx.db", "127.0.0.1", 0)
    await rx.start()
    yield rx
    await rx.aclose()


async def _run(receiver: Receiver, tmp_path: Path, events: list[NewEvent], *,
               lease_timeout: float, lease_batch: int, outage: int = 0) -> Watched:
    buf = AsyncBuffer(SqliteBuffer(tmp_path / "buf.db", 2**30, synchronous="OFF",
                                   lease_timeout=lease_timeout))
    await buf.open(["erp"])
    config = HttpSinkConfig.model_validate({
        "type": "http", "url": receiver.url, "mode": "batch", "batch_max_events": 5,
        "max_in_flight": 3, "timeout": "5s"})
    sink = Watched(HttpSink("erp", config))
    fw = Forwarder(sink, buf, FAST, lease_batch=lease_batch, poll_interval=3600.0)
    await buf.append(events, {})
    if outage:
        receiver.inject(503, count=outage)
    task = asyncio.create_task(fw.run())
    fw.wake()
    try:
        async def drained() -> bool:
            st = (await buf.stats()).sinks["erp"]
            return st.pending + st.leased == 0
        await wait_until(drained, timeout=30, what="backlog drained")
    finally:
        await fw.stop(5.0)
        await task
        await sink.aclose()
        await buf.aclose()
    return sink


async def test_an_outage_longer_than_the_lease_timeout_sends_nothing_twice(
        receiver: Receiver, tmp_path: Path) -> None:
    events = [event(i, f"m{i % 4}") for i in range(120)]
    # Leases of 20 rows time out after 0.3 s; 503s with 20-100 ms backoff last well over that,
    # while the rows leased ahead wait behind the request being retried.
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _run(receiver, tmp_path, events, lease_timeout=0.3, lease_batch=20, outage=12)
    assert loop.time() - started > 0.3
    failed = [r for r in receiver.requests if r.status == 503]
    assert len(failed) == 12
    copies = Counter(i for r in receiver.requests if r.status < 300 for i in r.ids)
    assert copies == Counter({e.id: 1 for e in events})  # each on the wire once, accepted
    assert receiver.stats() == {"received": 120, "duplicates": 0}


async def test_requests_in_flight_never_share_a_machine(receiver: Receiver,
                                                        tmp_path: Path) -> None:
    events = [event(i, f"m{i % 6}") for i in range(300)]
    receiver.faults.reject_ids = {"ev-0040"}  # refused (422): dead-lettered after bisection
    sink = await _run(receiver, tmp_path, events, lease_timeout=60.0, lease_batch=60,
                      outage=3)
    assert sink.overlaps == []
    assert sink.most_at_once > 1  # it did run requests in parallel
    got = receiver.events()
    assert len(got) == 299 and receiver.stats()["duplicates"] == 0
    for m in {e.key for e in events}:
        mine = [int(d["sequence"]) for d in got if d["source"].endswith(f"/{m}")]
        assert mine == sorted(mine), f"{m} out of order"
