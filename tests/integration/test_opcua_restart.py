"""The OPC UA server restarts mid-run with its namespaces in another order: the agent heals.

Real peers: an asyncua server, the runtime, the reference receiver. After the restart the
plant namespace has a different index, so a client that kept the old index (or the old
subscription) would read nothing or the wrong nodes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from agent.receiver import Receiver
from agent.runtime import Runtime
from config.loader import load_config_text
from protocols.opcua.testserver import OpcuaTestServer

VARIABLES = {"Line.State": 1, "Line.Reason": 0}


def config(tmp: Path, srv: OpcuaTestServer, mode: str, sink_url: str) -> Any:
    timing = "publishing_interval: 100ms" if mode == "subscribe" else "poll_interval: 100ms"
    return load_config_text(f"""
agent: {{id: test-edge, site: plant-t, data_dir: "{tmp / 'agent'}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: opcua
    endpoint: {srv.endpoint}
    mode: {mode}
    {timing}
    timeout: 1s
    keepalive_interval: 500ms
    backoff: {{initial: 100ms, max: 300ms}}
    tags:
      l.state: {{node: "{srv.node('Line.State')}", type: int}}
      l.reason: {{node: "{srv.node('Line.Reason')}", type: int}}
machines:
  m1:
    line: l1
    state: {{tag: l.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 100ms, reason_tag: l.reason}}
sinks:
  central: {{type: http, url: "{sink_url}", retry: {{initial_backoff: 50ms, max_backoff: 300ms}}}}
buffer: {{commit_interval: 10ms}}
""", "<test>")


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_server_restart_with_new_namespace_indexes_recovers_and_delivers(
        tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    srv = OpcuaTestServer(dict(VARIABLES))
    await srv.start(namespace_first=False)
    index_before = (await _namespaces(srv)).index(srv.namespace)
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    rt = Runtime(config(tmp_path, srv, mode, receiver.url))
    caplog.set_level(logging.INFO, logger="edge_agent")
    await rt.start()
    try:
        det = rt.detectors["m1"]
        sup = rt.sources["plc"].supervisor
        await wait_until(lambda: det.state.value == "running" and sup.state == "up",
                         what="first values")
        await srv.stop()
        await wait_until(lambda: sup.state == "down", timeout=10, what="outage noticed")
        await srv.start(namespace_first=True)
        assert (await _namespaces(srv)).index(srv.namespace) != index_before
        await wait_until(lambda: sup.state == "up", timeout=15, what="session rebuilt")
        # A downtime that happens only after the restart is detected and delivered.
        await srv.set("Line.Reason", 9)
        await srv.set("Line.State", 3)
        await wait_until(lambda: any(e["type"] == "plantedge.downtime.started"
                                     for e in receiver.events()),
                         timeout=15, what="downtime after the restart delivered")
        status = await rt.status()
    finally:
        await rt.stop()
        await srv.stop()
    events = receiver.events()
    await receiver.aclose()
    started = [e for e in events if e["type"] == "plantedge.downtime.started"]
    assert len(started) == 1 and started[0]["data"]["reason_code"] == "9"
    assert status["sources"]["plc"]["bad_tags"] == {}
    # Logged once down and once up, not once per attempt.
    transitions = [r for r in caplog.records if getattr(r, "component", None) == "plc"]
    downs = [r for r in transitions if getattr(r, "transition", None) == "down"]
    ups = [r for r in transitions if getattr(r, "transition", None) == "up"]
    assert len(downs) == 1 and len(ups) == 2, [r.getMessage() for r in transitions]


async def _namespaces(srv: OpcuaTestServer) -> list[str]:
    from protocols.opcua.browse import endpoint_config
    from protocols.opcua.session import Session

    async with Session("check", endpoint_config(srv.endpoint)) as session:
        return session.namespaces
