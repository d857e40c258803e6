"""kill -9 of the agent subprocess under load, restarts, then a full count at the receiver.

The plant keeps stopping, restarting and making scrap while the agent is killed with SIGKILL
at random moments (while detecting, committing and delivering). After the last restart the
machines run and everything drains. The receiver must then hold:

- per machine, event sequences exactly 1..N (nothing committed was lost, nothing detected twice);
- for every episode exactly one ``started`` and one ``ended`` (open episodes end once, later);
- scrap quantities that add up to exactly the counters' increase.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import AgentProcess, free_port, wait_until

from agent.receiver import Receiver
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

pytestmark = pytest.mark.slow

MACHINES = {"m1": 0, "m2": 10}  # machine -> base address (state, reason, scrap counter)


def tag(address: int, type_: str = "uint16") -> ModbusTag:
    return ModbusTag.model_validate({"table": "holding", "address": address, "type": type_})


def write_config(path: Path, data_dir: Path, modbus_port: int, sink_url: str,
                 health_port: int) -> None:
    tags, machines = [], []
    for m, base in MACHINES.items():
        tags += [f"      {m}.state: {{table: holding, address: {base}, type: uint16}}",
                 f"      {m}.reason: {{table: holding, address: {base + 1}, type: uint16}}",
                 f"      {m}.scrap: {{table: holding, address: {base + 2}, type: uint32}}"]
        machines += [f"  {m}:", "    line: l1",
                     f"    state: {{tag: {m}.state, map: {{1: running, 3: down}}}}",
                     f"    downtime: {{min_duration: 0s, reason_tag: {m}.reason}}",
                     f"    scrap: {{counter: {m}.scrap, window: 500ms}}"]
    path.write_text("\n".join([
        f'agent: {{id: kill-edge, site: s1, data_dir: "{data_dir}", stop_timeout: 5s}}',
        f'health: {{listen: "127.0.0.1:{health_port}"}}',
        "sources:", "  plc:", "    type: modbus", "    host: 127.0.0.1",
        f"    port: {modbus_port}", "    poll_interval: 30ms", "    timeout: 500ms",
        "    tags:", *tags, "machines:", *machines,
        "sinks:", "  central:", "    type: http", f'    url: "{sink_url}"', "    mode: batch",
        "    batch_max_events: 5", "    retry: {initial_backoff: 20ms, max_backoff: 200ms}",
        "buffer: {commit_interval: 5ms}", ""]))


async def drive(sim: ModbusSimulator, stop: asyncio.Event, counters: dict[str, int]) -> None:
    rng = random.Random(42)
    while not stop.is_set():
        for m, base in MACHINES.items():
            if rng.random() < 0.3:
                await sim.set_value(tag(base), rng.choice([1, 1, 3]))
                await sim.set_value(tag(base + 1), rng.choice([0, 4, 9]))
            counters[m] += rng.randint(0, 3)
            await sim.set_value(tag(base + 2, "uint32"), counters[m])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.04)


async def test_kill9_storm_then_exact_counts(tmp_path: Path) -> None:
    sim = ModbusSimulator(size=32)
    await sim.start()
    counters = {m: 1000 for m in MACHINES}
    for m, base in MACHINES.items():
        await sim.set_value(tag(base), 1)
        await sim.set_value(tag(base + 2, "uint32"), counters[m])
    initial = dict(counters)
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    health = free_port()
    cfg = tmp_path / "agent.yaml"
    assert sim.port is not None
    write_config(cfg, tmp_path / "data", sim.port, receiver.url, health)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    stop = asyncio.Event()
    rng = random.Random(7)

    async def status() -> dict[str, Any] | None:
        async with httpx.AsyncClient() as client:
            try:
                return (await client.get(f"http://127.0.0.1:{health}/status")).json()  # type: ignore[no-any-return]
            except httpx.HTTPError:
                return None

    async def first_reading() -> bool:
        st = await status()
        return st is not None and all(m["signal"] == "ok" for m in st["machines"].values())

    # The agent's first reading is its baseline: a counter increase before it is not its to
    # know. Start the load once it has read the plant.
    agent.start()
    await wait_until(first_reading, timeout=20, interval=0.1, what="first reading")
    driver = asyncio.create_task(drive(sim, stop, counters))
    try:
        for cycle in range(5):
            before = receiver.stats()["received"]
            if cycle:
                agent.start()
            # Progress every cycle: new events reach the receiver before the next kill.
            await wait_until(lambda b=before: receiver.stats()["received"] > b + 3,  # type: ignore[misc]
                             timeout=20, what=f"progress in cycle {cycle}")
            await asyncio.sleep(rng.uniform(0.0, 0.5))  # a random moment under load
            agent.kill()
        agent.start()
        stop.set()
        await driver
        for base in MACHINES.values():
            await sim.set_value(tag(base), 1)

        def scrap_total(m: str) -> int:
            return sum(e["data"]["quantity"] for e in receiver.events()
                       if e["type"] == "plantedge.scrap.recorded" and e["data"]["machine"] == m)

        last: dict[str, object] = {}

        async def drained() -> bool:
            st = await status()
            if st is None:
                return False
            last["status"] = {"machines": st["machines"], "buffer": st["buffer"],
                              "sinks": st["sinks"]}
            last["scrap"] = {m: (scrap_total(m), counters[m] - initial[m]) for m in MACHINES}
            machines_ok = all(v["state"] == "running" and v["open_downtime"] is None
                              for v in st["machines"].values())
            pending = st["buffer"]["sinks"]["central"]
            return (machines_ok and pending["pending"] + pending["leased"] == 0
                    and st["buffer"]["uncommitted"] == 0
                    and all(scrap_total(m) == counters[m] - initial[m] for m in MACHINES))

        try:
            await wait_until(drained, timeout=30, interval=0.2, what="everything drained")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {json.dumps(last, default=str)[:3000]}") \
                from None
        assert agent.terminate() == 0  # SIGTERM: a clean exit within stop_timeout
    finally:
        agent.kill()
        stop.set()
        await sim.stop()
    events = receiver.events()
    await receiver.aclose()

    by_machine: dict[str, list[int]] = defaultdict(list)
    for e in events:
        by_machine[e["data"]["machine"]].append(int(e["sequence"]))
    for m, seqs in by_machine.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{m}: gaps or repeats in {seqs}"

    phases: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        # Late reasons (the plant sets reason codes while running) add classified events,
        # as many as there were changes: not part of "started and ended once".
        if e["type"] in ("plantedge.downtime.started", "plantedge.downtime.ended"):
            phases[e["data"]["episode_id"]][e["type"].rsplit(".", 1)[1]] += 1
    assert phases, "the storm produced no downtime episodes"
    bad = {ep: dict(c) for ep, c in phases.items() if c != Counter(started=1, ended=1)}
    assert not bad, f"episodes not started+ended exactly once: {json.dumps(bad)[:500]}"
    for m in MACHINES:
        delivered = sum(e["data"]["quantity"] for e in events
                        if e["type"] == "plantedge.scrap.recorded" and e["data"]["machine"] == m)
        assert delivered == counters[m] - initial[m]
