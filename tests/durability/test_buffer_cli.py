"""``edge-agent buffer ...`` as a subprocess against the buffer of a running agent.

The agent runs (subprocess) against the simulated plant. First the receiver is away, so a
backlog builds: ``stats`` and ``pending`` must agree with the agent's own /status. Then the
receiver comes up refusing every scrap event of machine m2 (422), so those become dead letters:
``dead-letters`` lists them with status and reason, ``export`` writes them as JSON lines,
``purge`` without ``--yes`` deletes nothing, ``replay --id`` and ``replay`` return them to
pending once the receiver accepts them, and they are delivered; ``purge --yes`` deletes. The
agent keeps running throughout, and its /status counts follow the CLI's writes.
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _plant import Plant, get_json, write_config
from support import ROOT, AgentProcess, free_port, wait_until

from agent.receiver import Receiver

pytestmark = pytest.mark.slow


class RefusingReceiver(Receiver):
    """Refuses m2's scrap events with 422 while ``refuse`` is set."""

    refuse = True

    def _verdict(self, doc: Any) -> tuple[int, str]:
        if (self.refuse and isinstance(doc, dict) and doc.get("type") == "plantedge.scrap.recorded"
                and str(doc.get("source", "")).endswith("/m2")):
            return 422, "scrap of m2 is refused by this test receiver"
        return super()._verdict(doc)


def cli_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "buffer", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the simulated PLC and the receiver live on this event loop and must keep
    # answering while the CLI runs.
    return await asyncio.to_thread(cli_sync, *args)


