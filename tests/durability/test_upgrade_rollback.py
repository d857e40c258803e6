"""Health-gated upgrade with rollback: a schema migration is preceded by a snapshot of the
buffer (SQLite's backup API); ``edge-agent upgrade check`` tells, without writing, what a
version would do with a data directory; ``edge-agent rollback`` gives the previous version its
file back, carrying over events detected since the upgrade.

"The next version" is this code plus one migration step (``support/next_version.py``). The two
100,000-event scenarios count at the reference receiver: every pending event arrives after an
upgrade, and after a rollback (delivered ones again, deduplicated by id).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from _plant import write_config
from support import ROOT, free_port, wait_until_sync
from support.next_version import NEXT

from agent.cli import main
from agent.fleet import heartbeat_document
from agent.runtime import Runtime
from agent.wiring.load import load_config
from buffer import migrations
from buffer.base import BufferOpenError, NewEvent
from buffer.snapshot import read_record, snapshot_path
from buffer.sqlite import SqliteBuffer

NEXT_AGENT = ROOT / "tests" / "support" / "next_version.py"
CURRENT = migrations.SCHEMA_VERSION


def _event(i: int) -> NewEvent:
    m = f"press-{i % 4}"
    doc = {"specversion": "1.0", "id": f"up-{i:07d}", "type": "plantedge.scrap.recorded",
           "source": f"/sites/s1/lines/l1/machines/{m}", "time": "2026-01-01T00:00:00.000Z",
           "datacontenttype": "application/json", "agentid": "dur-edge",
           "sequence": str(i // 4 + 1),
           "data": {"machine": m, "line": "l1", "site": "s1", "order_id": None, "quantity": 1,
                    "window_start": "2026-01-01T00:00:00.000Z",
                    "window_end": "2026-01-01T00:01:00.000Z", "reason_code": None}}
    return NewEvent(doc["id"], m, doc["type"], doc["time"],
                    json.dumps(doc, separators=(",", ":"), sort_keys=True))


def _fill(path: Path, n: int, start: int = 0) -> None:
    buf = SqliteBuffer(path, max_size=2**40, synchronous="OFF")
    buf.open(["central"])
    try:
        for lo in range(start, start + n, 10_000):
            buf.append([_event(i) for i in range(lo, min(start + n, lo + 10_000))], {})
    finally:
        buf.close()


def _version(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _pending_ids(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        return {str(r[0]) for r in conn.execute(
            "SELECT e.id FROM events e JOIN deliveries d ON d.seq = e.seq "
            "WHERE d.state IN ('pending', 'leased')")}


@pytest.fixture
def next_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, NEXT))
    monkeypatch.setattr(migrations, "SCHEMA_VERSION", NEXT.version)


@pytest.fixture
def data(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(config file, buffer file) with 10 pending events written by the current version."""
    cfg = write_config(tmp_path / "agent.yaml", tmp_path / "data", 1, "http://127.0.0.1:1/e")
    db = tmp_path / "data" / "buffer.db"
    _fill(db, 10)
    yield cfg, db


# --------------------------------------------------------------------------- snapshot


def test_a_migration_is_preceded_by_a_snapshot_the_old_version_can_read(
        data: tuple[Path, Path], next_version: None) -> None:
    _, db = data
    _fill(db, 5, start=10)  # the next version opens (and migrates) the file
    assert _version(db) == NEXT.version
    snap = snapshot_path(db, CURRENT)
    assert _version(snap) == CURRENT
    assert _pending_ids(snap) == {f"up-{i:07d}" for i in range(10)}
    assert not snap.with_name(snap.name + "-wal").exists()  # one self-contained file
    rec = read_record(db)
    assert rec is not None and (rec["from_schema"], rec["to_schema"], rec["outcome"]) == (
        CURRENT, NEXT.version, "migrated")


def test_no_snapshot_no_migration(data: tuple[Path, Path], next_version: None) -> None:
    _, db = data
    snapshot_path(db, CURRENT).mkdir()  # the snapshot cannot be put in place
    with pytest.raises(BufferOpenError, match=r"snapshot .* failed.*nothing was migrated"):
        SqliteBuffer(db, max_size=2**30).open(["central"])
    assert _version(db) == CURRENT and len(_pending_ids(db)) == 10
    assert not list(db.parent.glob("*.tmp"))


def test_opening_at_the_same_version_takes_no_snapshot(data: tuple[Path, Path]) -> None:
    _, db = data
    _fill(db, 1, start=10)
    assert not list(db.parent.glob("*.snapshot")) and read_record(db) is None


