"""Upgrade check and rollback of the buffer file (``edge-agent upgrade check`` / ``rollback``).

``plan(path)`` reads, never writes: which schema version the file has, which migration steps
this version would run, whether it can take the file over at all (not written by a newer
agent, not damaged, room for the snapshot), and what it holds.

``rollback(path)`` gives the previous agent version its file back. Steps, each safe to repeat
after a crash until the final rename:

1. Open the current (migrated) file with an exclusive lock: a running agent holds the file
   open, so this fails and nothing is done (stop the agent first).
2. Read the events that are not in the snapshot and still undelivered or dead letters
   (detected after the upgrade): they are carried over, so a rollback loses nothing detected
   since. Read the current detector states, unreported drops and counters too: they are newer
   than the snapshot's and belong to the carried events (a machine's sequence must keep
   increasing; an episode open at the stop must not be detected again under a new id).
3. Copy the snapshot to ``<buffer>.rollback.tmp`` (backup API), append the carried events with
   a pending row for every sink, or their dead-letter row, replace the detector states, drops
   and meta with the current ones (through the core every schema version keeps, see
   ``migrations.py``), sync.
4. Keep the migrated file as ``<buffer>.schema-v<N>.rolled-back-<time>`` (a hard link, so the
   buffer path is never missing), then rename the copy into place (atomic); write the upgrade
   record (``rolled back``). A crash before that rename leaves the migrated file in place, and
   rollback can simply be run again.

Delivery after a rollback: the snapshot's events that the newer version delivered meanwhile
are pending again and are sent again with the same ids; a receiver deduplicates them by id
(the delivery contract), so a rollback makes duplicates on the wire, never new ids.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer import migrations
from buffer.snapshot import read_record, record_path, snapshot_path, write_record
from config.errors import FatalError
from config.model import format_time, utcnow

__all__ = ["RollbackResult", "UpgradeError", "UpgradePlan", "plan", "rollback", "snapshots"]

_SNAPSHOT = re.compile(r"\.schema-v(\d+)\.snapshot$")


class UpgradeError(FatalError):
    """A rollback that cannot be done (no snapshot, the agent still runs, nothing to undo)."""


@dataclass
class UpgradePlan:
    path: Path
    target: int  # the schema version this agent writes
    found: int | None = None  # the file's version; None when there is no file yet
    steps: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why this version cannot take over
    events: int = 0
    undelivered: int = 0  # pending or leased delivery rows
    size_bytes: int = 0
    free_bytes: int = 0
    snapshot: Path | None = None  # what the migration would write first
    snapshots: dict[int, Path] = field(default_factory=dict)  # already on disk
    last_upgrade: dict[str, Any] | None = None

    @property
    def can_take_over(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"buffer": str(self.path), "schema_found": self.found,
                "schema_target": self.target, "can_take_over": self.can_take_over,
                "problems": self.problems,
                "migrations": [{"version": v, "description": d} for v, d in self.steps],
                "events": self.events, "undelivered": self.undelivered,
                "size_bytes": self.size_bytes, "free_bytes": self.free_bytes,
                "snapshot": str(self.snapshot) if self.snapshot else None,
                "snapshots": {str(v): str(p) for v, p in self.snapshots.items()},
                "last_upgrade": self.last_upgrade}


def snapshots(path: Path) -> dict[int, Path]:
    """Snapshots beside the buffer file, by schema version."""
    out = {}
    for p in path.parent.glob(f"{_glob_escape(path.name)}.schema-v*.snapshot"):
        m = _SNAPSHOT.search(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def plan(path: Path) -> UpgradePlan:
    """What this version would do with the buffer file at ``path`` (read-only)."""
    target = migrations.SCHEMA_VERSION
    out = UpgradePlan(path=path, target=target, snapshots=snapshots(path),
                      last_upgrade=read_record(path))
    unreadable = _unreadable(path)
    if unreadable:
        out.problems.append(unreadable)
        return out
    with contextlib.suppress(OSError):
        out.free_bytes = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    if not path.exists():
        out.steps = [(m.version, m.description) for m in migrations.MIGRATIONS]
        return out
    out.size_bytes = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal"))
                         if p.exists())
    # A stopped agent leaves no -wal: then ``immutable`` reads without creating -wal/-shm
    # files. With a -wal (a running agent, or a crash), SQLite needs the shared memory index.
    live = path.with_name(path.name + "-wal").exists()
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?{'mode=ro' if live else 'immutable=1'}",
                               uri=True, timeout=5)
    except sqlite3.Error as e:
        out.problems.append(f"cannot open {path}: {e}")
        return out
    try:
        out.found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if out.found > target:
            out.problems.append(
                f"{path} has schema version {out.found}, written by a newer agent; this "
                f"version knows up to {target} and would refuse it")
            return out
        check = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)")]
        if check != ["ok"]:
            out.problems.append(f"{path} is damaged ({'; '.join(check)}): the agent would "
                                "move it aside and salvage what it can read")
        if out.found >= 1:
            out.events = int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            out.undelivered = int(conn.execute(
                "SELECT count(*) FROM deliveries WHERE state IN ('pending', 'leased')")
                .fetchone()[0])
    except sqlite3.Error as e:
        out.problems.append(f"cannot read {path}: {e}")
        return out
    finally:
        conn.close()
    out.steps = [(m.version, m.description) for m in migrations.MIGRATIONS
                 if m.version > out.found]
    if out.steps and out.found >= 1:
        out.snapshot = snapshot_path(path, out.found)
        need = out.size_bytes + 2**20
        if out.free_bytes < need:
            out.problems.append(f"the snapshot before migrating needs about {need} bytes free "
                                f"beside {path}; {out.free_bytes} are free")
    return out


@dataclass(frozen=True)
class RollbackResult:
    from_schema: int
    to_schema: int
    snapshot: Path
    set_aside: Path
    carried_over: int  # undelivered events detected after the snapshot, copied into it
    undelivered: int  # pending rows in the restored file


def rollback(path: Path, to_schema: int | None = None) -> RollbackResult:
    """Restore the snapshot taken before the last migration (see the module docstring)."""
    unreadable = _unreadable(path)
    if unreadable:  # else an unlistable directory would read as "no snapshot": nothing done
        raise UpgradeError(unreadable)
    have = snapshots(path)
    record = read_record(path) or {}
    if to_schema is None:
        to_schema = int(record["from_schema"]) if record.get("outcome") in (
            "migrating", "migrated") and int(record.get("from_schema", 0)) in have \
            else max(have, default=0)
    snap = have.get(to_schema)
    if snap is None:
        raise UpgradeError(f"no snapshot of schema version {to_schema} beside {path} "
                           f"(found: {', '.join(p.name for p in have.values()) or 'none'})")
    if not path.exists():
        raise UpgradeError(f"no buffer file at {path}")
    tmp = path.with_name(path.name + ".rollback.tmp")
    conn = _exclusive(path)
    try:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current <= to_schema:
            raise UpgradeError(f"{path} is at schema version {current}: nothing to roll back "
                               f"to version {to_schema}")
        conn.execute("ATTACH DATABASE ? AS snap", (f"{snap.resolve().as_uri()}?mode=ro",))
        carried = conn.execute(
            "SELECT e.seq, e.id, e.key, e.type, e.time, e.payload, e.created_at FROM events e "
            "WHERE e.id NOT IN (SELECT id FROM snap.events) AND EXISTS (SELECT 1 FROM "
            "deliveries d WHERE d.seq = e.seq AND d.state IN ('pending', 'leased', 'dead')) "
            "ORDER BY e.seq").fetchall()
        carried_seqs = {int(r[0]) for r in carried}
        dead = [r for r in conn.execute(
            "SELECT seq, sink, attempts, status, detail, failed_at FROM deliveries "
            "WHERE state = 'dead' ORDER BY seq") if int(r[0]) in carried_seqs]
        state = _State(
            detectors=conn.execute(
                "SELECT key, state, updated_at FROM detector_state").fetchall(),
            drops=conn.execute(
                "SELECT type, count, first_at, last_at FROM drops").fetchall(),
            meta=conn.execute("SELECT name, value FROM meta").fetchall(),
            sinks=conn.execute("SELECT name, added_at FROM sinks").fetchall(),
            dead=dead)
        conn.execute("DETACH DATABASE snap")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()  # the last connection: SQLite checkpoints and removes the -wal
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    undelivered = _restore(snap, tmp, carried, state)
    _same_owner(tmp, path)
    stamp = format_time(utcnow()).replace(":", "").replace("-", "")
    aside = path.with_name(f"{path.name}.schema-v{current}.rolled-back-{stamp}")
    # The buffer path must never be missing (a crash between two renames left no buffer.db:
    # the old agent then started on an empty file). A hard link keeps the migrated file, the
    # rename below swaps the restored copy in atomically.
    try:
        os.link(path, aside)
    except OSError:  # a file system without hard links: a copy
        shutil.copy2(path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path.with_name(path.name + suffix), aside.with_name(aside.name + suffix))
    os.replace(tmp, path)
    _sync_dir(path.parent)
    write_record(path, from_schema=current, to_schema=to_schema, outcome="rolled back",
                 snapshot=snap.name, set_aside=aside.name, carried_over=len(carried))
    _same_owner(record_path(path), path)
    return RollbackResult(current, to_schema, snap, aside, len(carried), undelivered)


def _unreadable(path: Path) -> str | None:
    """Why the data directory cannot be looked at by this user (None when it can)."""
    d = path.parent
    if d.exists() and not os.access(d, os.R_OK | os.X_OK):
        return (f"cannot read the data directory {d} as this user (uid {os.geteuid()}): run "
                f"as root or as the agent's user")
    return None


def _same_owner(made: Path, like: Path) -> None:
    """Give ``made`` the owner and mode of ``like``. Rollback is run by an operator or a
    playbook as root, while the agent runs as its own user (the Debian package's unit): a
    restored buffer owned by root is read-only to the agent, and the previous version would
    not start on it."""
    st = like.stat()
    if os.geteuid() == 0 and (made.stat().st_uid, made.stat().st_gid) != (st.st_uid, st.st_gid):
        os.chown(made, st.st_uid, st.st_gid)
    os.chmod(made, st.st_mode & 0o7777)


def _exclusive(path: Path) -> sqlite3.Connection:
    # uri=True: the snapshot is attached read-only by URI, whatever SQLite's build default.
    conn = sqlite3.connect(path.resolve().as_uri(), uri=True, isolation_level=None, timeout=0.5)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.execute("COMMIT")
    except sqlite3.OperationalError as e:
        conn.close()
        raise UpgradeError(f"{path} is in use ({e}): stop the agent before rolling back") \
            from e
    return conn


@dataclass(frozen=True)
class _State:
    """What the migrated file knows that is newer than the snapshot (rows of core tables)."""

    detectors: list[tuple[Any, ...]]
    drops: list[tuple[Any, ...]]
    meta: list[tuple[Any, ...]]
    sinks: list[tuple[Any, ...]]  # a sink added after the upgrade gets the carried events too
    dead: list[tuple[Any, ...]]  # (seq, sink, attempts, status, detail, failed_at) of carried


def _restore(snap: Path, tmp: Path, carried: list[tuple[Any, ...]], state: _State) -> int:
    src = sqlite3.connect(f"{snap.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(tmp, isolation_level=None)
    try:
        src.backup(dst)
        dst.execute("BEGIN IMMEDIATE")
        dst.executemany("INSERT OR IGNORE INTO sinks(name, added_at) VALUES (?, ?)",
                        state.sinks)
        sinks = [str(r[0]) for r in dst.execute("SELECT name FROM sinks")]
        dead: dict[int, dict[str, tuple[Any, ...]]] = {}
        for seq, sink, *rest in state.dead:
            dead.setdefault(int(seq), {})[str(sink)] = tuple(rest)
        for old_seq, *row in carried:
            cur = dst.execute("INSERT OR IGNORE INTO events(id, key, type, time, payload, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?)", row)
            if not cur.rowcount:
                continue
            letters = dead.get(int(old_seq), {})
            for s in sinks:
                if s in letters:  # a dead letter stays one (export, replay), with its reason
                    dst.execute("INSERT INTO deliveries(sink, state, seq, attempts, status, "
                                "detail, failed_at) VALUES (?, 'dead', ?, ?, ?, ?, ?)",
                                (s, cur.lastrowid, *letters[s]))
                else:
                    dst.execute("INSERT INTO deliveries(sink, state, seq) "
                                "VALUES (?, 'pending', ?)", (s, cur.lastrowid))
        dst.execute("DELETE FROM detector_state")
        dst.executemany("INSERT INTO detector_state(key, state, updated_at) VALUES (?, ?, ?)",
                        state.detectors)
        dst.execute("DELETE FROM drops")
        dst.executemany("INSERT INTO drops(type, count, first_at, last_at) VALUES (?, ?, ?, ?)",
                        state.drops)
        dst.executemany("INSERT OR REPLACE INTO meta(name, value) VALUES (?, ?)", state.meta)
        dst.execute("COMMIT")
        undelivered = int(dst.execute("SELECT count(*) FROM deliveries WHERE state IN "
                                      "('pending', 'leased')").fetchone()[0])
    finally:
        src.close()
        dst.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return undelivered


def _sync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
