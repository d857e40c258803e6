"""Drop accounting and the data-gap event that reports it commit together (issue 11, #2).

The agent runs as a subprocess with a tiny buffer (``drop_oldest``), a 2 s group commit and no
receiver, so capacity drops begin; it is killed with SIGKILL as soon as ``/status`` shows the
first drop, well inside the 2 s before its next commit. Then the buffer file must account for
every drop: the counts still recorded plus those reported by stored gap events equal
``dropped_total``. Before the fix the counts were cleared in one commit and the gap event was
only queued in memory: ``dropped_total`` > 0, no counts, no gap event.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _plant import Plant, get_json, write_config
from support import AgentProcess, free_port, wait_until

from buffer.sqlite import SqliteBuffer

pytestmark = pytest.mark.slow

GAP = "plantedge.data.gap"


async def test_kill9_right_after_a_drop_loses_neither_count_nor_report(tmp_path: Path) -> None:
    plant = Plant(seed=5)
    await plant.start()
    health = free_port()
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "agent.yaml", data, plant.port,
                       f"http://127.0.0.1:{free_port()}/events", health, scrap_window="50ms",
                       buffer="commit_interval: 2s, max_size: 80KiB, when_full: drop_oldest")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    agent.start()
    try:
        async def dropped() -> bool:
            await plant.step()
            st = await get_json(f"http://127.0.0.1:{health}/status")
            return bool(st) and int(st["buffer"]["dropped_total"]) > 0

        await wait_until(dropped, timeout=60, interval=0.03, what="first capacity drop")
        agent.kill()
    finally:
        agent.kill()
        await plant.stop()
    buf = SqliteBuffer.attach(data / "buffer.db", readonly=False)
    try:
        total = buf.stats().dropped_total
        recorded = buf.take_drops().total
        reported = sum(json.loads(e.payload)["data"]["dropped"]
                       for e in buf.pending(limit=100_000) if e.type == GAP)
    finally:
        buf.close()
    assert total > 0
    assert recorded + reported == total, (
        f"dropped_total={total}, still recorded={recorded}, reported by gap events={reported}")
