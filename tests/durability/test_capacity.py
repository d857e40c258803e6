"""Capacity end to end: ``max_size`` reached while the receiver is away, both policies.

The agent (in-process ``Runtime``) collects from the simulated plant into an 80 KiB buffer
(room for about 50 events) while nobody receives; then the receiver comes up and everything
left drains. Whatever was dropped must be accounted for exactly:

- per event type, detected = delivered + dropped, where "dropped" is the sum of the
  ``dropped_by_type`` of the ``plantedge.data.gap`` events that arrived, and it equals the
  buffer's ``dropped_total`` counter;
- gap events can be dropped too (the oldest under ``drop_oldest``, refused by ``reject_new``
  while the buffer is still full): their counts are carried into the next gap event, so no
  delivered gap event reports a dropped gap event instead of the facts it carried (a
  buffer-level test below drops one on purpose, for both implementations);
- no event arrives twice.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import pytest
from _plant import Plant, write_config
from support import free_port, wait_until
from support.events import check_event

from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config

pytestmark = pytest.mark.slow

GAP = "plantedge.data.gap"


@pytest.mark.parametrize("when_full", ["drop_oldest", "reject_new"])
async def test_capacity_drops_are_accounted_for_exactly(tmp_path: Path, when_full: str) -> None:
    plant = Plant(seed=21)
    await plant.start()
    rx_port = free_port()
    receiver = Receiver(tmp_path / "rx.db", port=rx_port)
    cfg = write_config(tmp_path / "agent.yaml", tmp_path / "data", plant.port,
                       f"http://127.0.0.1:{rx_port}/events", scrap_window="50ms", batch=20,
                       buffer=f"commit_interval: 5ms, max_size: 80KiB, when_full: {when_full}")
    rt = Runtime(load_config(cfg))
    try:
        await rt.start()
        await wait_until(lambda: all(d.signal == "ok" for d in rt.detectors.values()),
                         timeout=10, what="first reading")

        async def dropped_enough() -> bool:
            await plant.step()
            return (await rt.buffer.stats()).dropped_total >= 30

        await wait_until(dropped_enough, timeout=30, interval=0.03, what="drops")
        await plant.calm()
        await wait_until(lambda: all(d.episode is None for d in rt.detectors.values()),
                         what="episodes ended")
        await receiver.start()

        async def drained() -> bool:
            stats = await rt.buffer.stats()
            sink = stats.sinks["central"]
            return (rt.committer.uncommitted == 0 and sink.pending + sink.leased == 0
                    and not _accounted(rt, receiver, stats.dropped_total))

        # On a timeout the assertions below say what does not add up.
        with contextlib.suppress(AssertionError):
            await wait_until(drained, timeout=60, interval=0.1, what="drained and accounted")
        stats = await rt.buffer.stats()
    finally:
        await rt.stop()
        await plant.stop()
    events = receiver.events()
    accounted = _accounted(rt, receiver, stats.dropped_total)
    await receiver.aclose()
    assert receiver_dups(events) == 0
    assert accounted == ""  # every equation holds
    assert stats.dropped_total >= 30
    gaps = [e for e in events if e["type"] == GAP]
    assert gaps and all(g["data"]["reason"] == f"buffer full ({when_full})" for g in gaps)
    assert [p for e in events for p in check_event(e)] == []  # the versioned event contract


def receiver_dups(events: list[dict[str, object]]) -> int:
    return len(events) - len({e["id"] for e in events})


def _accounted(rt: Runtime, receiver: Receiver, dropped_total: int) -> str:
    """'' when every equation of the module docstring holds, else what does not."""
    events = receiver.events()
    delivered = Counter(str(e["type"]) for e in events)
    dropped: Counter[str] = Counter()
    gap_seqs = []
    for e in events:
        if e["type"] == GAP:
            dropped.update(e["data"]["dropped_by_type"])
            gap_seqs.append(int(e["sequence"]))
    problems = []
    if sum(dropped.values()) != dropped_total:
        problems.append(f"gap events report {sum(dropped.values())} dropped, the counter says "
                        f"{dropped_total}")
    for t, n in rt.events_detected.items():
        if delivered[t] + dropped[t] != n:
            problems.append(f"{t}: detected {n}, delivered {delivered[t]}, dropped {dropped[t]}")
    if not gap_seqs or dropped[GAP]:
        problems.append(f"gap events: {len(gap_seqs)}, reporting dropped gaps: {dropped[GAP]}")
    return "; ".join(problems)


@pytest.mark.parametrize("impl", ["sqlite", "memory"])
def test_a_dropped_gap_event_carries_its_counts_forward(tmp_path: Path, impl: str) -> None:
    import json

    from buffer.base import Buffer, NewEvent
    from buffer.memory import MemoryBuffer
    from buffer.sqlite import SqliteBuffer

    def event(i: int, type_: str = "plantedge.scrap.recorded", data: object = None) -> NewEvent:
        payload = json.dumps({"id": f"e{i}", "type": type_, "data": data or {}, "pad": "x" * 600})
        return NewEvent(f"e{i}", "m1", type_, "2026-01-01T00:00:00.000Z", payload)

    b: Buffer = (SqliteBuffer(tmp_path / "b.db", max_size=60 * 1024)
                 if impl == "sqlite" else MemoryBuffer(max_size=60 * 1024))
    b.open(["central"])
    try:
        report = {"dropped_by_type": {"plantedge.scrap.recorded": 7,
                                      "plantedge.downtime.ended": 2}}
        b.append([event(0, GAP, report)], {})  # the oldest event is a gap report
        n = 1
        while b.stats().dropped_total == 0:
            b.append([event(n)], {})
            n += 1
        drops = b.take_drops()
        assert GAP not in drops.by_type  # not "one gap event dropped" ...
        assert drops.by_type["plantedge.downtime.ended"] == 2  # ... but what it reported
        assert drops.by_type["plantedge.scrap.recorded"] >= 7 + 1
        # dropped_total counts facts once: the carried counts were counted when first dropped
        assert b.stats().dropped_total == drops.total - 9
        assert [r.id for r in b.pending("central", 10_000)][-1] == f"e{n - 1}"
    finally:
        b.close()
