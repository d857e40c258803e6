"""Disk full end to end: a 4 MiB tmpfs as the data directory, filled up while the plant runs.

The agent must stay up (``/healthz`` 200), say why it is not ready (``/readyz`` 503 naming the
full disk), keep what it detects in memory, and recover by itself once space returns (the
filler file is deleted): ``/readyz`` 200 again and everything arrives exactly once.

Needs root to mount a tmpfs; skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _plant import Plant, check_exact, drained_status, get_json, write_config
from support import AgentProcess, fill_disk, free_port, small_tmpfs, wait_until

from agent.receiver import Receiver

pytestmark = pytest.mark.slow


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small", "4m") as mnt:
        yield mnt



async def readyz(port: int) -> tuple[int, dict[str, object]] | None:
    async with httpx.AsyncClient(timeout=2.0) as client:
        try:
            r = await client.get(f"http://127.0.0.1:{port}/readyz")
            return r.status_code, r.json()
        except (httpx.HTTPError, ValueError):
            return None


async def test_disk_full_is_reported_and_recovers_by_itself(tmp_path: Path,
                                                            small_fs: Path) -> None:
    plant = Plant(seed=11)
    await plant.start()
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    health = free_port()
    cfg = write_config(tmp_path / "agent.yaml", small_fs / "data", plant.port, receiver.url,
                       health, health="min_disk_free: 0")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    status_url = f"http://127.0.0.1:{health}/status"
    stop = asyncio.Event()
    driver: asyncio.Task[None] | None = None
    try:
        agent.start()
        await wait_until(lambda: readyz(health), timeout=20, what="health endpoint up")
        await wait_until(lambda: _ready(health), timeout=20, what="ready at first")
        driver = asyncio.create_task(plant.drive(stop))
        await wait_until(lambda: receiver.stats()["received"] > 3, timeout=20,
                         what="deliveries before the disk fills")
        filler = fill_disk(small_fs)
        seen: dict[str, object] = {}

        async def full_reported() -> bool:
            got = await readyz(health)
            if got is None:
                return False
            code, doc = got
            seen["readyz"] = doc
            return code == 503 and any("disk full" in str(r) for r in doc.get("reasons", []))

        await wait_until(full_reported, timeout=20, interval=0.1, what="/readyz says disk full")
        assert agent.alive
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{health}/healthz")).status_code == 200
        st = await get_json(status_url)
        assert st is not None and "disk full" in str(st["buffer"]["storage_error"])

        filler.unlink()  # space returns: no restart, no operator action
        await wait_until(lambda: _ready(health), timeout=20, interval=0.1,
                         what="ready again after space returned")
        stop.set()
        await driver
        await plant.calm()

        async def drained() -> bool:
            return drained_status(await get_json(status_url), plant, receiver)

        await wait_until(drained, timeout=30, interval=0.1, what="everything drained")
        assert agent.terminate() == 0
        counts = check_exact(receiver, plant)
        assert sum(counts.values()) > 5
    finally:
        stop.set()
        if driver is not None:
            await driver
        agent.kill()
        await plant.stop()
        await receiver.aclose()


async def _ready(port: int) -> bool:
    got = await readyz(port)
    return got is not None and got[0] == 200
