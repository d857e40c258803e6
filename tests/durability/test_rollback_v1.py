"""Rollback of the real first migration (schema 1 -> current, through 2) on the frozen v1 file.

The generic round trip (``test_upgrade_rollback.py``) uses a made-up next version on top of the
current one; this one starts from ``data/buffer_v1.sql``, lets this code migrate it, detect and
settle after the upgrade, then gives the file back to schema 1. What the newer version knows
that the snapshot does not must come back with it: undelivered events, dead letters detected
since, and the detector states (a machine's sequence keeps increasing; an episode open at the
stop is not detected again under a new id).
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from buffer import upgrade
from buffer.base import NewEvent
from buffer.migrations import SCHEMA_VERSION
from buffer.snapshot import read_record, snapshot_path, write_record
from buffer.sqlite import SqliteBuffer
from buffer.upgrade import rollback

FIXTURE = Path(__file__).parent / "data" / "buffer_v1.sql"
STATE = json.dumps({"v": 1, "sequence": 41, "state": "down"})


def _v1(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.executescript(FIXTURE.read_text())


def _upgrade_and_work(db: Path) -> None:
    """This version opens the v1 file (migrates it), detects 3 events, one becomes a dead
    letter, the machine's state is saved, a drop is counted."""
    buf = SqliteBuffer(db, max_size=2**30)
    buf.open(["central", "uns"])  # a second sink, configured with the upgrade
    try:
        buf.append([NewEvent(f"after-{i}", "m1", "plantedge.scrap.recorded",
                             f"2026-01-02T00:00:0{i}.000Z", "{}") for i in range(3)],
                   {"m1": STATE})
    finally:
        buf.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.execute("UPDATE deliveries SET state = 'dead', status = 400, detail = 'bad', "
                     "failed_at = 't' WHERE seq = (SELECT seq FROM events WHERE id = 'after-0')")
        conn.execute("INSERT INTO drops VALUES ('plantedge.scrap.recorded', 2, 'a', 'b')")
        conn.execute("UPDATE meta SET value = 2 WHERE name = 'dropped_total'")
        conn.commit()


