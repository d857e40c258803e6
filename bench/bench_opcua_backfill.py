"""History backfill time for a one-hour gap of a 1 Hz variable, vs a bare asyncua history read.

    .venv/bin/python bench/bench_opcua_backfill.py [--seconds 3600] [--rounds 3] [--page 1000]

A node-opcua server (tests/support/node_opcua, npm) starts with ``Filler.State`` historized and
seeded with one value per second for the last ``--seconds`` (cycling 1, 3: a stop and a restart
every two seconds, the worst case for detection). Phases alternate, each ``--rounds`` times:

- ``backfill``: the agent's backfill for a gap of that length (attributes check, paged raw
  history read, filter, sort, batches), then every batch fed to a machine detector, as the
  runtime does after a reconnect; it reports values, batches and events detected;
- ``asyncua``: ``Node.read_raw_history`` over the same span with the same page size (the
  floor for any asyncua client).

The server is the bottleneck on small machines: read the ratio. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from support.node_opcua import NodeOpcuaServer, available  # noqa: E402

from agent.detect.config import MachineConfig  # noqa: E402
from agent.detect.machine import MachineDetector  # noqa: E402
from config.model import utcnow  # noqa: E402
from protocols.opcua.config import OpcuaSourceConfig  # noqa: E402
from protocols.opcua.history import BackfillReport, backfill  # noqa: E402
from protocols.opcua.session import Session  # noqa: E402

NODE = "ns=1;s=Filler.State"


async def agent_backfill(endpoint: str, since: datetime, page: int) -> tuple[float, str]:
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": endpoint, "timeout": "30s",
        "history": {"max_span": "2h", "max_values": 1_000_000, "page_size": page,
                    "margin": "5s"},
        "tags": {"f.state": {"node": NODE, "type": "int"}}})
    machine = MachineDetector("filler", MachineConfig.model_validate({
        "line": "l1", "state": {"tag": "f.state", "map": {1: "running", 3: "down"}},
        "downtime": {"min_duration": "0s"}}), "s")
    assert cfg.history is not None
    async with Session("bench", cfg) as session:
        from protocols.opcua.nodeids import parse_node_id

        node_id = parse_node_id(NODE).resolve(session.namespaces)
        report = BackfillReport()
        t = time.perf_counter()
        batches = await backfill(
            session, cfg.history, {"f.state": (node_id, NODE)}, lambda _tag: since,
            {"f.state": None}, report)
        events = 0
        for batch in batches:
            events += len(machine.on_samples(batch))
        took = time.perf_counter() - t
    return took, f"{report.values} values, {len(batches)} batches, {events} events"


async def bare_read(endpoint: str, since: datetime, page: int) -> tuple[float, str]:
    from asyncua import Client

    client = Client(endpoint, timeout=30)
    async with client:
        node = client.get_node(NODE)
        t = time.perf_counter()
        values = await node.read_raw_history(since - timedelta(seconds=5), utcnow(),
                                             numvalues=0, return_bounds=False)
        took = time.perf_counter() - t
    del page
    return took, f"{len(values)} values"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--port", type=int, default=48555)
    args = ap.parse_args()
    if not available():
        sys.exit("node-opcua is not installed: cd tests/support/node_opcua && npm ci")
    srv = NodeOpcuaServer(args.port, seed_seconds=args.seconds).start(timeout=120)
    try:
        since = utcnow() - timedelta(seconds=args.seconds)
        results: dict[str, list[float]] = {"backfill": [], "asyncua": []}
        for _ in range(args.rounds):
            for name, run in (("backfill", agent_backfill), ("asyncua", bare_read)):
                took, what = await run(srv.endpoint, since, args.page)
                results[name].append(took)
                print(f"  {name:9s} {took * 1000:8.1f} ms  {what}")
        print(f"one {args.seconds}s gap of a 1 Hz variable (median of {args.rounds}):")
        for name, times in results.items():
            print(f"  {name:9s} {statistics.median(times) * 1000:8.1f} ms")
    finally:
        srv.stop()


if __name__ == "__main__":
    asyncio.run(main())
