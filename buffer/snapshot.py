"""Snapshots of the buffer before a schema migration, and the record of the last upgrade.

An agent that migrates the buffer to a newer schema makes the file unreadable for the version
it replaces (``SchemaTooNewError``). So before the first migration step on a file that holds
data, ``snapshot_before_migration`` copies it with SQLite's online backup API (a consistent
image, WAL content included) to ``<buffer>.schema-v<N>.snapshot`` beside it, where N is the
version found. ``edge-agent rollback`` (``buffer/upgrade.py``) puts that copy back.

Files beside the buffer (same directory, same file system, so renames are atomic)::

    buffer.db.schema-v1.snapshot   the file as schema version 1 left it (rollback target)
    buffer.db.upgrade.json         the last upgrade: {"from_schema", "to_schema", "at",
                                   "outcome": "migrating" | "migrated" | "rolled back",
                                   "snapshot", "carried_over" (rollback only)}

Invariants:

- A migration never starts without a complete snapshot: the copy goes to ``*.tmp``, is synced
  and renamed into place; any failure (disk full, permissions) refuses the migration with
  ``BufferOpenError`` and leaves the buffer at its version, readable by the old agent.
- The record is written before the first step (``migrating``) and after the last
  (``migrated``): a crash between them leaves ``migrating``, which the heartbeat shows.
- Nothing here deletes a snapshot; the next migration from the same version replaces it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from buffer.base import BufferOpenError
from config.model import format_time, utcnow

__all__ = ["read_record", "record_migrated", "record_path", "snapshot_before_migration",
           "snapshot_path", "write_record"]

log = logging.getLogger(__name__)


def snapshot_path(path: Path, version: int) -> Path:
    return path.with_name(f"{path.name}.schema-v{int(version)}.snapshot")


def record_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.upgrade.json")


def read_record(path: Path) -> dict[str, Any] | None:
    """The last upgrade of the buffer at ``path``; None when there was none (or unreadable)."""
    try:
        doc = json.loads(record_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_record(path: Path, **fields: Any) -> dict[str, Any]:
    doc = {"at": format_time(utcnow()), **fields}
    target = record_path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True) + "\n", encoding="utf-8")
    _sync(tmp)
    os.replace(tmp, target)
    _sync(target.parent)
    return doc


def snapshot_before_migration(conn: sqlite3.Connection, path: Path | str, found: int,
                              target: int) -> Path:
    """Copy the buffer (at schema ``found``) before migrating it to ``target``."""
    path = Path(path)
    dest = snapshot_path(path, found)
    tmp = dest.with_name(dest.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        copy = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.backup(copy)
            # One self-contained file: the copy must not depend on a -wal beside it.
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
        _sync(tmp)
        os.replace(tmp, dest)
        _sync(dest.parent)
    except (OSError, sqlite3.Error) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        code = getattr(e, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_CORRUPT,
                                                     sqlite3.SQLITE_NOTADB):
            raise  # a damaged file: the buffer's open salvages it (nothing to snapshot)
        raise BufferOpenError(
            f"buffer file {path} needs a migration from schema version {found} to {target}, "
            f"but the snapshot {dest.name} taken first failed ({e}); nothing was migrated and "
            f"the file is still readable by the previous agent version. Free disk space "
            f"(about the size of the buffer file) and start again.") from e
    previous = read_record(path)
    # A migration interrupted by a crash started from an older version: keep that as "from".
    start = found
    if previous and previous.get("outcome") == "migrating" \
            and previous.get("to_schema") == target:
        start = int(previous.get("from_schema", found))
    try:
        write_record(path, from_schema=start, to_schema=target, outcome="migrating",
                     snapshot=snapshot_path(path, start).name)
    except OSError as e:
        raise BufferOpenError(f"buffer file {path}: cannot write {record_path(path).name} "
                              f"before migrating ({e}); nothing was migrated") from e
    log.info("buffer %s: schema version %d -> %d; snapshot of version %d in %s", path, found,
             target, found, dest.name)
    return dest


def record_migrated(path: Path, found: int, target: int) -> None:
    """After the last step: the record says ``migrated`` (from where the upgrade started)."""
    previous = read_record(path) or {}
    start = int(previous.get("from_schema", found)) \
        if previous.get("outcome") == "migrating" else found
    try:
        write_record(path, from_schema=start, to_schema=target, outcome="migrated",
                     snapshot=snapshot_path(path, start).name)
    except OSError as e:  # the migration itself is done and committed: only the note is lost
        log.warning("buffer %s: migrated, but the upgrade record could not be written: %s",
                    path, e)


def _sync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
