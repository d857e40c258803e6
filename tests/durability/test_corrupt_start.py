"""A damaged buffer at start-up: moved aside, readable events salvaged, the agent keeps going.

Phase 1: the agent collects while the receiver is away (a backlog in the buffer) and is killed
with SIGKILL (an unclean stop). The test lists the pending event ids, then damages the file one
of four ways: a bad header, a trashed page in the middle, a truncated file, or the write-ahead
log deleted after the unclean stop. Phase 2: the receiver comes up and the agent restarts.

It must: move the file aside (``buffer.db.corrupt-<timestamp>``), say on ``/readyz`` (503) and
in ``/status`` that the buffer is degraded and why, deliver exactly the salvaged events (as many
of the listed ids as the reason says it salvaged, no others from before), and keep collecting:
the scrap made after the restart all arrives, and the scrap delivered never exceeds what the
counters made (nothing counted twice).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import httpx
import pytest
from _plant import Plant, get_json, scrap_delivered, write_config
from support import AgentProcess, free_port, wait_until

from agent.receiver import Receiver
from buffer.sqlite import SqliteBuffer

pytestmark = pytest.mark.slow


def _checkpoint(db: Path) -> None:
    """Move the WAL into the main file (as a later crash would have left it), keeping the
    unclean-stop mark, so the damage below hits pages that hold events."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _event_leaf_pages(db: Path) -> list[int]:
    """Page numbers (1-based) of the events table's b-tree leaves (SQLite's dbstat table)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [n for (n,) in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'events' AND pagetype = 'leaf' "
            "ORDER BY pageno")]
    finally:
        conn.close()


def damage(db: Path, how: str) -> None:
    if how == "missing_wal":
        wal = db.with_name(db.name + "-wal")
        assert wal.exists() and wal.stat().st_size > 0, "the unclean stop left no WAL"
        wal.unlink()
        return
    _checkpoint(db)
    size = db.stat().st_size
    with db.open("r+b") as f:
        if how == "bad_header":
            f.write(b"NOT A DATABASE!\0")
        elif how == "damaged_page":
            pages = size // 4096
            assert pages >= 6, f"file too small to damage a middle page: {pages} pages"
            # A leaf page of the events table, so some events are lost for sure: "the middle
            # page" depended on the layout and sometimes held only detector state.
            leaves = _event_leaf_pages(db)
            assert len(leaves) >= 2, f"events fill only {len(leaves)} leaf page(s)"
            f.seek(4096 * (leaves[len(leaves) // 2] - 1))
            f.write(b"\xff" * 4096)
        else:
            assert how == "truncated"
            f.truncate(size * 3 // 5)


@pytest.mark.parametrize("how", ["bad_header", "damaged_page", "truncated", "missing_wal"])
async def test_corrupt_buffer_at_start(tmp_path: Path, how: str) -> None:
    plant = Plant(seed=5)
    await plant.start()
    rx_port = free_port()
    receiver = Receiver(tmp_path / "rx.db", port=rx_port)
    health = free_port()
    data = tmp_path / "data"
    db = data / "buffer.db"
    cfg = write_config(tmp_path / "agent.yaml", data, plant.port,
                       f"http://127.0.0.1:{rx_port}/events", health, scrap_window="50ms")
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    status_url = f"http://127.0.0.1:{health}/status"

    async def signal_ok() -> bool:
        st = await get_json(status_url)
        return st is not None and all(m["signal"] == "ok" for m in st["machines"].values())

    try:
        agent.start()
        await wait_until(signal_ok, timeout=20, interval=0.1, what="first reading")
        await plant.run_for(2.0)
        await plant.calm()

        async def backlog() -> bool:
            st = await get_json(status_url)
            return st is not None and st["buffer"]["sinks"]["central"]["pending"] > 40

        await wait_until(backlog, timeout=10, what="a backlog in the buffer")
        agent.kill()
        reader = SqliteBuffer.attach(db)
        before = {r.id for r in reader.pending("central", limit=100_000)}
        reader.close()
        damage(db, how)

        await receiver.start()
        scrap_at_restart = dict(plant.counters)
        agent.start()
        seen: dict[str, object] = {}

        async def degraded() -> bool:
            async with httpx.AsyncClient(timeout=2.0) as client:
                try:
                    r = await client.get(f"http://127.0.0.1:{health}/readyz")
                except httpx.HTTPError:
                    return False
            seen["readyz"] = r.json()
            return r.status_code == 503 and any(
                "buffer degraded" in reason for reason in r.json()["reasons"])

        await wait_until(degraded, timeout=20, interval=0.1, what="/readyz degraded")
        st = await get_json(status_url)
        reason = st["buffer"]["degraded_reason"]
        aside = [p for p in data.glob("buffer.db.corrupt-*") if p.name.endswith("Z")]
        assert len(aside) == 1 and aside[0].name in reason, (reason, list(data.iterdir()))
        if how == "missing_wal":
            assert "write-ahead log" in reason
        match = re.search(r"salvaged (\d+) events", reason)
        assert match, reason
        salvaged = int(match.group(1))

        await wait_until(signal_ok, timeout=20, interval=0.1, what="reading again")
        await plant.run_for(1.0)  # it keeps collecting into the fresh file
        await plant.calm()
        made_after = {m: plant.counters[m] - scrap_at_restart[m] for m in plant.counters}

        def new_events() -> list[dict[str, object]]:
            return [e for e in receiver.events() if e["id"] not in before]

        async def drained() -> bool:
            doc = await get_json(status_url)
            if doc is None:
                return False
            sink = doc["buffer"]["sinks"]["central"]
            return (sink["pending"] + sink["leased"] == 0 and doc["buffer"]["uncommitted"] == 0
                    and all(m["state"] == "running" and m["open_downtime"] is None
                            for m in doc["machines"].values())
                    and all(scrap_delivered(new_events())[m] >= made_after[m]
                            for m in made_after))

        await wait_until(drained, timeout=30, interval=0.1, what="the fresh file drained")
        assert agent.terminate() == 0
    finally:
        agent.kill()
        await plant.stop()
    events = receiver.events()
    await receiver.aclose()
    old = [e for e in events if e["id"] in before]
    assert len(old) == salvaged, f"{len(old)} old events delivered, {salvaged} salvaged"
    if how == "bad_header":
        assert salvaged == 0
    if how == "damaged_page":
        assert 0 < salvaged < len(before)
    assert len({e["id"] for e in events}) == len(events)
    delivered = scrap_delivered(events)
    assert all(delivered[m] <= plant.counters[m] - plant.initial[m] for m in delivered), \
        (delivered, plant.scrap_expected())
