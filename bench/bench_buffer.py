"""Buffer throughput: SqliteBuffer.append vs raw sqlite3 on the same file system, same run.

    .venv/bin/python bench/bench_buffer.py [--dir DIR] [--events N] [--synchronous FULL]

For each batch size (1, 10, 100, 1000) it commits N events through ``SqliteBuffer.append``
(one sink, so each event also gets a delivery row, and the capacity check runs) and through a
bare ``executemany`` into a one-table file in one transaction per batch. It prints events/s,
the ratio to the raw baseline and the p99 latency of one commit; then lease+settle throughput
(lease 100, settle them accepted) and append through ``AsyncBuffer`` (the writer thread hop).

Figures depend on the disk's fsync: run it on the target device (``--dir`` on the eMMC/SD
card) before trusting a number. This is a script, not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buffer.base import NewEvent, Settlement
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer

BATCHES = (1, 10, 100, 1000)
TARGET_BATCH = 1000
TARGET_RATE = 50_000


def _events(start: int, n: int) -> list[NewEvent]:
    out = []
    for i in range(start, start + n):
        payload = json.dumps({
            "specversion": "1.0", "id": f"ev-{i:09d}", "type": "plantedge.scrap.recorded",
            "source": "/sites/plant-a/lines/line-2/machines/press-3",
            "time": "2026-01-01T00:00:00.000Z", "datacontenttype": "application/json",
            "agentid": "plant-a-edge-01", "sequence": str(i),
            "data": {"quantity": 3, "window_start": "2026-01-01T00:00:00.000Z",
                     "window_end": "2026-01-01T00:01:00.000Z", "order_id": "4711"}})
        out.append(NewEvent(f"ev-{i:09d}", "press-3", "plantedge.scrap.recorded",
                            "2026-01-01T00:00:00.000Z", payload))
    return out


def _p99(latencies: list[float]) -> float:
    if len(latencies) < 2:
        return latencies[0] if latencies else 0.0
    return statistics.quantiles(latencies, n=100)[98]


def bench_buffer(path: Path, batch: int, total: int, sync: str) -> tuple[float, float]:
    buf = SqliteBuffer(path, max_size=2**40, synchronous=sync)
    buf.open(["erp"])
    events = _events(0, total)
    latencies = []
    t0 = time.perf_counter()
    for i in range(0, total, batch):
        t = time.perf_counter()
        buf.append(events[i:i + batch], {"press-3": '{"state":"running"}'})
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    buf.close()
    return total / elapsed, _p99(latencies)


def bench_raw(path: Path, batch: int, total: int, sync: str) -> tuple[float, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute("CREATE TABLE events(seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, "
                 "key TEXT, type TEXT, time TEXT, payload TEXT, created_at TEXT)")
    rows = [(e.id, e.key, e.type, e.time, e.payload, e.time) for e in _events(0, total)]
    latencies = []
    t0 = time.perf_counter()
    for i in range(0, total, batch):
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO events(id, key, type, time, payload, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", rows[i:i + batch])
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    conn.close()
    return total / elapsed, _p99(latencies)


def bench_lease_settle(path: Path, total: int, sync: str, chunk: int = 100) -> float:
    buf = SqliteBuffer(path, max_size=2**40, synchronous=sync)
    buf.open(["erp"])
    for i in range(0, total, 1000):
        buf.append(_events(i, min(1000, total - i)), {})
    done = 0
    t0 = time.perf_counter()
    while rows := buf.lease("erp", chunk):
        buf.settle("erp", Settlement(accepted=[r.seq for r in rows]))
        done += len(rows)
    elapsed = time.perf_counter() - t0
    buf.close()
    return done / elapsed


async def _bench_async(path: Path, batch: int, total: int, sync: str) -> float:
    buf = AsyncBuffer(SqliteBuffer(path, max_size=2**40, synchronous=sync))
    await buf.open(["erp"])
    events = _events(0, total)
    t0 = time.perf_counter()
    for i in range(0, total, batch):
        await buf.append(events[i:i + batch], {})
    elapsed = time.perf_counter() - t0
    await buf.aclose()
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="directory on the file system to measure (default: a temp dir)")
    parser.add_argument("--events", type=int, default=20_000,
                        help="events per measurement (batch size 1 uses a quarter)")
    parser.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"SQLite {sqlite3.sqlite_version}, synchronous={args.synchronous}, dir={root}")
        print(f"{'batch':>6} {'events':>7} {'buffer ev/s':>12} {'raw ev/s':>10} "
              f"{'ratio':>6} {'buffer p99 ms':>14} {'raw p99 ms':>11}")
        results = {}
        for batch in BATCHES:
            total = args.events // 4 if batch == 1 else args.events
            b_rate, b_p99 = bench_buffer(root / f"buf-{batch}.db", batch, total,
                                         args.synchronous)
            r_rate, r_p99 = bench_raw(root / f"raw-{batch}.db", batch, total, args.synchronous)
            results[batch] = (b_rate, r_rate, b_p99)
            print(f"{batch:>6} {total:>7} {b_rate:>12,.0f} {r_rate:>10,.0f} "
                  f"{b_rate / r_rate:>6.2f} {b_p99 * 1000:>14.3f} {r_p99 * 1000:>11.3f}",
                  flush=True)
        # Issue 6 targets, at the group-commit batch size of a busy plant (1000 per commit).
        b_rate, r_rate, b_p99 = results[TARGET_BATCH]
        print(f"durable capture at {TARGET_BATCH} events per commit "
              f"(synchronous={args.synchronous}): {b_rate:,.0f} events/s "
              f"[target >= {TARGET_RATE:,}: {'MET' if b_rate >= TARGET_RATE else 'MISSED'}], "
              f"{b_rate / r_rate:.0%} of raw executemany "
              f"[target >= 50%: {'MET' if b_rate >= 0.5 * r_rate else 'MISSED'}], "
              f"p99 commit {b_p99 * 1000:.1f} ms")
        rate = bench_lease_settle(root / "lease.db", args.events, args.synchronous)
        print(f"lease {100} + settle accepted: {rate:,.0f} events/s")
        for batch in (10, 100):
            rate = asyncio.run(_bench_async(root / f"async-{batch}.db", batch, args.events,
                                            args.synchronous))
            print(f"AsyncBuffer.append, batch {batch}: {rate:,.0f} events/s")


if __name__ == "__main__":
    main()
