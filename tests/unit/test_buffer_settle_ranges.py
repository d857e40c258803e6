"""The range deletes of grouped settles, each guard on its own: ``leases.runs`` never makes a
range across a row in flight, and ``settle.delete_accepted`` never deletes a row it was not
given even when a range would span one (it falls back to the exact list)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from buffer.base import NewEvent
from buffer.leases import LeaseTable, runs
from buffer.settle import delete_accepted
from buffer.sqlite import SqliteBuffer


def test_runs_break_at_rows_in_flight_only() -> None:
    assert runs([], [3]) == []
    assert runs([1, 2, 3, 5, 6], []) == [(1, 6)]  # gaps need no break: nothing pending there
    assert runs([1, 2, 4, 5, 9], [3, 7]) == [(1, 2), (4, 5), (9, 9)]
    assert runs([4, 5], [1, 3, 6, 9]) == [(4, 5)]  # breaks outside the span are ignored
    assert runs([1, 10], [2, 3, 4]) == [(1, 1), (10, 10)]


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
        # Settled: 1, 2, 4, 5; row 3 is pending and (wrongly) not named as in flight, so the
        # range 1..5 would take it: the RETURNING check must catch that.
        assert delete_accepted(conn, "erp", [1, 2, 4, 5], leased=[]) == (4, 4)
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
