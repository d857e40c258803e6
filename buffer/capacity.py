"""The ``max_size`` policies of the SQLite buffer, run inside the append transaction.

The size that counts (and that ``stats().size_bytes`` reports) is the live part of the main
file, ``(page_count - freelist_count) * page_size``, read with cheap pragmas before and after an
append's inserts, inside the same transaction (the pragmas see uncommitted pages). Free pages
are reused before the file grows, so the file stays near ``max_size`` (page granularity, and one
batch while it is being cut back); the WAL beside it is bounded by ``journal_size_limit`` after
each checkpoint. When over ``max_size``:

- ``drop_oldest`` deletes whole events, oldest first: first those with only pending rows, then
  (dead letters are kept longest) those holding a dead letter; never one the process holds
  (leased, or settled but not yet deleted: ``held``; if only those are left, the batch commits
  over the limit until they settle). Deletion
  frees pages only as they empty, so it may drop a few more events than the byte count alone
  would say; each one is counted.
- ``reject_new`` keeps the longest head of the batch that fits (a savepoint is rolled back and
  the head re-inserted, so nothing of the rejected tail stays behind, not even index page
  splits) and reports the tail as rejected. Stored events are never removed for room; a later
  batch may fit again once deliveries free space. The detector states still commit: the
  detector has moved on, and the drop is reported as a data gap instead.

Either way the count per type goes to the ``drops`` table (read and cleared by ``take_drops``,
so it survives a crash until reported) and ``meta.dropped_total``.

A ``plantedge.data.gap`` event is the report of earlier drops, not a fact of its own: when
one is dropped (the oldest event under a long outage, or refused by ``reject_new`` while the
buffer is still full), its ``dropped_by_type`` counts go back into the ``drops`` table
(``carried_drops``), so the next gap event reports them again and every dropped fact stays
accounted for by type. They are not added to ``dropped_total`` a second time.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from buffer.base import NewEvent

__all__ = [
    "ANY_STATE",
    "GAP_TYPE",
    "IN_JSON",
    "KNOWN_SINKS",
    "Dropped",
    "append_or_reject",
    "carried_drops",
    "drop_oldest",
    "json_list",
    "live_bytes",
    "page_stats",
    "record_drops",
]

# SQL fragments shared with sqlite.py. A list of seqs travels as one JSON parameter.
IN_JSON = "SELECT value FROM json_each(?)"
# "Every row of this event" = every (sink, state) prefix of the delivery key with this seq;
# every sink that ever had rows stays in ``sinks``.
KNOWN_SINKS = "(SELECT name FROM sinks)"
ANY_STATE = "('pending', 'dead')"  # leases are not in the file (schema 2, leases.py)


GAP_TYPE = "plantedge.data.gap"


def carried_drops(payload: str) -> Counter[str]:
    """The drop counts a dropped data-gap event reported (its ``data.dropped_by_type``); an
    unreadable report counts as one dropped gap event, so nothing vanishes uncounted."""
    try:
        by_type = json.loads(payload)["data"]["dropped_by_type"]
        counts = Counter({str(t): int(n) for t, n in by_type.items()})
    except (ValueError, KeyError, TypeError, AttributeError):
        return Counter({GAP_TYPE: 1})
    return +counts


def json_list(values: Sequence[int] | Sequence[str]) -> str:
    return json.dumps(list(values))


def page_stats(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(page_count, freelist_count, page_size) as this connection sees the file now."""
    page_count = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(page_count), int(free), int(page_size)


def live_bytes(conn: sqlite3.Connection) -> int:
    page_count, free, page_size = page_stats(conn)
    return (page_count - free) * page_size


def record_drops(conn: sqlite3.Connection, removed: Counter[str], now: str,
                 carried: Counter[str] | None = None) -> None:
    """Count ``removed`` events as dropped, and re-queue the ``carried`` counts of dropped
    gap reports (already in ``dropped_total``)."""
    if removed:
        conn.execute("UPDATE meta SET value = value + ? WHERE name = 'dropped_total'",
                     (sum(removed.values()),))
    both = removed + (carried or Counter())
    if not both:
        return
    conn.executemany(
        "INSERT INTO drops(type, count, first_at, last_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(type) DO UPDATE SET count = count + excluded.count, "
        "last_at = excluded.last_at",
        [(t, c, now, now) for t, c in both.items()])


def _split(events: Sequence[tuple[str, str]]) -> tuple[Counter[str], Counter[str]]:
    """(type, payload) of dropped events -> (facts dropped by type, carried gap counts)."""
    removed: Counter[str] = Counter()
    carried: Counter[str] = Counter()
    for type_, payload in events:
        if type_ == GAP_TYPE:
            carried.update(carried_drops(payload))
        else:
            removed[type_] += 1
    return removed, carried


