"""OPC UA alarms as stop reasons, against a node-opcua server (npm; not our client library):
off-normal alarms on machine objects that are event notifiers of the Server object."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import free_port, stop_task
from support.node_opcua import NodeOpcuaServer, needs_node_opcua

from agent.detect.config import MachineConfig
from agent.detect.machine import MachineDetector
from config.model import Event, TagSample, utcnow
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.source import OpcuaSource

pytestmark = needs_node_opcua


@pytest.fixture(scope="module")
def server() -> Iterator[NodeOpcuaServer]:
    srv = NodeOpcuaServer(free_port()).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def plc(server: NodeOpcuaServer) -> NodeOpcuaServer:
    for name in ("Filler.DoorOpen", "Filler.MotorFault", "Press.Jam"):
        server.set(name, False)
    server.set("Filler.State", 1)
    return server


def source_config(endpoint: str) -> OpcuaSourceConfig:
    return OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": endpoint, "publishing_interval": "50ms",
        "tags": {
            "filler.state": {"node": "ns=1;s=Filler.State"},
            # The machine object is an event notifier: it sees its own alarms only.
            "filler.alarms": {"node": "ns=1;s=Filler", "kind": "alarms"},
            # The Server object sees every alarm.
            "plant.alarms": {"node": "i=2253", "kind": "alarms"},
        }})


MACHINE = MachineConfig.model_validate({
    "line": "l1",
    "state": {"tag": "filler.state", "map": {1: "running", 3: "down"}},
    "downtime": {"min_duration": "0s", "reasons": {"DOOR": "Guard door open"},
                 "alarms": {"tag": "filler.alarms",
                            "reasons": [{"condition": "DoorOpen", "code": "DOOR"}]}}})
# The same machine fed from the Server object's alarms, limited to its own source nodes.
MACHINE_VIA_SERVER = MACHINE.model_copy(update={"downtime": MACHINE.downtime.model_copy(
    update={"alarms": MACHINE.downtime.alarms.model_copy(  # type: ignore[union-attr]
        update={"tag": "plant.alarms",
                "sources": ["ns=1;s=Filler.DoorOpen", "ns=1;s=Filler.MotorFault"]})})})


class Pipeline:
    """Source samples straight into detectors, as the runtime does (without the buffer)."""

    def __init__(self, detectors: Sequence[MachineDetector]) -> None:
        self.detectors = detectors
        self.samples: list[TagSample] = []
        self.events: dict[str, list[Event]] = {d.machine_id: [] for d in detectors}

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.samples.extend(samples)
        for d in self.detectors:
            self.events[d.machine_id] += d.on_samples(samples)
            self.events[d.machine_id] += d.on_tick(utcnow())

    def connected(self) -> None:
        pass


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def session(cfg: OpcuaSourceConfig, pipe: Pipeline) -> AsyncIterator[None]:
    task = asyncio.create_task(OpcuaSource("cell", cfg).run(pipe))
    try:
        # Connected, and the first ConditionRefresh is answered (one snapshot per alarm tag).
        await wait_until(lambda: sum(1 for s in pipe.samples if s.good and s.tag.endswith(
            ".alarms") and json.loads(str(s.value))["kind"] == "active") >= 2)
        yield
    finally:
        await stop_task(task)


def started(pipe: Pipeline, machine: str) -> list[dict[str, Any]]:
    return [e.data for e in pipe.events[machine] if e.type.value.endswith("started")]


def ended(pipe: Pipeline, machine: str) -> list[dict[str, Any]]:
    return [e.data for e in pipe.events[machine] if e.type.value.endswith("ended")]


@pytest.mark.parametrize("machine", [MACHINE, MACHINE_VIA_SERVER], ids=["notifier", "server"])
async def test_alarms_raised_and_cleared_give_reasons(plc: NodeOpcuaServer,
                                                      machine: MachineConfig) -> None:
    det = MachineDetector("filler", machine, "s")
    pipe = Pipeline([det])
    async with session(source_config(plc.endpoint), pipe):
        await wait_until(lambda: det.state.value == "running")
        # A mapped alarm active when the machine stops: its code, the configured text.
        plc.set("Filler.DoorOpen", True)
        await wait_until(lambda: det.alarms is not None and bool(det.alarms.active))
        plc.set("Filler.State", 3)
        await wait_until(lambda: len(started(pipe, "filler")) == 1)
        assert started(pipe, "filler")[0]["reason_code"] == "DOOR"
        assert started(pipe, "filler")[0]["reason"] == "Guard door open"
        plc.set("Filler.DoorOpen", False)
        plc.set("Filler.State", 1)
        await wait_until(lambda: len(ended(pipe, "filler")) == 1)
        assert det.alarms is not None and not det.alarms.active
        # Another machine's alarm is not this machine's reason; an unmapped alarm of its own
        # gives the condition name as the code and the server's message as the text.
        plc.set("Press.Jam", True)
        plc.set("Filler.MotorFault", True)
        await wait_until(lambda: len(det.alarms.active) == 1)  # type: ignore[union-attr]
        plc.set("Filler.State", 3)
        await wait_until(lambda: len(started(pipe, "filler")) == 2)
        second = started(pipe, "filler")[1]
        assert second["reason_code"] == "MotorFault"
        assert "Active" in second["reason"]  # node-opcua's message for an active condition
        plc.set("Filler.State", 1)
        await wait_until(lambda: len(ended(pipe, "filler")) == 2)


async def test_quick_toggles_and_the_most_severe_of_two_alarms(plc: NodeOpcuaServer) -> None:
    """A door raised, cleared and raised again within one publishing interval ends active;
    with a motor fault (more severe, raised later) also active, the motor fault is the reason;
    once it clears, the door is."""
    det = MachineDetector("filler", MACHINE, "s")
    pipe = Pipeline([det])
    plc.severity("Filler.DoorOpen", 300)
    plc.severity("Filler.MotorFault", 700)
    try:
        async with session(source_config(plc.endpoint), pipe):
            await wait_until(lambda: det.state.value == "running")
            for value in (True, False, True, False, True):
                plc.set("Filler.DoorOpen", value)
            plc.set("Filler.MotorFault", True)
            alarms = det.alarms
            assert alarms is not None
            await wait_until(lambda: sorted(a["condition"] for _, a in alarms.active.values())
                             == ["DoorOpen", "MotorFault"])
            plc.set("Filler.State", 3)
            await wait_until(lambda: len(started(pipe, "filler")) == 1)
            assert started(pipe, "filler")[0]["reason_code"] == "MotorFault"
            plc.set("Filler.MotorFault", False)
            await wait_until(lambda: len(alarms.active) == 1)
            plc.set("Filler.State", 1)
            await wait_until(lambda: len(ended(pipe, "filler")) == 1)
            plc.set("Filler.State", 3)
            await wait_until(lambda: len(started(pipe, "filler")) == 2)
            assert started(pipe, "filler")[1]["reason_code"] == "DOOR"
    finally:
        plc.severity("Filler.DoorOpen", 150)
        plc.severity("Filler.MotorFault", 150)


async def test_active_alarms_known_after_a_reconnect(plc: NodeOpcuaServer) -> None:
    det = MachineDetector("filler", MACHINE, "s")
    pipe = Pipeline([det])
    plc.set("Filler.DoorOpen", True)  # raised before the agent connects
    async with session(source_config(plc.endpoint), pipe):
        assert det.alarms is not None
        assert [a["condition"] for _, a in det.alarms.active.values()] == ["DoorOpen"]
    # While the agent is away the door closes and the motor trips.
    plc.set("Filler.DoorOpen", False)
    plc.set("Filler.MotorFault", True)
    pipe.samples.clear()
    async with session(source_config(plc.endpoint), pipe):
        # The refresh after the reconnect replaced the set: the door is no longer active.
        assert [a["condition"] for _, a in det.alarms.active.values()] == ["MotorFault"]
        plc.set("Filler.State", 3)
        await wait_until(lambda: len(started(pipe, "filler")) == 1)
        assert started(pipe, "filler")[0]["reason_code"] == "MotorFault"


async def test_browse_shows_event_notifiers_and_historizing_nodes(
        server: NodeOpcuaServer) -> None:
    from protocols.opcua.browse import browse, endpoint_config

    cfg = endpoint_config(server.endpoint)
    objects = {r.browse_name: r.flags for r in await browse(cfg, "i=85", 1)}
    assert objects["Filler"] == objects["Press"] == objects["Server"] == ("event-notifier",)
    children = {r.node_id.rsplit(";s=", 1)[-1]: r.flags
                for r in await browse(cfg, "ns=1;s=Filler", 1)}
    assert children["Filler.State"] == ("historizing", "history-read")
    assert children["Filler.Speed"] == ()


async def test_an_alarm_tag_on_a_node_that_is_no_notifier_is_bad_and_says_why(
        plc: NodeOpcuaServer) -> None:
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": plc.endpoint, "publishing_interval": "50ms",
        "tags": {"filler.state": {"node": "ns=1;s=Filler.State"},
                 "wrong.alarms": {"node": "ns=1;s=Filler.Speed", "kind": "alarms"}}})
    pipe = Pipeline([])
    task = asyncio.create_task(OpcuaSource("cell", cfg).run(pipe))
    try:
        await wait_until(lambda: any(s.tag == "wrong.alarms" and "notifier" in (s.detail or "")
                                     for s in pipe.samples))
    finally:
        await stop_task(task)
    # First "unknown until the ConditionRefresh" (every alarm tag, every session), then why.
    wrong = [s for s in pipe.samples if s.tag == "wrong.alarms"]
    assert all(s.quality.value == "bad" for s in wrong)
    assert "not an event notifier" in (wrong[-1].detail or "")
    assert any(s.tag == "filler.state" and s.good for s in pipe.samples)


async def test_recorded_alarms_replay_to_the_same_reasons(plc: NodeOpcuaServer,
                                                          tmp_path: Path) -> None:
    """Alarm events are samples: `edge-agent record` keeps them, `replay` gives the reason."""
    from agent.replay import read_samples, record, replay
    from agent.wiring.load import load_config_text

    cfg = load_config_text(f"""
