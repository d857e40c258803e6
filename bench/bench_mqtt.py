"""MQTT throughput: Mosquitto -> MqttSource -> detection, against a bare paho client, same run.

    .venv/bin/python bench/bench_mqtt.py [--messages N] [--rounds R] [--qos 0|1]

Method: one local Mosquitto broker. Each subscriber first connects once with a persistent
session (so the broker queues for it) and disconnects; a publisher process then publishes N
messages (JSON machine status and reject messages over 8 machines' topics), which the broker
queues for every subscriber. Each subscriber then reconnects on its own (one at a time, so
they never compete for the 2 cores) and drains its queue as fast as it can; the rate is N over
the time from its first to its last message. So the figure is what the subscriber can take
from the broker, not what the publisher can produce.

Subscribers, each in its own process:

- ``bare``: a paho client in paho's own ``loop_forever``, counting in ``on_message`` (no
  decoding at all): the ceiling.
- ``agent``: ``MqttSource`` (paho driven by the asyncio loop) whose samples go through the
  same routing as the runtime into the real ``MachineDetector``s (downtime + scrap rules),
  on asyncio and on uvloop.

Prints, per subscriber, the median wall-clock rate and the rate per CPU-second of the
subscriber process (its own user + system time from first to last message), each with the
ratio to the bare client (target: at least 70%). On a shared machine the wall-clock rate
swings with whatever else runs; the CPU figure says what each message costs and is the
steadier comparison. A script, not a test: nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MACHINES = 8


def _topics(i: int) -> tuple[str, str]:
    return f"bench/line{i % 4}/m{i}/status", f"bench/line{i % 4}/m{i}/reject"


def _config_text(url: str, qos: int, client_id: str) -> str:
    tags = []
    machines = []
    for i in range(MACHINES):
        status, reject = _topics(i)
        tags.append(f"      m{i}.state: {{topic: {status}, value: $.state, qos: {qos}}}")
        tags.append(f"      m{i}.speed: {{topic: {status}, value: $.speed, qos: {qos}}}")
        tags.append(f"      m{i}.reject: {{topic: {reject}, value: $.qty, qos: {qos}}}")
        machines.append(f"""  m{i}:
    line: line{i % 4}
    state: {{tag: m{i}.state, map: {{RUNNING: running, STOPPED: down}}}}
    downtime: {{min_duration: 0s}}
    scrap: {{quantity_tag: m{i}.reject, window: 10s}}""")
    return f"""agent: {{id: bench, site: bench}}
sources:
  broker:
    type: mqtt
    url: {url}
    client_id: {client_id}
    tags:
{chr(10).join(tags)}
machines:
{chr(10).join(machines)}
sinks:
  none: {{type: http, url: "http://127.0.0.1:9/"}}
