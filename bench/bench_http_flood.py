"""The agent's memory under a GET-body flood on its health listener (issue 11, #6).

Starts ``edge-agent run`` as a subprocess (health on a loopback port, one Modbus source that is
not there), waits until ``/healthz`` answers, then opens ``--connections`` connections that each
send ``GET /healthz`` with ``Content-Length: --body-mib`` MiB and stream that many bytes of body.
Prints the agent's RSS before the flood (the baseline of this run), at its peak during the
flood, and 3 s after, plus whether ``/healthz`` still answered.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_http_flood.py [--connections 24] [--body-mib 16]

Measured (2 cores shared, 24 connections x 16 MiB): see docs/security-limits.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def healthz(port: int, timeout: float = 5.0) -> int | None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = await asyncio.wait_for(reader.readline(), timeout)
        writer.close()
        return int(head.split()[1])
    except (OSError, TimeoutError, IndexError, ValueError):
        return None


async def flood_one(port: int, body: int) -> None:
    with contextlib.suppress(OSError):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % body)
        chunk = b"x" * 65536
        sent = 0
        while sent < body:
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()


def write_config(path: Path, data: Path, health: int) -> None:
    path.write_text(f"""
agent: {{id: flood, site: s1, data_dir: "{data}"}}
health: {{listen: "127.0.0.1:{health}"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {_free_port()},
         tags: {{st: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: st, map: {{1: running}}}}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:{_free_port()}/events"}}
""")


def start_agent(cfg: Path, cwd: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def run(connections: int, body_mib: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        health = _free_port()
        cfg = Path(tmp) / "agent.yaml"
        write_config(cfg, Path(tmp) / "data", health)
        proc = start_agent(cfg, tmp)
        try:
            deadline = time.monotonic() + 30
            while await healthz(health, 1) != 200:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the agent did not come up")
                await asyncio.sleep(0.1)
            before = rss_mib(proc.pid)
            peak = before
            flood = asyncio.gather(*(flood_one(health, body_mib * 2**20)
                                     for _ in range(connections)))
            while not flood.done():
                peak = max(peak, rss_mib(proc.pid))
                await asyncio.sleep(0.05)
            await flood
            during = await healthz(health)
            await asyncio.sleep(3)  # the settling time is the measurement, not a sync
            after = rss_mib(proc.pid)
            return {"before": before, "peak": peak, "after": after, "healthz": during}
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            tracebacks = err.decode(errors="replace").count("Traceback")
            if tracebacks:
                print(f"agent log had {tracebacks} traceback(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=24)
    parser.add_argument("--body-mib", type=int, default=16)
    args = parser.parse_args()
    r = asyncio.run(run(args.connections, args.body_mib))
    print(f"{args.connections} x GET /healthz with a {args.body_mib} MiB body: agent RSS "
          f"{r['before']:.0f} MiB before (baseline), peak {r['peak']:.0f} MiB, "
          f"{r['after']:.0f} MiB 3 s after; /healthz answered {r['healthz']}")


if __name__ == "__main__":
    main()
