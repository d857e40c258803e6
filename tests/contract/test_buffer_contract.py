"""One suite over every Buffer implementation: the invariants of buffer/base.py.

Each test runs against MemoryBuffer (the reference) and SqliteBuffer on a real file. Tests that
only make sense for a file (schema version, disk full) are at the end.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import fill_disk, small_tmpfs

from buffer.base import Buffer, BufferStats, NewEvent, Settlement
from buffer.memory import MemoryBuffer
from buffer.migrations import SCHEMA_VERSION
from buffer.sqlite import SqliteBuffer
from config.errors import SchemaTooNewError, StorageFullError

DOWN = "plantedge.downtime.started"
SCRAP = "plantedge.scrap.recorded"
SINKS = ["erp", "mes"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ev(i: int, type_: str = DOWN, key: str = "m1", size: int = 0) -> NewEvent:
    payload = f'{{"id":"e{i}","pad":"{"x" * size}"}}'
    return NewEvent(id=f"e{i}", key=key, type=type_, time=f"2026-01-01T00:00:{i % 60:02d}.000Z",
                    payload=payload)


Factory = Callable[..., Buffer]


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Builds a buffer of the parametrised kind; the same path every call, so a second call
    after close() is a reopen of the same file. Memory 'reopens' the same object."""
    made: list[Buffer] = []
    memory: dict[str, MemoryBuffer] = {}

    def factory(max_size: int = 2**40, when_full: str = "drop_oldest",
                lease_timeout: float = 60.0, clock: Callable[[], float] | None = None) -> Buffer:
        kw = {"clock": clock} if clock else {}
        buf: Buffer
        if request.param == "memory":
            if "b" not in memory:
                memory["b"] = MemoryBuffer(max_size, when_full, lease_timeout, **kw)
            buf = memory["b"]
        else:
            buf = SqliteBuffer(tmp_path / "buffer.db", max_size, when_full,
                               lease_timeout=lease_timeout, **kw)
        made.append(buf)
        return buf

    yield factory
    for b in made:
        b.close()


@pytest.fixture
def buf(make: Factory) -> Buffer:
    b = make()
    b.open(SINKS)
    return b


def ids(rows: list) -> list[str]:
    return [r.id for r in rows]


# ---------------------------------------------------------------- append

def test_append_stores_events_and_states_together(buf: Buffer) -> None:
    result = buf.append([ev(1), ev(2)], {"m1": '{"open": true}'})
    assert (result.stored, result.rejected) == (2, 0)
    assert buf.load_states() == {"m1": '{"open": true}'}
    assert ids(buf.pending("erp")) == ["e1", "e2"]
    assert buf.pending("erp")[0].payload == ev(1).payload
    assert buf.stats().events == 2


def test_states_only_and_state_overwrite(buf: Buffer) -> None:
    buf.append([], {"m1": "a", "m2": "b"})
    buf.append([], {"m1": "c"})
    assert buf.load_states() == {"m1": "c", "m2": "b"}
    assert buf.stats().events == 0


def test_duplicate_ids_are_ignored_and_not_counted(buf: Buffer) -> None:
    assert buf.append([ev(1), ev(2)], {}).stored == 2
    again = buf.append([ev(2), ev(3), ev(3)], {})
    assert again.stored == 1
    assert ids(buf.pending("erp")) == ["e1", "e2", "e3"]
    assert buf.stats().events == 3


def test_bad_input_is_refused_whole_and_loses_nothing(buf: Buffer) -> None:
    buf.append([ev(1)], {"m1": "a"})
    broken = NewEvent(id="e9", key="m1", type=DOWN, time="t", payload=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"e9.*payload"):
        buf.append([ev(2), broken], {"m1": "b"})
    with pytest.raises(ValueError, match="id"):
        buf.append([NewEvent("", "m1", DOWN, "t", "{}")], {})
    with pytest.raises(ValueError, match="detector state"):
        buf.append([ev(3)], {"m1": None})  # type: ignore[dict-item]
    assert ids(buf.pending()) == ["e1"]
    assert buf.load_states() == {"m1": "a"}
    assert buf.append([ev(2)], {"m1": "b"}).stored == 1  # still usable


