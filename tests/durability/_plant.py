"""A small simulated plant for the fault-matrix tests, and the exact count at the receiver.

Two machines on one Modbus simulator (state, reason, scrap counter each). ``Plant.drive`` keeps
stopping/starting them and making scrap; ``Plant.calm`` sets them running so open episodes end.
Whatever happened to the agent meanwhile, ``check_exact`` holds the receiver to the promise:

- per machine, CloudEvent ``sequence`` exactly 1..N: N detected, N distinct delivered, none
  twice (a sequence is committed with the detector state, so a re-detection reuses it);
- per machine, first arrivals in detection order (sequence order);
- every downtime episode started once and ended once;
- scrap quantities add up to exactly the counters' increase since the agent's first reading.

Duplicate *deliveries* (the receiver's ``duplicates`` counter) are checked by each test: zero
where the scenario never re-sends, at least one where a re-send is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from agent.receiver import Receiver
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

__all__ = ["MACHINES", "Plant", "check_exact", "get_json", "write_config"]

MACHINES = {"m1": 0, "m2": 10}  # machine -> base address (state, reason, scrap counter)


def _tag(address: int, type_: str = "uint16") -> ModbusTag:
    return ModbusTag.model_validate({"table": "holding", "address": address, "type": type_})


def write_config(path: Path, data_dir: Path, modbus_port: int, sink_url: str,
                 health_port: int | None = None, *, batch: int = 5, sink_extra: str = "",
                 buffer: str = "commit_interval: 5ms", stop_timeout: str = "5s",
                 retry: str = "{initial_backoff: 20ms, max_backoff: 200ms}",
                 scrap_window: str = "300ms", health: str = "") -> Path:
    """The agent configuration for the plant; ``buffer`` and ``health`` are YAML flow-map
    fragments, ``sink_extra`` block lines of the sink."""
    tags, machines = [], []
    for m, base in MACHINES.items():
        tags += [f"      {m}.state: {{table: holding, address: {base}, type: uint16}}",
                 f"      {m}.reason: {{table: holding, address: {base + 1}, type: uint16}}",
                 f"      {m}.scrap: {{table: holding, address: {base + 2}, type: uint32}}"]
        machines += [f"  {m}:", "    line: l1",
                     f"    state: {{tag: {m}.state, map: {{1: running, 3: down}}}}",
                     f"    downtime: {{min_duration: 0s, reason_tag: {m}.reason}}",
                     f"    scrap: {{counter: {m}.scrap, window: {scrap_window}}}"]
    listen = f"127.0.0.1:{health_port}" if health_port is not None else "127.0.0.1:0"
    path.write_text("\n".join([
        f'agent: {{id: dur-edge, site: s1, data_dir: "{data_dir}", stop_timeout: {stop_timeout}}}',
        f'health: {{listen: "{listen}"{", " + health if health else ""}}}',
        "sources:", "  plc:", "    type: modbus", "    host: 127.0.0.1",
        f"    port: {modbus_port}", "    poll_interval: 30ms", "    timeout: 500ms",
        "    backoff: {initial: 50ms, max: 500ms}",
        "    tags:", *tags, "machines:", *machines,
        "sinks:", "  central:", "    type: http", f'    url: "{sink_url}"', "    mode: batch",
        f"    batch_max_events: {batch}", f"    retry: {retry}",
        *([f"    {line}" for line in sink_extra.splitlines()] if sink_extra else []),
        f"buffer: {{{buffer}}}", ""]))
    return path


class Plant:
    """The simulated machines; counters start at 1000 and only grow."""

    def __init__(self, seed: int = 42) -> None:
        self.sim = ModbusSimulator(size=32)
        self.counters = {m: 1000 for m in MACHINES}
        self.initial = dict(self.counters)
        self._rng = random.Random(seed)

    @property
    def port(self) -> int:
        assert self.sim.port is not None
        return self.sim.port

    async def start(self) -> None:
        await self.sim.start()
        for m, base in MACHINES.items():
            await self.sim.set_value(_tag(base), 1)
            await self.sim.set_value(_tag(base + 2, "uint32"), self.counters[m])

    async def stop(self) -> None:
        await self.sim.stop()

    async def step(self) -> None:
        """One random change per machine: maybe a stop or start, some scrap."""
        for m, base in MACHINES.items():
            if self._rng.random() < 0.3:
                await self.sim.set_value(_tag(base), self._rng.choice([1, 1, 3]))
                await self.sim.set_value(_tag(base + 1), self._rng.choice([0, 4, 9]))
            self.counters[m] += self._rng.randint(0, 3)
            await self.sim.set_value(_tag(base + 2, "uint32"), self.counters[m])

    async def drive(self, stop: asyncio.Event, period: float = 0.04) -> None:
        while not stop.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)

    async def run_for(self, seconds: float, period: float = 0.04) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(self.drive(stop, period))
        await asyncio.sleep(seconds)  # load for a while: the duration is the scenario, not sync
        stop.set()
        await task

    async def calm(self) -> None:
        """Every machine running: open episodes end, counters stay where they are."""
        for base in MACHINES.values():
            await self.sim.set_value(_tag(base), 1)

    def scrap_expected(self) -> dict[str, int]:
        return {m: self.counters[m] - self.initial[m] for m in MACHINES}


def scrap_delivered(events: list[dict[str, Any]]) -> dict[str, int]:
    out = dict.fromkeys(MACHINES, 0)
    for e in events:
        if e["type"] == "plantedge.scrap.recorded":
            out[e["data"]["machine"]] += e["data"]["quantity"]
    return out


def check_exact(receiver: Receiver, plant: Plant) -> dict[str, int]:
    """Assert the promise at the receiver (module docstring); returns events per machine."""
    events = [e for e in receiver.events() if e["type"] != "plantedge.data.gap"]
    by_machine: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_machine[e["data"]["machine"]].append(int(e["sequence"]))
    for m, seqs in by_machine.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{m}: gaps or repeats in {seqs}"
        assert seqs == sorted(seqs), f"{m}: first deliveries out of detection order: {seqs}"
    phases: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        # Late reasons (the plant sets reason codes while running) add classified events,
        # as many as there were changes: not part of "started and ended once".
        if e["type"] in ("plantedge.downtime.started", "plantedge.downtime.ended"):
            phases[e["data"]["episode_id"]][e["type"].rsplit(".", 1)[1]] += 1
    bad = {ep: dict(c) for ep, c in phases.items() if c != Counter(started=1, ended=1)}
    assert not bad, f"episodes not started+ended exactly once: {bad}"
    assert scrap_delivered(events) == plant.scrap_expected()
    return {m: len(s) for m, s in by_machine.items()}


def drained_status(st: dict[str, Any] | None, plant: Plant, receiver: Receiver) -> bool:
    """The agent has nothing left to do and the receiver has all the scrap."""
    if st is None:
        return False
    machines_ok = all(v["state"] == "running" and v["open_downtime"] is None
                      and v["signal"] == "ok" for v in st["machines"].values())
    sinks = st["buffer"]["sinks"]["central"]
    return (machines_ok and sinks["pending"] + sinks["leased"] == 0
            and st["buffer"]["uncommitted"] == 0
            and scrap_delivered(receiver.events()) == plant.scrap_expected())


async def get_json(url: str) -> Any:
    """GET a JSON document, or None when nobody answers (the agent is down)."""
    async with httpx.AsyncClient(timeout=2.0) as client:
        try:
            return (await client.get(url)).json()
        except (httpx.HTTPError, ValueError):
            return None
