"""SIGTERM while a backlog drains: a clean exit (code 0) within stop_timeout, nothing lost.

The receiver is away while the plant makes events, so a backlog builds up in the buffer. Then a
slow receiver (every POST takes a while) comes up, and once the drain is under way the agent
gets SIGTERM. It must exit 0 within its stop_timeout (plus process start-up slack) with the
rest of the backlog still in the buffer; after a restart everything arrives exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from _plant import Plant, check_exact, drained_status, get_json, write_config
from support import AgentProcess, free_port, wait_until

from agent.httpserver import Request, Response
from agent.receiver import Receiver

pytestmark = pytest.mark.slow

STOP_TIMEOUT = 3.0


class SlowReceiver(Receiver):
    delay = 0.05

    async def _post(self, request: Request) -> tuple[Response, list[str]]:
        await asyncio.sleep(self.delay)  # a slow central API, so the drain takes a while
        return await super()._post(request)


async def test_sigterm_while_draining_exits_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    plant = Plant(seed=3)
    await plant.start()
    rx_port = free_port()
    receiver = SlowReceiver(tmp_path / "rx.db", port=rx_port)
    health = free_port()
    cfg = write_config(tmp_path / "agent.yaml", tmp_path / "data", plant.port,
                       f"http://127.0.0.1:{rx_port}/events", health,
                       stop_timeout=f"{STOP_TIMEOUT:g}s", batch=2)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    status_url = f"http://127.0.0.1:{health}/status"

    async def first_reading() -> bool:
        st = await get_json(status_url)
        return st is not None and all(m["signal"] == "ok" for m in st["machines"].values())

    async def backlog() -> int:
        st = await get_json(status_url)
        if st is None:
            return 0
        s = st["buffer"]["sinks"]["central"]
        return int(s["pending"] + s["leased"])

    try:
        agent.start()
        await wait_until(first_reading, timeout=20, interval=0.1, what="first reading")
        await plant.run_for(2.0)  # the receiver is away: a backlog builds up
        await plant.calm()
        await wait_until(lambda: backlog(), timeout=10, what="a backlog")
        await receiver.start()
        await wait_until(lambda: receiver.stats()["received"] >= 4, timeout=20,
                         what="the drain under way")
        left = await backlog()
        assert left > 0, "the backlog drained before SIGTERM; the scenario needs more events"
        assert agent.terminate(timeout=STOP_TIMEOUT + 5) == 0

        agent.start()

        async def drained() -> bool:
            return drained_status(await get_json(status_url), plant, receiver)

        await wait_until(drained, timeout=30, interval=0.1, what="everything drained")
        assert agent.terminate(timeout=STOP_TIMEOUT + 5) == 0
        counts = check_exact(receiver, plant)
        assert sum(counts.values()) > left
    finally:
        agent.kill()
        await plant.stop()
        await receiver.aclose()