async def ok(*args: str) -> str:
    done = await cli(*args)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return done.stdout


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_buffer_cli_against_a_running_agent(tmp_path: Path) -> None:
    plant = Plant(seed=9)
    await plant.start()
    rx_port = free_port()
    receiver = RefusingReceiver(tmp_path / "rx.db", port=rx_port)
    health = free_port()
    cfg = write_config(tmp_path / "agent.yaml", tmp_path / "data", plant.port,
                       f"http://127.0.0.1:{rx_port}/events", health, scrap_window="100ms")
    c = str(cfg)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    status_url = f"http://127.0.0.1:{health}/status"

    async def sink_status() -> dict[str, Any] | None:
        st = await get_json(status_url)
        return None if st is None else st["buffer"]["sinks"]["central"]  # type: ignore[no-any-return]

    async def signal_ok() -> bool:
        st = await get_json(status_url)
        return st is not None and all(m["signal"] == "ok" for m in st["machines"].values())

    try:
        agent.start()
        await wait_until(signal_ok, timeout=20, interval=0.1, what="first reading")
        await plant.run_for(1.0)
        await plant.calm()
        await wait_until(lambda: _stable_backlog(sink_status), timeout=10, what="a backlog")

        # --- read-only views agree with the agent's own status while it runs (the last scrap
        # windows may still close: compare a snapshot that did not move while it was taken)
        snap: dict[str, Any] = {}

        async def consistent() -> bool:
            before = await sink_status()
            doc = json.loads(await ok("stats", "--config", c, "--json"))
            snap["stats"] = doc["sinks"]["central"]
            snap["pending"] = lines(await ok("pending", "--config", c, "--json"))
            after = await sink_status()
            return before is not None and after is not None and \
                _backlog(before) == _backlog(after) and \
                len(snap["pending"]) == snap["stats"]["pending"] + snap["stats"]["leased"] \
                == before["pending"] + before["leased"]

        await wait_until(consistent, timeout=15, interval=0.2, what="CLI and /status agree")
        stats, pending = snap["stats"], snap["pending"]
        assert stats["oldest_pending_age_s"] > 0 and stats["oldest_pending_time"]
        table = await ok("stats", "--config", c)
        assert "central" in table and "PENDING" in table
        assert [p["seq"] for p in pending] == sorted(p["seq"] for p in pending)
        assert len(lines(await ok("pending", "--config", c, "--json", "--limit", "3"))) == 3
        assert "undelivered event(s) shown" in await ok("pending", "--config", c)

        # --- dead letters: m2's scrap is refused
        await receiver.start()

        async def settled_with_dead() -> bool:
            s = await sink_status()
            return s is not None and s["pending"] + s["leased"] == 0 and s["dead_letters"] > 0

        await wait_until(settled_with_dead, timeout=20, interval=0.1, what="dead letters")
        dead = lines(await ok("dead-letters", "--config", c, "--json"))
        assert dead and all(d["status"] == 422 and d["type"] == "plantedge.scrap.recorded"
                            and d["event"]["source"].endswith("/m2") for d in dead)
        assert len(dead) == (await sink_status())["dead_letters"]  # type: ignore[index]
        table = await ok("dead-letters", "--config", c)
        assert "422" in table and "scrap of m2 is refused" in table

        out = tmp_path / "dead.jsonl"
        done = await cli("export", "--config", c, "--out", str(out))
        assert done.returncode == 0
        assert f"exported {len(dead)} of {len(dead)} dead letter(s)" in done.stderr
        exported = lines(out.read_text())
        assert [e["id"] for e in exported] == [d["id"] for d in dead]
        assert all(e["event"]["id"] == e["id"] and "data" in e["event"] for e in exported)

        refused = await cli("purge", "--config", c)
        assert refused.returncode == 2 and f"would delete {len(dead)}" in refused.stderr
        assert (await sink_status())["dead_letters"] == len(dead)  # type: ignore[index]

        # --- replay one by id, then the rest, once the receiver accepts them
        receiver.refuse = False
        first = dead[0]["id"]
        assert "returned 1 dead letter(s)" in await ok("replay", "--config", c, "--id", first)
        await wait_until(lambda: any(e["id"] == first for e in receiver.events()),
                         timeout=20, what="the replayed event delivered")
        assert (await sink_status())["dead_letters"] == len(dead) - 1  # type: ignore[index]
        assert f"returned {len(dead) - 1} dead letter(s)" in await ok("replay", "--config", c)
        delivered = {d["id"] for d in dead}
        await wait_until(lambda: delivered <= {e["id"] for e in receiver.events()},
                         timeout=20, what="every replayed event delivered")

        async def agent_counts_follow() -> bool:
            s = await sink_status()
            return s is not None and s["dead_letters"] == 0 and s["pending"] + s["leased"] == 0

        await wait_until(agent_counts_follow, timeout=10, what="agent's /status after replay")

        # --- purge --yes
        receiver.refuse = True
        await plant.run_for(0.5)
        await plant.calm()

        seen = {"n": -1, "since": 0.0}

        async def dead_and_settled() -> bool:
            # The count must hold for longer than the 300 ms scrap window: a window still open
            # after calm() closes later and adds one more dead letter.
            s = await sink_status()
            if s is None or s["dead_letters"] == 0 or s["pending"] + s["leased"]:
                return False
            now = time.monotonic()
            if s["dead_letters"] != seen["n"]:
                seen.update(n=s["dead_letters"], since=now)
                return False
            return now - seen["since"] >= 1.0

        await wait_until(dead_and_settled, timeout=20, interval=0.1, what="new dead letters")
        n = seen["n"]
        # These failed after the last export: purge refuses until they are exported.
        refused = await cli("purge", "--config", c, "--yes")
        assert refused.returncode == 2 and f"{n} of {n} dead letter(s) are not in the last " \
            "export" in refused.stderr
        assert (await sink_status())["dead_letters"] == n  # type: ignore[index]
        csv_out = tmp_path / "dead.csv"
        done = await cli("export", "--config", c, "--format", "csv", "--out", str(csv_out))
        assert done.returncode == 0 and f"exported {n} of {n}" in done.stderr
        rows = list(csv.DictReader(csv_out.open(encoding="utf-8")))
        assert len(rows) == n and all(json.loads(r["event"])["id"] == r["id"] for r in rows)
        assert f"deleted {n} dead letter(s)" in await ok("purge", "--config", c, "--yes")

        async def dead_gone() -> bool:
            s = await sink_status()
            return s is not None and s["dead_letters"] == 0

        await wait_until(dead_gone, timeout=10, what="agent's /status after purge")
        assert agent.alive
        assert agent.terminate() == 0
        assert receiver.stats()["duplicates"] == 0
    finally:
        agent.kill()
        await plant.stop()
        await receiver.aclose()


def _backlog(s: dict[str, Any]) -> tuple[int, str | None]:
    return s["pending"] + s["leased"], s["oldest_pending_time"]


async def _stable_backlog(sink_status: Any) -> bool:
    s = await sink_status()
    return s is not None and s["pending"] > 5


def test_buffer_cli_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "agent.yaml", tmp_path / "nothing-here", 1,
                       "http://127.0.0.1:1/events")
    missing = cli_sync("stats", "--config", str(cfg))
    assert missing.returncode == 1 and "no buffer file" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: {id: x}\nbogus: 1\n")
    invalid = cli_sync("stats", "--config", str(bad))
    assert invalid.returncode == 2 and "bad.yaml" in invalid.stderr
    usage = subprocess.run([sys.executable, "-m", "agent.cli", "buffer"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr
