"""``buffer purge`` / ``replay`` of many dead letters never hold the write lock for long
(issue 11, #7). The real CLI runs as a subprocess on a real file while a writer in this process
commits every few milliseconds, as the agent does; the longest that writer waits is measured
against the whole run. Before the fix one transaction held the lock for the whole purge (15 s
for 800,000 rows; here ~1 s for 200,000), the writer's commits failed, and the purge exited 1."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from buffer.base import NewEvent, Settlement
from buffer.sqlite import SqliteBuffer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ROWS = 200_000


def make_dead_letters(path: Path, n: int) -> None:
    buf = SqliteBuffer(path, 2**40)
    buf.open(["central"])
    for start in range(0, n, 5000):
        buf.append([NewEvent(id=f"e{i}", key="m1", type="plantedge.scrap.recorded",
                             time="2026-01-01T00:00:00.000Z", payload=f'{{"id":"e{i}"}}')
                    for i in range(start, min(n, start + 5000))], {})
        rows = buf.lease("central", 5000)
        buf.settle("central", Settlement(dead={r.seq: (422, "bad") for r in rows}))
    buf.close()


class Writer(threading.Thread):
    """Commits a small transaction every 5 ms with a 5 s busy timeout, like the agent's
    writer; records the longest wait and any failure."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.stop = path, threading.Event()
        self.longest, self.failures, self.commits = 0.0, 0, 0

    def run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA synchronous=NORMAL")  # measure the lock, not the disk's fsync
        conn.execute("CREATE TABLE IF NOT EXISTS probe(n INTEGER)")
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO probe VALUES (1)")
                conn.execute("COMMIT")
                self.commits += 1
            except sqlite3.OperationalError:
                self.failures += 1
            self.longest = max(self.longest, time.monotonic() - started)
            time.sleep(0.005)
        conn.close()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "buffer", *args, "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "buffer.db"
    make_dead_letters(path, ROWS)
    return path


@pytest.mark.parametrize("action", ["replay", "purge"])
def test_chunked_actions_keep_the_agents_commits_flowing(tmp_path: Path, template: Path,
                                                          action: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(template, data / "buffer.db")
    config = tmp_path / "agent.yaml"
    config.write_text(f'agent: {{id: a, site: s, data_dir: "{data}"}}\n'
                      'sinks: {central: {type: http, url: "http://127.0.0.1:9/events"}}\n')
    writer = Writer(data / "buffer.db")
    writer.start()
    started = time.monotonic()
    done = cli(config, action, *(["--yes", "--all"] if action == "purge" else []))
    took = time.monotonic() - started
    writer.stop.set()
    writer.join()
    assert done.returncode == 0, done.stderr
    assert f"{ROWS} dead letter(s)" in done.stdout
    assert writer.failures == 0
    # The writer waited at most a small part of the run (one chunk), never the whole of it.
    # (Before: one transaction, so the longest wait was nearly the whole run.)
    assert writer.longest < max(0.4, took / 3), (
        f"the writer waited {writer.longest:.2f}s during a {took:.2f}s {action}")
    buf = SqliteBuffer.attach(data / "buffer.db")
    try:
        sinks = buf.stats().sinks["central"]
        assert sinks.dead_letters == 0
        assert sinks.pending == (ROWS if action == "replay" else 0)
    finally:
        buf.close()
