"""kill -9 while a history backfill's events are being committed, then a restart: each stop
that happened while the agent was away is reported once, under the same ids.

The agent runs as a subprocess against a node-opcua server that historizes the machine's
state. Run 1 sees the machine running and stops cleanly. While it is away the machine stops
twice. Run 2 backfills those stops and is SIGKILLed at its first commit (``before_commit``:
the events and the detector state are lost together; ``after_commit``: both are durable, not
yet delivered). Run 3, unarmed, must end with exactly the two stops at the receiver, and
after ``after_commit`` with the very ids run 2 committed (nothing detected a second time).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from support import AgentProcess, free_port, wait_until
from support.node_opcua import NodeOpcuaServer, needs_node_opcua

from agent.receiver import Receiver
from config.failpoints import ENV
from config.model import format_time, utcnow

pytestmark = needs_node_opcua


def write_config(path: Path, data: Path, endpoint: str, sink: str) -> Path:
    path.write_text(f"""
agent: {{id: edge-bk, site: plant-bk, data_dir: "{data}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: opcua
    endpoint: {endpoint}
    publishing_interval: 100ms
    timeout: 2s
    history: {{margin: 5s, max_span: 1h}}
    tags:
      f.state: {{node: "ns=1;s=Filler.State", type: int}}
machines:
  filler:
    line: l1
    state: {{tag: f.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 0s}}
sinks:
  central: {{type: http, url: "{sink}", retry: {{initial_backoff: 50ms, max_backoff: 300ms}}}}
buffer: {{commit_interval: 10ms}}
""", encoding="utf-8")
    return path


def committed(db: Path) -> list[tuple[str, str]]:
    """(id, type) of every downtime event in the buffer."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db)
    try:
        return [(str(i), str(t)) for i, t in conn.execute(
            "SELECT id, type FROM events WHERE type LIKE '%downtime%' ORDER BY seq")]
    finally:
        conn.close()


def running_saved(db: Path) -> bool:
    if not db.exists():
        return False
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT * FROM detector_state").fetchall()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return any("running" in str(row) for row in rows)


async def change(plc: NodeOpcuaServer, value: int) -> datetime:
    t = utcnow().replace(microsecond=utcnow().microsecond // 1000 * 1000)
    plc.set("Filler.State", value, time=t)
    await asyncio.sleep(0.05)
    return t


@pytest.mark.parametrize("point", ["before_commit:1", "after_commit:1"])
async def test_kill_while_committing_a_backfill(tmp_path: Path, point: str) -> None:
    plc = NodeOpcuaServer(free_port()).start()
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    data = tmp_path / "data"
    db = data / "buffer.db"
    cfg = write_config(tmp_path / "agent.yaml", data, plc.endpoint, receiver.url)
    log = tmp_path / "agent.log"
    runs = [AgentProcess(cfg, log, env={ENV: spec}) for spec in ("", point, "")]
    try:
        await change(plc, 1)
        runs[0].start()
        await wait_until(lambda: running_saved(db), timeout=20, what="running committed")
        assert runs[0].terminate() == 0

        t1, t2 = await change(plc, 3), await change(plc, 1)
        t3, t4 = await change(plc, 3), await change(plc, 1)
        runs[1].start()
        await wait_until(lambda: not runs[1].alive, timeout=20, what=f"failpoint {point}")
        assert runs[1].proc is not None and runs[1].proc.returncode == -signal.SIGKILL
        at_kill = committed(db)
        if point.startswith("before"):
            assert at_kill == []
        else:  # the backfilled stops were in that first commit
            assert len(at_kill) == 4, at_kill

        runs[2].start()
        await wait_until(lambda: len([e for e in receiver.events()
                                      if "downtime" in e["type"]]) >= 4,
                         timeout=20, what="the backfilled stops delivered")
        await asyncio.sleep(0.5)  # anything detected twice would arrive now
        assert runs[2].terminate() == 0
    finally:
        for run in runs:
            run.kill()
        plc.stop()
    events = [e for e in receiver.events() if "downtime" in e["type"]]
    await receiver.aclose()
    assert [(e["type"].rsplit(".", 1)[1], e["data"]["started_at"], e["data"].get("ended_at"))
            for e in events] == [
        ("started", format_time(t1), None), ("ended", format_time(t1), format_time(t2)),
        ("started", format_time(t3), None), ("ended", format_time(t3), format_time(t4))]
    if at_kill:
        assert [e["id"] for e in events] == [i for i, _ in at_kill]