# --------------------------------------------------------------------------- upgrade check


def _check(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    code = main(["upgrade", "check", "--config", str(cfg), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_upgrade_check_tells_what_it_would_migrate_and_changes_nothing(
        data: tuple[Path, Path], next_version: None, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, db = data
    before = {p.name: p.read_bytes() for p in db.parent.iterdir()}
    code, plan = _check(cfg, capsys)
    assert code == 0 and plan["can_take_over"] is True
    assert (plan["schema_found"], plan["schema_target"]) == (CURRENT, NEXT.version)
    assert plan["migrations"] == [{"version": NEXT.version, "description": NEXT.description}]
    assert plan["undelivered"] == 10 and plan["events"] == 10
    assert str(plan["snapshot"]).endswith(f"buffer.db.schema-v{CURRENT}.snapshot")
    assert {p.name: p.read_bytes() for p in db.parent.iterdir()} == before
    # Text form, for a person.
    assert main(["upgrade", "check", "--config", str(cfg)]) == 0
    assert f"will migrate {CURRENT} -> {NEXT.version}" in capsys.readouterr().out


def test_upgrade_check_refuses_a_file_of_a_newer_agent(
        data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg, db = data
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {CURRENT + 1}")
    code, plan = _check(cfg, capsys)
    assert code == 1 and plan["can_take_over"] is False
    assert "newer agent" in str(plan["problems"])


def test_upgrade_check_of_a_fresh_box_and_of_an_invalid_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "agent.yaml", tmp_path / "none", 1, "http://127.0.0.1:1/e")
    code, plan = _check(cfg, capsys)
    assert code == 0 and plan["schema_found"] is None
    cfg.write_text(cfg.read_text().replace("type: modbus", "type: profibus"))
    assert main(["upgrade", "check", "--config", str(cfg)]) == 2


# --------------------------------------------------------------------------- rollback


def test_rollback_restores_the_snapshot_and_carries_over_later_events(
        data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg, db = data
    with monkeypatch.context() as m:  # the next version: migrates, delivers 3, detects 5
        m.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, NEXT))
        m.setattr(migrations, "SCHEMA_VERSION", NEXT.version)
        _fill(db, 5, start=10)
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("DELETE FROM deliveries WHERE seq IN (SELECT seq FROM events WHERE id "
                         "IN ('up-0000000', 'up-0000001', 'up-0000011'))")
            conn.commit()
        assert main(["rollback", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"from schema version {NEXT.version} to {CURRENT}" in out
    assert "4 event(s) detected since the upgrade carried over" in out
    assert _version(db) == CURRENT
    # The snapshot's 10 (2 delivered meanwhile: again) and the 4 undelivered later ones.
    assert _pending_ids(db) == {f"up-{i:07d}" for i in range(15)} - {"up-0000011"}
    assert list(db.parent.glob(f"buffer.db.schema-v{NEXT.version}.rolled-back-*"))
    rec = read_record(db)
    assert rec is not None and (rec["outcome"], rec["carried_over"]) == ("rolled back", 4)
    # The old version opens it; a second rollback has nothing to undo.
    buf = SqliteBuffer(db, max_size=2**30)
    buf.open(["central"])
    assert buf.stats().sinks["central"].pending == 14
    buf.close()
    assert main(["rollback", "--config", str(cfg)]) == 2
    assert "nothing to roll back" in capsys.readouterr().err


def test_rollback_refuses_while_the_agent_holds_the_file(
        data: tuple[Path, Path], next_version: None, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, db = data
    buf = SqliteBuffer(db, max_size=2**30)
    buf.open(["central"])  # migrates; stays open like a running agent
    try:
        assert main(["rollback", "--config", str(cfg)]) == 2
    finally:
        buf.close()
    assert "stop the agent" in capsys.readouterr().err
    assert _version(db) == NEXT.version


def test_rollback_without_a_snapshot_says_so(data: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = data
    assert main(["rollback", "--config", str(cfg)]) == 2
    assert "no snapshot" in capsys.readouterr().err


# --------------------------------------------------------------------------- 100,000 events

N = 100_000


@pytest.fixture(scope="module")
def backlog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A buffer file of the current version with N pending events (built once)."""
    db = tmp_path_factory.mktemp("backlog") / "buffer.db"
    _fill(db, N)
    return db


class _Receiver:
    """``edge-agent receiver`` in its own process (the agent gets the other core)."""

    def __init__(self, tmp: Path) -> None:
        self.port, self.db = free_port(), tmp / "rx.db"
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "receiver", "--listen",
                                      f"127.0.0.1:{self.port}", "--db", str(self.db)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_sync(self._up, timeout=30, what="receiver up")

    def _up(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def counts(self) -> tuple[int, int]:
        """(distinct backlog events received, duplicates refused)."""
        stats = httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=10).json()
        with closing(sqlite3.connect(self.db, timeout=10)) as conn:
            n = conn.execute("SELECT count(*) FROM received WHERE id LIKE 'up-%'").fetchone()[0]
        return int(n), int(stats["duplicates"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _agent(script: list[str], cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *script, "run", "--config", str(cfg)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(30) == 0


def _setup(tmp_path: Path, backlog: Path) -> tuple[Path, Path, _Receiver]:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(backlog, data / "buffer.db")
    rx = _Receiver(tmp_path)
    cfg = write_config(tmp_path / "agent.yaml", data, free_port(), rx.url, batch=500,
                       buffer="commit_interval: 5ms, synchronous: NORMAL")
    return cfg, data / "buffer.db", rx


@pytest.mark.slow
def test_an_upgrade_with_100k_pending_events_loses_none(tmp_path: Path, backlog: Path) -> None:
    cfg, db, rx = _setup(tmp_path, backlog)
    agent = _agent([str(NEXT_AGENT)], cfg, tmp_path / "agent.log")
    try:
        wait_until_sync(lambda: rx.counts()[0] == N, timeout=240, interval=0.5,
                        what="every pending event delivered by the new version")
        _stop(agent)
    finally:
        if agent.poll() is None:
            agent.kill()
        received, _ = rx.counts()
        rx.stop()
    assert received == N
    assert _version(db) == NEXT.version and _version(snapshot_path(db, CURRENT)) == CURRENT
    assert len(_pending_ids(snapshot_path(db, CURRENT))) == N


@pytest.mark.slow
def test_a_rollback_with_100k_pending_events_loses_none(tmp_path: Path, backlog: Path) -> None:
    cfg, db, rx = _setup(tmp_path, backlog)
    log = tmp_path / "agent.log"
    try:
        new = _agent([str(NEXT_AGENT)], cfg, log)  # upgrades, delivers a part, fails its gate
        wait_until_sync(lambda: rx.counts()[0] >= 10_000, timeout=120, interval=0.2,
                        what="the new version delivering")
        _stop(new)
        sent_by_new, _ = rx.counts()
        assert sent_by_new < N, "the new version delivered everything: nothing to prove"
        done = subprocess.run([sys.executable, str(NEXT_AGENT), "rollback", "--config",
                               str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert _version(db) == CURRENT
        old = _agent(["-m", "agent.cli"], cfg, log)  # the previous version takes its file back
        t0 = time.monotonic()
        wait_until_sync(lambda: sum(rx.counts()) >= N + sent_by_new, timeout=240, interval=0.5,
                        what="the old version re-sending every event of the snapshot")
        _stop(old)
        print(f"old version re-sent {N} events in {time.monotonic() - t0:.1f}s")
    finally:
        for p in (locals().get("new"), locals().get("old")):
            if p is not None and p.poll() is None:
                p.kill()
        received, duplicates = rx.counts()
        rx.stop()
    assert received == N  # every event, each once
    assert duplicates >= sent_by_new  # those delivered before the rollback came again
    assert not _pending_ids(db)


# --------------------------------------------------------------------------- fleet heartbeat


async def _heartbeat(cfg: Path) -> dict[str, Any]:
    rt = Runtime(load_config(cfg))
    await rt.start()
    try:
        return await heartbeat_document(rt)
    finally:
        await rt.stop()


async def test_the_heartbeat_carries_the_schema_version_and_the_last_upgrade(
        data: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = data
    beat = await _heartbeat(cfg)
    assert beat["buffer"]["schema_version"] == CURRENT and beat["last_upgrade"] is None
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, NEXT))
        m.setattr(migrations, "SCHEMA_VERSION", NEXT.version)
        beat = await _heartbeat(cfg)
        assert beat["buffer"]["schema_version"] == NEXT.version
        up = beat["last_upgrade"]
        assert (up["from_schema"], up["to_schema"], up["outcome"]) == (
            CURRENT, NEXT.version, "migrated") and up["at"].endswith("Z")
        assert main(["rollback", "--config", str(cfg)]) == 0
    beat = await _heartbeat(cfg)
    up = beat["last_upgrade"]
    assert beat["buffer"]["schema_version"] == CURRENT
    assert (up["from_schema"], up["to_schema"], up["outcome"]) == (
        NEXT.version, CURRENT, "rolled back")
