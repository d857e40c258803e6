"""``kill -9`` in the middle of the schema 1 -> 2 upgrade, then a normal start.

From the frozen first-release file (pending, leased at a crash, dead-lettered rows; a detector
state and drop counts added here), a child process opens the buffer with a failpoint armed and
dies by SIGKILL: after the snapshot, or inside the step's transaction after the version bump.
The file must still be a whole version-1 file with every row as it was, the snapshot a
readable version-1 copy, and the next open must finish the upgrade losing nothing.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from buffer.migrations import SCHEMA_VERSION
from buffer.snapshot import read_record, snapshot_path
from buffer.sqlite import SqliteBuffer
from config import failpoints

FIXTURE = Path(__file__).parent / "data" / "buffer_v1.sql"
TABLES = ("events", "deliveries", "detector_state", "drops", "meta", "sinks")


def _build_v1(db: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.executescript(FIXTURE.read_text())
        conn.execute("INSERT INTO detector_state VALUES ('m1', '{\"state\":\"down\"}', 't')")
        conn.execute("INSERT INTO drops VALUES ('plantedge.scrap.recorded', 3, 'a', 'b')")
        conn.execute("UPDATE meta SET value = 3 WHERE name = 'dropped_total'")
        conn.commit()
    finally:
        conn.close()


def _dump(db: Path) -> tuple[int, dict[str, list[tuple[object, ...]]]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        return version, {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                         for t in TABLES}
    finally:
        conn.close()


def _open_and_die(db: Path, point: str) -> None:
    code = ("import sys; from buffer.sqlite import SqliteBuffer; "
            "SqliteBuffer(sys.argv[1], 2**30).open(['central']); print('survived')")
    env = {**os.environ, failpoints.ENV: point, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(db)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("point", ["migration_after_snapshot", "migration_before_commit"])
def test_a_kill_mid_upgrade_leaves_version_1_whole_and_the_restart_finishes(
        tmp_path: Path, point: str) -> None:
    db = tmp_path / "buffer.db"
    _build_v1(db)
    version, before = _dump(db)
    assert version == 1
    leased = [row for row in before["deliveries"] if row[1] == "leased"]
    assert leased, "the fixture must hold rows leased at a crash"

    _open_and_die(db, point)
    assert _dump(db) == (1, before)  # nothing of the step is left, nothing lost
    assert _dump(snapshot_path(db, 1)) == (1, before)
    assert (read_record(db) or {}).get("outcome") == "migrating"

    buf = SqliteBuffer(db, 2**30)
    buf.open(["central"])
    try:
        assert buf.schema_version == SCHEMA_VERSION
        stats = buf.stats()
        undelivered = sorted(
            (row for row in before["deliveries"] if row[1] in ("pending", "leased")),
            key=lambda row: row[2])
        assert stats.sinks["central"].pending == len(undelivered)
        assert stats.sinks["central"].dead_letters == 1
        assert stats.dropped_total == 3
        assert buf.load_states() == {"m1": '{"state":"down"}'}
        # Leased at the crash: pending again, in append order with the rest.
        assert [r.seq for r in buf.lease("central", 100)] == [row[2] for row in undelivered]
        assert buf.take_drops().by_type == {"plantedge.scrap.recorded": 3}
    finally:
        buf.close()
    record = read_record(db) or {}
    assert (record.get("from_schema"), record.get("outcome")) == (1, "migrated")
    assert _dump(snapshot_path(db, 1)) == (1, before)  # the rollback's copy is still intact
