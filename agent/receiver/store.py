"""The reference receiver's own SQLite file: events deduplicated by ``(source, id)``.

- One row per ``(source, id)`` (the primary key); every duplicate offered is counted in
  ``counters``. Each new event is committed before ``store`` returns, so before it is answered.
- The file runs in WAL mode with ``synchronous=NORMAL``: a commit survives the receiver process
  crashing (which is what the agent's exactly-once test needs); a power cut may lose the last
  commits, acceptable for a reference receiver, not for a production one.
- A batch is stored in one transaction with one ``executemany``; only a batch that meets a
  duplicate (already stored, or twice in the same array) is redone row by row to tell which
  items are 409.
- Two connections, each used by one thread at a time: the writer (the endpoint's worker thread)
  and the reader (queries; in WAL it sees committed rows only).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from config.model import format_time, utcnow

__all__ = ["EventStore"]

_INSERT = ("INSERT OR IGNORE INTO received (source, id, type, time, payload, received_at) "
           "VALUES (?, ?, ?, ?, ?, ?)")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    source TEXT NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, time TEXT,
    payload TEXT NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (source, id));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('duplicates', 0);
"""


class EventStore:
    """``open()`` creates or opens the file; ``close()`` closes it (both idempotent)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None  # the writer: store
        self._reader: sqlite3.Connection | None = None  # queries (WAL: committed rows only)

    def open(self) -> None:
        # check_same_thread=False: each connection moves between threads, one at a time.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        self._db.executescript(_SCHEMA)
        self._reader = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False)

    def close(self) -> None:
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("receiver is not started")
        return self._db

    def _read_conn(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError("receiver is not started")
        return self._reader

    # ------------------------------------------------------------------ queries

    def stats(self) -> dict[str, int]:
        db = self._read_conn()
        received = db.execute("SELECT count(*) FROM received").fetchone()[0]
        dups = db.execute("SELECT value FROM counters WHERE name='duplicates'").fetchone()[0]
        return {"received": int(received), "duplicates": int(dups)}

    def events(self, source: str | None = None) -> list[dict[str, Any]]:
        """Received CloudEvents (parsed), in arrival order."""
        sql = "SELECT payload FROM received"
        args: tuple[str, ...] = ()
        if source is not None:
            sql, args = sql + " WHERE source = ?", (source,)
        rows = self._read_conn().execute(sql + " ORDER BY rowid", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    # ------------------------------------------------------------------ storing

    def store(self, docs: list[dict[str, Any]], texts: list[str]) -> tuple[
            list[tuple[int, str]], list[dict[str, Any]]]:
        """Insert in one transaction; (201, "") new or (409, ...) duplicate for each, and the
        docs that were new (committed when this returns).

        ``texts[i]`` is the JSON text stored for ``docs[i]``. The common case (all new) is one
        ``executemany``; if fewer rows went in than were offered, that attempt is rolled back
        and the batch is redone row by row, so each item gets its own verdict."""
        db = self._conn()
        now = format_time(utcnow())
        rows = [(d["source"], d["id"], d["type"], d.get("time"), t, now)
                for d, t in zip(docs, texts, strict=True)]
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            if db.total_changes - before == len(rows):
                out = [(201, "")] * len(rows)
                new = docs
            else:
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                out, new = self._store_each(db, docs, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return out, new

    @staticmethod
    def _store_each(db: sqlite3.Connection, docs: list[dict[str, Any]],
                    rows: list[tuple[Any, ...]]) -> tuple[list[tuple[int, str]],
                                                          list[dict[str, Any]]]:
        out: list[tuple[int, str]] = []
        new: list[dict[str, Any]] = []
        for doc, row in zip(docs, rows, strict=True):
            if db.execute(_INSERT, row).rowcount == 1:
                out.append((201, ""))
                new.append(doc)
            else:
                db.execute("UPDATE counters SET value = value + 1 WHERE name='duplicates'")
                out.append((409, "already received"))
        return out, new