def test_each_event_gets_one_row_per_sink(buf: Buffer) -> None:
    buf.append([ev(1), ev(2)], {})
    stats = buf.stats()
    assert set(stats.sinks) == set(SINKS)
    for name in SINKS:
        assert stats.sinks[name].pending == 2
        assert stats.sinks[name].oldest_pending_time == ev(1).time


# ---------------------------------------------------------------- lease / settle

def test_lease_is_in_append_order_and_not_repeated(buf: Buffer) -> None:
    buf.append([ev(i) for i in range(1, 6)], {})
    buf.append([ev(i) for i in range(6, 9)], {})
    first = buf.lease("erp", 3)
    assert ids(first) == ["e1", "e2", "e3"]
    assert [r.seq for r in first] == sorted(r.seq for r in first)
    second = buf.lease("erp", 10)
    assert ids(second) == ["e4", "e5", "e6", "e7", "e8"]
    assert buf.lease("erp", 10) == []
    assert buf.stats().sinks["erp"].leased == 8
    # Leased rows stay visible as undelivered.
    assert len(buf.pending("erp")) == 8


def test_sinks_are_independent(buf: Buffer) -> None:
    buf.append([ev(1), ev(2), ev(3)], {})
    erp = buf.lease("erp", 3)
    buf.settle("erp", Settlement(accepted=[erp[0].seq], retry=[erp[1].seq],
                                 dead={erp[2].seq: (422, "bad field")}))
    mes = buf.lease("mes", 10)
    assert ids(mes) == ["e1", "e2", "e3"]
    assert all(r.attempts == 0 for r in mes)
    stats = buf.stats().sinks
    assert (stats["erp"].pending, stats["erp"].leased, stats["erp"].dead_letters) == (1, 0, 1)
    assert (stats["mes"].pending, stats["mes"].leased, stats["mes"].dead_letters) == (0, 3, 0)
    # e1 was accepted by erp but mes still needs it: the event stays.
    assert buf.stats().events == 3


def test_settle_accepted_deletes_event_after_last_sink(buf: Buffer) -> None:
    buf.append([ev(1), ev(2)], {})
    for sink in SINKS:
        rows = buf.lease(sink, 1)
        buf.settle(sink, Settlement(accepted=[r.seq for r in rows]))
    assert buf.stats().events == 1
    assert ids(buf.pending()) == ["e2"]


def test_settle_retry_returns_to_pending_in_order_with_attempts(buf: Buffer) -> None:
    buf.append([ev(1), ev(2), ev(3)], {})
    rows = buf.lease("erp", 2)
    buf.settle("erp", Settlement(retry=[rows[0].seq, rows[1].seq]))
    again = buf.lease("erp", 10)
    assert ids(again) == ["e1", "e2", "e3"]
    assert [r.attempts for r in again] == [1, 1, 0]


def test_rows_not_named_in_settle_stay_leased(buf: Buffer) -> None:
    buf.append([ev(1), ev(2)], {})
    rows = buf.lease("erp", 2)
    buf.settle("erp", Settlement(accepted=[rows[0].seq]))
    assert buf.lease("erp", 10) == []
    assert buf.stats().sinks["erp"].leased == 1


def test_expired_lease_is_offered_again(make: Factory) -> None:
    clock = FakeClock()
    b = make(lease_timeout=30.0, clock=clock)
    b.open(SINKS)
    b.append([ev(1), ev(2)], {})
    assert ids(b.lease("erp", 1)) == ["e1"]
    clock.now += 29.0
    assert ids(b.lease("erp", 5)) == ["e2"]
    clock.now += 1.5  # e1's lease is over, e2's is not
    assert ids(b.lease("erp", 5)) == ["e1"]


