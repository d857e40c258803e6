"""SqliteBuffer specifics (pragmas, read-only attach, migrations, corruption, shrinking) and the
AsyncBuffer writer thread. The shared semantics are in tests/contract/test_buffer_contract.py."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from support import fill_disk, small_tmpfs

import buffer.migrations as migrations
from buffer.base import (
    BufferCorruptError,
    BufferOpenError,
    BufferStats,
    NewEvent,
    Settlement,
)
from buffer.memory import MemoryBuffer
from buffer.migrations import SCHEMA_VERSION, Migration
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer
from config.errors import SchemaTooNewError, StorageFullError

SINKS = ["erp"]


def ev(i: int, size: int = 0) -> NewEvent:
    return NewEvent(id=f"e{i}", key="m1", type="plantedge.scrap.recorded",
                    time="2026-01-01T00:00:00.000Z", payload=f'{{"i":{i},"pad":"{"x" * size}"}}')


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "buffer.db"


def _opened(path: Path, **kw: object) -> SqliteBuffer:
    b = SqliteBuffer(path, kw.pop("max_size", 2**30), **kw)  # type: ignore[arg-type]
    b.open(SINKS)
    return b


def _pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


# ---------------------------------------------------------------- file settings

def test_creates_directory_and_uses_wal_full_incremental_vacuum(path: Path) -> None:
    b = _opened(path)
    conn = b._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    b.close()
    b.close()  # idempotent


def test_synchronous_normal_and_bad_values(path: Path) -> None:
    b = _opened(path, synchronous="normal")
    assert b._conn is not None and b._conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    b.close()
    with pytest.raises(ValueError, match="synchronous"):
        SqliteBuffer(path, 2**20, synchronous="FULL; DROP TABLE events")
    with pytest.raises(ValueError, match="max_size"):
        SqliteBuffer(path, 0)


def test_unopenable_path_is_a_clear_open_error(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    b = SqliteBuffer(tmp_path / "adir", 2**20)
    with pytest.raises(BufferOpenError, match="adir"):
        b.open(SINKS)
    b.close()


def test_calls_before_open_are_refused(path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        SqliteBuffer(path, 2**20).append([ev(1)], {})


# ---------------------------------------------------------------- read-only attach (CLI)

def test_attach_read_only_while_the_agent_writes(path: Path) -> None:
    agent = _opened(path)
    agent.append([ev(1), ev(2)], {"m1": "s"})
    rows = agent.lease("erp", 1)
    agent.settle("erp", Settlement(dead={rows[0].seq: (400, "bad")}))

    cli = SqliteBuffer.attach(path)
    try:
        assert [r.id for r in cli.pending("erp")] == ["e2"]
        assert [d.id for d in cli.dead_letters()] == ["e1"]
        assert cli.stats().sinks["erp"].dead_letters == 1
        with pytest.raises(RuntimeError, match="read-only"):
            cli.replay_dead_letters()
        agent.append([ev(3)], {})  # the agent keeps writing while the CLI reads
        assert [r.id for r in cli.pending("erp")] == ["e2", "e3"]
    finally:
        cli.close()

    admin = SqliteBuffer.attach(path, readonly=False)
    try:
        assert admin.replay_dead_letters(ids=["e1"]) == 1
    finally:
        admin.close()
    assert [r.id for r in agent.lease("erp", 10)] == ["e1", "e2", "e3"]
    agent.close()


def test_attach_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BufferOpenError, match="does not exist"):
        SqliteBuffer.attach(tmp_path / "nope.db")


def test_attach_refuses_a_newer_schema(path: Path) -> None:
    _opened(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    with pytest.raises(SchemaTooNewError, match="newer agent"):
        SqliteBuffer.attach(path)


# ---------------------------------------------------------------- migrations

def test_migration_step_keeps_pending_events(path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    b = _opened(path)
    b.append([ev(1), ev(2)], {"m1": "s"})
    b.close()
    step = Migration(SCHEMA_VERSION + 1, "add a column",
                     ("ALTER TABLE events ADD COLUMN note TEXT",))
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, step))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    b2 = _opened(path)
    assert [r.id for r in b2.pending("erp")] == ["e1", "e2"]
    assert b2.load_states() == {"m1": "s"}
    b2.close()
    assert _pragma(path, "user_version") == SCHEMA_VERSION + 1


def test_failed_migration_changes_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = _opened(path)
    b.append([ev(1)], {})
    b.close()

    def explode(conn: sqlite3.Connection) -> None:
        raise RuntimeError("step failed")

    step = Migration(SCHEMA_VERSION + 1, "broken", ("CREATE TABLE extra(x)",), explode)
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, step))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="step failed"):
        SqliteBuffer(path, 2**30).open(SINKS)
    assert _pragma(path, "user_version") == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "extra" not in tables
        assert conn.execute("SELECT id FROM events").fetchall() == [("e1",)]


# ---------------------------------------------------------------- corruption

def test_not_a_database_is_moved_aside_and_a_fresh_file_used(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not sqlite at all" * 200)
    b = SqliteBuffer(path, 2**30)
    b.open(SINKS)
    try:
        aside = list(path.parent.glob("buffer.db.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not sqlite")
        assert b.degraded_reason is not None and aside[0].name in b.degraded_reason
        assert b.append([ev(1)], {}).stored == 1  # keeps collecting
    finally:
        b.close()


def test_corruption_without_salvage_raises_and_leaves_the_file(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage" * 1000)
    b = SqliteBuffer(path, 2**30, salvage=False)
    with pytest.raises(BufferCorruptError, match="damaged"):
        b.open(SINKS)
    b.close()
    assert path.read_bytes().startswith(b"garbage")
    assert not list(path.parent.glob("*.corrupt-*"))


def test_damaged_page_after_a_crash_is_salvaged(path: Path) -> None:
    b = _opened(path)
    events = [ev(i, size=600) for i in range(300)]
    b.append(events, {"m1": "kept state"})
    b.close()
    with sqlite3.connect(path) as conn:  # as if the process had died: no clean stop recorded
        conn.execute("UPDATE meta SET value = 0 WHERE name = 'clean_stop'")
        page_size, pages = (conn.execute("PRAGMA page_size").fetchone()[0],
                            conn.execute("PRAGMA page_count").fetchone()[0])
    with path.open("r+b") as f:  # trash one page in the middle of the file
        f.seek(page_size * (pages // 3))
        f.write(b"\xff" * page_size)

    b2 = SqliteBuffer(path, 2**30)
    b2.open(SINKS)
    try:
        assert b2.degraded_reason is not None and "salvaged" in b2.degraded_reason
        kept = b2.pending("erp", limit=1000)
        originals = {e.id: e.payload for e in events}
        assert 250 <= len(kept) <= 300  # one bad page costs a few events, not all
        assert all(r.payload == originals[r.id] for r in kept)
        assert [r.id for r in kept] == sorted((r.id for r in kept), key=lambda s: int(s[1:]))
        assert b2.load_states() == {"m1": "kept state"}
        b2.append([ev(1000)], {})
    finally:
        b2.close()
    assert _pragma(path, "integrity_check") == "ok"
    aside = [p for p in path.parent.glob("buffer.db.corrupt-*") if p.name.endswith("Z")]
    assert len(aside) == 1


def test_clean_stop_is_recorded(path: Path) -> None:
    b = _opened(path)
    assert b._conn is not None
    assert b._conn.execute("SELECT value FROM meta WHERE name='clean_stop'").fetchone() == (0,)
    b.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name='clean_stop'").fetchone() == (1,)


# ---------------------------------------------------------------- housekeeping

def test_file_shrinks_after_delivery(path: Path) -> None:
    b = _opened(path)
    b.append([ev(i, size=2000) for i in range(1000)], {})
    full = b.stats().size_bytes
    while rows := b.lease("erp", 200):
        b.settle("erp", Settlement(accepted=[r.seq for r in rows]))
    assert b.stats().events == 0
    b.close()
    assert path.stat().st_size < full / 4


def test_drops_survive_a_restart_until_taken(path: Path) -> None:
    b = _opened(path, max_size=150_000)
    for start in range(0, 300, 20):
        b.append([ev(i, size=1500) for i in range(start, start + 20)], {})
    b.close()
    b2 = _opened(path, max_size=150_000)
    drops = b2.take_drops()
    assert drops.total > 0 and drops.total == b2.stats().dropped_total
    assert b2.take_drops().total == 0
    b2.close()


def as_in_file(stats: BufferStats) -> BufferStats:
    """What a second connection sees of ``stats``: leases live in the agent's memory, so in
    the file a leased row is still pending."""
    return replace(stats, sinks={n: replace(s, pending=s.pending + s.leased, leased=0)
                                 for n, s in stats.sinks.items()})


def test_running_counts_match_a_recount_through_drops(path: Path) -> None:
    b = _opened(path, max_size=150_000)
    counted = SqliteBuffer.attach(path, max_size=150_000)  # counts rows on every call
    try:
        b.append([ev(i, size=1500) for i in range(20)], {})
        leased = b.lease("erp", 6)
        b.settle("erp", Settlement(dead={leased[0].seq: (400, "x")}, retry=[leased[1].seq],
                                   accepted=[leased[2].seq]))
        for start in range(20, 300, 20):
            b.append([ev(i, size=1500) for i in range(start, start + 20)], {})
            assert as_in_file(b.stats()) == counted.stats()
        assert b.stats().dropped_total > 0
        assert b.replay_dead_letters() == 1 and as_in_file(b.stats()) == counted.stats()
    finally:
        counted.close()
        b.close()


# ---------------------------------------------------------------- AsyncBuffer

class _ThreadRecorder(MemoryBuffer):
    """Records the thread each call actually runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def open(self, sinks):  # type: ignore[no-untyped-def]
        self.threads.add(threading.get_ident())
        super().open(sinks)

    def append(self, events, states):  # type: ignore[no-untyped-def]
        self.threads.add(threading.get_ident())
        return super().append(events, states)

    def lease(self, sink, limit):  # type: ignore[no-untyped-def]
        self.threads.add(threading.get_ident())
        return super().lease(sink, limit)

    def settle(self, sink, settlement):  # type: ignore[no-untyped-def]
        self.threads.add(threading.get_ident())
        super().settle(sink, settlement)

    def close(self) -> None:
        self.threads.add(threading.get_ident())
        super().close()


