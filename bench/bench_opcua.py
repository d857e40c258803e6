"""OPC UA throughput: data-change notifications/s into detection vs a bare asyncua client.

    .venv/bin/python bench/bench_opcua.py [--tags 200] [--seconds 6] [--rounds 2]

One run starts an asyncua server in its own process that rewrites every variable as fast as
it can (each write is a change), then alternates client phases, each in a fresh process:

- ``bare``: an ``asyncua.Client`` with one subscription in iterator mode that only counts
  ``DataChangeEvent``s: the ceiling for any asyncua consumer;
- ``agent``: the agent's ``Runtime`` with the OPC UA source in subscribe mode, its machines
  (detection) fed by every sample, the SQLite buffer open: samples carried into detection are
  counted by the runtime (``samples_total``).

Each phase also reports its own CPU time per notification, which says what the agent would
carry if the server were not the bottleneck. Both use the same subscription parameters
(publishing interval, per-item queue, sampling 0).
Phases alternate (bare, agent, bare, agent, ...) so drift on a shared machine hits both; with
``--together`` both clients run at once on the same notifications (the question is then whether
the agent keeps up). The report gives each phase, the medians, the agent/bare ratio and the
agent process's RSS.
The in-process server is the bottleneck on small machines (docs/library-notes.md): read the
ratio, not the absolute rate. This is a script, not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PUBLISHING_MS = 100
ITEM_QUEUE = 1000


def _cpu() -> float:
    """CPU seconds (user + system) used by this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------ server


async def _serve(tags: int, port: int) -> None:
    from protocols.opcua.testserver import OpcuaTestServer

    srv = OpcuaTestServer({f"V{i}": 0 for i in range(tags)}, port=port)
    await srv.start()
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        for i in range(tags):
            await srv.set(f"V{i}", n)
        await asyncio.sleep(0)  # let the server publish between rounds


# ------------------------------------------------------------------------------ clients


async def _bare(endpoint: str, namespace: str, tags: int, seconds: float) -> dict[str, Any]:
    from asyncua import Client, ua

    client = Client(endpoint, timeout=5)
    await client.connect()
    try:
        idx = (await client.get_namespace_array()).index(namespace)
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=PUBLISHING_MS, RequestedMaxKeepAliveCount=20,
            RequestedLifetimeCount=200, MaxNotificationsPerPublish=0, PublishingEnabled=True,
            Priority=0)
        sub = await client.create_subscription(params, None, queue_maxsize=1_000_000)
        requests = []
        for i in range(tags):
            node: Any = client.get_node(ua.NodeId(f"V{i}", idx))
            requests.append(sub._make_monitored_item_request(
                node, ua.AttributeIds.Value, None, ITEM_QUEUE, ua.MonitoringMode.Reporting, 0))
        await sub.create_monitored_items(requests)
        count = 0
        cpu0 = 0.0
        loop = asyncio.get_running_loop()
        warm = loop.time() + 1.0
        start = end = 0.0
        async for _ in sub:
            now = loop.time()
            if now < warm:
                continue
            if not start:
                start, end, cpu0 = now, now + seconds, _cpu()
            count += 1
            if now >= end:
                break
        return {"notifications": count, "seconds": loop.time() - start,
                "cpu_s": _cpu() - cpu0, "rss_mib": _rss_mib()}
    finally:
        await client.disconnect()


