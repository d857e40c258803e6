"""The range deletes of grouped settles, each guard on its own: ``leases.runs`` never makes a
range across a row in flight, and ``settle.delete_accepted`` never deletes a row it was not
given: a range is a run of consecutive seqs, so it cannot reach a row in flight, a dead letter,
another sink's row or an event this sink has no row for."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from buffer.base import NewEvent
from buffer.leases import LeaseTable, runs
from buffer.settle import MIN_RUN, delete_accepted
from buffer.sqlite import SqliteBuffer


def test_runs_are_consecutive_seqs_only() -> None:
    assert runs([]) == []
    assert runs([1, 2, 3, 5, 6]) == [(1, 3), (5, 6)]  # a gap may hide any row: a break
    assert runs([1, 2, 4, 5, 9]) == [(1, 2), (4, 5), (9, 9)]
    assert runs([7]) == [(7, 7)]


def test_a_range_that_would_reach_an_unsettled_row_deletes_only_the_given_rows(
        tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    b = SqliteBuffer(path, 2**30)
    b.open(["erp"])
    b.append([NewEvent(f"e{i}", "m1", "t", "2026-01-01T00:00:00.000Z", "{}")
              for i in range(1, 6)], {})
    b.close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # Settled: 1, 2, 4, 5; row 3 is pending (in flight, say): no range may span it.
        assert delete_accepted(conn, "erp", [1, 2, 4, 5]) == (4, 4)
        conn.execute("COMMIT")
        assert [s for (s,) in conn.execute("SELECT seq FROM deliveries")] == [3]
        assert [s for (s,) in conn.execute("SELECT seq FROM events")] == [3]
    finally:
        conn.close()


def test_give_back_returns_leased_rows_and_lowers_the_floor() -> None:
    table = LeaseTable()
    table.take("erp", [5, 6, 7], until=10.0)
    table.of("erp").floor = 7
    table.accept("erp", [6])
    assert table.give_back("erp", [5, 6, 7, 99]) == 2
    s = table.of("erp")
    assert (dict(s.leased), s.settled, s.floor) == ({}, {6}, 4)


def test_long_runs_delete_only_the_settled_rows_of_their_sink(tmp_path: Path) -> None:
    """Runs long enough to go as ranges (``MIN_RUN``), with every kind of row between them:
    nothing but the settled rows of ``erp`` (and events no row holds any more) is deleted."""
    path = tmp_path / "buffer.db"
    b = SqliteBuffer(path, 2**30)
    b.open(["erp"])
    n = 3 * MIN_RUN + 3
    b.append([NewEvent(f"e{i}", "m1", "t", "2026-01-01T00:00:00.000Z", "{}")
              for i in range(1, n + 1)], {})
    b.close()
    b = SqliteBuffer(path, 2**30)
    b.open(["erp", "mes"])  # mes: registered later, rows only for events appended from now
    b.append([NewEvent(f"f{i}", "m1", "t", "2026-01-01T00:00:00.000Z", "{}")
              for i in range(1, MIN_RUN + 1)], {})
    b.close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        in_flight, dead = MIN_RUN + 1, 2 * MIN_RUN + 2
        conn.execute("UPDATE deliveries SET state = 'dead' WHERE sink = 'erp' AND seq = ?",
                     (dead,))
        settled = [s for s in range(1, n + MIN_RUN + 1) if s not in (in_flight, dead)]
        conn.execute("BEGIN IMMEDIATE")
        rows, events = delete_accepted(conn, "erp", settled)
        conn.execute("COMMIT")
        # The events appended after mes joined keep their mes rows.
        assert (rows, events) == (len(settled), n - 2)
        left = conn.execute("SELECT sink, state, seq FROM deliveries ORDER BY sink, seq")
        assert list(left) == [("erp", "pending", in_flight), ("erp", "dead", dead)] + [
            ("mes", "pending", s) for s in range(n + 1, n + MIN_RUN + 1)]
        assert [s for (s,) in conn.execute("SELECT seq FROM events ORDER BY seq")] == [
            in_flight, dead, *range(n + 1, n + MIN_RUN + 1)]
    finally:
        conn.close()


def test_a_single_sink_range_never_takes_an_event_this_sink_has_no_row_for(
        tmp_path: Path) -> None:
    """Events appended while no sink was configured have no row at all; a long run of settled
    rows on either side must leave them (only one sink ever registered: no per-event check)."""
    path = tmp_path / "buffer.db"
    ev = [NewEvent(f"e{i}", "m1", "t", "2026-01-01T00:00:00.000Z", "{}")
          for i in range(1, 2 * MIN_RUN + 2)]
    b = SqliteBuffer(path, 2**30)
    b.open(["erp"])
    b.append(ev[:MIN_RUN], {})
    b.close()
    b = SqliteBuffer(path, 2**30)
    b.open([])
    b.append(ev[MIN_RUN:MIN_RUN + 1], {})  # seq MIN_RUN + 1: no row for any sink
    b.close()
    b = SqliteBuffer(path, 2**30)
    b.open(["erp"])
    b.append(ev[MIN_RUN + 1:], {})
    b.close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        settled = [s for (s,) in conn.execute("SELECT seq FROM deliveries ORDER BY seq")]
        assert MIN_RUN + 1 not in settled and len(settled) == 2 * MIN_RUN
        conn.execute("BEGIN IMMEDIATE")
        assert delete_accepted(conn, "erp", settled) == (2 * MIN_RUN, 2 * MIN_RUN)
        conn.execute("COMMIT")
        assert [s for (s,) in conn.execute("SELECT seq FROM events")] == [MIN_RUN + 1]
    finally:
        conn.close()
