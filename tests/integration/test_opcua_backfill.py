"""History backfill after an agent restart, against a node-opcua server that historizes the
machine's state variable: stops that happened (or ended) while the agent was stopped are
reported once, with their true times, after the restart."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until
from support.node_opcua import NodeOpcuaServer, needs_node_opcua
from support.tcp_proxy import TcpProxy

from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from config.model import format_time, utcnow
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.history import BackfillReport, backfill
from protocols.opcua.nodeids import parse_node_id
from protocols.opcua.session import Session

pytestmark = needs_node_opcua


@pytest.fixture(scope="module")
def plc() -> Iterator[NodeOpcuaServer]:
    # Filler.State starts with a history of 100 values, one per second, alternating 1 and 3.
    srv = NodeOpcuaServer(free_port(), seed_seconds=100).start()
    try:
        yield srv
    finally:
        srv.stop()


def config(tmp: Path, plc: NodeOpcuaServer, sink_url: str, endpoint: str | None = None) -> Any:
    return load_config_text(f"""
agent: {{id: edge-bf, site: plant-bf, data_dir: "{tmp / 'agent'}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: opcua
    endpoint: {endpoint or plc.endpoint}
    publishing_interval: 100ms
    timeout: 2s
    keepalive_interval: 500ms
    backoff: {{initial: 100ms, max: 300ms}}
    history: {{margin: 5s, max_span: 1h}}
    tags:
      f.state: {{node: "ns=1;s=Filler.State", type: int}}
      f.reason: {{node: "ns=1;s=Filler.Reason", type: int}}
      f.speed: {{node: "ns=1;s=Filler.Speed"}}
machines:
  filler:
    line: l1
    state: {{tag: f.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 0s, reason_tag: f.reason}}
sinks:
  central: {{type: http, url: "{sink_url}", retry: {{initial_backoff: 50ms, max_backoff: 300ms}}}}
buffer: {{commit_interval: 10ms}}
""", "<test>")


# 101 values: the initial one, then the 100 seeded.
@pytest.mark.parametrize(("max_values", "expected", "truncated"), [(1000, 101, False),
                                                                  (35, 35, True)])
async def test_history_is_paged_through_and_bounded(plc: NodeOpcuaServer, max_values: int,
                                                    expected: int, truncated: bool) -> None:
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": plc.endpoint,
        "history": {"page_size": 10, "max_values": max_values, "margin": "1s"},
        "tags": {"f.state": {"node": "ns=1;s=Filler.State", "type": "int"}}})
    assert cfg.history is not None
    report = BackfillReport()
    async with Session("t", cfg) as session:
        node = parse_node_id("ns=1;s=Filler.State").resolve(session.namespaces)
        # node-opcua hands out the same continuation point for every page: paging must go
        # on while pages bring values (asyncua's read_raw_history stops after the second).
        batches = await backfill(
            session, cfg.history, {"f.state": (node, "ns=1;s=Filler.State")},
            lambda _t: utcnow() - timedelta(seconds=3600),
            {"f.state": None}, report)
    seeded = [s for b in batches for s in b]
    assert len(seeded) == expected
    assert [s.value for s in seeded[1:5]] == [1, 3, 1, 3]
    assert all(a.time < b.time for a, b in itertools.pairwise(seeded))
    assert report.tags["f.state"]["truncated"] is truncated


def downtime(receiver: Receiver) -> list[tuple[str, str, str | None]]:
    """(type, started_at, ended_at) of every downtime event received, in order."""
    return [(e["type"].rsplit(".", 1)[1], e["data"]["started_at"], e["data"].get("ended_at"))
            for e in receiver.events() if e["type"].startswith("plantedge.downtime")]


async def change(plc: NodeOpcuaServer, value: int, reason: int | None = None) -> datetime:
    """Set the state (and the reason, at the same instant) now; the time the server records
    (millisecond precision)."""
    t = utcnow().replace(microsecond=utcnow().microsecond // 1000 * 1000)
    if reason is not None:
        plc.set("Filler.Reason", reason, time=t)
    plc.set("Filler.State", value, time=t)
    await asyncio.sleep(0.05)
    return t


def reasons(receiver: Receiver) -> list[str | None]:
    return [e["data"]["reason_code"] for e in receiver.events()
            if e["type"].startswith("plantedge.downtime")]


async def test_stops_while_the_agent_was_away_are_reported_once_with_true_times(
        tmp_path: Path, plc: NodeOpcuaServer) -> None:
    await change(plc, 1)
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    cfg = config(tmp_path, plc, receiver.url)
    try:
        rt = Runtime(cfg)
        await rt.start()
        await wait_until(lambda: rt.detectors["filler"].state.value == "running",
                         what="running")
        await rt.stop()

        # 1. A stop entirely while the agent is stopped, with its reason.
        t1 = await change(plc, 3, reason=7)
        t2 = await change(plc, 1, reason=0)
        rt = Runtime(cfg)
        await rt.start()
        await wait_until(lambda: len(downtime(receiver)) == 2, what="backfilled stop")
        assert downtime(receiver) == [("started", format_time(t1), None),
                                      ("ended", format_time(t1), format_time(t2))]
        assert reasons(receiver) == ["7", "7"]
        status = (await rt.status())["sources"]["plc"]["detail"]["history"]
        assert status["runs_total"] == 1 and status["last_values"] >= 2
        assert status["last_tags"]["f.state"]["historizing"] is True
        # Filler.Speed is not historized: skipped, and said so.
        assert "f.speed" not in status["last_tags"]  # no machine needs it

        # 2. A stop that begins while the agent runs and ends while it is stopped.
        t3 = await change(plc, 3)
        await wait_until(lambda: len(downtime(receiver)) == 3, what="live stop")
        await rt.stop()
        t4 = await change(plc, 1)
        # Written again (a PLC refreshing its output): the live value now carries a later
        # time, so only the history knows when the stop really ended.
        await change(plc, 1)
        rt = Runtime(cfg)
        await rt.start()
        await wait_until(lambda: len(downtime(receiver)) == 4, what="end of the stop")
        # Nothing more arrives: each fact once (the receiver also dedups by id, so a
        # re-detection under a new id would show up here as a fifth event).
        await asyncio.sleep(0.5)
        await rt.stop()
        events = downtime(receiver)
        codes = reasons(receiver)
        classified = [e for e in receiver.events() if e["type"].endswith("classified")]
    finally:
        await receiver.aclose()
    # Backfilled reasons are not taken for late reasons of other stops (no classification).
    assert codes[2:] == [None, None] and classified == []
    assert events[2:] == [("started", format_time(t3), None),
                                      ("ended", format_time(t3), format_time(t4))]


async def test_a_stop_during_a_network_outage_is_backfilled_after_the_reconnect(
        tmp_path: Path, plc: NodeOpcuaServer) -> None:
    await change(plc, 1)
    proxy = await TcpProxy("127.0.0.1", plc.port).start()
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    rt = Runtime(config(tmp_path, plc, receiver.url, f"opc.tcp://127.0.0.1:{proxy.port}"))
    await rt.start()
    try:
        sup = rt.sources["plc"].supervisor
        await wait_until(lambda: rt.detectors["filler"].state.value == "running"
                         and sup.state == "up", what="running")
        proxy.cut()
        await wait_until(lambda: sup.state == "down", what="outage noticed")
        t1 = await change(plc, 3)
        t2 = await change(plc, 1)
        await change(plc, 1)  # rewritten: the live value's time is not the stop's end
        proxy.restore()
        await wait_until(lambda: len(downtime(receiver)) == 2, timeout=15,
                         what="stop backfilled after the reconnect")
        await asyncio.sleep(0.5)
        events = downtime(receiver)
        signal = [e["type"].rsplit(".", 1)[1] for e in receiver.events()
                  if e["type"].startswith("plantedge.signal")]
    finally:
        await rt.stop()
        await proxy.aclose()
        await receiver.aclose()
    assert events == [("started", format_time(t1), None),
                      ("ended", format_time(t1), format_time(t2))]
    assert signal == ["lost", "restored"]


async def test_a_backfilled_stop_takes_no_reason_from_alarms_known_before_the_gap(
        tmp_path: Path, plc: NodeOpcuaServer) -> None:
    """The door alarm was active when the agent stopped and cleared while it was away; the
    stop it missed is backfilled before the ConditionRefresh tells what is active now. The
    saved alarm set is stale by then: the stop must not take the door as its reason."""
    await change(plc, 1)
    plc.set("Filler.DoorOpen", True)
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    cfg = load_config_text(f"""
agent: {{id: edge-bfa, site: plant-bf, data_dir: "{tmp_path / 'agent'}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: opcua
    endpoint: {plc.endpoint}
    publishing_interval: 100ms
    history: {{margin: 5s, max_span: 1h}}
    tags:
      f.state: {{node: "ns=1;s=Filler.State", type: int}}
      f.alarms: {{node: "ns=1;s=Filler", kind: alarms}}
machines:
  filler:
    line: l1
    state: {{tag: f.state, map: {{1: running, 3: down}}}}
    downtime:
      min_duration: 0s
      alarms: {{tag: f.alarms, reasons: [{{condition: DoorOpen, code: DOOR}}]}}
sinks:
  central: {{type: http, url: "{receiver.url}", retry: {{initial_backoff: 50ms}}}}
buffer: {{commit_interval: 10ms}}
""", "<test>")
    try:
        rt = Runtime(cfg)
        await rt.start()
        alarms = rt.detectors["filler"].alarms
        assert alarms is not None
        await wait_until(lambda: rt.detectors["filler"].state.value == "running"
                         and bool(alarms.active), what="running, door alarm active")
        await rt.stop()
        plc.set("Filler.DoorOpen", False)
        await change(plc, 3)
        await change(plc, 1)
        rt = Runtime(cfg)
        await rt.start()
        await wait_until(lambda: len(downtime(receiver)) == 2, what="backfilled stop")
        await rt.stop()
        codes = reasons(receiver)
    finally:
        plc.set("Filler.DoorOpen", False)
        await receiver.aclose()
    assert codes == [None, None]