agent: {{id: edge-rec, site: s, data_dir: "{tmp_path}"}}
sources:
  cell:
    type: opcua
    endpoint: {plc.endpoint}
    publishing_interval: 50ms
    tags:
      filler.state: {{node: "ns=1;s=Filler.State", type: int}}
      filler.alarms: {{node: "ns=1;s=Filler", kind: alarms}}
machines:
  filler:
    line: l1
    state: {{tag: filler.state, map: {{1: running, 3: down}}}}
    downtime:
      alarms: {{tag: filler.alarms, reasons: [{{condition: DoorOpen, code: DOOR}}]}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:9/events"}}
""", "<test>")
    path = tmp_path / "samples.jsonl"
    with path.open("w", encoding="utf-8") as out:
        task = asyncio.create_task(record(cfg, out, duration=3.0))
        await asyncio.sleep(1.0)  # connected, refreshed
        plc.set("Filler.DoorOpen", True)
        await asyncio.sleep(0.3)
        plc.set("Filler.State", 3)
        await asyncio.sleep(0.3)
        plc.set("Filler.State", 1)
        plc.set("Filler.DoorOpen", False)
        await task
    events = [e for e in replay(cfg, read_samples(path))
              if e["type"].startswith("plantedge.downtime")]
    assert [e["type"].rsplit(".", 1)[1] for e in events] == ["started", "ended"]
    assert all(e["data"]["reason_code"] == "DOOR" for e in events), (events, path.read_text())


async def test_a_network_outage_ends_with_a_condition_refresh(plc: NodeOpcuaServer) -> None:
    """The same source object reconnecting (as its supervisor does after the link drops):
    alarms that changed during the outage are right as soon as it is back."""
    from support.tcp_proxy import TcpProxy

    from config.errors import EdgeAgentError

    det = MachineDetector("filler", MACHINE, "s")
    pipe = Pipeline([det])
    proxy = await TcpProxy("127.0.0.1", plc.port).start()
    cfg = source_config(f"opc.tcp://127.0.0.1:{proxy.port}").model_copy(
        update={"keepalive_interval": 0.3, "timeout": 1.0})
    source = OpcuaSource("cell", cfg)
    sessions = 0

    async def supervise() -> None:
        nonlocal sessions
        while True:
            sessions += 1
            with contextlib.suppress(EdgeAgentError, OSError):
                await source.run(pipe)
            await asyncio.sleep(0.1)

    plc.set("Filler.DoorOpen", True)
    task = asyncio.create_task(supervise())
    try:
        alarms = det.alarms
        assert alarms is not None
        await wait_until(lambda: [a["condition"] for _, a in alarms.active.values()]
                         == ["DoorOpen"])
        proxy.cut()
        await wait_until(lambda: sessions >= 2)
        plc.set("Filler.DoorOpen", False)
        plc.set("Filler.MotorFault", True)
        await asyncio.sleep(0.3)
        assert [a["condition"] for _, a in alarms.active.values()] == ["DoorOpen"]
        proxy.restore()
        await wait_until(lambda: [a["condition"] for _, a in alarms.active.values()]
                         == ["MotorFault"])
    finally:
        await stop_task(task)
        await proxy.aclose()


async def test_machine_sources_by_namespace_uri(plc: NodeOpcuaServer) -> None:
    """A machine fed from the Server object's alarms names its source nodes the way tags do,
    nsu=<namespace URI>;s=...: its alarms are its reasons, another machine's are not."""
    from protocols.opcua.session import Session

    async with Session("t", source_config(plc.endpoint)) as s:
        uri = s.namespaces[1]
    alarms = MACHINE_VIA_SERVER.downtime.alarms
    assert alarms is not None
    machine = MACHINE_VIA_SERVER.model_copy(update={"downtime": MACHINE.downtime.model_copy(
        update={"alarms": alarms.model_copy(update={"sources": [
            f"nsu={uri};s=Filler.DoorOpen", f"nsu={uri};s=Filler.MotorFault"]})})})
    det = MachineDetector("filler", machine, "s")
    pipe = Pipeline([det])
    async with session(source_config(plc.endpoint), pipe):
        await wait_until(lambda: det.state.value == "running")
        plc.set("Press.Jam", True)
        plc.set("Filler.DoorOpen", True)
        await wait_until(lambda: det.alarms is not None and bool(det.alarms.active))
        plc.set("Filler.State", 3)
        await wait_until(lambda: len(started(pipe, "filler")) == 1)
        assert started(pipe, "filler")[0]["reason_code"] == "DOOR"
        assert det.alarms is not None
        assert [a["condition"] for _, a in det.alarms.active.values()] == ["DoorOpen"]
