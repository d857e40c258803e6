"""The durable buffer: one SQLite file in WAL mode, one writer connection.

Schema version 3 (``migrations.py``, version in ``PRAGMA user_version``)::

    events(seq AUTOINCREMENT, id UNIQUE, key, type, time, payload, created_at)
       1 ──< deliveries(sink, state, seq, attempts, status, detail, failed_at)
             key (sink, state, seq), state pending | dead: a sink's undelivered rows in
             append order are one key range
    detector_state(key, state, updated_at) -- a rowid table: a 2-3 KB state stays in its leaf
    sinks(name, added_at)
    drops(type, count, first_at, last_at)      meta(name, value)   -- dropped_total, clean_stop

States of one delivery row (one per event per sink known when the event was appended); the
lease and the accepted-but-not-yet-deleted state live in memory (``leases.py``)::

    pending --lease--> leased --settle accepted--> settled --next write--> (row deleted;
       ^   (memory)      |  (memory)                 (memory)     event deleted with its last row)
       |                 |    --settle dead------> dead --replay--> pending   (purge: deleted)
       |                 |    --settle retry-----> pending (attempts + 1)
       +--expiry/open/release (a leaser that stops gives its rows back)

Invariants:

- ``append`` is one ``BEGIN IMMEDIATE`` transaction: events (``INSERT OR IGNORE`` on the id,
  so a re-detected event is neither stored twice nor counted), their delivery rows, the
  detector states, and any capacity drops commit together or not at all. Group commit: a batch
  is one transaction and one fsync.
- A lease writes nothing. ``renew`` moves the deadline of rows still leased (the forwarder
  renews what it holds before each lease, so rows in flight are never offered twice);
  a lease older than ``lease_timeout`` is offered again; ``open`` starts with no lease.
- Grouped settles: accepted rows are deleted by the next write transaction (an append carries
  them), or by their own once ``settle_rows`` piled up or the oldest waited ``settle_delay``
  seconds (checked at ``settle`` and ``lease``), and at ``close``. One statement per seq range
  (``settle.py``). A crash loses at most those deletions: the rows are pending again and
  re-sent, and the receiver deduplicates them. Dead and retry settlements commit at once.
- ``seq`` is never reused (AUTOINCREMENT), so append order = seq order, across deletes too.
- A held row (leased or settled) is never offered again by ``lease`` and capacity never
  drops its event.
- Sinks: a sink named at ``open`` gets rows only for events appended after it was first
  registered. A sink removed from the configuration keeps its rows (pending/dead, shown by
  ``stats``) until purged; nothing is deleted because a config line went away. With no sink
  at all, events are kept (there is nobody to deliver them to) until capacity drops them.
- ``detector_state`` is never dropped by the capacity policy.

Capacity (``capacity.py``): what counts is the live part of the main file (pages in use);
``drop_oldest`` deletes the oldest events not held (dead letters last), ``reject_new`` keeps
the head of a batch that fits; both count drops by type, durably. The file is created with
``auto_vacuum=INCREMENTAL`` and ``incremental_vacuum`` runs after deletions once a quarter of
it is free, so it also shrinks.

Crash semantics: with ``synchronous=FULL`` a returned ``append`` survives a power cut; with
``NORMAL`` it survives a process crash but the last commits may be lost on power loss.
``close`` records a clean stop; ``open`` after a stop that did not record one runs
``PRAGMA quick_check`` before anything else (``sqlite_file.py``, which also translates errors).

Damage: a damaged file found at ``open`` (not a database, or ``quick_check`` fails) is moved
aside to ``<file>.corrupt-<UTC timestamp>`` and its readable events and states are copied into
a fresh file (``salvage.py``); ``degraded_reason`` says so for readiness. Damage met later
raises ``BufferCorruptError`` (fatal: the restart salvages).

Statistics: ``open`` counts rows once; afterwards each committed transaction adjusts running
counts by its statements' row counts, and the leased and settled rows come from memory, so
``stats()`` (called for every /status) scans nothing. When another connection has committed
(``PRAGMA data_version`` changed: the CLI's replay or purge), the rows are counted again and
leases scan from the start of each sink. ``attach`` connections count from scratch and see no
leases. ``stats()`` and ``pending()`` commit the grouped settles first, so they are exact.

Threading: one connection (``check_same_thread=False``) used by one thread at a time; the
runtime confines it to the ``AsyncBuffer`` writer thread. Readers such as the CLI use
``SqliteBuffer.attach(path)`` (``mode=ro``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from buffer import views
from buffer.base import (
    AppendResult,
    Buffer,
    BufferCorruptError,
    BufferOpenError,
    BufferStats,
    DeadLetter,
    Drops,
    LeasedEvent,
    NewEvent,
    check_batch,
)
from buffer.capacity import (
    append_or_reject,
    drop_keys,
    drop_oldest,
    json_list,
    live_bytes,
    make_room_for_share,
    page_stats,
    split_drops,
    unrecord_drops,
)
from buffer.config import WhenFull
from buffer.salvage import move_aside, read_salvageable, wal_missing
from buffer.settle import delete_orphans
from buffer.snapshot import read_record
from buffer.sqlite_delivery import SqliteDeliveries
from config.errors import StorageFullError
from config.model import format_time, utcnow

__all__ = ["SqliteBuffer"]

log = logging.getLogger(__name__)


class SqliteBuffer(SqliteDeliveries, Buffer):
    """The production ``Buffer``; see the module docstring for schema, states and invariants."""

    def __init__(self, path: Path | str, max_size: int,
                 when_full: WhenFull | str = WhenFull.DROP_OLDEST,
                 synchronous: str = "FULL", lease_timeout: float = 60.0, *,
                 busy_timeout: float = 5.0, salvage: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 settle_delay: float = 1.0, settle_rows: int = 4096) -> None:
        super().__init__(path, synchronous, busy_timeout, lease_timeout=lease_timeout,
                         clock=clock, settle_delay=settle_delay, settle_rows=settle_rows)
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size}")
        self.max_size = int(max_size)
        self.when_full = WhenFull(when_full)
        self._sinks: tuple[str, ...] = ()
        self.salvage = salvage
        # Why the buffer is degraded (a salvaged file), for readiness; None when it is not.
        self.degraded_reason: str | None = None
        # The file's schema version once opened, and the last upgrade's record (snapshot.py):
        # shown in the fleet heartbeat.
        self.schema_version: int | None = None
        self.last_upgrade: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    def open(self, sinks: Sequence[str]) -> None:
        """Create or migrate, check the file after an unclean stop, salvage a damaged file
        (when ``salvage``), register the sinks. No lease survives a reopen."""
        self._sinks = tuple(dict.fromkeys(sinks))
        try:
            if wal_missing(self.path):
                raise BufferCorruptError(f"buffer file {self.path} lost its write-ahead log "
                                         "after an unclean stop (committed events were in it)")
            self._open(readonly=False)
            self._check_after_unclean_stop()
        except BufferCorruptError as e:
            self.close()
            if not self.salvage:
                raise
            self._salvage(e)
        now = format_time(utcnow())
        self._leases.clear()
        self._settled_since = None
        with self._write("opening") as conn:
            self._register_sinks(conn, now)
            # Cleared here, set by close(): a start that finds 0 follows a crash.
            conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('clean_stop', 0)")
        self._owner = True
        self._load_counts()
        self.schema_version = int(self._require().execute("PRAGMA user_version").fetchone()[0])
        self.last_upgrade = read_record(self.path)

    def _register_sinks(self, conn: sqlite3.Connection, now: str) -> None:
        # Every sink that ever had rows stays in ``sinks``: queries that must see all of an
        # event's rows enumerate it (the delivery key starts with the sink).
        conn.executemany("INSERT OR IGNORE INTO sinks(name, added_at) VALUES (?, ?)",
                         [(s, now) for s in self._sinks])

    def _salvage(self, cause: BufferCorruptError) -> None:
        try:
            aside = move_aside(self.path)
        except OSError as e:
            raise BufferOpenError(f"buffer file {self.path} is damaged ({cause}) and cannot be "
                                  f"moved aside: {e}") from e
        found = read_salvageable(aside)
        self._open(readonly=False)  # a fresh file
        now = format_time(utcnow())
        with self._write("writing salvaged rows") as conn:
            self._register_sinks(conn, now)
            stored = self._insert(conn, found.events, 0, now)
            conn.executemany("INSERT INTO detector_state(key, state, updated_at) "
                             "VALUES (?, ?, ?)", [(k, v, now) for k, v in found.states.items()])
        self._damaged = False
        self.degraded_reason = (
            f"{cause}; moved it to {aside.name} and salvaged {stored} events and "
            f"{len(found.states)} detector states into a fresh file"
            + (f"; unreadable: {'; '.join(found.problems)}" if found.problems else ""))
        log.error("%s", self.degraded_reason)

    @classmethod
    def attach(cls, path: Path | str, *, readonly: bool = True,
               max_size: int = 2**62) -> SqliteBuffer:
        """Open an existing file for the CLI while the agent may be running.

        Holds no leases and registers no sinks. ``readonly`` (the default) uses a
        ``mode=ro`` connection for stats/pending/dead letters; ``readonly=False`` allows the
        short writes of replay/purge (the agent's own connection waits on busy_timeout).
        """
        self = cls(path, max_size)
        self._open(readonly=readonly)
        return self

    def close(self) -> None:
        if self._conn is not None and self._owner and not self.readonly and \
                self._leases.settled_count():
            try:
                with self._write("deleting delivered events at close") as conn:
                    self._flush_settled(conn)
            except Exception as e:  # they are re-sent after the restart, and deduplicated
                log.warning("buffer %s: could not record the last deliveries at close: %s",
                            self.path, e)
        self._counts = None
        self._leases.clear()
        super().close()

    # ------------------------------------------------------------------ append / states

    def append(self, events: Sequence[NewEvent], states: Mapping[str, str], *,
               reported: Drops | None = None) -> AppendResult:
        check_batch(events, states)
        if not events and not states:
            return AppendResult(0, 0)
        now = format_time(utcnow())
        with self._write("appending events") as conn:
            self._flush_settled(conn)  # delivered rows ride along: no commit of their own
            if reported is not None:
                unrecord_drops(conn, drop_keys(reported.by_type, reported.by_sink))
            before = int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
            live_before = live_bytes(conn)
            if self.when_full is WhenFull.REJECT_NEW:
                share = self._fair_share()
                freed = make_room_for_share(conn, events, max_size=self.max_size, now=now,
                                            held=self._leases.held, usage=share.get("usage"),
                                            total=share.get("events", 0))
                self._delta_events -= freed.events
                self._delta.subtract(freed.rows)
                live_before = live_bytes(conn) if freed.events else live_before
                stored, rejected = append_or_reject(
                    conn, events, lambda batch: self._insert(conn, batch, before, now),
                    max_size=self.max_size, before=before, live_before=live_before, now=now,
                    sinks=self._sinks)
                self._count_new(stored)
            else:
                inserted = self._insert(conn, events, before, now)
                self._count_new(inserted)
                dropped = drop_oldest(conn, max_size=self.max_size, before=before,
                                      inserted=inserted, live_before=live_before, now=now,
                                      held=self._leases.held, **self._fair_share())
                self._delta_events -= dropped.events
                self._delta.subtract(dropped.rows)
                stored, rejected = inserted - dropped.new, 0
            if states:
                conn.executemany(
                    "INSERT INTO detector_state(key, state, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET state = excluded.state, "
                    "updated_at = excluded.updated_at",
                    [(k, v, now) for k, v in states.items()])
            unreported = conn.execute("SELECT 1 FROM drops LIMIT 1").fetchone() is not None
        return AppendResult(stored=stored, rejected=rejected, unreported_drops=unreported)

    def _insert(self, conn: sqlite3.Connection, events: Sequence[NewEvent], before: int,
                now: str) -> int:
        """Insert new events and their delivery rows; the number of events that were new."""
        if not events:
            return 0
        cur = conn.executemany(
            "INSERT OR IGNORE INTO events(id, key, type, time, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(e.id, e.key, e.type, e.time, e.payload, now) for e in events])
        inserted = max(cur.rowcount, 0)
        if inserted:
            for sink in self._sinks:
                conn.execute("INSERT INTO deliveries(sink, state, seq, attempts) "
                             "SELECT ?, 'pending', seq, 0 FROM events WHERE seq > ?",
                             (sink, before))
        return inserted

    def _count_new(self, n: int) -> None:
        self._delta_events += n
        for sink in self._sinks:
            self._move(sink, None, "pending", n)

    def load_states(self) -> dict[str, str]:
        rows = self._read("loading detector states", "SELECT key, state FROM detector_state")
        return {str(k): str(v) for k, v in rows}
    def peek_drops(self) -> Drops:
        rows = self._read("reading drop counts",
                          "SELECT type, count, first_at, last_at FROM drops")
        return _drops_of(rows)

    def take_drops(self) -> Drops:
        # Mostly there is nothing, and then nothing is written (a write transaction here
        # would pay its own fsync for the grouped settles).
        if not self._read("reading drop counts", "SELECT 1 FROM drops LIMIT 1"):
            return Drops()
        with self._write("taking drop counts") as conn:
            rows = conn.execute("SELECT type, count, first_at, last_at FROM drops").fetchall()
            conn.execute("DELETE FROM drops")
        return _drops_of(rows)

    def _fair_share(self) -> dict[str, Any]:
        """Rows held per sink and events, as of this transaction (see capacity.py)."""
        if self._counts is None or len(self._sinks) < 2:
            return {}
        now = self._counts + self._delta
        usage = {sink: sum(now[(sink, st)] for st in ("pending", "dead"))
                 for sink in self._sinks}
        return {"usage": usage, "events": self._events + self._delta_events}

    # ------------------------------------------------------------------ dead letters, views

    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        return self._view("listing dead letters", views.dead_letters, sink, limit)

    def iter_dead_letters(self, sink: str | None = None, ids: Sequence[str] | None = None
                          ) -> tuple[int, views.DeadLetterStream]:
        """Every dead letter, streamed from one read snapshot, with the snapshot's count (for
        ``buffer export``: no limit, constant memory). Close the stream, read or not."""
        def translate(e: sqlite3.Error) -> Exception:
            return self._translate(e, "reading dead letters")
        return self._view("counting dead letters", functools.partial(
            views.iter_dead_letters, translate=translate), sink, ids)

    def count_dead_letters(self, sink: str | None = None,
                           ids: Sequence[str] | None = None) -> int:
        return self._view("counting dead letters", views.count_dead, sink, ids)

    def replay_dead_letters(self, sink: str | None = None,
                            ids: Sequence[str] | None = None, *,
                            limit: int | None = None) -> int:
        where, params = views.first_dead(*views.dead_filter(sink, ids), limit)
        with self._write("replaying dead letters") as conn:
            self._flush_settled(conn)
            moved = conn.execute("UPDATE deliveries SET state = 'pending', attempts = 0, "
                                 "status = NULL, detail = NULL, failed_at = NULL "
                                 f"WHERE {where} RETURNING sink", params).fetchall()
            for (name,) in moved:
                self._move(str(name), "dead", "pending", 1)
        if moved:
            self._leases.forget_floors()  # replayed rows sit below the rows leased since
        return len(moved)

    def purge_dead_letters(self, sink: str | None = None,
                           ids: Sequence[str] | None = None, *,
                           limit: int | None = None) -> int:
        where, params = views.first_dead(*views.dead_filter(sink, ids), limit)
        with self._write("purging dead letters") as conn:
            self._flush_settled(conn)
            gone = conn.execute(f"DELETE FROM deliveries WHERE {where} RETURNING sink, seq",
                                params).fetchall()
            for name, _ in gone:
                self._move(str(name), "dead", None, 1)
            self._delta_events -= delete_orphans(conn, json_list([seq for _, seq in gone]))
        self._maybe_shrink()
        return len(gone)

    def pending(self, sink: str | None = None, limit: int = 1000) -> list[LeasedEvent]:
        """Per sink: its pending and leased rows. Without a sink: each event that still has
        an undelivered row anywhere, once, with the highest attempt count."""
        self._flush_now()
        sinks = [sink] if sink is not None else self._view(
            "listing sinks", views.sink_names, self._sinks)
        return self._view("listing pending events", views.undelivered, sinks, limit)

    def stats(self) -> BufferStats:
        """Exact counts: grouped settles are committed first (a /status request is rare
        next to settles; a drain still groups them between two requests)."""
        conn = self._require()
        # Stats must answer on a full disk: then only ``events`` still counts settled rows.
        with contextlib.suppress(StorageFullError):
            self._flush_now()
        self._foreign_writes()
        try:
            counts = self._counts
            events = self._events if counts is not None else int(
                conn.execute("SELECT count(*) FROM events").fetchone()[0])
            page_count, free, page_size = page_stats(conn)
            dropped = conn.execute(
                "SELECT value FROM meta WHERE name = 'dropped_total'").fetchone()
            sinks = {}
            for name in views.sink_names(conn, self._sinks):
                mine = None
                if counts is not None:
                    leased, settled = self._leases.counts(name)
                    mine = {"pending": counts[(name, "pending")] - leased - settled,
                            "leased": leased, "dead": counts[(name, "dead")]}
                sinks[name] = views.sink_stats(conn, name, mine,
                                               self._leases.of(name).settled)
        except sqlite3.Error as e:
            raise self._translate(e, "reading stats") from e
        return BufferStats(events=events, size_bytes=(page_count - free) * page_size,
                           max_size=self.max_size, sinks=sinks,
                           dropped_total=int(dropped[0]) if dropped else 0)


def _drops_of(rows: Sequence[tuple[Any, ...]]) -> Drops:
    if not rows:
        return Drops()
    by_type, by_sink = split_drops({str(t): int(c) for t, c, _, _ in rows})
    return Drops(by_type=by_type, by_sink=by_sink, first_at=min(str(r[2]) for r in rows),
                 last_at=max(str(r[3]) for r in rows))
