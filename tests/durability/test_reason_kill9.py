"""A reason entered over HTTP survives a kill -9 right after its 2xx, and arrives once.

The agent runs as a real subprocess. While the receiver answers 503 (so nothing of the
classification can have been delivered), a reason is posted; the moment the 201 arrives the
agent is killed with SIGKILL. After a restart the receiver gets the classification exactly
once, and repeating the same request finds it (200, same event id, no second event).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from support import AgentProcess, free_port, wait_until
from support.configs import http_sink_yaml, modbus_agent_yaml

from agent.receiver import Receiver
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

pytestmark = pytest.mark.slow

STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})
TOKEN = "kill9-reason-token"
CLASSIFIED = "plantedge.downtime.classified"


def write_config(path: Path, data_dir: Path, plc_port: int, sink_url: str, health_port: int,
                 token_file: Path) -> None:
    health = (f'{{listen: "127.0.0.1:{health_port}", '
              f'reason_entry: {{bearer_token: "${{file:{token_file}}}"}}}}')
    path.write_text(modbus_agent_yaml("reason-kill-edge", data_dir, plc_port, health=health)
                    + """\
    timeout: 500ms
    tags:
      m.state: {table: holding, address: 0, type: uint16}
machines:
  m1:
    line: l1
    state: {tag: m.state, map: {1: running, 3: down}}
    downtime: {reasons: {7: Bottle jam}}
""" + http_sink_yaml(sink_url, max_backoff="300ms"), encoding="utf-8")


async def test_kill9_right_after_the_2xx_still_delivers_the_classification_once(
        tmp_path: Path) -> None:
    plc = ModbusSimulator(size=8)
    await plc.start()
    await plc.set_value(STATE, 1)
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    health = free_port()
    cfg = tmp_path / "agent.yaml"
    assert plc.port is not None
    write_config(cfg, tmp_path / "data", plc.port, rx.url, health, token_file)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    base = f"http://127.0.0.1:{health}"
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def of_type(t: str) -> list[dict[str, Any]]:
        return [e for e in rx.events() if e["type"] == t]

    try:
        agent.start()
        await plc.set_value(STATE, 3)
        await wait_until(lambda: of_type("plantedge.downtime.started"), timeout=30,
                         what="started")
        await plc.set_value(STATE, 1)
        ended = await wait_until(lambda: of_type("plantedge.downtime.ended"), timeout=20,
                                 what="ended")
        episode = ended[0]["data"]["episode_id"]
        rx.faults.status, rx.faults.count = 503, 1_000_000  # nothing gets through now
        body = {"code": "7", "text": "jam", "by": "operator"}
        url = f"{base}/machines/m1/episodes/{episode}/reason"
        async with httpx.AsyncClient() as http:
            r = await http.post(url, json=body, headers=auth, timeout=10)
            agent.kill()  # right after the 2xx
        assert r.status_code == 201, r.text
        event_id = r.json()["event_id"]
        assert of_type(CLASSIFIED) == []

        rx.faults.count = 0
        agent.start()
        got = await wait_until(lambda: of_type(CLASSIFIED), timeout=30, what="classified")
        assert [e["id"] for e in got] == [event_id]
        async with httpx.AsyncClient() as http:
            again = await wait_until(lambda: _post(http, url, body, auth), timeout=20,
                                     what="agent answering again")
        assert again.status_code == 200 and again.json()["event_id"] == event_id
        assert again.json()["created"] is False
        await wait_until(lambda: rt_idle(base), timeout=10, what="nothing pending")
        assert [e["id"] for e in of_type(CLASSIFIED)] == [event_id]
        assert got[0]["data"]["reason"] == "Bottle jam"
    finally:
        agent.kill()
        await rx.aclose()
        await plc.stop()


async def _post(http: httpx.AsyncClient, url: str, body: dict[str, str],
                auth: dict[str, str]) -> httpx.Response | None:
    try:
        return await http.post(url, json=body, headers=auth, timeout=5)
    except httpx.HTTPError:
        return None


async def rt_idle(base: str) -> bool:
    try:
        async with httpx.AsyncClient() as http:
            st = (await http.get(f"{base}/status", timeout=5)).json()
    except httpx.HTTPError:
        return False
    sink = st["buffer"]["sinks"]["central"]
    return bool(sink["pending"] + sink["leased"] == 0 and st["buffer"]["uncommitted"] == 0)
