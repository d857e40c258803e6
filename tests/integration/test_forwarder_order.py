"""Per-machine order with several requests in flight, against a receiver that misbehaves.

The promise checked here, at the receiver, for every request as it arrives: no event of a
machine arrives before every earlier event of that machine was accepted or dead-lettered
(answered for good), unless the earlier one is in the same request ahead of it. The receiver
answers some requests slowly, some 503 (nothing taken), and some 207 with a per-item 422 (that
item is dead-lettered, the others accepted). The real HTTP sink, forwarder and SQLite buffer.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import wait_until

from agent.httpserver import HttpServer, Request, Response
from agent.runtime.components import Components
from agent.runtime.forwarder import Forwarder
from agent.sinks.config import HttpSinkConfig, RetryPolicy
from agent.sinks.http import HttpSink
from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer

FAST = RetryPolicy(initial_backoff="10ms", max_backoff="50ms")


def event(i: int, machine: str) -> NewEvent:
    doc = {"specversion": "1.0", "id": f"{machine}-{i:04d}",
           "source": f"/sites/s/lines/l/machines/{machine}",
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "datacontenttype": "application/json", "data": {"quantity": i}}
    return NewEvent(doc["id"], machine, doc["type"], "2026-01-01T00:00:00.000Z",
                    json.dumps(doc, separators=(",", ":"), sort_keys=True))


@dataclass
class Judge:
    """A receiver that checks order on arrival; its misbehaviour comes from a seeded rng."""

    order: dict[str, list[str]]  # machine -> its event ids in append order
    dead: set[str]  # ids answered 422 in a 207
    rng: random.Random = field(default_factory=lambda: random.Random(12))
    slow: float = 0.25  # share of requests answered after a pause
    unavailable: float = 0.15  # share answered 503
    resolved: set[str] = field(default_factory=set)  # accepted or dead-lettered
    accepted: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    flying = 0
    most_at_once = 0

    def check(self, ids: list[str]) -> None:
        seen: set[str] = set()
        for event_id in ids:
            machine = event_id.split("-")[0]
            for earlier in self.order[machine]:
                if earlier == event_id:
                    break
                if earlier not in self.resolved and earlier not in seen:
                    self.violations.append(f"{event_id} arrived before {earlier} was answered")
            seen.add(event_id)

    async def handle(self, request: Request) -> Response:
        ids = [doc["id"] for doc in json.loads(request.body)]
        self.check(ids)
        self.flying += 1
        self.most_at_once = max(self.most_at_once, self.flying)
        try:
            roll = self.rng.random()
            if roll < self.slow:
                await asyncio.sleep(self.rng.uniform(0.02, 0.12))
            elif roll < self.slow + self.unavailable:
                await asyncio.sleep(self.rng.uniform(0.0, 0.03))
                self.statuses[503] += 1
                return Response.json({"error": "try later"}, 503)
            else:
                await asyncio.sleep(0)  # let the other requests in flight arrive
            results = []
            for event_id in ids:
                if event_id in self.dead:
                    results.append({"id": event_id, "status": 422, "detail": "refused"})
                else:
                    results.append({"id": event_id, "status": 201})
                    self.accepted[event_id] += 1
                self.resolved.add(event_id)
            self.statuses[207] += 1
            return Response.json({"results": results}, 207)
        finally:
            self.flying -= 1


@pytest.fixture
async def judged() -> AsyncIterator[tuple[Judge, str, list[NewEvent]]]:
    rng = random.Random(7)
    machines = [f"m{k}" for k in range(7)]
    # Uneven: some machines have many events, some few, interleaved at random.
    weights = [8, 5, 3, 2, 1, 1, 1]
    keys = rng.choices(machines, weights, k=400)
    events = [event(i, key) for i, key in enumerate(keys)]
    order: dict[str, list[str]] = {m: [] for m in machines}
    for e in events:
        order[e.key].append(e.id)
    dead = {e.id for e in rng.sample(events, 12)}
    judge = Judge(order, dead)
    server = HttpServer(judge.handle, "127.0.0.1", 0)
    port = await server.start()
    try:
        yield judge, f"http://127.0.0.1:{port}/events", events
    finally:
        await server.aclose()


async def test_no_machine_event_overtakes_an_unanswered_earlier_one(
        judged: tuple[Judge, str, list[NewEvent]], tmp_path: Path) -> None:
    judge, url, events = judged
    buf = AsyncBuffer(SqliteBuffer(tmp_path / "buf.db", 2**30, synchronous="OFF"))
    await buf.open(["erp"])
    config = HttpSinkConfig.model_validate({
        "type": "http", "url": url, "mode": "batch", "batch_max_events": 6,
        "max_in_flight": 4, "timeout": "5s"})
    sink = HttpSink("erp", config)
    # Small leases: rows keep arriving while requests are in flight and being retried.
    fw = Forwarder(sink, buf, FAST, lease_batch=17, poll_interval=3600.0)
    await buf.append(events, {})
    task = asyncio.create_task(fw.run())
    fw.wake()
    try:
        async def drained() -> bool:
            st = (await buf.stats()).sinks["erp"]
            return st.pending + st.leased == 0
        await wait_until(drained, timeout=60, what="backlog drained")
        stats = (await buf.stats()).sinks["erp"]
    finally:
        await fw.stop(5.0)
        await task
        await sink.aclose()
        await buf.aclose()
    assert judge.violations == []
    assert judge.statuses[503] > 5 and judge.most_at_once > 1  # the faults did happen
    # Nothing lost, nothing twice (no crash, no timeout), every refused one a dead letter.
    assert judge.accepted == Counter({e.id: 1 for e in events if e.id not in judge.dead})
    assert stats.dead_letters == len(judge.dead)
    assert fw.dead_lettered_total == len(judge.dead)


async def test_a_replaced_forwarder_gives_its_rows_back_and_order_holds(
        judged: tuple[Judge, str, list[NewEvent]], tmp_path: Path) -> None:
    """A reload replaces a sink while its forwarder retries (the usual reason to reload: the
    receiver refused). What the old forwarder leased must be offered to the new one at once,
    before the newer rows of the same machines (a lease left to time out, 60 s, would let the
    new forwarder send those first)."""
    judge, url, events = judged
    judge.dead.clear()
    judge.slow, judge.unavailable = 0.0, 1.0  # the old sink's receiver answers 503 only
    buf = AsyncBuffer(SqliteBuffer(tmp_path / "buf.db", 2**30, synchronous="OFF"))
    await buf.open(["erp"])
    config = HttpSinkConfig.model_validate({
        "type": "http", "url": url, "mode": "batch", "batch_max_events": 4,
        "max_in_flight": 2, "timeout": "5s"})
    try:
        await buf.append(events, {})
        old_sink = HttpSink("erp", config)
        old = Forwarder(old_sink, buf, FAST, lease_batch=20, poll_interval=3600.0)
        old_task = asyncio.create_task(old.run())
        await wait_until(lambda: judge.statuses[503] >= 3, timeout=10, what="503s")
        held = (await buf.stats()).sinks["erp"].leased
        assert held >= 4
        await old.stop(1.0)  # as components.replace_sink does
        await old_task
        await old_sink.aclose()
        assert (await buf.stats()).sinks["erp"].leased == 0  # given back
        judge.unavailable = 0.0
        new_sink = HttpSink("erp", config)
        new = Forwarder(new_sink, buf, FAST, lease_batch=20, poll_interval=3600.0)
        new_task = asyncio.create_task(new.run())
        new.wake()
        try:
            async def drained() -> bool:
                st = (await buf.stats()).sinks["erp"]
                return st.pending + st.leased == 0
            await wait_until(drained, timeout=20, what="backlog drained by the new forwarder")
        finally:
            await new.stop(5.0)
            await new_task
            await new_sink.aclose()
    finally:
        await buf.aclose()
    assert judge.violations == []
    assert judge.accepted == Counter({e.id: 1 for e in events})


async def test_reload_replaces_a_sink_with_requests_in_flight_without_loss_or_duplicate(
        judged: tuple[Judge, str, list[NewEvent]], tmp_path: Path) -> None:
    """``Components.replace_sink`` (what a reload does for a changed sink) while requests are
    in flight to a slow receiver: they finish and settle, the rest is given back, the new
    forwarder delivers it in order; each event accepted once. A second forwarder for a sink
    that has one running is refused."""
    judge, url, events = judged
    judge.dead.clear()
    judge.slow, judge.unavailable = 0.9, 0.0
    buf = AsyncBuffer(SqliteBuffer(tmp_path / "buf.db", 2**30, synchronous="OFF"))
    await buf.open(["erp"])
    parts = Components(buf, lambda name, source: _never, lambda sink: sink)
    config = HttpSinkConfig.model_validate({
        "type": "http", "url": url, "mode": "batch", "batch_max_events": 5,
        "max_in_flight": 4, "timeout": "5s"})
    try:
        await buf.append(events, {})
        parts.start_sink("erp", config).forwarder.wake()
        await wait_until(lambda: judge.flying >= 2, timeout=10, what="requests in flight")
        with pytest.raises(RuntimeError, match="already has a running forwarder"):
            parts.start_sink("erp", config)
        before = sum(judge.accepted.values())
        slot = await parts.replace_sink("erp", config, timeout=10.0)
        assert sum(judge.accepted.values()) > before  # the requests in flight were answered
        assert slot is parts.sinks["erp"]

        async def drained() -> bool:
            st = (await buf.stats()).sinks["erp"]
            return st.pending + st.leased == 0
        await wait_until(drained, timeout=30, what="backlog drained after the replacement")
    finally:
        await parts.stop_sinks(5.0)
        await buf.aclose()
    assert judge.violations == []
    assert judge.accepted == Counter({e.id: 1 for e in events})


async def _never() -> None:
    await asyncio.Event().wait()
