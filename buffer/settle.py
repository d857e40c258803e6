"""The SQL of settling delivery rows, run inside the buffer's write transaction.

- ``delete_accepted``: accepted rows of one sink are deleted one statement per run of
  consecutive seqs (``seq BETWEEN first AND last`` walks the key ``(sink, state, seq)`` once
  instead of seeking each row), and so are their events once no row of any sink is left. A
  run has no gap (``leases.runs``): every seq between its ends is one of the rows given, so a
  range cannot reach a row that was not settled (a row in flight, a dead letter, another
  sink's row, an event this sink has no row for). Seqs that are not part of a long enough run
  are deleted by their exact list, in one statement.
- ``mark_dead`` and ``mark_retry`` update rows by seq (rare: a poison event, a 207 item).

No statement returns rows: each runs in one step, which releases the GIL for the whole
statement. Stepping through a ``RETURNING`` or a long result takes the GIL back for every row,
and with the event loop busy each of those hand-overs waited for it (a drain's deletes cost
several times more; docs/buffer.md).

Each returns what the caller needs for its running counts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from buffer.capacity import ANY_STATE, IN_JSON, KNOWN_SINKS, json_list
from buffer.leases import runs

__all__ = ["delete_accepted", "delete_orphans", "mark_dead", "mark_retry"]

_NO_ROWS_LEFT = (f"NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sink IN {KNOWN_SINKS} "
                 f"AND d.state IN {ANY_STATE} AND d.seq = events.seq)")
# Shorter runs go with the scattered seqs into the one list statement: a statement per row
# or two would cost more than a seek per row.
MIN_RUN = 16


def delete_accepted(conn: sqlite3.Connection, sink: str, seqs: list[int]) -> tuple[int, int]:
    """Delete the pending rows ``seqs`` (sorted, distinct) of ``sink`` and their events if no
    other row is left. Returns (rows, events) deleted."""
    if not seqs:
        return 0, 0
    # With a single sink ever registered no other row can hold an event whose row just went,
    # so the per-event check is left out (in the list statement too: every seq given is a
    # settled row of this sink, so its event has no other row).
    only_sink = conn.execute("SELECT count(*) FROM sinks").fetchone()[0] == 1
    keep = "" if only_sink else f"AND {_NO_ROWS_LEFT}"
    rows = events = 0
    scattered: list[int] = []
    for first, last in runs(seqs):
        if last - first + 1 < MIN_RUN:
            scattered.extend(range(first, last + 1))
            continue
        rows += conn.execute("DELETE FROM deliveries WHERE sink = ? AND state = 'pending' "
                             "AND seq BETWEEN ? AND ?", (sink, first, last)).rowcount
        events += conn.execute(f"DELETE FROM events WHERE seq BETWEEN ? AND ? {keep}",
                               (first, last)).rowcount
    if scattered:
        seqs_json = json_list(scattered)
        rows += conn.execute(f"DELETE FROM deliveries WHERE sink = ? AND state = 'pending' "
                             f"AND seq IN ({IN_JSON})", (sink, seqs_json)).rowcount
        events += conn.execute(f"DELETE FROM events WHERE seq IN ({IN_JSON}) {keep}",
                               (seqs_json,)).rowcount
    return rows, events


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