def test_a_renewed_lease_is_not_offered_again(make: Factory) -> None:
    clock = FakeClock()
    b = make(lease_timeout=30.0, clock=clock)
    b.open(SINKS)
    b.append([ev(1), ev(2)], {})
    held = b.lease("erp", 1)
    clock.now += 29.0
    b.renew("erp", [r.seq for r in held] + [10**6])  # an unknown seq is ignored
    clock.now += 29.0  # 58 s after the lease, 29 s after the renewal
    assert ids(b.lease("erp", 5)) == ["e2"]
    clock.now += 1.5
    assert ids(b.lease("erp", 5)) == ["e1"]  # the renewed lease ran out too
    b.renew("erp", [r.seq for r in held])
    assert b.stats().sinks["erp"].leased == 2


def test_released_rows_are_offered_again_at_once_accepted_ones_never(buf: Buffer) -> None:
    buf.append([ev(1), ev(2), ev(3), ev(4)], {})
    rows = buf.lease("erp", 4)
    buf.settle("erp", Settlement(dead={rows[3].seq: (422, "bad")}))
    buf.settle("erp", Settlement(accepted=[rows[1].seq]))  # its deletion may still wait
    # A stopping leaser gives back all it holds, the accepted and dead ones too (it may not
    # know their settles went through): only the leased ones come back, first in order.
    buf.release("erp", [r.seq for r in rows] + [10**6])
    assert ids(buf.lease("erp", 5)) == ["e1", "e3"]
    assert buf.stats().sinks["erp"].dead_letters == 1


def test_dead_letters_listed_replayed_by_id_and_all(buf: Buffer) -> None:
    buf.append([ev(1), ev(2), ev(3)], {})
    rows = buf.lease("erp", 3)
    buf.settle("erp", Settlement(dead={r.seq: (400, f"bad {r.id}") for r in rows}))
    dead = buf.dead_letters()
    assert [(d.sink, d.id, d.status, d.detail) for d in dead] == [
        ("erp", "e1", 400, "bad e1"), ("erp", "e2", 400, "bad e2"), ("erp", "e3", 400, "bad e3")]
    assert all(d.failed_at.endswith("Z") for d in dead)
    assert buf.dead_letters("mes") == []
    assert buf.lease("erp", 10) == []  # never back in the loop by itself

    assert buf.replay_dead_letters("erp", ids=["e2"]) == 1
    assert ids(buf.dead_letters("erp")) == ["e1", "e3"]
    replayed = buf.lease("erp", 10)
    assert ids(replayed) == ["e2"] and replayed[0].attempts == 0

    assert buf.replay_dead_letters() == 2
    assert buf.dead_letters() == []
    assert ids(buf.lease("erp", 10)) == ["e1", "e3"]


def test_purge_dead_letters_deletes_event_with_last_row(buf: Buffer) -> None:
    buf.append([ev(1), ev(2)], {})
    for sink in SINKS:
        rows = buf.lease(sink, 1)
        buf.settle(sink, Settlement(dead={rows[0].seq: (None, "timeout")}))
    assert buf.purge_dead_letters("erp", ids=["e1"]) == 1
    assert buf.stats().events == 2  # mes still holds e1 as a dead letter
    assert buf.purge_dead_letters() == 1
    assert buf.stats().events == 1
    assert ids(buf.pending()) == ["e2"]


# ---------------------------------------------------------------- reopen

def test_states_and_events_survive_reopen(make: Factory) -> None:
    b = make()
    b.open(SINKS)
    b.append([ev(1), ev(2)], {"m1": "s1"})
    b.close()
    b2 = make()
    b2.open(SINKS)
    assert b2.load_states() == {"m1": "s1"}
    assert ids(b2.pending("erp")) == ["e1", "e2"]


def test_leases_are_reclaimed_at_reopen(make: Factory) -> None:
    b = make()
    b.open(SINKS)
    b.append([ev(1), ev(2), ev(3)], {})
    leased = b.lease("erp", 2)
    b.close()  # as if the process died holding the lease
    b2 = make()
    b2.open(SINKS)
    assert b2.stats().sinks["erp"].leased == 0
    again = b2.lease("erp", 10)
    assert ids(again) == ["e1", "e2", "e3"]
    assert [r.seq for r in again[:2]] == [r.seq for r in leased]


