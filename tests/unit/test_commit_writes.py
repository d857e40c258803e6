"""What the committer asks of the buffer per commit: the agent's sequence state only when it
changed, and drops only when the buffer may hold some (each call is a hop to its thread)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.runtime.commit import AGENT_STATE_KEY, Committer
from buffer.base import AppendResult, Drops, NewEvent


class FakeBuffer:
    def __init__(self) -> None:
        self.states: list[dict[str, str]] = []
        self.peeks = 0
        self.drops = Drops()

    async def append(self, events: Sequence[NewEvent], states: Mapping[str, str], *,
                     reported: Any = None) -> AppendResult:
        self.states.append(dict(states))
        if reported is not None:
            self.drops = Drops()
        return AppendResult(len(events), 0, unreported_drops=bool(self.drops.by_type))

    async def peek_drops(self) -> Drops:
        self.peeks += 1
        return self.drops


def _committer(buf: FakeBuffer) -> Committer:
    return Committer(buf, lambda: {}, agent_id="a1", site="s1",  # type: ignore[arg-type]
                     interval=0.01, when_full="drop_oldest", on_commit=lambda: None)


async def test_the_agent_sequence_is_written_only_when_it_changed() -> None:
    buf = FakeBuffer()
    c = _committer(buf)
    c.restore({AGENT_STATE_KEY: "4"})
    c._queue.append(c._data_gap_event(4, {"t": 1}, None, None, "test"))
    await c.flush()
    assert buf.states == [{}]  # restored 4, still 4: not rewritten
    c._queue_data_gap({"t": 1}, None, None, "test")  # takes sequence 5
    await c.flush()
    assert buf.states[-1] == {AGENT_STATE_KEY: "5"}
    c._queue.append(c._data_gap_event(5, {"t": 2}, None, None, "test"))
    await c.flush()
    assert buf.states[-1] == {}


async def test_drops_are_looked_for_at_start_and_when_an_append_recorded_some() -> None:
    buf = FakeBuffer()
    c = _committer(buf)
    await c.flush()  # the first commit looks (a crash may have left drops)
    assert buf.peeks == 1
    for _ in range(3):
        c._queue.append(c._data_gap_event(0, {"t": 1}, None, None, "test"))
        await c.flush()
    assert buf.peeks == 1  # appends that recorded no drop: no look
    buf.drops = Drops(by_type={"plantedge.scrap.recorded": 2}, first_at="a", last_at="b")
    c._queue.append(c._data_gap_event(0, {"t": 1}, None, None, "test"))
    await c.flush()  # this append says drops are waiting: reported in the same flush
    assert buf.peeks == 2
    assert buf.drops.total == 0 and c.committed_total == 5