async def _agent(endpoint: str, namespace: str, tags: int, seconds: float) -> dict[str, Any]:
    from agent.runtime import Runtime
    from agent.wiring.load import load_config_text

    data = tempfile.mkdtemp(prefix="bench-opcua-")
    tag_lines = "\n".join(
        f'      t{i}: {{node: "nsu={namespace};s=V{i}", type: int, sampling_interval: 0ms, '
        f'queue_size: {ITEM_QUEUE}}}' for i in range(tags))
    machines = "\n".join(
        f"  m{i}:\n    line: l1\n    state: {{tag: t{i}, running_above: -1}}\n"
        f"    scrap: {{counter: t{i}, window: 1m, max_step: 1000000}}"
        for i in range(min(tags, 20)))
    text = f"""
agent: {{id: bench, site: bench, data_dir: "{data}"}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: opcua
    endpoint: {endpoint}
    publishing_interval: {PUBLISHING_MS}ms
    stale_after: 10m
    tags:
{tag_lines}
machines:
{machines}
sinks:
  central: {{type: http, url: "http://127.0.0.1:9/unreachable"}}
"""
    rt = Runtime(load_config_text(text, "<bench>"))
    await rt.start()
    try:
        info = rt.sources["plc"]
        deadline = time.monotonic() + 30
        while info.supervisor.state != "up":
            if time.monotonic() > deadline:
                raise SystemExit(f"the source did not connect: {info.supervisor.last_error}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        c0, t0, cpu0 = info.samples_total, time.monotonic(), _cpu()
        await asyncio.sleep(seconds)
        c1, t1, cpu1 = info.samples_total, time.monotonic(), _cpu()
        return {"notifications": c1 - c0, "seconds": t1 - t0, "cpu_s": cpu1 - cpu0,
                "rss_mib": _rss_mib(), "bad_samples": info.bad_total}
    finally:
        await rt.stop()


def _client_main(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    fn = _bare if args.role == "bare" else _agent
    result = asyncio.run(fn(args.endpoint, args.namespace, args.tags, args.seconds))
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ driver


def _spawn(role: str, endpoint: str, namespace: str, tags: int,
           seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--endpoint", endpoint, "--namespace",
         namespace, "--tags", str(tags), "--seconds", str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _collect(role: str, proc: subprocess.Popen[str], seconds: float) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise SystemExit(f"{role} phase did not finish:\n{stderr[-3000:]}") from None
    if proc.returncode != 0:
        raise SystemExit(f"{role} phase failed:\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["rate"] = result["notifications"] / result["seconds"]
    result["cpu_us"] = 1e6 * result["cpu_s"] / max(1, result["notifications"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tags", type=int, default=200)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--together", action="store_true",
                   help="run the bare client and the agent at the same time on the same "
                   "notifications (instead of alternating phases)")
    p.add_argument("--role", choices=["server", "bare", "agent"], default=None)
    p.add_argument("--endpoint", default="")
    p.add_argument("--namespace", default="")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.role == "server":
        asyncio.run(_serve(args.tags, args.port))
        return
    if args.role is not None:
        _client_main(args)
        return

    from protocols.opcua.testserver import PLANT_NAMESPACE, _free_port

    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--role", "server", "--tags",
                               str(args.tags), "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("server did not start")
        endpoint = f"opc.tcp://127.0.0.1:{port}"
        results: dict[str, list[dict[str, Any]]] = {"bare": [], "agent": []}
        print(f"{args.tags} tags, server rewriting all of them continuously, "
              f"{args.seconds:g}s per phase, {os.cpu_count()} CPU(s)")
        for r in range(args.rounds):
            groups = [("bare", "agent")] if args.together else [("bare",), ("agent",)]
            for group in groups:
                procs = {role: _spawn(role, endpoint, PLANT_NAMESPACE, args.tags, args.seconds)
                         for role in group}
                done = {role: _collect(role, proc, args.seconds) for role, proc in procs.items()}
                results.update({role: [*results[role], res] for role, res in done.items()})
            for role in ("bare", "agent"):
                res = results[role][-1]
                print(f"  round {r + 1} {role:<5}: {res['rate']:9,.0f} notifications/s "
                      f"({res['notifications']:,} in {res['seconds']:.1f}s), "
                      f"{res['cpu_us']:.0f} us CPU each, RSS {res['rss_mib']:.0f} MiB",
                      flush=True)
        bare = statistics.median(x["rate"] for x in results["bare"])
        agent = statistics.median(x["rate"] for x in results["agent"])
        rss = max(x["rss_mib"] for x in results["agent"])
        bare_us = statistics.median(x["cpu_us"] for x in results["bare"])
        agent_us = statistics.median(x["cpu_us"] for x in results["agent"])
        print(f"median: bare asyncua client {bare:,.0f}/s, agent into detection {agent:,.0f}/s "
              f"= {agent / bare:.0%} of bare (target >= 70%); agent RSS {rss:.0f} MiB")
        print(f"client CPU per notification: bare {bare_us:.0f} us, agent {agent_us:.0f} us "
              f"(the agent alone could carry ~{1e6 / agent_us:,.0f}/s on one core)")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
