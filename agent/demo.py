"""``edge-agent demo``: a simulated plant, the agent and the reference receiver in one process.

The demo plant is one Modbus TCP device (the embedded simulator) holding three machines:

- ``filler-1``: a state code (1 running, 2 idle, 3 down, 4 planned), a reason code, a 32-bit
  scrap counter stored low word first (CDAB), the production order as a string;
- ``press-3``: no state code, only a speed (float32): running above 10 strokes/min;
- ``oven-2``: a state code and a 16-bit scrap counter that starts near 65535, so it rolls over.

and an OPC UA server (embedded asyncua) with one more machine, read by subscription:

- ``packer-4``: state code, reason code, scrap counter and order as OPC UA variables, addressed
  with ``nsu=`` node ids.

and, when a ``mosquitto`` binary is installed, a local MQTT broker with one more machine
(``protocols/mqtt/demo_plant.py``); without it the demo says so and runs without that machine:

- ``sealer-5``: JSON status messages (state and reason) and one reject message per rejected
  batch, summed into scrap windows.

A fixed script (repeating every 30 s) stops and restarts them and makes scrap; once the
first stop of ``press-3`` (which has no reason tag) is reported, an operator command
(``edge-agent reason set press-3 20 ...``, run as a real subprocess against the agent's
reason-entry endpoint) classifies it, and the receiver prints the classification; the agent reads
the device, detects episodes and scrap, buffers them in SQLite and delivers them to the
receiver, which prints each event once. It ends with ``delivered=N pending=N dead_letters=N``.
With ``--sink mqtt`` the events go to a Unified Namespace on the local Mosquitto instead
(``agent/demo_uns.py``) and a subscriber prints them as they arrive on their topics.
The configuration below goes through the same loader as a plant's own file.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.app import run_async, serve
from agent.demo_uns import UNS_SINK_YAML, UnsWatcher
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import config_hash, load_config_text
from config.tasks import wait_event
from protocols.modbus.config import ModbusSourceConfig
from protocols.modbus.simulator import ModbusSimulator
from protocols.mqtt.demo_plant import MACHINE_YAML as MQTT_MACHINE_YAML
from protocols.mqtt.demo_plant import SOURCE_YAML as MQTT_SOURCE_YAML
from protocols.mqtt.demo_plant import MqttDemoMachine
from protocols.opcua.testserver import OpcuaTestServer

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = """\
agent: {id: demo-edge-01, site: demo-plant, data_dir: "{data_dir}", stop_timeout: 5s}
health:
  listen: "127.0.0.1:0"
  reason_entry: {bearer_token: "${file:{data_dir}/reason-token}"}
sources:
  plant-sim:
    type: modbus
    host: 127.0.0.1
    port: {modbus_port}
    unit_id: 1
    poll_interval: 200ms
    timeout: 1s
    tags:
      filler.state:  {table: holding, address: 0, type: uint16}
      filler.reason: {table: holding, address: 1, type: uint16}
      filler.scrap:  {table: holding, address: 2, type: uint32, byte_order: CDAB}
      filler.order:  {table: holding, address: 10, type: string, length: 8}
      press.speed:   {table: holding, address: 20, type: float32}
      press.scrap:   {table: holding, address: 22, type: uint32}
      press.order:   {table: holding, address: 30, type: string, length: 8}
      oven.state:    {table: holding, address: 40, type: uint16}
      oven.scrap:    {table: holding, address: 41, type: uint16}
  packer-plc:
    type: opcua
    endpoint: "{opcua_endpoint}"
    mode: subscribe
    publishing_interval: 200ms
    tags:
      packer.state:  {node: "nsu={opcua_ns};s=Packer.State", type: int}
      packer.reason: {node: "nsu={opcua_ns};s=Packer.Reason", type: int}
      packer.scrap:  {node: "nsu={opcua_ns};s=Packer.Scrap", type: int}
      packer.order:  {node: "nsu={opcua_ns};s=Packer.Order", type: string}