"""


# --------------------------------------------------------------------------- roles


def _publish(port: int, n: int, qos: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payloads = []
    for i in range(n):
        m = i % MACHINES
        status, reject = _topics(m)
        if i % 10 == 9:
            payloads.append((reject, json.dumps({"qty": 1 + i % 3, "reason": "R12"})))
        else:
            payloads.append((status, json.dumps({
                "state": "RUNNING" if (i // 50) % 5 else "STOPPED", "speed": 40.0 + i % 7,
                "ts": 1764300000000 + i})))
    last = None
    for topic, payload in payloads:
        last = client.publish(topic, payload, qos=qos)
    assert last is not None
    last.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def _bare(port: int, n: int, qos: int, register_only: bool) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare",
                         clean_session=False)
    state: dict[str, Any] = {"count": 0, "first": None, "last": None, "cpu_first": None,
                             "cpu_last": None}

    def on_connect(c: mqtt.Client, *_a: Any) -> None:
        c.subscribe([(t, qos) for i in range(MACHINES) for t in _topics(i)])

    def on_subscribe(c: mqtt.Client, *_a: Any) -> None:
        if register_only:
            c.disconnect()

    def on_message(c: mqtt.Client, _u: Any, _msg: mqtt.MQTTMessage) -> None:
        state["count"] += 1
        if state["first"] is None:
            state["first"], state["cpu_first"] = time.perf_counter(), time.process_time()
        if state["count"] >= n:
            state["last"], state["cpu_last"] = time.perf_counter(), time.process_time()
            c.disconnect()

    client.on_connect, client.on_subscribe, client.on_message = (on_connect, on_subscribe,
                                                                  on_message)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_forever()
    return state


async def _agent(port: int, n: int, qos: int, register_only: bool,
                 client_id: str) -> dict[str, Any]:
    from agent.wiring.build import build_detectors
    from agent.wiring.load import load_config_text
    from config.model import TagSample
    from protocols.mqtt.source import MqttSource

    config = load_config_text(_config_text(f"mqtt://127.0.0.1:{port}", qos, client_id),
                              "<bench>")
    source = MqttSource("broker", config.sources["broker"])  # type: ignore[arg-type]
    detectors = build_detectors(config)
    by_tag: dict[str, list[Any]] = {}
    for det in detectors.values():
        for tag in det.tags:
            by_tag.setdefault(tag, []).append(det)
    state: dict[str, Any] = {"count": 0, "first": None, "last": None, "events": 0,
                             "samples": 0, "cpu_first": None, "cpu_last": None}
    done = asyncio.Event()

    class Out:
        def connected(self) -> None:
            if register_only:
                done.set()

        def emit(self, samples: Sequence[TagSample]) -> None:
            if state["first"] is None:
                state["first"], state["cpu_first"] = time.perf_counter(), time.process_time()
            state["samples"] += len(samples)
            touched: dict[str, list[TagSample]] = {}
            for s in samples:  # the runtime's routing (Runtime.on_samples)
                for det in by_tag.get(s.tag, ()):
                    touched.setdefault(det.machine_id, []).append(s)
            for mid, batch in touched.items():
                state["events"] += len(detectors[mid].on_samples(batch))
            if source.messages_total >= n:
                state["last"], state["cpu_last"] = time.perf_counter(), time.process_time()
                done.set()

    task = asyncio.create_task(source.run(Out()))
    await done.wait()
    if register_only:
        await asyncio.sleep(0.3)  # let the SUBACK arrive before leaving
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    state["count"] = source.messages_total
    state["decode_errors"] = sum(source.decode_errors.values())
    return state


def _role(args: argparse.Namespace) -> None:
    if args.role == "publish":
        _publish(args.port, args.messages, args.qos)
        return
    if args.role == "bare":
        result = _bare(args.port, args.messages, args.qos, args.register)
    else:
        if args.role == "agent-uvloop":
            import uvloop

            result = uvloop.run(_agent(args.port, args.messages, args.qos, args.register,
                                       f"bench-{args.role}"))
        else:
            result = asyncio.run(_agent(args.port, args.messages, args.qos, args.register,
                                        f"bench-{args.role}"))
    print(json.dumps(result))


# --------------------------------------------------------------------------- orchestration


def _run(role: str, port: int, n: int, qos: int, register: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--role", role, "--port", str(port), "--messages", str(n),
           "--qos", str(qos)] + (["--register"] if register else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--register", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        _role(args)
        return 0

    from protocols.mqtt.broker import MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        print("the mosquitto binary is not installed (apt-get install mosquitto)")
        return 2
    roles = ["bare", "agent-asyncio", "agent-uvloop"]
    n = args.messages
    rates: dict[str, list[float]] = {r: [] for r in roles}
    cpu_rates: dict[str, list[float]] = {r: [] for r in roles}
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoBroker(Path(tmp), max_queued_messages=n + 1000,
                                 extra_config="queue_qos0_messages true\n"
                                              "max_queued_bytes 0")
        broker.start()
        try:
            for role in roles:
                _run(role, broker.port, n, args.qos, register=True)
            print(f"{n} messages per round (QoS {args.qos}, {MACHINES} machines, JSON "
                  f"status with 2 tags + reject messages), {args.rounds} rounds")
            for r in range(args.rounds):
                t0 = time.perf_counter()
                _run("publish", broker.port, n, args.qos)
                publish_s = time.perf_counter() - t0
                line = [f"round {r + 1}: published in {publish_s:.1f}s"]
                for role in roles:
                    res = _run(role, broker.port, n, args.qos)
                    if res.get("count", 0) < n or res.get("last") is None:
                        line.append(f"{role}: only {res.get('count')} of {n}")
                        continue
                    rate = n / (res["last"] - res["first"])
                    cpu_rate = n / max(1e-9, res["cpu_last"] - res["cpu_first"])
                    rates[role].append(rate)
                    cpu_rates[role].append(cpu_rate)
                    extra = (f", {res['samples']} samples, {res['events']} events"
                             if "events" in res else "")
                    line.append(f"{role} {rate:,.0f} msg/s ({cpu_rate:,.0f} per CPU-s{extra})")
                print("; ".join(line), flush=True)
        finally:
            broker.kill()
    print()
    bare = statistics.median(rates["bare"]) if rates["bare"] else float("nan")
    bare_cpu = statistics.median(cpu_rates["bare"]) if cpu_rates["bare"] else float("nan")
    print(f"{'subscriber':<16}{'median msg/s':>14}{'vs bare':>10}{'msg/CPU-s':>12}{'vs bare':>10}")
    for role in roles:
        if rates[role]:
            med, cpu = statistics.median(rates[role]), statistics.median(cpu_rates[role])
            print(f"{role:<16}{med:>14,.0f}{med / bare:>10.0%}{cpu:>12,.0f}"
                  f"{cpu / bare_cpu:>10.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
