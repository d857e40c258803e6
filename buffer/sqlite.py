"""The durable buffer: one SQLite file in WAL mode, one writer connection.

Schema (``migrations.py``, version in ``PRAGMA user_version``)::

    events(seq AUTOINCREMENT, id UNIQUE, key, type, time, payload, created_at)
       1 ──< deliveries(sink, state, seq, attempts, leased_until, status, detail, failed_at)
             key (sink, state, seq): a sink's pending rows in append order are one range
    detector_state(key, state, updated_at)     sinks(name, added_at)
    drops(type, count, first_at, last_at)      meta(name, value)   -- dropped_total, clean_stop

States of one delivery row (one per event per sink known when the event was appended)::

    pending --lease--> leased --settle accepted--> (row deleted; event deleted with its last row)
       ^                 |    --settle dead------> dead --replay--> pending   (purge: deleted)
       |                 |    --settle retry-----> pending (attempts + 1)
       +--expiry/open----+

Invariants:

- ``append`` is one ``BEGIN IMMEDIATE`` transaction: events (``INSERT OR IGNORE`` on the id,
  so a re-detected event is neither stored twice nor counted), their delivery rows, the
  detector states, and any capacity drops commit together or not at all. Group commit: a batch
  is one transaction and one fsync.
- ``seq`` is never reused (AUTOINCREMENT), so append order = seq order, across deletes too.
- A leased row is never deleted before it is settled, and the capacity policy never drops an
  event that has a leased row. Leases use the process's monotonic clock; they mean nothing to
  another process, so ``open`` returns every leased row to pending (crash recovery).
- Sinks: a sink named at ``open`` gets rows only for events appended after it was first
  registered. A sink removed from the configuration keeps its rows (pending/dead, shown by
  ``stats``) until purged; nothing is deleted because a config line went away. With no sink
  at all, events are kept (there is nobody to deliver them to) until capacity drops them.
- ``detector_state`` is never dropped by the capacity policy.

Capacity (``capacity.py``): what counts is the live part of the main file (pages in use);
``drop_oldest`` deletes the oldest events without leased rows (dead letters last),
``reject_new`` keeps the head of a batch that fits; both count drops by type, durably. The file
is created with ``auto_vacuum=INCREMENTAL`` and ``incremental_vacuum`` runs after a settle or
purge once a quarter of it is free, so it also shrinks.

Crash semantics: with ``synchronous=FULL`` a returned ``append``/``settle`` survives a power
cut; with ``NORMAL`` it survives a process crash but the last commits may be lost on power
loss. ``close`` records a clean stop in ``meta``; ``open`` after a stop that did not record
one (crash, power cut) runs ``PRAGMA quick_check`` before anything else.

Failures: ``SQLITE_FULL`` rolls the transaction back and raises ``StorageFullError`` (the
connection stays usable; the next call after space returns succeeds; reads keep working). A
damaged file found at ``open`` (not a database, or ``quick_check`` fails) is moved aside to
``<file>.corrupt-<UTC timestamp>`` and its readable events and states are copied into a fresh
file (``salvage.py``); ``degraded_reason`` says so for readiness. Damage met later raises
``BufferCorruptError`` (fatal: the restart salvages). Other SQLite errors during work raise
``BufferUnavailableError`` (retryable) and at open ``BufferOpenError``.

Statistics: ``open`` counts rows once; afterwards each committed transaction adjusts running
counts by its statements' row counts, so ``stats()`` (called for every /status) scans nothing.
When another connection has committed (``PRAGMA data_version`` changed: the CLI's replay or
purge), ``stats()`` counts once more. ``attach`` connections count from scratch.

Threading: one connection (``check_same_thread=False``) used by one thread at a time; the
runtime confines it to the ``AsyncBuffer`` writer thread. Readers such as the CLI use
``SqliteBuffer.attach(path)`` (``mode=ro``).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from buffer import views
from buffer.base import (
    AppendResult,
    Buffer,
    BufferCorruptError,
    BufferOpenError,
    BufferStats,
    BufferUnavailableError,
    DeadLetter,
    Drops,
    LeasedEvent,
    NewEvent,
    Settlement,
    check_batch,
)
from buffer.capacity import (
    ANY_STATE,
    IN_JSON,
    KNOWN_SINKS,
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
from buffer.migrations import check_version, migrate
from buffer.salvage import move_aside, read_salvageable, wal_missing
from buffer.snapshot import read_record
from config.errors import EdgeAgentError, StorageFullError
from config.model import format_time, utcnow

__all__ = ["SqliteBuffer"]

log = logging.getLogger(__name__)
_SHRINK_PAGES = 2048  # pages freed per incremental_vacuum step

_T = TypeVar("_T")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_WAL_LIMIT = 8 * 2**20  # bytes the WAL is truncated to after a checkpoint


class SqliteBuffer(Buffer):
    """The production ``Buffer``; see the module docstring for schema, states and invariants."""

    def __init__(self, path: Path | str, max_size: int,
                 when_full: WhenFull | str = WhenFull.DROP_OLDEST,
                 synchronous: str = "FULL", lease_timeout: float = 60.0, *,
                 busy_timeout: float = 5.0, salvage: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if str(synchronous).upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, "
                             f"not {synchronous!r}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, not {max_size}")
        self.path = Path(path)
        self.max_size = int(max_size)
        self.when_full = WhenFull(when_full)
        self.synchronous = str(synchronous).upper()
        self.lease_timeout = float(lease_timeout)
        self.busy_timeout = float(busy_timeout)
        self.readonly = False
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._sinks: tuple[str, ...] = ()
        self._owner = False  # opened by open() (not attach): records clean stops
        # Earliest lease deadline per sink handed out by this process (open() resets all
        # leases, so no other deadlines exist); lease() reclaims only once one has passed.
        self._expiry: dict[str, float] = {}
        self._damaged = False  # a corrupt page was met: the next start must check the file
        # Row counts by (sink, state) and the event count, kept in step with every commit so
        # stats() scans nothing (None when not opened by open(): stats() then counts rows).
        # Changes collect in the _delta fields during a transaction, applied after COMMIT.
        self._counts: Counter[tuple[str, str]] | None = None
        self._events = 0
        self._delta: Counter[tuple[str, str]] = Counter()
        self._delta_events = 0
        # PRAGMA data_version when the counts were taken: it changes only when another
        # connection (the CLI's replay/purge) commits, and then stats() counts again.
        self._data_version = 0
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
        (when ``salvage``), return leases to pending, register the sinks."""
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
        with self._write("opening") as conn:
            self._register_sinks(conn, now)
            conn.execute("UPDATE deliveries SET state = 'pending', leased_until = NULL "
                         f"WHERE sink IN {KNOWN_SINKS} AND state = 'leased'")
            self._expiry.clear()
            # Cleared here, set by close(): a start that finds 0 follows a crash.
            conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('clean_stop', 0)")
        self._owner = True
        self._load_counts()
        self.schema_version = int(self._require().execute("PRAGMA user_version").fetchone()[0])
        self.last_upgrade = read_record(self.path)

    def _load_counts(self) -> None:
        """Count rows once at open (a scan); from here on each commit adjusts the counts."""
        conn = self._require()
        try:
            rows = conn.execute("SELECT sink, state, count(*) FROM deliveries "
                                "GROUP BY sink, state").fetchall()
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        except sqlite3.Error as e:
            raise self._translate(e, "counting rows", opening=True) from e
        self._counts = Counter({(str(k), str(st)): int(n) for k, st, n in rows})
        self._events = int(events)
        self._data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])

    def _register_sinks(self, conn: sqlite3.Connection, now: str) -> None:
        # Every sink that ever had rows stays in ``sinks``: queries that must see all of an
        # event's rows enumerate it (the delivery key starts with the sink).
        conn.executemany("INSERT OR IGNORE INTO sinks(name, added_at) VALUES (?, ?)",
                         [(s, now) for s in self._sinks])

    def _check_after_unclean_stop(self) -> None:
        """After a crash or power cut (no clean close recorded), run ``quick_check`` once:
        damage found now is salvaged instead of failing later in the middle of a delivery."""
        conn = self._require()
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'clean_stop'").fetchone()
            if row is None or row[0]:
                return
            result = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        except sqlite3.Error as e:
            raise self._translate(e, "checking the file", opening=True) from e
        if result != ["ok"]:
            raise BufferCorruptError(f"buffer file {self.path} is damaged: {'; '.join(result)}")

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

        Reclaims no leases and registers no sinks. ``readonly`` (the default) uses a
        ``mode=ro`` connection for stats/pending/dead letters; ``readonly=False`` allows the
        short writes of replay/purge (the agent's own connection waits on busy_timeout).
        """
        self = cls(path, max_size)
        self._open(readonly=readonly)
        return self

    def close(self) -> None:
        self._counts = None
        conn, self._conn = self._conn, None
        owner, self._owner = self._owner, False
        if conn is None:
            return
        try:
            if owner and not self._damaged:
                conn.execute("UPDATE meta SET value = 1 WHERE name = 'clean_stop'")
        except sqlite3.Error:
            pass  # then the next start checks the file: the safe side
        finally:
            conn.close()

    def _open(self, readonly: bool) -> None:
        if self._conn is not None:
            raise RuntimeError(f"buffer {self.path} is already open")
        self.readonly = readonly
        try:
            if readonly:
                if not self.path.exists():
                    raise BufferOpenError(f"buffer file {self.path} does not exist")
                conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False,
                                       timeout=self.busy_timeout)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=self.busy_timeout)
        except (OSError, sqlite3.Error) as e:
            raise BufferOpenError(f"cannot open buffer file {self.path}: {e}") from e
        try:
            self._configure(conn, readonly)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _configure(self, conn: sqlite3.Connection, readonly: bool) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            if readonly:
                check_version(conn, self.path)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return
            # A newer schema is refused before anything is written, even the journal mode:
            # the file is left exactly as the newer agent wrote it.
            check_version(conn, self.path)
            # auto_vacuum only takes effect on a file without tables, i.e. at creation.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BufferOpenError(f"buffer file {self.path}: cannot use WAL mode "
                                      f"(journal_mode is {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
            migrate(conn, self.path)
        except sqlite3.Error as e:
            raise self._translate(e, "opening", opening=True) from e

    # ------------------------------------------------------------------ plumbing

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"buffer {self.path} is not open")
        return self._conn

    def _translate(self, e: sqlite3.Error, what: str, opening: bool = False) -> EdgeAgentError:
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary == sqlite3.SQLITE_FULL:
            return StorageFullError(f"buffer {self.path}: disk full while {what}; nothing of "
                                    f"this call was committed, everything before is kept")
        if primary in _CORRUPT_CODES:
            self._damaged = True
            return BufferCorruptError(f"buffer file {self.path} is damaged ({e}) while {what}")
        if opening:
            return BufferOpenError(f"cannot open buffer file {self.path}: {e}")
        return BufferUnavailableError(f"buffer {self.path}: {what} failed: {e}")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; SQLite errors leave nothing half-done."""
        conn = self._require()
        if self.readonly:
            raise RuntimeError(f"buffer {self.path} is attached read-only; {what} needs a write")
        self._delta.clear()
        self._delta_events = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
                if self._counts is not None:
                    self._counts.update(self._delta)
                    self._events += self._delta_events
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._translate(e, what) from e

    def _read(self, what: str, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._require().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise self._translate(e, what) from e

    def _move(self, sink: str, src: str | None, dst: str | None, n: int) -> None:
        """Count ``n`` rows of ``sink`` moving from state ``src`` to ``dst`` (None: created
        or deleted) in the open transaction."""
        if src is not None:
            self._delta[(sink, src)] -= n
        if dst is not None:
            self._delta[(sink, dst)] += n

    def _view(self, what: str, query: Callable[..., _T], *args: object) -> _T:
        try:
            return query(self._require(), *args)
        except sqlite3.Error as e:
            raise self._translate(e, what) from e

    # ------------------------------------------------------------------ append / states

    def append(self, events: Sequence[NewEvent], states: Mapping[str, str], *,
               reported: Drops | None = None) -> AppendResult:
        check_batch(events, states)
        if not events and not states:
            return AppendResult(0, 0)
        now = format_time(utcnow())
        with self._write("appending events") as conn:
            if reported is not None:
                unrecord_drops(conn, drop_keys(reported.by_type, reported.by_sink))
            before = int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
            live_before = live_bytes(conn)
            if self.when_full is WhenFull.REJECT_NEW:
                share = self._fair_share()
                freed = make_room_for_share(conn, events, max_size=self.max_size, now=now,
                                            usage=share.get("usage"),
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
                                      **self._fair_share())
                self._delta_events -= dropped.events
                self._delta.subtract(dropped.rows)
                stored, rejected = inserted - dropped.new, 0
            if states:
                conn.executemany(
                    "INSERT INTO detector_state(key, state, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET state = excluded.state, "
                    "updated_at = excluded.updated_at",
                    [(k, v, now) for k, v in states.items()])
        return AppendResult(stored=stored, rejected=rejected)

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
        with self._write("taking drop counts") as conn:
            rows = conn.execute("SELECT type, count, first_at, last_at FROM drops").fetchall()
            conn.execute("DELETE FROM drops")
        return _drops_of(rows)

    def _fair_share(self) -> dict[str, Any]:
        """Rows held per sink and events, as of this transaction (see capacity.py)."""
        if self._counts is None or len(self._sinks) < 2:
            return {}
        now = self._counts + self._delta
        usage = {sink: sum(now[(sink, st)] for st in ("pending", "leased", "dead"))
                 for sink in self._sinks}
        return {"usage": usage, "events": self._events + self._delta_events}

    # ------------------------------------------------------------------ lease / settle

    def lease(self, sink: str, limit: int) -> list[LeasedEvent]:
        if limit <= 0:
            return []
        now = self._clock()
        due = self._expiry.get(sink)
        next_due = due
        with self._write(f"leasing for sink {sink}") as conn:
            if due is not None and due <= now:
                next_due = self._reclaim_expired(sink, now)
            rows = conn.execute(
                "SELECT d.seq, e.id, e.key, e.type, e.payload, d.attempts "
                "FROM deliveries d JOIN events e ON e.seq = d.seq "
                "WHERE d.sink = ? AND d.state = 'pending' ORDER BY d.seq LIMIT ?",
                (sink, limit)).fetchall()
            if rows:
                cur = conn.execute(
                    "UPDATE deliveries SET state = 'leased', leased_until = ? "
                    f"WHERE sink = ? AND state = 'pending' AND seq IN ({IN_JSON})",
                    (now + self.lease_timeout, sink, json_list([r[0] for r in rows])))
                self._move(sink, "pending", "leased", cur.rowcount)
                next_due = min(next_due if next_due is not None else math.inf,
                               now + self.lease_timeout)
        if next_due is None:
            self._expiry.pop(sink, None)
        else:
            self._expiry[sink] = next_due
        return [LeasedEvent(int(s), str(i), str(k), str(t), str(p), int(a))
                for s, i, k, t, p, a in rows]

    def _reclaim_expired(self, sink: str, now: float) -> float | None:
        """Expired leases back to pending; returns the next deadline of this sink, if any.

        Only run when a deadline has passed (``_expiry``); both statements scan just the
        leased rows of the sink (a key range)."""
        conn = self._require()
        cur = conn.execute("UPDATE deliveries SET state = 'pending', leased_until = NULL "
                           "WHERE sink = ? AND state = 'leased' AND leased_until <= ?",
                           (sink, now))
        self._move(sink, "leased", "pending", cur.rowcount)
        row = conn.execute("SELECT min(leased_until) FROM deliveries "
                           "WHERE sink = ? AND state = 'leased'", (sink,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def settle(self, sink: str, settlement: Settlement) -> None:
        if not (settlement.accepted or settlement.retry or settlement.dead):
            return
        now = format_time(utcnow())
        with self._write(f"settling for sink {sink}") as conn:
            # One statement per source state, so each rowcount says which counts move. A row
            # whose lease expired (pending again) is settled all the same.
            if settlement.retry:
                retry = json_list(settlement.retry)
                for state in ("pending", "leased"):  # pending first: it is the target state
                    cur = conn.execute(
                        "UPDATE deliveries SET state = 'pending', leased_until = NULL, "
                        "attempts = attempts + 1 WHERE sink = ? AND state = ? "
                        f"AND seq IN ({IN_JSON})", (sink, state, retry))
                    self._move(sink, state, "pending", cur.rowcount)
            if settlement.dead:
                for state in ("leased", "pending"):
                    cur = conn.executemany(
                        "UPDATE deliveries SET state = 'dead', leased_until = NULL, "
                        "attempts = attempts + 1, status = ?, detail = ?, failed_at = ? "
                        "WHERE sink = ? AND state = ? AND seq = ?",
                        [(st, detail, now, sink, state, seq)
                         for seq, (st, detail) in settlement.dead.items()])
                    self._move(sink, state, "dead", cur.rowcount)
            if settlement.accepted:
                seqs = json_list(settlement.accepted)
                gone = conn.execute(f"DELETE FROM deliveries WHERE sink = ? AND state IN "
                                    f"{ANY_STATE} AND seq IN ({IN_JSON}) RETURNING state",
                                    (sink, seqs)).fetchall()
                for (state,) in gone:
                    self._move(sink, str(state), None, 1)
                self._delete_orphans(conn, seqs)
        self._maybe_shrink()

    def _delete_orphans(self, conn: sqlite3.Connection, seqs_json: str) -> None:
        cur = conn.execute(f"DELETE FROM events WHERE seq IN ({IN_JSON}) AND NOT EXISTS "
                           f"(SELECT 1 FROM deliveries d WHERE d.sink IN {KNOWN_SINKS} "
                           f"AND d.state IN {ANY_STATE} AND d.seq = events.seq)", (seqs_json,))
        self._delta_events -= cur.rowcount

    def _maybe_shrink(self) -> None:
        """Give free pages back to the file system once a quarter of the file is free."""
        conn = self._require()
        try:
            page_count, free, _ = page_stats(conn)
            if free > 256 and free * 4 > page_count:
                # Each step frees one page and a cursor would step once (the pragma returns no
                # columns); executescript steps it to the end. No transaction is open here.
                # A bounded step: a long vacuum would hold the write lock the agent needs.
                conn.executescript(f"PRAGMA incremental_vacuum({_SHRINK_PAGES});")
        except sqlite3.Error as e:
            # Shrinking is housekeeping: a full disk here must not fail a committed settle.
            if (getattr(e, "sqlite_errorcode", 0) & 0xFF) != sqlite3.SQLITE_FULL:
                raise self._translate(e, "shrinking the file") from e

    # ------------------------------------------------------------------ dead letters, views

    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        return self._view("listing dead letters", views.dead_letters, sink, limit)

    def iter_dead_letters(self, sink: str | None = None, ids: Sequence[str] | None = None
                          ) -> tuple[int, Generator[DeadLetter, None, None]]:
        """Every dead letter, streamed from one read snapshot, with the snapshot's count (for
        ``buffer export``: no limit, constant memory)."""
        total, rows = self._view("counting dead letters", views.iter_dead_letters, sink, ids)

        def translated() -> Generator[DeadLetter, None, None]:
            try:
                yield from rows
            except sqlite3.Error as e:
                raise self._translate(e, "reading dead letters") from e
            finally:
                rows.close()

        return total, translated()

    def replay_dead_letters(self, sink: str | None = None,
                            ids: Sequence[str] | None = None, *,
                            limit: int | None = None) -> int:
        where, params = views.first_dead(*views.dead_filter(sink, ids), limit)
        with self._write("replaying dead letters") as conn:
            moved = conn.execute("UPDATE deliveries SET state = 'pending', attempts = 0, "
                                 "status = NULL, detail = NULL, failed_at = NULL "
                                 f"WHERE {where} RETURNING sink", params).fetchall()
            for (name,) in moved:
                self._move(str(name), "dead", "pending", 1)
        return len(moved)

    def purge_dead_letters(self, sink: str | None = None,
                           ids: Sequence[str] | None = None, *,
                           limit: int | None = None) -> int:
        where, params = views.first_dead(*views.dead_filter(sink, ids), limit)
        with self._write("purging dead letters") as conn:
            gone = conn.execute(f"DELETE FROM deliveries WHERE {where} RETURNING sink, seq",
                                params).fetchall()
            for name, _ in gone:
                self._move(str(name), "dead", None, 1)
            self._delete_orphans(conn, json_list([seq for _, seq in gone]))
        self._maybe_shrink()
        return len(gone)

    def pending(self, sink: str | None = None, limit: int = 1000) -> list[LeasedEvent]:
        """Per sink: its pending and leased rows. Without a sink: each event that still has
        an undelivered row anywhere, once, with the highest attempt count."""
        sinks = [sink] if sink is not None else self._view(
            "listing sinks", views.sink_names, self._sinks)
        return self._view("listing pending events", views.undelivered, sinks, limit)

    def stats(self) -> BufferStats:
        conn = self._require()
        try:
            if self._counts is not None and int(conn.execute(
                    "PRAGMA data_version").fetchone()[0]) != self._data_version:
                self._load_counts()  # another connection wrote (the CLI): count again
            counts = self._counts
            events = self._events if counts is not None else int(
                conn.execute("SELECT count(*) FROM events").fetchone()[0])
            page_count, free, page_size = page_stats(conn)
            dropped = conn.execute(
                "SELECT value FROM meta WHERE name = 'dropped_total'").fetchone()
            sinks = {name: views.sink_stats(conn, name, None if counts is None else {
                         st: counts[(name, st)] for st in ("pending", "leased", "dead")})
                     for name in views.sink_names(conn, self._sinks)}
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