def test_sink_added_later_gets_only_later_events(make: Factory) -> None:
    b = make()
    b.open(["erp"])
    b.append([ev(1)], {})
    b.close()
    b2 = make()
    b2.open(["erp", "mes"])
    b2.append([ev(2)], {})
    assert ids(b2.pending("mes")) == ["e2"]
    assert ids(b2.pending("erp")) == ["e1", "e2"]


def test_sink_removed_from_config_keeps_its_rows(make: Factory) -> None:
    b = make()
    b.open(["erp", "old"])
    b.append([ev(1)], {})
    b.close()
    b2 = make()
    b2.open(["erp"])
    b2.append([ev(2)], {})
    assert ids(b2.pending("old")) == ["e1"]
    assert b2.stats().sinks["old"].pending == 1
    rows = b2.lease("erp", 10)
    b2.settle("erp", Settlement(accepted=[r.seq for r in rows]))
    assert b2.stats().events == 1  # e1 waits for 'old'; e2 had no row for it


# ---------------------------------------------------------------- capacity

def _fill(b: Buffer, n: int, batch: int, size: int = 1500) -> list[NewEvent]:
    all_events = [ev(i, DOWN if i % 3 else SCRAP, size=size) for i in range(n)]
    for start in range(0, n, batch):
        b.append(all_events[start:start + batch], {"m1": f"state-{start}"})
    return all_events


def _dropped(b: Buffer, all_events: list[NewEvent]) -> tuple[list[str], list[NewEvent]]:
    kept = ids(b.pending())
    return kept, [e for e in all_events if e.id not in set(kept)]


def test_drop_oldest_keeps_newest_and_counts_drops_by_type(make: Factory) -> None:
    b = make(max_size=200_000, when_full="drop_oldest")
    b.open(SINKS)
    all_events = _fill(b, 400, 20)
    kept, dropped = _dropped(b, all_events)
    assert dropped, "the buffer never filled"
    assert kept == [e.id for e in all_events[len(dropped):]]  # a suffix: the newest
    assert len(kept) >= 40  # it drops what it must, not everything
    drops = b.take_drops()
    assert drops.by_type == dict(Counter(e.type for e in dropped))
    assert drops.first_at is not None and drops.last_at is not None
    assert b.take_drops().total == 0  # reset after take
    stats = b.stats()
    assert stats.dropped_total == len(dropped)
    assert stats.size_bytes <= 200_000
    assert b.load_states() == {"m1": "state-380"}  # states are never dropped


def test_drop_counts_leave_only_with_the_gap_event_that_reports_them(make: Factory) -> None:
    """peek_drops clears nothing; append(reported=...) takes exactly those counts out in the
    transaction that stores the report, and drops recorded since stay (issue 11, #2)."""
    b = make(max_size=200_000, when_full="drop_oldest")
    b.open(SINKS)
    all_events = _fill(b, 400, 20)
    _, dropped = _dropped(b, all_events)
    seen = b.peek_drops()
    assert seen.by_type == dict(Counter(e.type for e in dropped))
    assert b.peek_drops().by_type == seen.by_type  # reading is not taking
    b.append([ev(10_000, "plantedge.data.gap")], {"__agent__": "1"}, reported=seen)
    left = b.peek_drops()
    # Whatever the gap's own append dropped is still recorded; the reported counts are gone.
    _, dropped_now = _dropped(b, all_events)
    assert left.total == len(dropped_now) - len(dropped)
    assert b.stats().dropped_total == len(dropped_now)


