"""Leases, settles and running counts of the SQLite buffer (the delivery half of it).

``SqliteDeliveries`` sits between the file (``sqlite_file.py``) and ``SqliteBuffer``
(``sqlite.py``, which holds the module docstring with the states and invariants). Here:

- ``lease`` reads the oldest pending rows of a sink that this process does not hold, from
  the sink's floor (``leases.py``), without a write transaction: a lease writes nothing.
- ``renew`` moves deadlines of rows still leased; expired leases go back to pending at the
  next ``lease`` of that sink.
- ``settle``: accepted rows become settled in memory and are deleted by the next write
  transaction (``_flush_settled``, called by every writer), or by their own transaction once
  ``settle_rows`` rows piled up or the oldest waited ``settle_delay`` seconds. Dead and retry
  outcomes commit at once (they change what is in the file, not just when). On a full disk
  the grouped deletes wait (``StorageFullError`` is not raised by a lease or an accepted
  settle), so deliveries go on.
- Running counts: ``_move`` collects row count changes by (sink, state) during a
  transaction; they are applied after COMMIT, dropped on ROLLBACK (and rows being flushed go
  back to settled).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from buffer.base import LeasedEvent, Settlement
from buffer.capacity import IN_JSON, json_list, page_stats
from buffer.leases import LeaseTable
from buffer.settle import delete_accepted, mark_dead, mark_retry
from buffer.sqlite_file import SqliteFile
from config.errors import StorageFullError
from config.model import format_time, utcnow

__all__ = ["SqliteDeliveries"]

log = logging.getLogger(__name__)

_LEASE_FROM = ("FROM deliveries d JOIN events e ON e.seq = d.seq WHERE d.sink = ? AND "
               "d.state = 'pending' AND d.seq > ? ORDER BY d.seq LIMIT ?")
_LEASE_ROWS = f"SELECT d.seq, e.id, e.key, e.type, e.payload, d.attempts {_LEASE_FROM}"
# Both aggregates take the rows in the same order, so the n-th payload is the n-th row's.
_PACKED_LEASE = ("SELECT json_group_array(json_array(seq, id, key, type, attempts, "
                 "length(payload))), group_concat(payload, '') "
                 f"FROM (SELECT d.seq, e.id, e.key, e.type, e.payload, d.attempts {_LEASE_FROM})")
_SHRINK_EVERY = 60.0  # seconds between shrinks while rows are still pending
_SHRINK_PAGES = 2048  # pages freed per incremental_vacuum step


class SqliteDeliveries(SqliteFile):
    """See the module docstring."""

    def __init__(self, path: Path | str, synchronous: str, busy_timeout: float, *,
                 lease_timeout: float, clock: Callable[[], float] = time.monotonic,
                 settle_delay: float = 1.0, settle_rows: int = 4096) -> None:
        super().__init__(path, synchronous, busy_timeout)
        self.lease_timeout = float(lease_timeout)
        self.settle_delay = float(settle_delay)
        self.settle_rows = int(settle_rows)
        self._clock = clock
        self._leases = LeaseTable()
        self._settled_since: float | None = None  # clock time of the oldest grouped settle
        self._full_until = -math.inf  # after a disk-full flush: no new try before this time
        # Settled rows being deleted by the open transaction (back to the table on rollback).
        self._flushing: dict[str, list[int]] = {}
        # Row counts by (sink, state) of the file and the event count, kept in step with every
        # commit so stats() scans nothing (None when not opened by open(): stats() counts).
        self._counts: Counter[tuple[str, str]] | None = None
        self._events = 0
        self._delta: Counter[tuple[str, str]] = Counter()
        self._delta_events = 0
        # PRAGMA data_version when the counts were taken: it changes only when another
        # connection (the CLI's replay/purge) commits, and then the rows are counted again.
        self._data_version = 0
        self._last_shrink = -_SHRINK_EVERY

    def _load_counts(self) -> None:
        """Count rows (a scan): at open, and when another connection has written."""
        conn = self._require()
        try:
            rows = conn.execute("SELECT sink, state, count(*) FROM deliveries "
                                "GROUP BY sink, state").fetchall()
            events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            self._data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as e:
            raise self._translate(e, "counting rows", opening=True) from e
        self._counts = Counter({(str(k), str(st)): int(n) for k, st, n in rows})
        self._events = int(events)

    def _foreign_writes(self) -> None:
        """Another connection committed (replay, purge): count again, scan leases afresh."""
        if self._counts is None:
            return
        try:
            version = int(self._require().execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as e:
            raise self._translate(e, "checking for other writers") from e
        if version != self._data_version:
            self._load_counts()
            self._leases.forget_floors()

    def _on_begin(self) -> None:
        self._delta.clear()
        self._delta_events = 0
        self._flushing = {}

    def _on_commit(self) -> None:
        if self._counts is not None:
            self._counts.update(self._delta)
            self._events += self._delta_events
        if self._flushing:
            self._flushing = {}
            if not self._leases.settled_count():
                self._settled_since = None

    def _on_rollback(self) -> None:
        for sink, seqs in self._flushing.items():  # not deleted after all: settled still
            self._leases.accept(sink, seqs)
        self._flushing = {}

    def _move(self, sink: str, src: str | None, dst: str | None, n: int) -> None:
        """Count ``n`` rows of ``sink`` moving from state ``src`` to ``dst`` (None: created
        or deleted) in the open transaction."""
        if src is not None:
            self._delta[(sink, src)] -= n
        if dst is not None:
            self._delta[(sink, dst)] += n

    # ------------------------------------------------------------------ lease / settle

    def lease(self, sink: str, limit: int) -> list[LeasedEvent]:
        if limit <= 0:
            return []
        now = self._clock()
        self._maybe_flush(now)
        self._foreign_writes()
        held = self._leases.of(sink)
        self._leases.expire(sink, now)
        # Scan from the floor; held rows above it (a lease returned below rows in flight)
        # are read and skipped, so ask for that many more.
        out: list[LeasedEvent] = []
        for s, i, k, t, p, a in self._lease_rows(sink, held.floor,
                                                 limit + held.held_above_floor()):
            if len(out) >= limit:
                break
            held.floor = s  # every pending row up to here is held once this lease is taken
            if not held.is_held(s):
                out.append(LeasedEvent(s, i, k, t, p, a))
        self._leases.take(sink, (e.seq for e in out), now + self.lease_timeout)
        return out

    def _lease_rows(self, sink: str, floor: int, limit: int) -> list[tuple[Any, ...]]:
        """(seq, id, key, type, payload, attempts) of the first ``limit`` pending rows of
        ``sink`` above ``floor``, in seq order.

        Read in one step: the row fields as one JSON array and the payloads as one string cut
        by their lengths. Fetching row by row takes the GIL back for every row, and with the
        event loop busy each hand-over can wait for it (docs/buffer.md). A payload holding a
        NUL character (SQLite's length() stops there) shows as a length mismatch: then the
        rows are fetched one by one."""
        what = f"leasing for sink {sink}"
        params = (sink, floor, limit)
        packed = self._read(what, _PACKED_LEASE, params)
        meta, text = packed[0] if packed else ("[]", None)
        fields = json.loads(meta)
        text = text or ""
        if sum(f[5] for f in fields) != len(text):
            return self._read(what, _LEASE_ROWS, params)
        out: list[tuple[Any, ...]] = []
        at = 0
        for seq, event_id, key, type_, attempts, size in fields:
            out.append((seq, event_id, key, type_, text[at:at + size], attempts))
            at += size
        return out

    def renew(self, sink: str, seqs: Sequence[int]) -> None:
        self._leases.renew(sink, seqs, self._clock() + self.lease_timeout)

    def release(self, sink: str, seqs: Sequence[int]) -> None:
        self._leases.give_back(sink, seqs)

    def settle(self, sink: str, settlement: Settlement) -> None:
        if not (settlement.accepted or settlement.retry or settlement.dead):
            return
        if settlement.accepted:
            self._accept(sink, settlement.accepted)
        if settlement.retry or settlement.dead:
            now = format_time(utcnow())
            with self._write(f"settling for sink {sink}") as conn:
                self._flush_settled(conn)
                if settlement.retry:
                    mark_retry(conn, sink, settlement.retry)
                if settlement.dead:
                    self._move(sink, "pending", "dead",
                               mark_dead(conn, sink, settlement.dead, now))
            self._leases.release(sink, [*settlement.retry, *settlement.dead])
            self._maybe_shrink()
        else:
            self._maybe_flush(self._clock())

    def _accept(self, sink: str, seqs: Sequence[int]) -> None:
        leased = self._leases.of(sink).leased
        known = [s for s in seqs if s in leased]
        if len(known) < len(seqs):  # a row not leased here (expired): is it still pending?
            rest = [s for s in seqs if s not in leased]
            known += [int(s) for (s,) in self._read(
                "settling", f"SELECT seq FROM deliveries WHERE sink = ? AND state = 'pending' "
                f"AND seq IN ({IN_JSON})", (sink, json_list(rest)))]
        if self._leases.accept(sink, known) and self._settled_since is None:
            self._settled_since = self._clock()

    def _maybe_flush(self, now: float) -> None:
        """Commit the grouped settles once enough piled up or the oldest waited long enough."""
        since = self._settled_since
        if since is None or now < self._full_until or (
                now - since < self.settle_delay
                and self._leases.settled_count() < self.settle_rows):
            return
        try:
            with self._write("deleting delivered events") as conn:
                self._flush_settled(conn)
        except StorageFullError:
            # The rows stay settled in memory (never offered again) and are deleted once a
            # write succeeds. A full disk must not stop deliveries: leases and accepted
            # settles write nothing else. Tried again a while later, not on every call.
            self._full_until = now + max(self.settle_delay, 1.0)
            return
        self._maybe_shrink()

    def _flush_now(self) -> None:
        if self._conn is not None and self._owner and self._leases.settled_count():
            with self._write("deleting delivered events") as conn:
                self._flush_settled(conn)
            self._maybe_shrink()

    def _flush_settled(self, conn: sqlite3.Connection) -> None:
        """Delete the settled rows in the open transaction (see ``_on_rollback``)."""
        if not self._leases.settled_count():
            return
        self._flushing = self._leases.take_settled()
        for sink, seqs in self._flushing.items():
            rows, events = delete_accepted(conn, sink, seqs)
            self._move(sink, "pending", None, rows)
            self._delta_events -= events

    def _shrink_due(self) -> bool:
        """Shrinking moves live pages from the end of the file into free ones; in the middle
        of a drain the next deletions free those again. So: once nothing is pending, or at
        most once a minute (a sink removed from the configuration may keep rows forever)."""
        now = self._clock()
        idle = self._counts is None or not any(
            n for (_, state), n in self._counts.items() if state == "pending")
        if idle or now - self._last_shrink >= _SHRINK_EVERY:
            self._last_shrink = now
            return True
        return False

    def _maybe_shrink(self) -> None:
        """Give free pages back to the file system once a quarter of the file is free."""
        conn = self._require()
        try:
            page_count, free, _ = page_stats(conn)
            if free > 256 and free * 4 > page_count and self._shrink_due():
                # Each step frees one page and a cursor would step once (the pragma returns no
                # columns); executescript steps it to the end. No transaction is open here.
                # A bounded step: a long vacuum would hold the write lock the agent needs.
                conn.executescript(f"PRAGMA incremental_vacuum({_SHRINK_PAGES});")
        except sqlite3.Error as e:
            # Shrinking is housekeeping: a full disk here must not fail a committed settle.
            if (getattr(e, "sqlite_errorcode", 0) & 0xFF) != sqlite3.SQLITE_FULL:
                raise self._translate(e, "shrinking the file") from e