def _rows(db: Path, sql: str) -> list[Any]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def test_rollback_to_v1_keeps_dead_letters_states_and_drops_of_the_newer_version(
        tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    _v1(db)
    _upgrade_and_work(db)
    assert _rows(snapshot_path(db, 1), "PRAGMA user_version") == [(1,)]
    r = rollback(db)
    assert (r.from_schema, r.to_schema, r.carried_over) == (SCHEMA_VERSION, 1, 3)
    assert _rows(db, "PRAGMA user_version") == [(1,)]
    states = {(i, s): st for i, s, st in _rows(
        db, "SELECT e.id, d.sink, d.state FROM events e JOIN deliveries d ON d.seq = e.seq "
            "WHERE e.id LIKE 'after-%'")}
    assert states == {("after-0", "central"): "dead", ("after-0", "uns"): "dead",
                      ("after-1", "central"): "pending", ("after-1", "uns"): "pending",
                      ("after-2", "central"): "pending", ("after-2", "uns"): "pending"}
    assert _rows(db, "SELECT status, detail FROM deliveries WHERE state = 'dead' AND seq = "
                     "(SELECT seq FROM events WHERE id = 'after-0')") == [(400, "bad")] * 2
    # The newer detector state (sequence 41), not the snapshot's (none): new events go on
    # from there instead of reusing sequence numbers the carried events already carry.
    assert dict(_rows(db, "SELECT key, state FROM detector_state"))["m1"] == STATE
    assert _rows(db, "SELECT type, count FROM drops") == [("plantedge.scrap.recorded", 2)]
    assert _rows(db, "SELECT value FROM meta WHERE name = 'dropped_total'") == [(2,)]
    rec = read_record(db)
    assert rec is not None and (rec["outcome"], rec["carried_over"]) == ("rolled back", 3)


def test_a_crash_before_the_final_rename_leaves_the_buffer_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "buffer.db"
    _v1(db)
    _upgrade_and_work(db)
    real = os.replace

    def crash(src: object, dst: object) -> None:
        if Path(str(dst)) == db:
            raise KeyboardInterrupt("power cut before the restored copy is renamed in")
        real(src, dst)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(upgrade.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            rollback(db)
    # The buffer is still there (migrated, every event), and rollback can run again.
    assert _rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert _rows(db, "SELECT count(*) FROM events WHERE id LIKE 'after-%'") == [(3,)]
    assert rollback(db).to_schema == 1
    assert _rows(db, "PRAGMA user_version") == [(1,)]


def test_a_crash_between_the_last_step_and_its_record_is_finished_at_the_next_open(
        tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    _v1(db)
    _upgrade_and_work(db)
    # As a kill -9 right after the last step's commit leaves it: the file migrated, the record
    # not.
    write_record(db, from_schema=1, to_schema=SCHEMA_VERSION, outcome="migrating",
                 snapshot=snapshot_path(db, 1).name)
    buf = SqliteBuffer(db, max_size=2**30)
    buf.open(["central"])
    buf.close()
    rec = read_record(db)
    assert rec is not None and (rec["from_schema"], rec["to_schema"], rec["outcome"]) == (
        1, SCHEMA_VERSION, "migrated")



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (rollback run as root by a playbook)")
def test_a_rollback_run_as_root_leaves_the_buffer_to_the_agents_user(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    _v1(db)
    _upgrade_and_work(db)
    agent_uid, agent_gid = 10001, 10001  # the image's and a typical system user's ids
    for f in (db, snapshot_path(db, 1)):
        os.chown(f, agent_uid, agent_gid)
        os.chmod(f, 0o600)
    rollback(db)  # as root, as the playbook's 'become' runs it
    st = db.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (agent_uid, agent_gid, 0o600)
    assert db.with_name("buffer.db.upgrade.json").stat().st_uid == agent_uid


def test_no_room_for_the_snapshot_check_says_no_and_the_agent_refuses_to_migrate(
        tmp_path: Path) -> None:
    """A real ENOSPC (a 3 MiB tmpfs holding a 1.8 MiB v1 buffer): ``upgrade check`` says it
    cannot take over and why; opening refuses the migration with what to do, and the file
    stays at version 1 with every undelivered event."""
    from support import small_tmpfs

    from buffer.base import BufferOpenError
    from buffer.upgrade import plan

    with small_tmpfs(tmp_path / "small", "3m") as small:
        db = small / "buffer.db"
        _v1(db)
        with closing(sqlite3.connect(db)) as conn:  # padding: the copy cannot fit beside it
            conn.execute("CREATE TABLE pad(x)")
            conn.execute("INSERT INTO pad VALUES (zeroblob(1800000))")
            conn.commit()
        p = plan(db)
        assert not p.can_take_over and (p.found, p.target) == (1, SCHEMA_VERSION)
        assert "snapshot before migrating needs" in " ".join(p.problems), p.problems
        with pytest.raises(BufferOpenError, match=r"snapshot .* failed .*disk is full.*nothing "
                           r"was migrated.*Free disk space"):
            SqliteBuffer(db, max_size=2**30).open(["central"])
        assert _rows(db, "PRAGMA user_version") == [(1,)]
        assert _rows(db, "SELECT count(*) FROM deliveries WHERE state != 'dead'") == [(8,)]
        assert sorted(f.name for f in small.iterdir()) == ["buffer.db"]


@pytest.mark.slow
def test_rollback_is_refused_while_a_real_agent_process_runs_on_the_migrated_file(
        tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from _plant import write_config
    from support import ROOT, wait_until_sync

    data = tmp_path / "data"
    data.mkdir()
    db = data / "buffer.db"
    _v1(db)
    cfg = write_config(tmp_path / "agent.yaml", data, 1, "http://127.0.0.1:1/events")
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_sync(lambda: read_record(db) is not None
                        and read_record(db)["outcome"] == "migrated",  # type: ignore[index]
                        timeout=30, what="the agent migrated the v1 file")
        cli = [sys.executable, "-m", "agent.cli", "rollback", "--config", str(cfg)]
        refused = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "stop the agent" in refused.stderr, refused.stderr
        assert _rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert _rows(db, "PRAGMA user_version") == [(1,)]
        assert _rows(db, "SELECT count(*) FROM deliveries WHERE state != 'dead'")[0][0] >= 8
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to become another user)")
def test_a_user_who_cannot_read_the_data_directory_is_told_so() -> None:
    """Not "no buffer file yet" (or a traceback) from upgrade check, and not "no snapshot"
    from rollback, which the playbook takes as "nothing to roll back" and reinstalls the
    previous version on a file it refuses."""
    import shutil
    import tempfile

    from buffer.upgrade import UpgradeError, plan

    top = Path(tempfile.mkdtemp(prefix="ea-perm-"))  # pytest's tmp_path is root's alone
    try:
        top.chmod(0o755)
        data = top / "data"
        data.mkdir(mode=0o700)
        db = data / "buffer.db"
        _v1(db)
        _upgrade_and_work(db)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: an operator without sudo
            out: list[str] = []
            try:
                os.setgid(65534)
                os.setuid(65534)
                out.append(" ".join(plan(db).problems))
                try:
                    rollback(db)
                    out.append("rolled back")
                except UpgradeError as e:
                    out.append(str(e))
            except BaseException as e:  # reported to the parent, which asserts on it
                out.append(f"{type(e).__name__}: {e}")
            finally:
                os.write(write, json.dumps(out).encode())
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            said = json.loads(f.read() or "[]")
        os.waitpid(pid, 0)
        assert len(said) == 2 and all("cannot read the data directory" in s for s in said), said
        assert _rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    finally:
        shutil.rmtree(top, ignore_errors=True)