def test_reject_new_keeps_what_is_stored_and_reports_rejected(make: Factory) -> None:
    b = make(max_size=200_000, when_full="reject_new")
    b.open(SINKS)
    all_events = [ev(i, DOWN if i % 3 else SCRAP, size=1500) for i in range(400)]
    rejected = 0
    stored: list[str] = []
    for start in range(0, 400, 20):
        batch = all_events[start:start + 20]
        result = b.append(batch, {"m1": f"state-{start}"})
        rejected += result.rejected
        assert result.stored + result.rejected == 20
        now = ids(b.pending())
        # Stored events are never removed to make room, and a batch is cut to a head.
        assert now[:len(stored)] == stored
        assert now[len(stored):] == [e.id for e in batch[:result.stored]]
        stored = now
    kept, dropped = _dropped(b, all_events)
    assert dropped and rejected == len(dropped)
    assert kept[:40] == [e.id for e in all_events[:40]]
    assert b.take_drops().by_type == dict(Counter(e.type for e in dropped))
    assert b.stats().size_bytes <= 200_000
    # The states of a rejected batch still commit: the detector has moved on.
    assert b.load_states() == {"m1": "state-380"}


def test_drop_oldest_never_drops_leased_and_drops_dead_letters_last(make: Factory) -> None:
    b = make(max_size=200_000, when_full="drop_oldest")
    b.open(["erp"])
    b.append([ev(i, size=1500) for i in range(10)], {})
    leased = b.lease("erp", 4)  # e0..e3 in flight
    b.settle("erp", Settlement(dead={leased[3].seq: (400, "poison")}))  # e3 dead
    b.append([ev(i, size=1500) for i in range(10, 120)], {})
    kept = set(ids(b.pending("erp")))
    assert {"e0", "e1", "e2"} <= kept  # still leased: never dropped
    assert "e4" not in kept  # older pending rows went first
    assert ids(b.dead_letters()) == ["e3"]  # the dead letter outlived them
    # Settling the leased rows still works after the drops.
    b.settle("erp", Settlement(accepted=[r.seq for r in leased[:3]]))
    assert not {"e0", "e1", "e2"} & set(ids(b.pending("erp")))


def test_batch_larger_than_capacity(make: Factory) -> None:
    b = make(max_size=120_000, when_full="drop_oldest")
    b.open(SINKS)
    big = [ev(i, size=1500) for i in range(300)]
    result = b.append(big, {"m1": "x"})
    kept = ids(b.pending())
    assert 0 < len(kept) < 300
    assert result.stored == len(kept) and result.rejected == 0
    assert b.take_drops().total == 300 - len(kept)
    assert kept == [e.id for e in big[300 - len(kept):]]


# ---------------------------------------------------------------- sqlite only

def test_schema_too_new_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    b = SqliteBuffer(path, 2**30)
    b.open(SINKS)
    b.append([ev(1)], {})
    b.close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = SqliteBuffer(path, 2**30)
    with pytest.raises(SchemaTooNewError) as info:
        newer.open(SINKS)
    message = str(info.value)
    assert str(path) in message and f"version {SCHEMA_VERSION + 1}" in message
    assert "buffer.path" in message
    newer.close()  # safe after a failed open
    with sqlite3.connect(path) as conn:  # untouched
        assert conn.execute("SELECT id FROM events").fetchall() == [("e1",)]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "4m") as mnt:
        yield mnt



def test_disk_full_is_a_state_not_a_crash(small_fs: Path) -> None:
    path = small_fs / "buffer.db"
    b = SqliteBuffer(path, max_size=2**30)
    try:
        b.open(SINKS)
        first = [ev(i, size=1000) for i in range(50)]
        assert b.append(first, {"m1": "before"}).stored == 50
        ballast = fill_disk(small_fs)

        more = [ev(i, size=1000) for i in range(50, 550)]
        with pytest.raises(StorageFullError):
            b.append(more, {"m1": "during"})
        # Nothing of the failed batch, everything before it.
        assert ids(b.pending("erp", limit=10_000)) == [e.id for e in first]
        assert b.load_states() == {"m1": "before"}

        ballast.unlink()
        assert b.append(more, {"m1": "after"}).stored == 500
        assert ids(b.pending("mes", limit=10_000)) == [e.id for e in first + more]
        rows = b.lease("erp", 100)
        b.settle("erp", Settlement(accepted=[r.seq for r in rows]))
        b.close()

        again = SqliteBuffer(path, max_size=2**30)
        again.open(SINKS)
        assert again.load_states() == {"m1": "after"}
        assert again.stats().events == 550
        again.close()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        b.close()


