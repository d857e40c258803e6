"""The SQL of settling delivery rows, run inside the buffer's write transaction.

- ``delete_accepted``: accepted rows of one sink are deleted one seq range per statement
  (``seq BETWEEN first AND last`` walks the key ``(sink, state, seq)`` once instead of seeking
  each row), and so are their events once no row of any sink is left. A range must not take a
  row that was not settled: ranges never span a row still leased (``leases.runs``), and each
  statement returns what it deleted; should a range have reached anything else (a row another
  connection replayed into it, an event appended before the sink existed), the savepoint is
  rolled back and the rows are deleted by the exact list of seqs instead.
- ``mark_dead`` and ``mark_retry`` update rows by seq (rare: a poison event, a 207 item).

Each returns what the caller needs for its running counts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping

from buffer.capacity import ANY_STATE, IN_JSON, KNOWN_SINKS, json_list
from buffer.leases import runs

__all__ = ["delete_accepted", "delete_orphans", "mark_dead", "mark_retry"]

_NO_ROWS_LEFT = (f"NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sink IN {KNOWN_SINKS} "
                 f"AND d.state IN {ANY_STATE} AND d.seq = events.seq)")


def delete_accepted(conn: sqlite3.Connection, sink: str, seqs: list[int],
                    leased: Iterable[int]) -> tuple[int, int]:
    """Delete the pending rows ``seqs`` (sorted) of ``sink`` and their events if no other
    row is left; ``leased`` are rows that must survive. Returns (rows, events) deleted."""
    if not seqs:
        return 0, 0
    want = set(seqs)
    conn.execute("SAVEPOINT settle")
    try:
        got = _by_ranges(conn, sink, runs(seqs, leased), want)
        if got is None:
            conn.execute("ROLLBACK TO settle")
            got = _by_list(conn, sink, seqs)
        conn.execute("RELEASE settle")
    except BaseException:
        conn.execute("ROLLBACK TO settle")
        conn.execute("RELEASE settle")
        raise
    return got


def _by_ranges(conn: sqlite3.Connection, sink: str, ranges: list[tuple[int, int]],
               want: set[int]) -> tuple[int, int] | None:
    """None when a range reached a row or event it must not delete."""
    # With a single sink ever registered no other row can hold an event whose row just went,
    # so the per-event check is left out (the RETURNING check still guards each range).
    only_sink = conn.execute("SELECT count(*) FROM sinks").fetchone()[0] == 1
    keep = "" if only_sink else f"AND {_NO_ROWS_LEFT}"
    rows = events = 0
    for first, last in ranges:
        got = conn.execute("DELETE FROM deliveries WHERE sink = ? AND state = 'pending' "
                           "AND seq BETWEEN ? AND ? RETURNING seq",
                           (sink, first, last)).fetchall()
        if any(seq not in want for (seq,) in got):
            return None
        rows += len(got)
        gone = conn.execute(f"DELETE FROM events WHERE seq BETWEEN ? AND ? {keep} "
                            "RETURNING seq", (first, last)).fetchall()
        if len(gone) > len(got) or (gone and not {s for (s,) in gone} <= {s for (s,) in got}):
            return None
        events += len(gone)
    return rows, events


def _by_list(conn: sqlite3.Connection, sink: str, seqs: list[int]) -> tuple[int, int]:
    seqs_json = json_list(seqs)
    rows = conn.execute(f"DELETE FROM deliveries WHERE sink = ? AND state = 'pending' "
                        f"AND seq IN ({IN_JSON})", (sink, seqs_json)).rowcount
    return rows, delete_orphans(conn, seqs_json)


def delete_orphans(conn: sqlite3.Connection, seqs_json: str) -> int:
    """Delete the events among these seqs that no longer have any delivery row; how many."""
    return conn.execute(f"DELETE FROM events WHERE seq IN ({IN_JSON}) AND {_NO_ROWS_LEFT}",
                        (seqs_json,)).rowcount


def mark_dead(conn: sqlite3.Connection, sink: str,
              dead: Mapping[int, tuple[int | None, str]], now: str) -> int:
    """Pending rows -> dead letters with their status and reason; how many moved."""
    return conn.executemany(
        "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, status = ?, "
        "detail = ?, failed_at = ? WHERE sink = ? AND state = 'pending' AND seq = ?",
        [(st, detail, now, sink, seq) for seq, (st, detail) in dead.items()]).rowcount


def mark_retry(conn: sqlite3.Connection, sink: str, seqs: list[int]) -> None:
    """One more attempt counted on rows that stay pending."""
    conn.execute("UPDATE deliveries SET attempts = attempts + 1 WHERE sink = ? AND "
                 f"state = 'pending' AND seq IN ({IN_JSON})", (sink, json_list(seqs)))