async def test_async_buffer_confines_calls_to_one_thread() -> None:
    inner = _ThreadRecorder()
    buf = AsyncBuffer(inner)
    await buf.open(SINKS)
    await asyncio.gather(*(buf.append([ev(i)], {"m1": str(i)}) for i in range(20)))
    rows = await buf.lease("erp", 100)
    assert [r.id for r in rows] == [f"e{i}" for i in range(20)]  # call order kept
    await buf.settle("erp", Settlement(accepted=[r.seq for r in rows]))
    assert (await buf.stats()).events == 0
    assert await buf.load_states() == {"m1": "19"}
    await buf.aclose()
    assert len(inner.threads) == 1
    assert threading.get_ident() not in inner.threads


async def test_async_buffer_over_sqlite_round_trip(path: Path) -> None:
    buf = AsyncBuffer(SqliteBuffer(path, 2**30))
    await buf.open(SINKS)
    assert (await buf.append([ev(1), ev(2)], {"m1": "s"})).stored == 2
    rows = await buf.lease("erp", 1)
    await buf.settle("erp", Settlement(dead={rows[0].seq: (422, "no")}))
    assert [d.id for d in await buf.dead_letters()] == ["e1"]
    assert await buf.replay_dead_letters(ids=["e1"]) == 1
    assert [r.id for r in await buf.pending("erp")] == ["e1", "e2"]
    rows = await buf.lease("erp", 1)
    await buf.settle("erp", Settlement(dead={rows[0].seq: (422, "no")}))
    assert await buf.purge_dead_letters() == 1
    assert (await buf.take_drops()).total == 0
    await buf.aclose()
    await buf.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await buf.stats()


