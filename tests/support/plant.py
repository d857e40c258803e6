"""A small plant on real sockets for tests of the operator views: a Modbus simulator -> a
started runtime with its health server -> the reference receiver, stopped in reverse order."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.health import HealthServer
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

# Holding register 0: the machine state tag of the tests using this plant (1 = running).
HOLDING_0 = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})


@dataclass(slots=True)
class ModbusPlant:
    plc: ModbusSimulator
    rx: Receiver
    rt: Runtime
    health_port: int


@contextlib.asynccontextmanager
async def modbus_plant(tmp_path: Path, config: Callable[[int, str], str],
                       initial: Sequence[tuple[ModbusTag, int]] = ((HOLDING_0, 1),),
                       ) -> AsyncIterator[ModbusPlant]:
    """``config(plc_port, receiver_url)`` is the agent's YAML; the simulator's registers get
    ``initial`` before the runtime starts."""
    plc = ModbusSimulator(size=16)
    await plc.start()
    assert plc.port is not None
    for tag, value in initial:
        await plc.set_value(tag, value)
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    cfg = load_config_text(config(plc.port, rx.url), "<test>")
    rt = Runtime(cfg)
    health = HealthServer(rt, cfg.health.listen)
    try:
        await rt.start()
        yield ModbusPlant(plc, rx, rt, await health.start())
    finally:
        await health.aclose()
        await rt.stop()
        await rx.aclose()
        await plc.stop()
