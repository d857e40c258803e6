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
from agent.wiring.load import load_config_text
from protocols.opcua.testserver import OpcuaTestServer

VARIABLES = {"Line.State": 1, "Line.Reason": 0}


def config(tmp: Path, srv: OpcuaTestServer, mode: str, sink_url: str) -> Any:
    timing = "publishing_interval: 100ms" if mode == "subscribe" else "poll_interval: 100ms"
    return load_config_text(f"""
agent: {{id: edge-{mode}, site: plant-{mode}, data_dir: "{tmp / mode}", stop_timeout: 3s}}
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


async def test_server_restart_with_new_namespace_indexes_recovers_and_delivers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two agents on the same server, one subscribing and one polling (two sites, so their
    events stay apart in the one receiver); both must heal."""
    srv = OpcuaTestServer(dict(VARIABLES))
    await srv.start(namespace_first=False)
    index_before = (await _namespaces(srv)).index(srv.namespace)
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    modes = ("subscribe", "poll")
    runtimes = {m: Runtime(config(tmp_path, srv, m, receiver.url)) for m in modes}
    caplog.set_level(logging.INFO, logger="agent.runtime")
    for rt in runtimes.values():
        await rt.start()
    try:
        sups = {m: rt.sources["plc"].supervisor for m, rt in runtimes.items()}
        await wait_until(lambda: all(rt.detectors["m1"].state.value == "running"
                                     for rt in runtimes.values())
                         and all(s.state == "up" for s in sups.values()), what="first values")
        await srv.stop()
        await wait_until(lambda: all(s.state == "down" for s in sups.values()), timeout=10,
                         what="outage noticed")
        await srv.start(namespace_first=True)
        assert (await _namespaces(srv)).index(srv.namespace) != index_before
        await wait_until(lambda: all(s.state == "up" for s in sups.values()), timeout=15,
                         what="sessions rebuilt")
        # A downtime that happens only after the restart is detected and delivered.
        await srv.set("Line.Reason", 9)
        await srv.set("Line.State", 3)

        def started() -> list[dict[str, Any]]:
            return [e for e in receiver.events() if e["type"] == "plantedge.downtime.started"]

        await wait_until(lambda: len(started()) == 2, timeout=15,
                         what="downtime after the restart delivered by both agents")
        statuses = {m: await rt.status() for m, rt in runtimes.items()}
    finally:
        for rt in runtimes.values():
            await rt.stop()
        await srv.stop()
    events = started()
    await receiver.aclose()
    assert sorted(e["source"].split("/")[2] for e in events) == ["plant-poll", "plant-subscribe"]
    assert all(e["data"]["reason_code"] == "9" for e in events)
    for status in statuses.values():
        assert status["sources"]["plc"]["bad_tags"] == {}
    # Each agent logged once down and once up again, not once per attempt.
    transitions = [r for r in caplog.records if getattr(r, "component", None) == "plc"]
    downs = [r for r in transitions if getattr(r, "transition", None) == "down"]
    ups = [r for r in transitions if getattr(r, "transition", None) == "up"]
    assert len(downs) == 2 and len(ups) == 4, [r.getMessage() for r in transitions]
    # asyncua's own per-attempt tracebacks stay out of the log during the outage.
    assert not [r for r in caplog.records if r.name.startswith("asyncua")
                and r.levelno >= logging.WARNING]


async def _namespaces(srv: OpcuaTestServer) -> list[str]:
    from protocols.opcua.browse import endpoint_config
    from protocols.opcua.session import Session

    async with Session("check", endpoint_config(srv.endpoint)) as session:
        return session.namespaces