machines:
  filler-1:
    line: line-1
    state: {tag: filler.state, map: {1: running, 2: idle, 3: down, 4: planned}}
    downtime:
      min_duration: 2s
      reason_tag: filler.reason
      reasons: {7: Bottle jam, 12: Label roll empty}
    scrap: {counter: filler.scrap, window: 5s}
    order_tag: filler.order
  press-3:
    line: line-2
    state: {tag: press.speed, running_above: 10}
    downtime:
      min_duration: 2s
      reasons: {20: Die change, 21: Waiting for material}
      reason_categories: {20: planned}
    scrap: {counter: press.scrap, window: 5s}
    order_tag: press.order
  oven-2:
    line: line-2
    state: {tag: oven.state, map: {1: running, 3: down, 4: planned}}
    scrap: {counter: oven.scrap, window: 5s}
  packer-4:
    line: line-3
    state: {tag: packer.state, map: {1: running, 3: down, 4: planned}}
    downtime:
      min_duration: 2s
      reason_tag: packer.reason
      reasons: {21: Film break}
    scrap: {counter: packer.scrap, window: 5s}
    order_tag: packer.order
sinks:
  central:
    type: http
    url: "{receiver_url}"
    mode: batch
    batch_max_events: 50
    timeout: 5s
    retry: {initial_backoff: 200ms, max_backoff: 5s}
