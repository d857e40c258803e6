"""Modbus RTU read latency over a pty (serial) and an RTU-over-TCP gateway, ours vs pymodbus.

    .venv/bin/python bench/bench_modbus_rtu.py [--reads 300] [--rounds 3]

The device is modbus_tk's RtuServer (a thread in this process) on one end of a socat pty
pair; ``serial`` opens the other end, ``gateway`` goes through ``socat TCP-LISTEN ...
FILE:pty``. Per path, phases alternate (ours, pymodbus, ours, ...) so drift on a shared machine
hits both; each phase reads 10 holding registers of unit 1 ``--reads`` times, one at a time.
The pymodbus baseline is ``AsyncModbusSerialClient`` / ``AsyncModbusTcpClient(framer=RTU)``.

Then the cost of one frame fault (a bad CRC, garbage before the frame, a truncated frame),
with ``timeout`` 300 ms and no retry: how long the faulty read takes and what it returns, for
both clients. A pty has no baud-rate timing: the figures are the software path plus
modbus_tk's own inter-frame wait (3.5 characters at 115200 baud), not a real RS-485 line.
This is a script, not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.rtu_peer import Gateway, PtyPair, RtuDevice  # noqa: E402

from protocols.modbus.config import ModbusSourceConfig, ModbusTable  # noqa: E402
from protocols.modbus.transport import LineStats, RtuLine  # noqa: E402

Reader = Callable[[], Awaitable[Any]]


async def ours(path: str, where: dict[str, Any]) -> tuple[Reader, Callable[[], None]]:
    cfg = ModbusSourceConfig.model_validate({
        "type": "modbus", "transport": path, **where, "timeout": "300ms", "retries": 0,
        "tags": {"a": {"address": 0}}})
    line = RtuLine(cfg, LineStats(cfg.where))
    await line.open()

    async def read() -> Any:
        return await line.read(1, ModbusTable.HOLDING, 0, 10)
    return read, line.close


async def pymodbus_client(path: str, where: dict[str, Any]) -> tuple[Reader, Callable[[], None]]:
    from pymodbus import FramerType
    from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    client: Any
    if path == "serial":
        client = AsyncModbusSerialClient(where["serial"]["device"], baudrate=115200,
                                         timeout=0.3, retries=0, reconnect_delay=0)
    else:
        client = AsyncModbusTcpClient(where["host"], port=where["port"], framer=FramerType.RTU,
                                      timeout=0.3, retries=0, reconnect_delay=0)
    await client.connect()

    async def read() -> Any:
        rr = await client.read_holding_registers(0, count=10, device_id=1)
        return rr.registers
    return read, client.close


async def latency(make: Any, path: str, where: dict[str, Any], reads: int) -> list[float]:
    read, close = await make(path, where)
    try:
        for _ in range(5):
            await read()
        times = []
        for _ in range(reads):
            t = time.perf_counter()
            await read()
            times.append((time.perf_counter() - t) * 1000)
        return times
    finally:
        close()
        await asyncio.sleep(0.1)  # let socat's per-connection child go before the next phase


async def fault_cost(make: Any, path: str, where: dict[str, Any], device: RtuDevice,
                     fault: str) -> str:
    read, close = await make(path, where)
    try:
        await read()
        device.inject(1, fault)
        t = time.perf_counter()
        try:
            out = f"values {(await read())[:2]}..."
        except Exception as exc:
            out = f"{type(exc).__name__}"
        ms = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        await read()
        after = (time.perf_counter() - t) * 1000
        return f"{ms:7.1f} ms -> {out}; next read {after:.1f} ms"
    finally:
        close()
        await asyncio.sleep(0.1)


def summary(times: list[float]) -> str:
    times = sorted(times)
    return (f"median {statistics.median(times):5.2f} ms  p95 {times[int(0.95 * len(times))]:5.2f}"
            f" ms  max {times[-1]:6.2f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with PtyPair() as line, RtuDevice(line.device, [1]) as device:
        device.set(1, 0, list(range(10)))
        for path in ("serial", "rtu-over-tcp"):
            gw = Gateway(line.client).__enter__() if path == "rtu-over-tcp" else None
            where: dict[str, Any] = (
                {"serial": {"device": line.client, "baudrate": 115200, "parity": "none"}}
                if gw is None else {"host": "127.0.0.1", "port": gw.port})
            results: dict[str, list[float]] = {"ours": [], "pymodbus": []}
            for _ in range(args.rounds):
                for name, make in (("ours", ours), ("pymodbus", pymodbus_client)):
                    results[name] += await latency(make, path, where, args.reads)
            print(f"{path} ({args.rounds} x {args.reads} reads of 10 registers)")
            for name, times in results.items():
                print(f"  {name:9s} {summary(times)}")
            for fault in ("crc", "garbage", "truncate"):
                for name, make in (("ours", ours), ("pymodbus", pymodbus_client)):
                    cost = await fault_cost(make, path, where, device, fault)
                    print(f"  {fault:8s} {name:9s} {cost}")
            if gw is not None:
                gw.__exit__()


if __name__ == "__main__":
    asyncio.run(main())