# ---------------------------------------------------------------- both agree on any sequence

_op = st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, 30), max_size=6)),
    st.tuples(st.just("lease"), st.sampled_from(SINKS), st.integers(0, 5)),
    st.tuples(st.just("settle"), st.sampled_from(SINKS),
              st.lists(st.sampled_from(["accepted", "retry", "dead", "keep"]), max_size=5)),
    st.tuples(st.just("replay"), st.sampled_from([None, *SINKS])),
    st.tuples(st.just("purge"), st.sampled_from([None, *SINKS])),
    st.tuples(st.just("expire")),
    st.tuples(st.just("reopen")),
)


def as_in_file(stats: BufferStats) -> BufferStats:
    """What a second connection sees of ``stats``: leases live in the agent's memory, so in
    the file a leased row is still pending."""
    return replace(stats, sinks={n: replace(s, pending=s.pending + s.leased, leased=0)
                                 for n, s in stats.sinks.items()})


def _observe(b: Buffer) -> tuple:
    stats = b.stats()
    return (
        stats.events,
        {k: (v.pending, v.leased, v.dead_letters, v.oldest_pending_time)
         for k, v in sorted(stats.sinks.items())},
        _without_seq(b.pending()),
        [(d.sink, d.id, d.status, d.detail) for d in b.dead_letters()],
        b.load_states(),
    )


def _without_seq(rows: list) -> list[tuple]:
    return [(r.id, r.key, r.type, r.payload, r.attempts) for r in rows]


def _settlement(rows: list, outcomes: list[str]) -> Settlement:
    settlement = Settlement()
    for row, outcome in zip(rows, outcomes, strict=False):
        if outcome == "accepted":
            settlement.accepted.append(row.seq)
        elif outcome == "retry":
            settlement.retry.append(row.seq)
        elif outcome == "dead":
            settlement.dead[row.seq] = (400, f"bad {row.id}")
    return settlement


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=30))
def test_sqlite_behaves_like_the_reference(ops: list[tuple]) -> None:
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "buffer.db"
        memory = MemoryBuffer(lease_timeout=10.0, clock=clock)
        sqlite = SqliteBuffer(path, 2**40, synchronous="OFF", lease_timeout=10.0, clock=clock)
        pair: list[Buffer] = [memory, sqlite]
        for b in pair:
            b.open(SINKS)
        # A second, read-only connection counts rows from scratch: the writer's running
        # counts (what its stats() reports) must agree with it after every step.
        counted = SqliteBuffer.attach(path, max_size=2**40)
        # Seqs may differ (SQLite can skip a seq on an ignored duplicate); ids must not.
        leased: list[dict[str, list]] = [{s: [] for s in SINKS} for _ in pair]
        try:
            for step, op in enumerate(ops):
                kind = op[0]
                if kind == "append":
                    batch = [ev(i, SCRAP if i % 2 else DOWN) for i in op[1]]
                    results = [b.append(batch, {"m1": f"s{step}"}) for b in pair]
                    assert results[0] == results[1]
                elif kind == "lease":
                    got = [b.lease(op[1], op[2]) for b in pair]
                    assert _without_seq(got[0]) == _without_seq(got[1])
                    for mine, rows in zip(leased, got, strict=True):
                        mine[op[1]] = rows
                elif kind == "settle":
                    for b, mine in zip(pair, leased, strict=True):
                        b.settle(op[1], _settlement(mine[op[1]], op[2]))
                elif kind == "replay":
                    assert pair[0].replay_dead_letters(op[1]) == pair[1].replay_dead_letters(op[1])
                elif kind == "purge":
                    assert pair[0].purge_dead_letters(op[1]) == pair[1].purge_dead_letters(op[1])
                elif kind == "expire":
                    clock.now += 11.0
                else:
                    for b in pair:
                        b.close()
                        b.open(SINKS)
                a, s = _observe(memory), _observe(sqlite)
                assert a == s, f"after step {step} {op}"
                assert as_in_file(sqlite.stats()) == counted.stats(), \
                    f"counts after step {step} {op}"
        finally:
            counted.close()
            for b in pair:
                b.close()


