"""The ``max_size`` policies of the SQLite buffer, run inside the append transaction.

The size that counts (and that ``stats().size_bytes`` reports) is the live part of the main
file, ``(page_count - freelist_count) * page_size``, read with cheap pragmas before and after an
append's inserts, inside the same transaction (the pragmas see uncommitted pages). Free pages
are reused before the file grows, so the file stays near ``max_size`` (page granularity, and one
batch while it is being cut back); the WAL beside it is bounded by ``journal_size_limit`` after
each checkpoint. When over ``max_size``:

- ``drop_oldest`` deletes whole events, oldest first: first those with only pending rows, then
  (dead letters are kept longest) those holding a dead letter; never one the process holds
  (leased, or delivered with its deletion still grouped: ``held``; if only those are left, the
  batch commits over the limit until they settle). Deletion
  frees pages only as they empty, so it may drop a few more events than the byte count alone
  would say; each one is counted.
- ``reject_new`` keeps the longest head of the batch that fits (a savepoint is rolled back and
  the head re-inserted, so nothing of the rejected tail stays behind, not even index page
  splits) and reports the tail as rejected. Stored events are never removed for room; a later
  batch may fit again once deliveries free space. The detector states still commit: the
  detector has moved on, and the drop is reported as a data gap instead.

Fair share between sinks (``drop_oldest``): the runtime passes how many events each sink still
holds rows for. A sink holding more than an equal share of the buffer's events (``events /
sinks``; one down for a day) is over its share; while there are events that only such sinks
still need, those go first, so a sink that keeps up never loses an event to another sink's
outage. Only when nothing else can go is an event dropped that a sink within its share needs.

Attribution: every delivery row deleted (or, for ``reject_new``, never created) is counted per
(sink, type), so the data gap can say which sink lost what; those counts travel in the same
``drops`` table under keys ``sink:<sink>:<type>`` (sink ids cannot contain ``:``), which
``split_drops`` separates again. They are not added to ``dropped_total`` (that counts events).

Either way the count per type goes to the ``drops`` table (read by ``peek_drops`` and taken
out by ``unrecord_drops`` in the transaction that stores the gap event reporting it, so it
survives a crash until reported) and ``meta.dropped_total``.

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
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from buffer.base import NewEvent

__all__ = [
    "ANY_STATE",
    "GAP_TYPE",
    "IN_JSON",
    "KNOWN_SINKS",
    "SINK_KEY",
    "Dropped",
    "append_or_reject",
    "carried_drops",
    "drop_keys",
    "drop_oldest",
    "json_list",
    "live_bytes",
    "make_room_for_share",
    "page_stats",
    "record_drops",
    "sink_key",
    "split_drops",
    "unrecord_drops",
    "within_share",
]

# SQL fragments shared with sqlite.py. A list of seqs travels as one JSON parameter.
IN_JSON = "SELECT value FROM json_each(?)"
# "Every row of this event" = every (sink, state) prefix of the delivery key with this seq;
# every sink that ever had rows stays in ``sinks``.
KNOWN_SINKS = "(SELECT name FROM sinks)"
ANY_STATE = "('pending', 'dead')"  # leases are not in the file (schema 2, leases.py)


GAP_TYPE = "plantedge.data.gap"
SINK_KEY = "sink:"


def sink_key(sink: str, type_: str) -> str:
    return f"{SINK_KEY}{sink}:{type_}"


def drop_keys(by_type: dict[str, int], by_sink: dict[str, dict[str, int]]) -> dict[str, int]:
    """The ``drops`` table keys of a report: the inverse of ``split_drops``."""
    keys = dict(by_type)
    for sink, per in by_sink.items():
        for type_, n in per.items():
            keys[sink_key(sink, type_)] = n
    return keys


def split_drops(counts: dict[str, int]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``drops`` table counts -> (events by type, rows lost by sink and type)."""
    by_type: dict[str, int] = {}
    by_sink: dict[str, dict[str, int]] = {}
    for key, n in counts.items():
        if key.startswith(SINK_KEY):
            sink, _, type_ = key[len(SINK_KEY):].partition(":")
            per = by_sink.setdefault(sink, {})
            per[type_] = per.get(type_, 0) + n
        else:
            by_type[key] = by_type.get(key, 0) + n
    return by_type, by_sink


def carried_drops(payload: str) -> Counter[str]:
    """The drop counts a dropped data-gap event reported (its ``data.dropped_by_type``, and
    ``dropped_by_sink`` under sink keys); an unreadable report counts as one dropped gap event,
    so nothing vanishes uncounted."""
    try:
        data = json.loads(payload)["data"]
        counts = Counter({str(t): int(n) for t, n in data["dropped_by_type"].items()})
        for sink, per in (data.get("dropped_by_sink") or {}).items():
            counts.update({sink_key(str(sink), str(t)): int(n) for t, n in per.items()})
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


