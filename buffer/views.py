"""Read-side queries of the SQLite buffer: dead letters, undelivered rows, statistics.

Pure functions over a connection, shared by the agent's writer connection and the CLI's
read-only one (``SqliteBuffer.attach``). They only read; translating SQLite errors is the
caller's job. Each walks key ranges of ``deliveries(sink, state, seq)``, so listing the oldest
rows never sorts a whole table. Leases are held in the agent's memory (``leases.py``): in the
file an undelivered row is ``pending`` whether or not the running agent has it in flight.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence

from buffer.base import DeadLetter, LeasedEvent, SinkStats
from buffer.capacity import IN_JSON, KNOWN_SINKS, json_list

__all__ = ["DeadLetterStream", "count_dead", "dead_filter", "dead_letters", "first_dead",
           "iter_dead_letters", "sink_names", "sink_stats", "undelivered"]


def sink_names(conn: sqlite3.Connection, configured: Sequence[str]) -> list[str]:
    """The configured sinks first, then any other sink that ever had rows."""
    names = dict.fromkeys(configured)
    names.update(dict.fromkeys(str(r[0]) for r in conn.execute("SELECT name FROM sinks")))
    return list(names)


def dead_filter(sink: str | None, ids: Sequence[str] | None) -> tuple[str, list[object]]:
    """A WHERE clause on ``deliveries`` selecting dead letters (of one sink, with these ids)."""
    if sink is None:
        where, params = f"sink IN {KNOWN_SINKS} AND state = 'dead'", list[object]()
    else:
        where, params = "sink = ? AND state = 'dead'", [sink]
    if ids is not None:
        where += f" AND seq IN (SELECT seq FROM events WHERE id IN ({IN_JSON}))"
        params.append(json_list(list(ids)))
    return where, params


def first_dead(where: str, params: list[object],
               limit: int | None) -> tuple[str, list[object]]:
    """Narrow a ``dead_filter`` to its first ``limit`` rows (None: all), so that replay and
    purge can work in short transactions."""
    if limit is None:
        return where, params
    return (f"state = 'dead' AND (sink, seq) IN (SELECT sink, seq FROM deliveries "
            f"WHERE {where} ORDER BY seq, sink LIMIT ?)", [*params, limit])


def dead_letters(conn: sqlite3.Connection, sink: str | None, limit: int) -> list[DeadLetter]:
    where, params = dead_filter(sink, None)
    rows = conn.execute(
        "SELECT d.sink, d.seq, e.id, e.type, e.payload, d.status, d.detail, d.failed_at "
        f"FROM deliveries d JOIN events e ON e.seq = d.seq WHERE {where} "
        "ORDER BY d.seq, d.sink LIMIT ?", [*params, limit]).fetchall()
    return [DeadLetter(str(sk), int(s), str(i), str(t), str(p),
                       None if st is None else int(st), str(dt or ""), str(fa or ""))
            for sk, s, i, t, p, st, dt, fa in rows]


class DeadLetterStream(Iterator[DeadLetter]):
    """Dead letters in (seq, sink) order from one read snapshot.

    The snapshot (a deferred transaction this stream began, if the connection had none) ends
    on ``close()`` or at the end of the rows, whether or not the rows were ever read: a
    stream that is opened only for its count and closed must not leave the connection inside
    a transaction (the next write on it would fail, and the WAL could not be checkpointed
    past the snapshot). ``translate`` turns an SQLite error while reading into the caller's.
    """

    def __init__(self, conn: sqlite3.Connection, where: str, params: list[object],
                 owns: bool, translate: Callable[[sqlite3.Error], Exception]) -> None:
        self._conn, self._where, self._params = conn, where, params
        self._owns, self._translate = owns, translate
        self._cur: sqlite3.Cursor | None = None
        self._closed = False

    def __iter__(self) -> DeadLetterStream:
        return self

    def __next__(self) -> DeadLetter:
        if self._closed:
            raise StopIteration
        try:
            if self._cur is None:
                self._cur = self._conn.execute(
                    "SELECT d.sink, d.seq, e.id, e.type, e.payload, d.status, d.detail, "
                    "d.failed_at FROM deliveries d JOIN events e ON e.seq = d.seq "
                    f"WHERE {self._where} ORDER BY d.seq, d.sink", self._params)
            row = self._cur.fetchone()
        except sqlite3.Error as e:
            self.close()
            raise self._translate(e) from e
        if row is None:
            self.close()
            raise StopIteration
        sk, s, i, t, p, st, dt, fa = row
        return DeadLetter(str(sk), int(s), str(i), str(t), str(p),
                          None if st is None else int(st), str(dt or ""), str(fa or ""))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cur is not None:
            self._cur.close()
        if self._owns and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")  # a read snapshot: nothing to commit

    def __enter__(self) -> DeadLetterStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def count_dead(conn: sqlite3.Connection, sink: str | None,
               ids: Sequence[str] | None = None) -> int:
    """How many dead letters (of one sink, with these ids) there are."""
    where, params = dead_filter(sink, ids)
    return int(conn.execute(f"SELECT count(*) FROM deliveries WHERE {where}",
                            params).fetchone()[0])


def iter_dead_letters(conn: sqlite3.Connection, sink: str | None,
                      ids: Sequence[str] | None = None, *,
                      translate: Callable[[sqlite3.Error], Exception] = lambda e: e
                      ) -> tuple[int, DeadLetterStream]:
    """Every dead letter (of one sink, with these ids), streamed in (seq, sink) order from one
    read snapshot, and how many there are in that snapshot. Close the stream (or read it to
    the end) to end the read transaction; closing it unread ends it too."""
    where, params = dead_filter(sink, ids)
    owns = not conn.in_transaction
    if owns:
        conn.execute("BEGIN")
    try:
        total = int(conn.execute(f"SELECT count(*) FROM deliveries WHERE {where}",
                                 params).fetchone()[0])
    except BaseException:
        if owns:
            conn.execute("ROLLBACK")
        raise
    return total, DeadLetterStream(conn, where, params, owns, translate)


def undelivered(conn: sqlite3.Connection, sinks: Sequence[str],
                limit: int) -> list[LeasedEvent]:
    """Undelivered (pending) rows of these sinks, oldest first, each event once (with the
    highest attempt count among its rows)."""
    attempts: dict[int, int] = {}
    for name in sinks:
        for seq, n in conn.execute("SELECT seq, attempts FROM deliveries WHERE sink = ? "
                                   "AND state = 'pending' ORDER BY seq LIMIT ?", (name, limit)):
            attempts[seq] = max(attempts.get(seq, 0), int(n))
    chosen = sorted(attempts)[:max(limit, 0)]
    rows = conn.execute(f"SELECT seq, id, key, type, payload FROM events "
                        f"WHERE seq IN ({IN_JSON}) ORDER BY seq", (json_list(chosen),))
    return [LeasedEvent(int(s), str(i), str(k), str(t), str(p), attempts[s])
            for s, i, k, t, p in rows]


def sink_stats(conn: sqlite3.Connection, sink: str, counts: dict[str, int] | None = None,
               delivered: Collection[int] = ()) -> SinkStats:
    """Counts by state (counted here unless given; ``leased`` is only known to the agent)
    and the time of the oldest undelivered event: the first pending key that is not among
    ``delivered`` (rows accepted whose deletion is not committed yet)."""
    if counts is None:
        counts = {state: int(conn.execute("SELECT count(*) FROM deliveries WHERE sink = ? "
                                          "AND state = ?", (sink, state)).fetchone()[0])
                  for state in ("pending", "dead")}
        counts["leased"] = 0
    first = None
    if counts["pending"] + counts["leased"] > 0:
        for (seq,) in conn.execute("SELECT seq FROM deliveries WHERE sink = ? AND "
                                   "state = 'pending' ORDER BY seq", (sink,)):
            if seq not in delivered:
                first = int(seq)
                break
    oldest = None
    if first is not None:
        row = conn.execute("SELECT time FROM events WHERE seq = ?", (first,)).fetchone()
        oldest = str(row[0]) if row else None
    return SinkStats(pending=counts["pending"], leased=counts["leased"],
                     dead_letters=counts["dead"], oldest_pending_time=oldest)