buffer: {max_size: 64MiB, when_full: drop_oldest, commit_interval: 20ms}
"""

# (second within the 30 s cycle, machine, what) — a plant's morning in miniature.
_SCRIPT: list[tuple[float, str, dict[str, Any]]] = [
    (0.0, "filler", {"state": 1, "reason": 0, "order": "PO-1001"}),
    (0.0, "press", {"speed": 55.0, "order": "PO-2001"}),
    (0.0, "oven", {"state": 1}),
    (3.0, "filler", {"state": 3, "reason": 0}),
    (4.0, "filler", {"reason": 7}),          # the reason is entered after the stop began
    (9.0, "filler", {"state": 1, "reason": 0}),
    (2.0, "press", {"speed": 0.0}),          # no reason tag: the operator gives one
    (13.0, "press", {"speed": 55.0}),
    (11.0, "filler", {"state": 3}),           # a micro-stop: shorter than min_duration
    (11.6, "filler", {"state": 1}),
    (15.0, "oven", {"state": 3}),
    (22.0, "oven", {"state": 1}),
    (17.0, "filler", {"order": "PO-1002"}),
    (19.0, "filler", {"state": 4}),           # planned: changeover
    (25.0, "filler", {"state": 1}),
    (0.0, "packer", {"state": 1, "reason": 0, "order": "PO-3001"}),
    (4.0, "packer", {"state": 3, "reason": 21}),
    (10.0, "packer", {"state": 1, "reason": 0}),
]

_PACKER_NODES = {"packer.state": "Packer.State", "packer.reason": "Packer.Reason",
                 "packer.scrap": "Packer.Scrap", "packer.order": "Packer.Order"}



class _Plant:
    """Drives the simulator through the script and makes scrap while machines run."""

    def __init__(self, sim: ModbusSimulator, cfg: ModbusSourceConfig,
                 opcua: OpcuaTestServer) -> None:
        self.sim, self.tags, self.opcua = sim, cfg.tags, opcua
        self.rng = random.Random(7)
        self.counters = {"filler": 1000, "press": 0, "oven": 65530, "packer": 500}
        self.running = {"filler": True, "press": True, "oven": True, "packer": True}

    async def set(self, tag: str, value: object) -> None:
        if tag in _PACKER_NODES:
            await self.opcua.set(_PACKER_NODES[tag], value)
            return
        await self.sim.set_value(self.tags[tag], value)

    async def apply(self, machine: str, change: dict[str, Any]) -> None:
        for key, value in change.items():
            tag = {"speed": "press.speed"}.get(key, f"{machine}.{key}")
            await self.set(tag, value)
            if key == "state":
                self.running[machine] = value == 1
            if key == "speed":
                self.running[machine] = value > 10

    async def make_scrap(self) -> None:
        for machine, running in self.running.items():
            if running and self.rng.random() < 0.5:
                self.counters[machine] += self.rng.randint(1, 3)
                width = 65536 if machine == "oven" else 2**31 if machine == "packer" else 2**32
                await self.set(f"{machine}.scrap", self.counters[machine] % width)

    async def run(self, stop: asyncio.Event) -> None:
        await self.set("filler.scrap", self.counters["filler"])
        await self.set("oven.scrap", self.counters["oven"])
        await self.set("packer.scrap", self.counters["packer"])
        script = sorted(_SCRIPT, key=lambda s: s[0])
        t0 = time.monotonic()
        cycle, i, next_scrap = 0, 0, 0.5
        while not stop.is_set():
            now = time.monotonic() - t0
            while i < len(script) and cycle * 30 + script[i][0] <= now:
                await self.apply(script[i][1], script[i][2])
                i += 1
            if i == len(script):
                cycle, i = cycle + 1, 0
            if now >= next_scrap:
                await self.make_scrap()
                next_scrap += 1.0
            await wait_event(stop, 0.1)


_OPERATOR_CMD = ["reason", "set", "press-3", "20", "--text", "die change for PO-2002"]


async def _operator(receiver: Receiver, port: int, token_file: Path) -> None:
    """Once press-3's first stop is reported, an operator classifies it from a terminal at
    the line: the real ``edge-agent reason set`` command against the running agent."""
    while not any(e["type"] == "plantedge.downtime.started" and
                  e["data"].get("machine") == "press-3" for e in receiver.events()):
        await asyncio.sleep(0.2)
    print(f"  operator$ edge-agent {shlex.join(_OPERATOR_CMD)}", flush=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", *_OPERATOR_CMD, "--url",
        f"http://127.0.0.1:{port}", "--token-file", str(token_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    for line in out.decode("utf-8", "replace").splitlines():
        print(f"  operator| {line}", flush=True)


def _describe(doc: dict[str, Any]) -> str:
    data = doc.get("data", {})
    kind = doc.get("type", "").removeprefix("plantedge.").replace(".", " ").upper()
    what = [f"{kind:<17}", f"{data.get('machine', data.get('agent', '?')):<9}"]
    if "category" in data:
        what.append(data["category"])
    if data.get("reason_code"):
        what.append(f"reason={data['reason_code']}" + (f" ({data['reason']})"
                                                        if data.get("reason") else ""))
    if data.get("classified_by"):
        what.append(f"by {data['classified_by']}")
    if "duration_seconds" in data:
        what.append(f"duration={data['duration_seconds']:.1f}s")
    if data.get("microstops"):
        what.append(f"microstops={data['microstops']}")
    if "quantity" in data:
        what.append(f"quantity={data['quantity']}")
        if "counter_from" in data:
            what.append(f"counter {data['counter_from']}->{data['counter_to']}")
    if data.get("order_id"):
        what.append(f"order={data['order_id']}")
    return f"  {doc.get('time', '')[11:23]}  " + "  ".join(what)


async def _demo(duration: float, data_dir: Path, sink: str = "http") -> int:
    sim = ModbusSimulator(size=100)
    modbus_port = await sim.start()
    opcua = OpcuaTestServer({"Packer.State": 1, "Packer.Reason": 0, "Packer.Scrap": 0,
                             "Packer.Order": ""}, namespace="urn:demo-plant:packer")
    await opcua.start()
    sealer = MqttDemoMachine.create(data_dir / "mosquitto")
    if sink == "mqtt" and sealer is None:
        await sim.stop()
        await opcua.stop()
        print("demo: --sink mqtt needs the mosquitto binary (apt-get install mosquitto)",
              file=sys.stderr)
        return 2
    uns = UnsWatcher(sealer.broker.port, _describe) if sink == "mqtt" and sealer else None
    receiver = Receiver(data_dir / "receiver.db",
                        echo=None if uns else lambda doc: print(_describe(doc), flush=True))
    await receiver.start()
    token_file = data_dir / "agent" / "reason-token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(secrets.token_urlsafe(24), encoding="utf-8")
    text = (DEMO_CONFIG.replace("{data_dir}", str(data_dir / "agent"))
            .replace("{modbus_port}", str(modbus_port)).replace("{receiver_url}", receiver.url)
            .replace("{opcua_endpoint}", opcua.endpoint).replace("{opcua_ns}", opcua.namespace))
    if sealer is not None:
        text = (text.replace("\nmachines:\n", "\n" + MQTT_SOURCE_YAML.replace(
            "{mqtt_url}", sealer.url) + "machines:\n", 1)
            .replace("\nsinks:\n", "\n" + MQTT_MACHINE_YAML + "sinks:\n", 1))
    if uns is not None and sealer is not None:  # the UNS on the local broker instead
        text = text[:text.index("\nsinks:\n") + 1] + UNS_SINK_YAML.replace(
            "{mqtt_url}", sealer.url) + text[text.index("\nbuffer:") + 1:]
    config = load_config_text(text, "<demo plant>")
    plant_cfg = config.sources["plant-sim"]
    assert isinstance(plant_cfg, ModbusSourceConfig)
    plant = _Plant(sim, plant_cfg, opcua)
    stop_plant, stop_agent = asyncio.Event(), asyncio.Event()
    holder: dict[str, Runtime] = {}
    tasks: list[asyncio.Task[None]] = []
    summary: dict[str, int] = {}

    async def ready(runtime: Runtime, port: int) -> None:
        holder["rt"] = runtime
        tasks.append(asyncio.create_task(_operator(receiver, port, token_file)))
        print(f"demo: Modbus simulator on 127.0.0.1:{modbus_port}, OPC UA server at "
              f"{opcua.endpoint}, receiver at {receiver.url}, "
              f"agent status at http://127.0.0.1:{port}/status", flush=True)
        print(f"demo: MQTT broker (Mosquitto) at {sealer.url} with machine sealer-5" if sealer
              else "demo: no mosquitto binary, so no MQTT machine (apt-get install mosquitto "
              "to add sealer-5)", flush=True)
        if uns is not None:
            print("demo: events go to the Unified Namespace on that broker (sink 'uns', topics "
                  "demo-plant/<line>/<machine>/events/<type>, retained .../state)", flush=True)
        print(f"demo: running for {duration:g}s; events appear as "
              f"{'the UNS watcher sees' if uns else 'the receiver gets'} them\n", flush=True)

    async def script() -> None:
        plant_task = asyncio.create_task(plant.run(stop_plant))
        sealer_task = asyncio.create_task(sealer.run(stop_plant)) if sealer else None
        await wait_event(stop_agent, duration)
        stop_plant.set()
        for t in tasks:
            t.cancel()
        await plant_task
        if sealer_task is not None:
            await sealer_task
        rt = holder.get("rt")
        if rt is not None:
            await rt.flush()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                stats = await rt.buffer.stats()
                if all(s.pending + s.leased == 0 for s in stats.sinks.values()):
                    break
                await asyncio.sleep(0.1)
            stats = await rt.buffer.stats()
            summary["pending"] = sum(s.pending + s.leased for s in stats.sinks.values())
            summary["dead_letters"] = sum(s.dead_letters for s in stats.sinks.values())
        stop_agent.set()

    script_task = asyncio.create_task(script())
    try:
        await serve(config, config_hash(config), stop_agent, on_ready=ready)
    finally:
        stop_agent.set()
        await script_task
        summary["delivered"] = uns.received() if uns else receiver.stats()["received"]
        if uns is not None:
            uns.close()
        await receiver.aclose()
        await sim.stop()
        await opcua.stop()
        if sealer is not None:
            sealer.stop()
    print(f"\ndelivered={summary.get('delivered', 0)} pending={summary.get('pending', 0)} "
          f"dead_letters={summary.get('dead_letters', 0)}", flush=True)
    return 0 if summary.get("delivered", 0) > 0 and summary.get("pending", 1) == 0 else 1


def run_demo(duration: float, keep: Path | None = None, sink: str = "http") -> int:
    data_dir = keep or Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_async(lambda: _demo(duration, data_dir, sink))
    except KeyboardInterrupt:
        return 130
    finally:
        if keep is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"demo data kept in {data_dir}", file=sys.stderr)