async def test_async_buffer_aclose_after_failed_open(path: Path) -> None:
    _opened(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    buf = AsyncBuffer(SqliteBuffer(path, 2**30))
    with pytest.raises(SchemaTooNewError):
        await buf.open(SINKS)
    await buf.aclose()
    await buf.aclose()


# ---------------------------------------------------------------- kill -9

_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer
b = SqliteBuffer(Path(sys.argv[1]), 2**30)
b.open(["erp"])
n = 0
while True:
    batch = [NewEvent(f"b{n}-{i}", "m1", "t", "x", "p" * 300) for i in range(50)]
    b.append(batch, {"m1": str(n)})
    print(n, flush=True)
    n += 1
"""


def test_kill_9_mid_append_keeps_whole_batches_with_their_state(path: Path) -> None:
    path.parent.mkdir(parents=True)
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), root],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        last = -1
        while last < 20:  # let it commit a few batches, then kill it mid-stream
            line = proc.stdout.readline()
            assert line, "writer died on its own"
            last = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    b = SqliteBuffer(path, 2**30)
    b.open(["erp"])
    try:
        state = int(b.load_states()["m1"])
        assert state >= last  # every acknowledged commit survived
        got = [r.id for r in b.pending("erp", limit=100_000)]
        # All batches up to the committed state, each whole, nothing beyond it.
        assert got == [f"b{n}-{i}" for n in range(state + 1) for i in range(50)]
    finally:
        b.close()


# ---------------------------------------------------------------- grouped settles (schema 2)

def _in_file(path: Path) -> tuple[list[tuple[str, str, int]], list[int]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT sink, state, seq FROM deliveries ORDER BY sink, seq")
        return [tuple(r) for r in rows], [s for (s,) in conn.execute(  # type: ignore[misc]
            "SELECT seq FROM events ORDER BY seq")]


def test_a_lease_writes_nothing_and_settles_wait_for_the_next_write(path: Path) -> None:
    b = _opened(path, settle_delay=3600.0)
    b.append([ev(i) for i in range(4)], {})
    before = _in_file(path)
    rows = b.lease("erp", 4)
    assert _in_file(path) == before  # leases live in memory
    b.settle("erp", Settlement(accepted=[r.seq for r in rows[:2]]))
    assert _in_file(path) == before  # grouped: not deleted yet
    assert [r.id for r in b.lease("erp", 10)] == []  # but never offered again
    b.append([ev(9)], {})  # the next write carries the deletion
    deliveries, events = _in_file(path)
    assert [s for _, _, s in deliveries] == [3, 4, 5] and events == [3, 4, 5]
    b.close()


def test_settled_ranges_spare_rows_in_flight_dead_letters_and_other_sinks(path: Path) -> None:
    b = SqliteBuffer(path, 2**30, settle_delay=0.0)
    b.open(["erp", "mes"])
    b.append([ev(i) for i in range(12)], {})
    first, second = b.lease("erp", 5), b.lease("erp", 7)
    b.settle("erp", Settlement(dead={second[2].seq: (422, "bad")}))
    # The second block is answered first; the first is still in flight.
    b.settle("erp", Settlement(accepted=[r.seq for r in second if r.seq != second[2].seq]))
    deliveries, events = _in_file(path)
    assert [s for sink, st, s in deliveries if sink == "erp"] == [1, 2, 3, 4, 5, 8]
    assert ("erp", "dead", 8) in deliveries
    assert events == list(range(1, 13))  # every event still has its "mes" row
    b.settle("mes", Settlement(accepted=[r.seq for r in b.lease("mes", 12)]))
    deliveries, events = _in_file(path)
    assert events == [1, 2, 3, 4, 5, 8]  # in flight for erp, or a dead letter
    b.settle("erp", Settlement(accepted=[r.seq for r in first]))
    assert _in_file(path) == ([("erp", "dead", 8)], [8])
    b.close()


def test_grouped_settles_are_committed_at_close(path: Path) -> None:
    b = _opened(path, settle_delay=3600.0)
    b.append([ev(i) for i in range(3)], {})
    b.settle("erp", Settlement(accepted=[r.seq for r in b.lease("erp", 3)]))
    b.close()
    assert _in_file(path) == ([], [])


def test_drop_oldest_spares_held_rows_and_counts_no_grouped_delete_as_a_loss(
        path: Path) -> None:
    """Capacity while deletions are grouped: rows accepted by one sink and not yet deleted
    are no loss for that sink when their event is dropped (the other sink still needed it);
    rows in flight are never dropped; stats count right after."""
    b = SqliteBuffer(path, 200_000, settle_delay=3600.0)
    b.open(["erp", "mes"])
    b.append([ev(i, size=1500) for i in range(10)], {})
    delivered = b.lease("erp", 4)  # e0..e3: accepted by erp, deletion grouped
    b.settle("erp", Settlement(accepted=[r.seq for r in delivered]))
    in_flight = b.lease("mes", 2)  # e0, e1: in flight for mes
    b.append([ev(i, size=1500) for i in range(10, 120)], {})
    kept_mes = {r.id for r in b.pending("mes", 1000)}
    kept_erp = {r.id for r in b.pending("erp", 1000)}
    assert {r.id for r in in_flight} <= kept_mes  # in flight: never dropped
    dropped = {f"e{i}" for i in range(120)} - kept_mes
    assert dropped and dropped >= {"e2", "e3"}  # events only mes still needed went too
    drops = b.take_drops()
    lost_erp = sum(drops.by_sink.get("erp", {}).values())
    lost_mes = sum(drops.by_sink.get("mes", {}).values())
    assert lost_mes == len(dropped)
    assert lost_erp == len(dropped - {"e0", "e1", "e2", "e3"})  # erp had those already
    assert kept_erp == kept_mes - {"e0", "e1"}
    stats = b.stats()
    assert (stats.sinks["erp"].pending, stats.sinks["erp"].leased) == (len(kept_erp), 0)
    assert (stats.sinks["mes"].pending, stats.sinks["mes"].leased) == (len(kept_mes) - 2, 2)
    b.close()


def test_a_full_disk_does_not_stop_leases_and_accepted_settles(tmp_path: Path) -> None:
    """Leases write nothing and accepted rows only wait for their grouped deletion, so a full
    disk (a real tmpfs filled to the last byte) must not stop deliveries: the deletions wait,
    the rows are never offered again, and they go once space returns."""
    with small_tmpfs(tmp_path / "small", "4m") as mnt:
        clock = [100.0]
        b = SqliteBuffer(mnt / "buffer.db", 2**30, settle_delay=0.0, clock=lambda: clock[0])
        b.open(["erp"])
        b.append([ev(i, size=2000) for i in range(300)], {})
        filler = fill_disk(mnt)
        try:
            with pytest.raises(StorageFullError):  # appends do fail: the disk is full
                b.append([ev(i, size=2000) for i in range(1000, 1300)], {})
            first = b.lease("erp", 10)
            b.settle("erp", Settlement(accepted=[r.seq for r in first]))
            second = b.lease("erp", 10)
            assert {r.seq for r in first}.isdisjoint(r.seq for r in second)
            b.settle("erp", Settlement(accepted=[r.seq for r in second]))
            assert b._leases.settled_count() == 20  # waiting for space
            stats = b.stats()  # answers on a full disk, counting the waiting ones delivered
            assert (stats.sinks["erp"].pending, stats.sinks["erp"].leased) == (280, 0)
        finally:
            filler.unlink()
        clock[0] += 5.0
        b.lease("erp", 1)  # the next try deletes them
        assert b._leases.settled_count() == 0
        b.close()
        with sqlite3.connect(mnt / "buffer.db") as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 280