@pytest.mark.parametrize("when_full", ["drop_oldest", "reject_new"])
def test_a_down_sink_loses_its_own_oldest_while_the_other_keeps_receiving(
        make: Factory, when_full: str) -> None:
    """Fair share: 'erp' is down and fills the buffer; 'mes' keeps delivering and loses
    nothing (not even under reject_new), and the drops say that 'erp' lost what."""
    b = make(max_size=200_000, when_full=when_full)
    b.open(SINKS)
    all_events = [ev(i, DOWN if i % 3 else SCRAP, size=1500) for i in range(400)]
    got: list[str] = []
    for start in range(0, 400, 20):
        b.append(all_events[start:start + 20], {})
        rows = b.lease("mes", 100)
        got += [r.id for r in rows]
        b.settle("mes", Settlement(accepted=[r.seq for r in rows]))
    assert got == [e.id for e in all_events]  # everything, in order
    erp_kept = ids(b.pending("erp"))
    lost = [e for e in all_events if e.id not in set(erp_kept)]
    assert lost, "the buffer never filled"
    assert erp_kept == [e.id for e in all_events[len(lost):]]  # erp keeps its newest
    drops = b.take_drops()
    assert drops.by_sink == {"erp": dict(Counter(e.type for e in lost))}
    assert drops.by_type == dict(Counter(e.type for e in lost))
    assert b.stats().size_bytes <= 200_000


def test_drop_oldest_spares_old_events_a_sink_within_its_share_still_needs(
        make: Factory) -> None:
    """Fair share under drop_oldest: 'mes' keeps up, except that one machine's events wait
    (held back behind a retried one: per-machine order) while the other machine's newer ones
    are delivered; 'erp' is down. When the buffer is full, what goes is what only 'erp' still
    needs, however new, not the older events 'mes' still has to send."""
    b = make(max_size=200_000, when_full="drop_oldest")
    b.open(SINKS)
    evs = [ev(i, key="slow" if i % 10 == 0 else "fast", size=1500) for i in range(300)]
    for start in range(0, 300, 10):
        b.append(evs[start:start + 10], {})
        rows = b.lease("mes", 100)
        b.settle("mes", Settlement(accepted=[r.seq for r in rows if r.key == "fast"],
                                   retry=[r.seq for r in rows if r.key == "slow"]))
    drops = b.take_drops()
    assert drops.by_type, "the buffer never filled"
    assert ids(b.pending("mes")) == [e.id for e in evs if e.key == "slow"]  # none lost
    assert "mes" not in drops.by_sink and sum(drops.by_sink["erp"].values()) > 0
    stats = b.stats()  # within its share: at most half of the buffered events
    assert stats.sinks["mes"].pending == 30 and (stats.events + 10) / 2 >= 30 + 10


def test_drops_attribute_rows_only_to_sinks_that_still_needed_them(make: Factory) -> None:
    b = make(max_size=200_000, when_full="drop_oldest")
    b.open(SINKS)
    b.append([ev(i, size=1500) for i in range(40)], {})
    early = b.lease("mes", 10)  # mes delivered e0..e9 before the buffer filled
    b.settle("mes", Settlement(accepted=[r.seq for r in early]))
    b.append([ev(i, size=1500) for i in range(40, 400)], {})  # nobody delivers any more
    drops = b.take_drops()
    dropped = drops.by_type[DOWN]
    assert drops.by_sink["erp"] == {DOWN: dropped}
    assert drops.by_sink["mes"] == {DOWN: dropped - 10}  # e0..e9 were no loss for mes
