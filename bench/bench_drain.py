"""Backlog drain: N pending events delivered by the agent vs the receiver's own absorb rate.

    .venv/bin/python bench/bench_drain.py [--events 1000000] [--batch 500] [--dir DIR]
                                          [--baseline-events N]

1. Build a buffer file with N pending events for one sink (not timed; synchronous=OFF).
2. Baseline: the reference receiver (its own process) absorbs the same batches, POSTed one
   after the other over one keep-alive connection by a bare httpx client: the time spent in
   the requests gives the receiver's absorb rate, the ceiling for any agent.
3. Drain: a fresh receiver process and the agent (``edge-agent run``, its own process, batch
   mode, ``batch_max_events`` = --batch, ``max_in_flight`` = --in-flight if given) on the
   built file. The agent's /status is polled for progress every 0.1 s; its RSS is sampled from
   /proc every 0.05 s, and its peak (VmHWM) read at the end.
   The drain rate is N / (time of the last settle - time of the first delivery).

Targets: at least 80% of the receiver's absorb rate, at most 25 us of agent CPU per delivered
event, peak RSS under 200 MB and not growing with the backlog (the RSS at each quarter of the
drain is printed). The receiver and the agent run in separate processes so they do not share a
GIL; this process only polls. Nothing asserts: it is a script for figures, to be run on the
target hardware. The last line sums a run up:
``drain: agent=N/s receiver=N/s ratio=R cpu_us_per_event=N peak_rss_mb=N``.

Last measured (2026-12-02, shared 2-core machine under a load of 3-4, --events 100000, three
runs alternating with the previous code, medians): agent 20,460 -> 33,007 events/s, CPU
19.0 -> 15.2 us per event, peak RSS 66.7 -> 71.1 MB, flat; ratio to the receiver 0.44 -> 0.46
(the receiver's own rate swung from 38,000 to 83,000 events/s between runs). 1,000,000 events:
39,688 vs 78,954 events/s (0.50), 20.5 us per event, RSS 71-77 MB. The 80% target is not met
on this machine: agent and receiver share two cores with other work, and the agent is idle
about half of the drain waiting for answers.

After the buffer work of issue 15 (statements without per-row stepping, a lease read in one
step, leasing ahead by a whole lease; 2026-12-02, --events 100000, three runs alternating
with the code before, medians): agent 43,196 -> 50,334 events/s, ratio to the receiver 0.71
-> 0.84, CPU 19.0 -> 16.2 us per event, peak RSS 73.0 -> 81.2 MB (3000 rows leased ahead
instead of 2000), flat.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from buffer.base import NewEvent  # noqa: E402
from buffer.sqlite import SqliteBuffer  # noqa: E402

TARGET_RATE = 20_000
TARGET_RSS_MB = 200


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payload(i: int) -> str:
    m = f"press-{i % 8}"
    return json.dumps({
        "specversion": "1.0", "id": f"bench-{i:09d}", "type": "plantedge.scrap.recorded",
        "source": f"/sites/plant-a/lines/line-2/machines/{m}",
        "time": "2026-01-01T00:00:00.000Z", "datacontenttype": "application/json",
        "agentid": "plant-a-edge-01", "sequence": str(i // 8 + 1),
        "data": {"machine": m, "line": "line-2", "site": "plant-a", "quantity": 3,
                 "window_start": "2026-01-01T00:00:00.000Z",
                 "window_end": "2026-01-01T00:01:00.000Z", "counter_from": 100,
                 "counter_to": 103, "order_id": "4711"}}, separators=(",", ":"), sort_keys=True)


def build(path: Path, n: int) -> float:
    buf = SqliteBuffer(path, max_size=2**42, synchronous="OFF")
    buf.open(["central"])
    t0 = time.perf_counter()
    for start in range(0, n, 10_000):
        buf.append([NewEvent(f"bench-{i:09d}", f"press-{i % 8}", "plantedge.scrap.recorded",
                             "2026-01-01T00:00:00.000Z", _payload(i))
                    for i in range(start, min(n, start + 10_000))], {})
    buf.close()
    return time.perf_counter() - t0


def start_receiver(db: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "receiver", "--listen",
                             f"127.0.0.1:{port}", "--db", str(db)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/stats")
    return proc


def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up within {timeout:g}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def baseline(port: int, n: int, batch: int) -> float:
    """Events/s the receiver absorbs: time spent inside the POSTs only."""
    url = f"http://127.0.0.1:{port}/events"
    spent = 0.0
    with httpx.Client(timeout=60.0) as client:
        for start in range(0, n, batch):
            body = ("[" + ",".join(_payload(i) for i in range(start, min(n, start + batch)))
                    + "]").encode()
            t = time.perf_counter()
            r = client.post(url, content=body, headers={
                "Content-Type": "application/cloudevents-batch+json",
                "Idempotency-Key": f"baseline-{start}"})
            spent += time.perf_counter() - t
            if r.status_code != 207:
                raise SystemExit(f"baseline: receiver answered {r.status_code}: {r.text[:200]}")
    return n / spent


def _rss_kb(pid: int, field: str = "VmRSS") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(root: Path, db: Path, port: int, n: int, batch: int,
          in_flight: int | None) -> dict[str, Any]:
    health = _port()
    cfg = root / "agent.yaml"
    cfg.write_text("\n".join([
        f'agent: {{id: bench-edge, site: s1, data_dir: "{root / "data"}", stop_timeout: 10s}}',
        f'health: {{listen: "127.0.0.1:{health}"}}',
        "sinks:", "  central:", "    type: http", f'    url: "http://127.0.0.1:{port}/events"',
        "    mode: batch", f"    batch_max_events: {batch}", "    timeout: 30s",
        *([f"    max_in_flight: {in_flight}"] if in_flight else []),
        f'buffer: {{path: "{db}", max_size: 4TiB}}', ""]))
    log = (root / "agent.log").open("wb")
    t_spawn = time.perf_counter()
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "--log-level", "warning",
                              "run", "--config", str(cfg)], cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
    status_url = f"http://127.0.0.1:{health}/status"
    samples: list[tuple[float, int, int]] = []  # (time, undelivered, rss kB)
    t_first: float | None = None
    cpu_first = 0.0
    last_poll = 0.0
    undelivered = n
    try:
        with httpx.Client(timeout=5.0) as client:
            while True:
                now = time.perf_counter()
                rss = _rss_kb(agent.pid)
                if agent.poll() is not None:
                    raise SystemExit(f"the agent exited with {agent.returncode}; see "
                                     f"{root / 'agent.log'}")
                if now - last_poll >= 0.1:
                    last_poll = now
                    try:
                        sink = client.get(status_url).json()["buffer"]["sinks"]["central"]
                        undelivered = int(sink["pending"]) + int(sink["leased"])
                        if t_first is None and undelivered < n:
                            t_first, cpu_first = now, _cpu_seconds(agent.pid)
                    except (httpx.HTTPError, ValueError, KeyError):
                        pass
                if rss is not None:
                    samples.append((now, undelivered, rss))
                if undelivered == 0:
                    break
                time.sleep(0.05)
        t_end = time.perf_counter()
        peak = _rss_kb(agent.pid, "VmHWM") or 0
        cpu = _cpu_seconds(agent.pid) - cpu_first
    finally:
        stop(agent)
        log.close()
    received = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=60.0).json()
    quarters = {}
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        left = n * (1 - q)
        near = min(samples, key=lambda s: abs(s[1] - left))
        quarters[f"{int(q * 100)}%"] = round(near[2] / 1024, 1)
    start = t_first if t_first is not None else t_spawn
    return {"seconds": t_end - start, "seconds_from_spawn": t_end - t_spawn,
            "rate": n / (t_end - start), "peak_rss_mb": round(peak / 1024, 1),
            "rss_by_progress_mb": quarters, "received": received,
            "agent_cpu_us_per_event": round(cpu / n * 1e6, 1),
            "agent_cpu_share": round(cpu / (t_end - start), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500, help="batch_max_events")
    parser.add_argument("--baseline-events", type=int, default=None,
                        help="events for the receiver baseline (default: --events)")
    parser.add_argument("--in-flight", type=int, default=None,
                        help="the sink's max_in_flight (default: the config default)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    n, batch = args.events, args.batch
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        db = root / "buffer.db"
        built = build(db, n)
        print(f"built {n:,} pending events in {built:.1f}s "
              f"({db.stat().st_size / 2**20:,.0f} MiB file)", flush=True)

        port = _port()
        rx = start_receiver(root / "rx-baseline.db", port)
        try:
            absorb = baseline(port, args.baseline_events or n, batch)
        finally:
            stop(rx)
        print(f"receiver absorb rate (bare client, batches of {batch}): {absorb:,.0f} events/s",
              flush=True)

        port = _port()
        rx = start_receiver(root / "rx-drain.db", port)
        try:
            result = drain(root, db, port, n, batch, args.in_flight)
        finally:
            stop(rx)
    rate = result["rate"]
    print(f"agent drain: {n:,} events in {result['seconds']:.1f}s "
          f"({result['seconds_from_spawn']:.1f}s from process start) = {rate:,.0f} events/s, "
          f"{rate / absorb:.0%} of the receiver's absorb rate")
    print(f"receiver: {result['received']}")
    print(f"agent CPU: {result['agent_cpu_us_per_event']} us per event "
          f"({result['agent_cpu_share']:.0%} of one core during the drain): its own ceiling "
          f"on a free core is ~{1e6 / max(result['agent_cpu_us_per_event'], 0.1):,.0f} "
          "events/s")
    print(f"agent RSS by drain progress (MB): {result['rss_by_progress_mb']}; "
          f"peak (VmHWM) {result['peak_rss_mb']} MB")
    print(f"target >= {TARGET_RATE:,} events/s: {'MET' if rate >= TARGET_RATE else 'MISSED'}; "
          f"peak RSS < {TARGET_RSS_MB} MB: "
          f"{'MET' if result['peak_rss_mb'] < TARGET_RSS_MB else 'MISSED'}")
    # The one line to compare runs by (issue 12: ratio >= 0.8, <= 25 us per event).
    print(f"drain: agent={rate:.0f}/s receiver={absorb:.0f}/s ratio={rate / absorb:.2f} "
          f"cpu_us_per_event={result['agent_cpu_us_per_event']:.1f} "
          f"peak_rss_mb={result['peak_rss_mb']:.1f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
