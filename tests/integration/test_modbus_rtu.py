"""Modbus RTU against a real RTU device (modbus_tk's RtuServer) on a socat pty pair, directly
(transport serial) and through a socat RTU-over-TCP gateway (transport rtu-over-tcp)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import stop_task
from support.rtu_peer import (
    Gateway,
    NodeModbusDevice,
    PtyPair,
    RtuDevice,
    WatchingDevice,
    have_node_modbus,
    have_socat,
)

from agent.wiring.build import build_source
from config.errors import ConnectionLostError
from config.model import Quality, TagSample
from protocols.modbus.config import ModbusSourceConfig, ModbusTable
from protocols.modbus.line import ModbusLineSource
from protocols.modbus.transport import LineStats, RtuLine, UnitSilentError

# Subprocess peers (socat, node) and real timeouts: seconds per test.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_socat(), reason="socat is not installed")]

H = ModbusTable.HOLDING
TAGS = {
    "u1.state": {"unit_id": 1, "address": 0},
    "u1.count": {"unit_id": 1, "address": 2, "type": "uint32"},
    "u2.state": {"unit_id": 2, "address": 0},
    "u2.coil": {"unit_id": 2, "table": "coil", "address": 3, "type": "bool"},
    "u3.state": {"unit_id": 3, "address": 0},  # no device answers unit 3
}


class Rig:
    """One RTU line with its device, and for rtu-over-tcp a gateway in front of it.

    A fresh line per test: socat's gateway forks a child per connection that keeps reading
    the pty for a moment after its client hangs up, so a next client on the same pty could
    lose answers to it (as with two masters on one bus).
    """

    def __init__(self, transport: str, line: PtyPair, device: RtuDevice,
                 gateway: Gateway | None) -> None:
        self.transport, self.line, self.device, self.gateway = transport, line, device, gateway

    def config(self, tags: dict[str, Any] = TAGS, **kw: Any) -> ModbusSourceConfig:
        return config(self.transport, self.line, self.gateway, tags, **kw)


@pytest.fixture(params=["serial", "rtu-over-tcp"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    with PtyPair() as line, RtuDevice(line.device, [1, 2]) as dev:
        dev.set(1, 0, [7, 0, 0x0001, 0x0002])
        dev.set(2, 0, [9])
        dev.set(2, 3, [1], table="c")
        if request.param == "serial":
            yield Rig("serial", line, dev, None)
            return
        with Gateway(line.client) as gw:
            yield Rig("rtu-over-tcp", line, dev, gw)


def config(transport: str, line: PtyPair, gateway: Gateway | None, tags: dict[str, Any] = TAGS,
           **kw: Any) -> ModbusSourceConfig:
    where: dict[str, Any]
    if transport == "serial":
        where = {"serial": {"device": line.client, "baudrate": 115200, "parity": "none"}}
    else:
        assert gateway is not None
        where = {"host": "127.0.0.1", "port": gateway.port}
    return ModbusSourceConfig.model_validate({
        "type": "modbus", "transport": transport, **where, "poll_interval": "20ms",
        # Generous: a loaded CI machine must not turn a slow answer into a frame fault.
        "timeout": "400ms", "tags": tags, **kw})


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[TagSample]] = []
        self.connects = 0

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.batches.append(list(samples))

    def connected(self) -> None:
        self.connects += 1

    def by_tag(self, batch: int = -1) -> dict[str, TagSample]:
        return {s.tag: s for s in self.batches[batch]}


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def collect(source: ModbusLineSource, batches: int) -> Collector:
    """Run ``source`` until it delivered ``batches`` batches of samples, then cancel it."""
    out = Collector()
    task = asyncio.create_task(source.run(out))
    try:
        await wait_until(lambda: len(out.batches) >= batches)
    finally:
        await stop_task(task)
    return out


@contextlib.asynccontextmanager
async def opened(cfg: ModbusSourceConfig) -> AsyncIterator[RtuLine]:
    link = RtuLine(cfg, LineStats(cfg.where))
    await link.open()
    try:
        yield link
    finally:
        link.close()


async def test_three_units_one_silent(rig: Rig) -> None:
    source = build_source("rs485", rig.config())
    assert isinstance(source, ModbusLineSource)
    out = await collect(source, 3)
    assert out.connects == 1
    for batch in range(len(out.batches)):
        got = out.by_tag(batch)
        assert (got["u1.state"].value, got["u1.count"].value) == (7, 0x00010002)
        assert (got["u2.state"].value, got["u2.coil"].value) == (9, True)
        assert all(got[t].quality is Quality.GOOD for t in ("u1.state", "u1.count", "u2.state",
                                                            "u2.coil"))
        assert got["u3.state"].quality is Quality.BAD and got["u3.state"].value is None
        assert "unit 3" in (got["u3.state"].detail or "")
        assert "no answer" in (got["u3.state"].detail or "")
    units = source.status()["units"]
    assert units["3"]["faults"]["no_answer"] >= 3 and units["3"]["answers"] == 0
    # A unit silent in the last poll gets one attempt, not 1 + retries: polls stay short.
    assert units["3"]["requests"] <= len(out.batches) + 2
    for u in ("1", "2"):
        assert sum(units[u]["faults"].values()) == 0 and units[u]["answers"] >= 3


async def test_requests_never_overlap_on_one_line(rig: Rig) -> None:
    """Many callers at once (say a poll and a probe): the line serialises them, so no answer
    collides with another request and every value is right."""
    async with opened(rig.config()) as link:
        results = await asyncio.gather(*(link.read(1 + k % 2, H, 0, 1) for k in range(12)))
    assert results == [[7], [9]] * 6
    assert all(sum(st.faults.values()) == 0 for st in link.stats.units.values())


@pytest.mark.parametrize("fault", ["crc", "data", "garbage", "truncate"])
async def test_frame_fault_counted_logged_once_and_line_recovers(
        rig: Rig, fault: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="protocols.modbus.transport")
    async with opened(rig.config(retries=0)) as link:
        rig.device.inject(1, fault, times=2)
        outcomes: list[Any] = []
        for _ in range(2):
            try:
                outcomes.append(await link.read(1, H, 0, 4))
            except UnitSilentError as exc:
                outcomes.append(str(exc))
        # The line recovers by itself: the next requests of both units are answered.
        assert await link.read(1, H, 0, 4) == [7, 0, 1, 2]
        assert await link.read(2, H, 0, 1) == [9]
    counts = link.stats.unit(1).faults
    kind = {"crc": "crc_error", "data": "crc_error", "garbage": "garbage",
            "truncate": "truncated"}[fault]
    assert counts[kind] == 2
    assert sum(counts.values()) == 2
    assert sum(link.stats.unit(2).faults.values()) == 0
    if fault == "garbage":
        # Noise before a good frame is skipped: the value is read, and it is the right one.
        assert outcomes == [[7, 0, 1, 2]] * 2
    else:
        # Never a wrong value: a damaged frame makes the read fail, nothing else.
        assert all(isinstance(o, str) and "unit 1" in o for o in outcomes)
    warnings = [r for r in caplog.records if "unit 1" in r.getMessage()]
    assert len(warnings) == 1


async def test_retry_hides_a_single_fault(rig: Rig) -> None:
    async with opened(rig.config(retries=1)) as link:
        rig.device.inject(2, "crc")
        assert await link.read(2, H, 0, 1) == [9]
    assert link.stats.unit(2).faults["crc_error"] == 1


async def test_gateway_gone_ends_the_session() -> None:
    with PtyPair() as line, RtuDevice(line.device, [1]), Gateway(line.client) as gw:
        cfg = config("rtu-over-tcp", line, gw)
        out = Collector()
        task = asyncio.create_task(ModbusLineSource("gw", cfg).run(out))
        await wait_until(lambda: len(out.batches) >= 1)
    # socat stopped: the socket closes and the session ends (the supervisor reconnects).
    with pytest.raises(ConnectionLostError):
        await asyncio.wait_for(task, 5)


async def test_missing_serial_port_is_a_clear_connection_error() -> None:
    cfg = ModbusSourceConfig.model_validate({
        "type": "modbus", "transport": "serial", "serial": {"device": "/dev/nonexistent-tty"},
        "tags": {"a": {"address": 0}}})
    with pytest.raises(ConnectionLostError, match="/dev/nonexistent-tty"):
        await ModbusLineSource("x", cfg).probe()


async def test_probe_reports_each_unit_and_its_frame_errors(rig: Rig) -> None:
    from agent.probe import ProbeResult, format_results

    source = build_source("rs485", rig.config())
    rig.device.inject(2, "crc")
    samples = await source.probe()
    report = source.probe_report()  # type: ignore[attr-defined]
    text = format_results([ProbeResult("rs485", samples, report=report)])
    assert [s.tag for s in samples if s.good] == ["u1.state", "u1.count", "u2.state", "u2.coil"]
    assert report[0].startswith("unit 1: answers;") and "frame errors: none" in report[0]
    assert report[1].startswith("unit 2: answers;") and "crc_error x1" in report[1]
    assert report[2].startswith("unit 3: SILENT;") and "no_answer x2" in report[2]
    assert "unit 3: SILENT" in text and "u3.state" in text


async def test_serial_port_gone_ends_the_session() -> None:
    """The adapter disappears (here: the pty pair's socat is killed): the session ends with
    a connection error, so the supervisor reconnects with backoff."""
    with PtyPair() as line, RtuDevice(line.device, [1]):
        cfg = config("serial", line, None)
        out = Collector()
        task = asyncio.create_task(ModbusLineSource("rs485", cfg).run(out))
        await wait_until(lambda: len(out.batches) >= 1)
        assert line._proc is not None
        line._proc.kill()
        with pytest.raises(ConnectionLostError, match="serial port"):
            await asyncio.wait_for(task, 5)


async def test_runtime_status_shows_per_unit_counters(tmp_path: Path) -> None:
    from agent.runtime import Runtime
    from agent.wiring.load import load_config_text

    with PtyPair() as line, RtuDevice(line.device, [1, 2]):
        cfg = load_config_text(f"""
agent: {{id: edge-rtu, site: s, data_dir: "{tmp_path}", stop_timeout: 2s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  rs485:
    type: modbus
    transport: serial
    serial: {{device: "{line.client}", baudrate: 115200, parity: none}}
    poll_interval: 50ms
    timeout: 400ms
    tags:
      a.state: {{unit_id: 1, address: 0}}
      b.state: {{unit_id: 2, address: 0}}
      c.state: {{unit_id: 3, address: 0}}
machines:
  a: {{line: l1, state: {{tag: a.state, map: {{0: running, 3: down}}}}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:9/events"}}
""", "<test>")
        rt = Runtime(cfg)
        await rt.start()
        try:
            await wait_until(lambda: rt.detectors["a"].state.value == "running")
            status = (await rt.status())["sources"]["rs485"]
        finally:
            await rt.stop()
    units = status["detail"]["units"]
    assert status["detail"]["transport"] == "serial"
    assert units["1"]["answers"] >= 1 and units["2"]["answers"] >= 1
    assert units["3"]["silent"] is True and units["3"]["faults"]["no_answer"] >= 1
    assert set(status["bad_tags"]) == {"c.state"}


@pytest.mark.skipif(not have_node_modbus(), reason="tests/support/node_modbus/node_modules "
                    "is needed (.ci/run installs it)")
@pytest.mark.parametrize("transport", ["serial", "rtu-over-tcp"])
async def test_three_units_one_silent_on_npm_modbus_serial(transport: str) -> None:
    """The same line against a second device implementation (npm modbus-serial)."""
    tags = {"u1.a": {"unit_id": 1, "address": 0}, "u1.b": {"unit_id": 1, "address": 5},
            "u2.a": {"unit_id": 2, "address": 1, "type": "uint32"},
            "u2.c": {"unit_id": 2, "table": "coil", "address": 3, "type": "bool"},
            "u3.a": {"unit_id": 3, "address": 0}}
    with PtyPair() as line, NodeModbusDevice(line.device, [1, 2]), \
            contextlib.ExitStack() as stack:
        gw = stack.enter_context(Gateway(line.client)) if transport == "rtu-over-tcp" else None
        cfg = config(transport, line, gw, tags, timeout="500ms")
        source = ModbusLineSource("rs485", cfg)
        out = await collect(source, 2)
    got = out.by_tag()
    assert (got["u1.a"].value, got["u1.b"].value) == (100, 105)
    assert got["u2.a"].value == (201 << 16) + 202 and got["u2.c"].value is True
    assert got["u3.a"].quality is Quality.BAD and "unit 3" in (got["u3.a"].detail or "")
    units = source.status()["units"]
    assert sum(units["1"]["faults"].values()) == sum(units["2"]["faults"].values()) == 0


async def test_an_adapter_echoing_the_request_is_neither_an_answer_nor_a_fault(
        rig: Rig) -> None:
    async with opened(rig.config(retries=0)) as link:
        rig.device.inject(1, "echo", times=3)
        values = [await link.read(1, H, 0, 4) for _ in range(3)]
    assert values == [[7, 0, 1, 2]] * 3
    assert sum(link.stats.unit(1).faults.values()) == 0


@pytest.mark.parametrize(("baudrate", "gap"), [(9600, 3.5 * 11 / 9600), (115200, 0.00175)])
async def test_one_request_at_a_time_and_the_inter_frame_gap_under_load(
        baudrate: int, gap: float) -> None:
    """Polls and direct reads of three units (one silent) hammer one line at once: the device
    never sees a request while another is unanswered, and before every request the line was
    quiet for 3.5 character times (8N2 at 9600 baud: 4.0 ms), or 1.75 ms above 19,200 baud."""
    tags = {f"u{u}.{k}": {"unit_id": u, "address": k} for u in (1, 2, 3) for k in (0, 1)}
    with PtyPair() as line, WatchingDevice(line.device, [1, 2]) as dev:
        cfg = ModbusSourceConfig.model_validate({
            "type": "modbus", "transport": "serial", "timeout": "100ms", "retries": 0,
            "serial": {"device": line.client, "baudrate": baudrate, "parity": "none",
                       "stop_bits": 2}, "tags": tags})
        source = ModbusLineSource("rs485", cfg)
        async with opened(cfg) as link:
            results: list[Any] = await asyncio.gather(
                *(source.poll(link) for _ in range(3)),
                *(link.read(1 + k % 2, H, k, 1) for k in range(12)))
    for batch in results[:3]:
        got = {s.tag: s for s in batch}
        assert [got[f"u{u}.{k}"].value for u in (1, 2) for k in (0, 1)] == [100, 101, 200, 201]
        assert got["u3.0"].quality is Quality.BAD
    assert results[3:] == [[(1 + k % 2) * 100 + k] for k in range(12)]
    assert dev.requests >= 3 * 3 + 12
    assert dev.overlaps == 0
    assert min(dev.gaps) >= gap, sorted(dev.gaps)[:5]


def test_probe_json_carries_the_per_unit_report(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`edge-agent probe --json` gives the same per-unit answers and frame errors as the
    table (a commissioning script reads those)."""
    import json

    from agent.cli import main

    with PtyPair() as line, RtuDevice(line.device, [1]):
        path = tmp_path / "agent.yaml"
        path.write_text(f"""
agent: {{id: e, site: s}}
sources:
  rs485:
    type: modbus
    transport: serial
    serial: {{device: "{line.client}", baudrate: 115200, parity: none}}
    timeout: 200ms
    tags:
      a: {{unit_id: 1, address: 0}}
      b: {{unit_id: 4, address: 0}}
""", encoding="utf-8")
        assert main(["probe", "--config", str(path), "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["report"][0].startswith("unit 1: answers;")
    assert result["report"][1].startswith("unit 4: SILENT;")


async def test_a_long_answer_at_a_low_baud_rate_is_not_cut_off() -> None:
    """20 registers at 1200 baud 8N1 take 45 x 8.3 ms = 0.38 s on the wire: more than a
    timeout of 0.2 s, which is the device's time to answer, not the line's."""
    with PtyPair() as line, WatchingDevice(line.device, [1], char_time=10 / 1200) as dev:
        cfg = ModbusSourceConfig.model_validate({
            "type": "modbus", "transport": "serial", "timeout": "200ms", "retries": 0,
            "serial": {"device": line.client, "baudrate": 1200, "parity": "none"},
            "tags": {"a": {"unit_id": 1, "address": 0}}})
        async with opened(cfg) as link:
            assert await link.read(1, H, 0, 20) == [100 + k for k in range(20)]
    assert dev.requests == 1