def append_or_reject(conn: sqlite3.Connection, events: Sequence[NewEvent],
                     insert: Callable[[Sequence[NewEvent]], int], *, max_size: int,
                     before: int, live_before: int, now: str) -> tuple[int, int]:
    """reject_new: insert the longest head of the batch that fits; (stored, rejected).

    ``insert`` writes events and their delivery rows and returns how many were new;
    ``before`` is the highest seq before this batch."""
    conn.execute("SAVEPOINT batch")
    inserted = insert(events)
    if inserted == 0 or live_bytes(conn) <= max_size:
        conn.execute("RELEASE batch")
        return inserted, 0
    live = live_bytes(conn)
    by_id = {e.id: e for e in events}
    fresh = [by_id[str(i)] for (i,) in conn.execute(
        "SELECT id FROM events WHERE seq > ? ORDER BY seq", (before,))]
    per_event = max((live - live_before) / inserted, 1.0)
    keep = min(len(fresh) - 1, max(int((max_size - live_before) / per_event), 0))
    while True:
        conn.execute("ROLLBACK TO batch")
        insert(fresh[:keep])
        if keep <= 0 or live_bytes(conn) <= max_size:
            break
        keep -= max(keep // 8, 1)
    conn.execute("RELEASE batch")
    removed, carried = _split([(e.type, e.payload) for e in fresh[keep:]])
    record_drops(conn, removed, now, carried)
    return keep, len(fresh) - keep


@dataclass(slots=True)
class Dropped:
    """What ``drop_oldest`` deleted: events, of which ``new`` from this very batch (when the
    batch alone is larger than the room there is), and delivery rows by (sink, state)."""

    events: int = 0
    new: int = 0
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)


def drop_oldest(conn: sqlite3.Connection, *, max_size: int, before: int, inserted: int,
                live_before: int, now: str, held: Callable[[], Collection[int]]) -> Dropped:
    """drop_oldest after the batch is inserted (``before``: the highest seq before it);
    ``held()`` gives the seqs that must not be dropped (asked only when over the limit)."""
    dropped = Dropped()
    live = live_bytes(conn)
    if inserted == 0 or live <= max_size:
        return dropped
    # Bytes per event as this batch actually grew the file; each round then learns from what
    # its deletes freed. Deleting too few only costs another round.
    per_event = max((live - live_before) / inserted, 64.0)
    removed: Counter[str] = Counter()
    carried: Counter[str] = Counter()
    keep = json_list(sorted(held()))
    while live > max_size:
        victims = _victims(conn, int((live - max_size) / per_event) + 1, keep)
        if not victims:
            break  # only leased rows left (or nothing): commit over capacity for now
        seqs = json_list([s for s, _ in victims])
        rows = conn.execute(f"DELETE FROM deliveries WHERE sink IN {KNOWN_SINKS} AND state "
                            f"IN {ANY_STATE} AND seq IN ({IN_JSON}) RETURNING sink, state",
                            (seqs,)).fetchall()
        dropped.rows.update((str(sink), str(state)) for sink, state in rows)
        gone = conn.execute(f"DELETE FROM events WHERE seq IN ({IN_JSON}) "
                            "RETURNING type, payload", (seqs,)).fetchall()
        facts, reports = _split([(str(t), str(p)) for t, p in gone])
        removed.update(facts)
        carried.update(reports)
        dropped.events += len(victims)
        dropped.new += sum(1 for s, _ in victims if s > before)
        now_live = live_bytes(conn)
        # Pages free only when they empty, so a round may free less than its rows' worth;
        # learn from rounds that freed something, keep the estimate after one that did not.
        if now_live < live:
            per_event = max(min(per_event, (live - now_live) / len(victims)), 64.0)
        live = now_live
    record_drops(conn, removed, now, carried)
    return dropped


def _victims(conn: sqlite3.Connection, n: int, held_json: str) -> list[tuple[int, str]]:
    spare = f"e.seq NOT IN ({IN_JSON})"
    for extra in (f"AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sink IN {KNOWN_SINKS} "
                  "AND d.state = 'dead' AND d.seq = e.seq)", ""):  # dead letters go last
        rows = conn.execute(f"SELECT seq, type FROM events e WHERE {spare} {extra} "
                            "ORDER BY seq LIMIT ?", (held_json, n)).fetchall()
        if rows:
            return [(int(s), str(t)) for s, t in rows]
    return []
