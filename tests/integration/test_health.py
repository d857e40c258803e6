"""The health endpoint over real sockets: Modbus simulator -> runtime -> receiver, and an
HTTP client asking /healthz, /readyz, /status and /metrics while things break."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import free_port, wait_until
from support.configs import http_sink_yaml, modbus_agent_yaml

from agent import __version__
from agent.health import HealthServer
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import config_hash, load_config_text
from agent.wiring.schema import Config
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})


def make_config(tmp: Path, plc_port: int, sink_url: str, health: str = "") -> Config:
    text = modbus_agent_yaml("health-edge", tmp / "agent", plc_port,
                             health=f'{{listen: "127.0.0.1:0"{health}}}') + """\
    timeout: 300ms
    stale_after: 600ms
    backoff: {initial: 50ms, max: 200ms}
    tags:
      m.state: {table: holding, address: 0, type: uint16}
machines:
  m1:
    line: l1
    state: {tag: m.state, map: {1: running, 3: down}}
""" + http_sink_yaml(sink_url)
    return load_config_text(text, "<test>")


@pytest.fixture
async def plc() -> AsyncIterator[ModbusSimulator]:
    sim = ModbusSimulator(size=16)
    await sim.start()
    await sim.set_value(STATE, 1)
    yield sim
    await sim.stop()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    yield rx
    await rx.aclose()


class Agent:
    """A started runtime with its health server and an HTTP client pointed at it."""

    def __init__(self, config: Config) -> None:
        self.rt = Runtime(config, config_hash=config_hash(config))
        self.health = HealthServer(self.rt, config.health.listen)
        self.http = httpx.AsyncClient(timeout=5)
        self.base = ""

    async def __aenter__(self) -> Agent:
        await self.rt.start()
        self.base = f"http://127.0.0.1:{await self.health.start()}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.health.aclose()
        await self.rt.stop()

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(self.base + path)

    async def reasons(self) -> list[str]:
        r = await self.get("/readyz")
        return [] if r.status_code == 200 else list(r.json()["reasons"])

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = await self.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


async def test_ready_status_and_metrics_on_a_working_agent(
        tmp_path: Path, plc: ModbusSimulator, receiver: Receiver) -> None:
    assert plc.port is not None
    async with Agent(make_config(tmp_path, plc.port, receiver.url)) as a:
        assert (await a.get("/healthz")).json() == {"status": "ok"}
        assert await wait_until(lambda: _ready(a), what="ready")
        # A downtime episode: detected, buffered, delivered; every counter moves.
        await plc.set_value(STATE, 3)
        await wait_until(lambda: receiver.stats()["received"] >= 1, what="delivery")
        await wait_until(lambda: a.rt.forwarders["central"].delivered_total >= 1, what="settle")

        st = (await a.get("/status")).json()
        assert st["version"] == __version__ and st["ready"] is True
        assert st["readiness_reasons"] == []
        assert st["config_hash"] == config_hash(a.rt.config) and len(st["config_hash"]) == 64
        assert st["uptime_s"] >= 0 and st["clock"]["state"] == "steady"
        assert st["disk"]["free_bytes"] > 0 and st["disk"]["total_bytes"] >= st["disk"][
            "free_bytes"]
        assert st["sources"]["plc"]["state"] == "up"

        m = await a.metrics()
        assert m[("edge_agent_samples_received_total", (("source", "plc"),))] >= 1
        assert m[("edge_agent_source_up", (("source", "plc"),))] == 1
        assert m[("edge_agent_events_detected_total",
                  (("machine", "m1"), ("type", "downtime.started")))] == 1
        assert m[("edge_agent_events_delivered_total", (("sink", "central"),))] >= 1
        assert m[("edge_agent_events_dead_lettered_total", (("sink", "central"),))] == 0
        assert m[("edge_agent_delivery_duration_seconds_count", (("sink", "central"),))] >= 1
        delayed = m[("edge_agent_event_delivery_delay_seconds_count", (("sink", "central"),))]
        assert delayed >= 1  # every accepted event is observed once
        assert m[("edge_agent_event_delivery_delay_seconds_sum", (("sink", "central"),))] < 60
        assert m[("edge_agent_delivery_attempts_total",
                  (("sink", "central"), ("type", "accepted")))] >= 1
        assert m[("edge_agent_sink_held", (("sink", "central"),))] == 0
        assert ("edge_agent_buffer_pending_events", (("sink", "central"),)) in m
        assert m[("edge_agent_ready", ())] == 1
        assert m[("edge_agent_disk_free_bytes", ())] > 0
        # Rule 9: every label is one of the bounded set (state: the MachineState enum), except
        # build_info's fixed version labels.
        assert {k for name, labels in m for k, _ in labels
                if name != "edge_agent_build_info"} <= {"source", "machine", "sink", "type",
                                                         "le", "state"}
        assert (await a.get("/nope")).status_code == 404


async def _ready(a: Agent) -> bool:
    return (await a.get("/readyz")).status_code == 200


async def test_readiness_reports_held_sink_and_stale_source_then_recovers(
        tmp_path: Path, plc: ModbusSimulator, receiver: Receiver) -> None:
    assert plc.port is not None
    async with Agent(make_config(tmp_path, plc.port, receiver.url)) as a:
        await wait_until(lambda: _ready(a), what="ready")
        receiver.faults.require_token = "not-what-we-send"
        await plc.set_value(STATE, 3)

        async def held() -> list[str]:
            return [r for r in await a.reasons() if "sink central is held" in r]

        assert await wait_until(held, what="held sink reported")
        m = await a.metrics()
        assert m[("edge_agent_sink_held", (("sink", "central"),))] == 1
        assert m[("edge_agent_ready", ())] == 0

        await plc.stop()  # the PLC goes away: past its 600ms stale limit the source is stale

        async def stale() -> list[str]:
            return [r for r in await a.reasons() if r.startswith("source plc is stale")]

        assert await wait_until(stale, what="stale source reported")
        r = await a.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "not ready"
        assert len(r.json()["reasons"]) >= 2  # every reason, not just the first

        receiver.faults.require_token = None
        await plc.start()
        await plc.set_value(STATE, 1)
        await wait_until(lambda: _ready(a), timeout=15, what="ready again")
        assert receiver.stats()["received"] >= 1  # nothing was dropped while held


async def test_thresholds_disk_capacity_and_pending_age(
        tmp_path: Path, plc: ModbusSimulator) -> None:
    assert plc.port is not None
    dead_url = f"http://127.0.0.1:{free_port()}/events"  # nobody listens: events pile up
    health = (", min_disk_free: 1000000TiB, buffer_full_ratio: 0.000001,"
              " max_pending_age: 200ms")
    async with Agent(make_config(tmp_path, plc.port, dead_url, health)) as a:
        await plc.set_value(STATE, 3)
        await wait_until(lambda: sum(a.rt.events_detected.values()) >= 1, what="detected")

        async def all_three() -> list[str] | None:
            reasons = await a.reasons()
            wanted = ("disk headroom low", "buffer near capacity", "sink central falls behind")
            return reasons if all(any(r.startswith(w) for r in reasons) for w in wanted) \
                else None

        reasons = await wait_until(all_three, what="three threshold reasons")
        assert any("(limit 0.2s)" in r for r in reasons)
        st = (await a.get("/status")).json()
        assert st["ready"] is False and st["readiness_reasons"]


async def test_healthz_fails_when_the_loop_stops_ticking(tmp_path: Path) -> None:
    class Stalled:
        """Only what /healthz reads: the ticker last ran 30 s ago."""

        last_tick_mono = time.monotonic() - 30

    server = HealthServer(Stalled(), "127.0.0.1:0")  # type: ignore[arg-type]
    port = await server.start()
    try:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{port}/healthz")
            assert r.status_code == 503 and r.json()["status"] == "stalled"
            assert (await http.post(f"http://127.0.0.1:{port}/healthz")).status_code == 405
    finally:
        await server.aclose()


async def test_status_command_prints_a_readable_table(
        tmp_path: Path, plc: ModbusSimulator, receiver: Receiver) -> None:
    from agent.status_cli import format_status, health_url

    assert plc.port is not None
    async with Agent(make_config(tmp_path, plc.port, receiver.url)) as a:
        await wait_until(lambda: _ready(a), what="ready")
        await plc.set_value(STATE, 3)
        await wait_until(lambda: a.rt.detectors["m1"].episode is not None, what="down")
        doc = (await a.get("/status")).json()
    text = format_status(doc)
    lines = text.splitlines()
    assert lines[0] == "agent health-edge at site s1: READY"
    assert f"version {__version__}" in lines[1] and doc["config_hash"][:12] in lines[1]
    for section in ("SOURCES", "MACHINES", "SINKS"):
        assert section in lines
    machine = next(line for line in lines if line.strip().startswith("m1 "))
    assert "down" in machine and "unplanned since" in machine
    assert any(line.strip().startswith("plc ") and " up " in line for line in lines)
    # Where `edge-agent status` looks: --url, else the config's health.listen, else default.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("health: {listen: '0.0.0.0:9911'}\nagent: {id: x}\n")
    assert health_url(cfg, None) == "http://127.0.0.1:9911"
    assert health_url(cfg, "http://h:1/") == "http://h:1"
    assert health_url(None, None) == "http://127.0.0.1:9780"
