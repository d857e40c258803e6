"""Schema versions of the SQLite buffer, applied in order with ``PRAGMA user_version``.

Each migration moves the file from ``version - 1`` to ``version`` in one transaction together
with the ``user_version`` bump, so a crash mid-upgrade leaves the old version intact and the
next start repeats the step. Steps are plain SQL (or a small function over the connection);
they keep pending events. A file whose version is newer than ``SCHEMA_VERSION`` is refused
with ``SchemaTooNewError``: an older agent must never write a schema it does not understand.
Before the first step on a file that holds data, ``migrate`` snapshots it (``snapshot.py``),
so ``edge-agent rollback`` can give the previous version its file back.

Rollback also carries events appended after the snapshot into the restored file, and the
newer detector states, drops and counters, through the core every version keeps:
``events(id, key, type, time, payload, created_at)``, ``deliveries(sink, state, seq,
attempts, status, detail, failed_at)``, ``sinks(name)``, ``detector_state(key, state,
updated_at)``, ``drops(type, count, first_at, last_at)`` and ``meta(name, value)``. A
migration must keep those columns (adding columns with defaults is fine); one that cannot must
teach ``buffer/upgrade.py``.

Adding a version: append a ``Migration(n + 1, ...)`` below; never edit a released step.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from buffer.snapshot import read_record, record_migrated, snapshot_before_migration
from config import failpoints
from config.errors import SchemaTooNewError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "check_version", "migrate"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    # DDL statements run in order, then ``apply`` (if given) for data changes SQL cannot express.
    statements: Sequence[str] = ()
    apply: Callable[[sqlite3.Connection], None] | None = None


_V1 = (
    # seq is AUTOINCREMENT so a seq is never reused after deletes: leases and settlements name
    # rows by seq, and ordering across a drop or a purge must stay append order.
    """CREATE TABLE events(
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        key        TEXT NOT NULL,
        type       TEXT NOT NULL,
        time       TEXT NOT NULL,
        payload    TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    # One b-tree for delivery state: the key (sink, state, seq) makes "oldest pending rows of a
    # sink" a range scan, and a state change moves the row within the same tree. A separate
    # index would cost another page write on every append, lease and settle.
    """CREATE TABLE deliveries(
        sink         TEXT NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('pending', 'leased', 'dead')),
        seq          INTEGER NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        leased_until REAL,
        status       INTEGER,
        detail       TEXT,
        failed_at    TEXT,
        PRIMARY KEY (sink, state, seq)) WITHOUT ROWID""",
    """CREATE TABLE detector_state(
        key        TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at TEXT NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE sinks(
        name     TEXT PRIMARY KEY,
        added_at TEXT NOT NULL) WITHOUT ROWID""",
    # Drops not yet reported by take_drops(): durable, so a crash between the drop and the
    # data-gap event does not lose the fact that something was dropped.
    """CREATE TABLE drops(
        type     TEXT PRIMARY KEY,
        count    INTEGER NOT NULL,
        first_at TEXT NOT NULL,
        last_at  TEXT NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE meta(
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL) WITHOUT ROWID""",
    "INSERT INTO meta(name, value) VALUES ('dropped_total', 0)",
)

# Version 2: leases live in the agent's memory (they never meant anything to another process:
# every open returned them to pending), so a delivery row is only ever pending or dead and a
# lease writes nothing. Rows leased at the last stop become pending; nothing else changes.
# SQLite cannot alter a CHECK constraint, so the table is rebuilt (copied in key order).
_V2 = (
    """CREATE TABLE deliveries_v2(
        sink      TEXT NOT NULL,
        state     TEXT NOT NULL CHECK (state IN ('pending', 'dead')),
        seq       INTEGER NOT NULL,
        attempts  INTEGER NOT NULL DEFAULT 0,
        status    INTEGER,
        detail    TEXT,
        failed_at TEXT,
        PRIMARY KEY (sink, state, seq)) WITHOUT ROWID""",
    """INSERT INTO deliveries_v2(sink, state, seq, attempts, status, detail, failed_at)
       SELECT sink, CASE state WHEN 'dead' THEN 'dead' ELSE 'pending' END, seq, attempts,
              status, detail, failed_at
       FROM deliveries ORDER BY sink, CASE state WHEN 'dead' THEN 'dead' ELSE 'pending' END,
            seq""",
    "DROP TABLE deliveries",
    "ALTER TABLE deliveries_v2 RENAME TO deliveries",
)

# Version 3: detector_state becomes an ordinary (rowid) table. A WITHOUT ROWID table keeps at
# most about a quarter of a page of a row in its leaf (1002 bytes with 4 KiB pages); a
# machine's saved state is 2-3 KB, so each commit of one wrote the leaf and two or three
# overflow pages besides. A rowid table keeps a row of up to ~4 KB whole in its leaf: a state
# commit writes one page (an update of the state leaves the key index alone). Same columns,
# same rows.
_V3 = (
    """CREATE TABLE detector_state_v3(
        key        TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at TEXT NOT NULL)""",
    """INSERT INTO detector_state_v3(key, state, updated_at)
       SELECT key, state, updated_at FROM detector_state ORDER BY key""",
    "DROP TABLE detector_state",
    "ALTER TABLE detector_state_v3 RENAME TO detector_state",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _V1),
    Migration(2, "leases in memory: delivery rows are pending or dead", _V2),
    Migration(3, "detector states in a rowid table: one page written per saved state", _V3),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection, path: Path | str) -> int:
    """The file's schema version; raises ``SchemaTooNewError`` if this code cannot read it."""
    version = _user_version(conn)
    if version > SCHEMA_VERSION:
        raise SchemaTooNewError(
            f"buffer file {path} has schema version {version}, but this agent knows only up to "
            f"version {SCHEMA_VERSION}: it was written by a newer agent. Upgrade the agent or "
            f"point buffer.path elsewhere (the file is left untouched).")
    return version


def migrate(conn: sqlite3.Connection, path: Path | str) -> tuple[int, int]:
    """Bring the file up to ``SCHEMA_VERSION``; returns (version found, version now).

    The connection must be in autocommit mode (``isolation_level=None``): each step runs in
    its own ``BEGIN IMMEDIATE`` transaction.
    """
    found = check_version(conn, path)
    upgrading = 0 < found < SCHEMA_VERSION  # a file with data (0: a new file, nothing to keep)
    if upgrading:
        snapshot_before_migration(conn, Path(path), found, SCHEMA_VERSION)
        failpoints.hit("migration_after_snapshot")
    for step in MIGRATIONS:
        if step.version <= found:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            if _user_version(conn) >= step.version:
                conn.execute("ROLLBACK")
                continue
            for sql in step.statements:
                conn.execute(sql)
            if step.apply is not None:
                step.apply(conn)
            conn.execute(f"PRAGMA user_version = {int(step.version)}")
            failpoints.hit("migration_before_commit")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if upgrading:
        record_migrated(Path(path), found, SCHEMA_VERSION)
    elif found == SCHEMA_VERSION:
        # A crash after the last step's commit, before its record: finish the record.
        previous = read_record(Path(path))
        if previous and previous.get("outcome") == "migrating" \
                and previous.get("to_schema") == found:
            record_migrated(Path(path), found, found)
    return found, _user_version(conn)
