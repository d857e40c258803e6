"""While the buffer cannot commit, detections wait in memory, bounded, and drops are reported."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until

import agent.runtime.commit as commit_module
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from config.errors import StorageFullError
from config.model import Quality, TagSample, utcnow


def config(tmp: Path) -> Any:
    return load_config_text(f"""
agent: {{id: a1, site: s1, data_dir: "{tmp}"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {free_port()},
         tags: {{st: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: st, map: {{1: running, 3: down}}}}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:{free_port()}/events"}}
buffer: {{commit_interval: 1ms}}
""", "<test>")


async def test_uncommitted_detections_are_bounded_and_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commit_module, "MAX_UNCOMMITTED", 5)
    rt = Runtime(config(tmp_path))
    await rt.start()
    full = True
    real_append = rt.buffer.append

    async def append(rows: Any, states: Any) -> Any:
        if full:
            raise StorageFullError("database or disk is full")
        return await real_append(rows, states)

    monkeypatch.setattr(rt.buffer, "append", append)
    try:
        t0 = utcnow()
        for i in range(12):  # 12 state changes: 1 start ... alternating started/ended
            rt.on_samples("plc", [TagSample("st", 3 if i % 2 == 0 else 1, Quality.GOOD,
                                            t0 + timedelta(seconds=i))])
        detected = sum(rt.events_detected.values())
        assert detected == 12
        await wait_until(lambda: rt.storage_full, what="commits failing")
        await wait_until(lambda: rt.committer.uncommitted == 5, what="queue bounded")
        assert rt.readiness() and "buffer" in rt.readiness()[0]
        full = False
        await wait_until(lambda: rt.storage_error is None, what="commits work again")
        await wait_until(lambda: rt.committer.uncommitted == 0, what="gap committed")
        rows = await rt.buffer.pending("central", limit=100)
        detected = sum(rt.events_detected.values())  # incl. signal.lost from the dead PLC
    finally:
        await rt.stop()
    types = [r.type for r in rows]
    assert types.count("plantedge.data.gap") == 1
    gap = next(r for r in rows if r.type == "plantedge.data.gap")
    data = json.loads(gap.payload)["data"]
    # Everything detected is either committed or accounted for by the gap, oldest first.
    assert data["dropped"] == detected - (len(rows) - 1) >= 7
    assert sum(data["dropped_by_type"].values()) == data["dropped"]
    assert data["dropped_by_type"]["plantedge.downtime.started"] >= 3
    assert "waited in memory" in data["reason"]