def unrecord_drops(conn: sqlite3.Connection, reported: dict[str, int]) -> None:
    """Take counts that a data-gap event now reports out of the ``drops`` table (same
    transaction as that event's insert)."""
    if not reported:
        return
    conn.executemany("UPDATE drops SET count = count - ? WHERE type = ?",
                     [(c, t) for t, c in reported.items()])
    conn.execute("DELETE FROM drops WHERE count <= 0")


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
                     before: int, live_before: int, now: str,
                     sinks: Sequence[str] = ()) -> tuple[int, int]:
    """reject_new: insert the longest head of the batch that fits; (stored, rejected).

    ``insert`` writes events and their delivery rows and returns how many were new;
    ``before`` is the highest seq before this batch; every one of ``sinks`` (those that get
    rows for new events) lost each rejected event."""
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
    for sink in sinks:
        carried.update(Counter(sink_key(sink, e.type) for e in fresh[keep:]))
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
                live_before: int, now: str, held: Callable[[], Collection[int]],
                usage: Mapping[str, int] | None = None, events: int = 0) -> Dropped:
    """drop_oldest after the batch is inserted (``before``: the highest seq before it);
    ``held()`` gives the seqs that must not be dropped (asked only when over the limit).

    ``usage``: events each sink still holds rows for, ``events``: events in the buffer (both
    including this batch); with them, sinks within their fair share are spared while anything
    else can go (module docstring)."""
    live = live_bytes(conn)
    if inserted == 0 or live <= max_size:
        return Dropped()
    # Bytes per event as this batch actually grew the file; each round then learns from what
    # its deletes freed. Deleting too few only costs another round.
    per_event = max((live - live_before) / inserted, 64.0)
    spared = within_share(usage or {}, events)
    drop = _Dropping(conn, before, per_event, held())
    if spared:
        drop.until(max_size, spared)
    drop.until(max_size, [])  # nothing left that only over-share sinks need: oldest first
    record_drops(conn, drop.removed, now, drop.carried)
    return drop.dropped


def make_room_for_share(conn: sqlite3.Connection, events: Sequence[NewEvent], *,
                        max_size: int, now: str, held: Callable[[], Collection[int]],
                        usage: Mapping[str, int] | None = None, total: int = 0) -> Dropped:
    """reject_new's fair share, before the batch goes in: when the batch would not fit, drop
    the oldest events that only sinks over their share still need (never one a sink within
    its share needs), so one sink that is down does not make the others lose new events."""
    spared = within_share(usage or {}, total)
    live = live_bytes(conn)
    # Generous (rows, index entries, page slack): too much only drops a little more of what
    # over-share sinks alone still need; too little would reject new events for everyone.
    need = sum(len(e.payload) * 5 // 4 + 400 for e in events)
    if not spared or live + need <= max_size:
        return Dropped()
    drop = _Dropping(conn, 2**62, max(need / max(len(events), 1), 64.0), held())
    drop.until(max_size - need, spared)
    record_drops(conn, drop.removed, now, drop.carried)
    return drop.dropped


class _Dropping:
    """Deletes victims in rounds until the live size is at a target, counting everything."""

    def __init__(self, conn: sqlite3.Connection, before: int, per_event: float,
                 held: Collection[int]) -> None:
        self.conn, self.before, self.per_event = conn, before, per_event
        self.held = json_list(sorted(held))
        self.dropped = Dropped()
        self.removed: Counter[str] = Counter()
        self.carried: Counter[str] = Counter()

    def until(self, target: int, spared: Sequence[str]) -> None:
        conn = self.conn
        live = live_bytes(conn)
        while live > target:
            victims = _victims(conn, int((live - target) / self.per_event) + 1, self.held,
                               spared)
            if not victims:
                return  # only leased (or spared) rows left: commit over capacity for now
            seqs = json_list([s for s, _ in victims])
            type_of = dict(victims)
            rows = conn.execute(
                f"DELETE FROM deliveries WHERE sink IN {KNOWN_SINKS} AND state IN {ANY_STATE} "
                f"AND seq IN ({IN_JSON}) RETURNING sink, state, seq", (seqs,)).fetchall()
            self.dropped.rows.update((str(sink), str(state)) for sink, state, _ in rows)
            # Rows lost per sink and type (pending and dead letters alike; a gap report a
            # sink lost counts as a gap event, and its contents are carried as well).
            self.carried.update(sink_key(str(sink), type_of[int(seq)]) for sink, _, seq in rows)
            gone = conn.execute(f"DELETE FROM events WHERE seq IN ({IN_JSON}) "
                                "RETURNING type, payload", (seqs,)).fetchall()
            facts, reports = _split([(str(t), str(p)) for t, p in gone])
            self.removed.update(facts)
            self.carried.update(reports)
            self.dropped.events += len(victims)
            self.dropped.new += sum(1 for s, _ in victims if s > self.before)
            now_live = live_bytes(conn)
            # Pages free only when they empty, so a round may free less than its rows'
            # worth; learn from rounds that freed something, keep the estimate otherwise.
            if now_live < live:
                self.per_event = max(min(self.per_event, (live - now_live) / len(victims)),
                                     64.0)
            live = now_live


def within_share(usage: Mapping[str, int], events: int) -> list[str]:
    """Sinks holding rows for at most an equal share of the buffer's events."""
    if len(usage) < 2 or events <= 0:
        return []
    share = events / len(usage)
    spared = [sink for sink, n in usage.items() if n <= share]
    return spared if len(spared) < len(usage) else []


def _victims(conn: sqlite3.Connection, n: int, held_json: str,
             spared: Sequence[str] = ()) -> list[tuple[int, str]]:
    """The oldest droppable events: none held by the process (``held_json``); dead letters
    last; with ``spared``, only events none of those sinks still needs."""
    not_spared = ("AND NOT EXISTS (SELECT 1 FROM deliveries s WHERE s.sink IN "
                  f"({IN_JSON}) AND s.state IN {ANY_STATE} AND s.seq = e.seq) ")
    no_dead = (f"AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.sink IN {KNOWN_SINKS} "
               "AND d.state = 'dead' AND d.seq = e.seq) ")
    for keep in (no_dead, ""):  # dead letters go last
        sql = (f"SELECT seq, type FROM events e WHERE e.seq NOT IN ({IN_JSON}) {keep}"
               + (not_spared if spared else "") + "ORDER BY seq LIMIT ?")
        params: tuple[object, ...] = (held_json, json_list(list(spared)), n) if spared \
            else (held_json, n)
        rows = conn.execute(sql, params).fetchall()
        if rows:
            return [(int(s), str(t)) for s, t in rows]
    return []
