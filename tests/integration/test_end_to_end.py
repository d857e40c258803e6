"""Modbus PLC -> agent -> reference receiver, in one process over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until

from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from agent.wiring.schema import Config
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

TAGS = {
    "st": ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"}),
    "rsn": ModbusTag.model_validate({"table": "holding", "address": 1, "type": "uint16"}),
    "cnt": ModbusTag.model_validate({"table": "holding", "address": 2, "type": "uint32",
                                     "byte_order": "CDAB"}),
    "ord": ModbusTag.model_validate({"table": "holding", "address": 10, "type": "string",
                                     "length": 8}),
}


def make_config(tmp: Path, modbus_port: int, sink_url: str, **buffer: Any) -> Config:
    text = f"""
agent: {{id: test-edge, site: plant-t, data_dir: "{tmp / 'agent'}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    port: {modbus_port}
    poll_interval: 50ms
    timeout: 500ms
    backoff: {{initial: 50ms, max: 500ms}}
    tags:
      m.state: {{table: holding, address: 0, type: uint16}}
      m.reason: {{table: holding, address: 1, type: uint16}}
      m.scrap: {{table: holding, address: 2, type: uint32, byte_order: CDAB}}
      m.order: {{table: holding, address: 10, type: string, length: 8}}
machines:
  m1:
    line: l1
    state: {{tag: m.state, map: {{1: running, 3: down, 4: planned}}}}
    downtime: {{min_duration: 100ms, reason_tag: m.reason, reasons: {{5: Jam}}}}
    scrap: {{counter: m.scrap, window: 1s}}
    order_tag: m.order
sinks:
  central:
    type: http
    url: "{sink_url}"
    mode: batch
    batch_max_events: 20
    timeout: 2s
    retry: {{initial_backoff: 50ms, max_backoff: 500ms}}
buffer: {{commit_interval: 10ms}}
"""
    return load_config_text(text, "<test>")


@pytest.fixture
async def plc() -> AsyncIterator[ModbusSimulator]:
    sim = ModbusSimulator(size=64)
    await sim.start()
    yield sim
    await sim.stop()


def of_type(events: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"plantedge.{suffix}"]


async def test_downtime_and_scrap_across_rollover_arrive_once(
        tmp_path: Path, plc: ModbusSimulator) -> None:
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    port = plc.port
    assert port is not None
    rt = Runtime(make_config(tmp_path, port, receiver.url))
    await plc.set_value(TAGS["st"], 1)
    await plc.set_value(TAGS["ord"], "PO-77")
    await plc.set_value(TAGS["cnt"], 2**32 - 5)
    await rt.start()
    try:
        det = rt.detectors["m1"]
        await wait_until(lambda: det.state.value == "running" and det.counter_last == 2**32 - 5,
                         what="first poll")
        await plc.set_value(TAGS["st"], 3)
        await plc.set_value(TAGS["rsn"], 5)
        await plc.set_value(TAGS["cnt"], 2**32 - 2)
        await wait_until(lambda: det.counter_last == 2**32 - 2, what="counter seen")
        await plc.set_value(TAGS["cnt"], 3)  # rolls over: 2**32-2 -> 3 is +5
        await wait_until(lambda: det.episode is not None and det.episode.announced
                         and det.counter_last == 3, what="downtime announced")
        await plc.set_value(TAGS["st"], 1)

        def done() -> bool:
            ev = receiver.events()
            return (len(of_type(ev, "downtime.ended")) == 1
                    and sum(e["data"]["quantity"] for e in of_type(ev, "scrap.recorded")) >= 8)

        await wait_until(done, timeout=15, what="ended + scrap delivered")
    finally:
        await rt.stop()
    events = receiver.events()
    await receiver.aclose()
    started, ended = of_type(events, "downtime.started"), of_type(events, "downtime.ended")
    assert len(started) == 1 and len(ended) == 1
    assert started[0]["data"]["reason_code"] == "5" and started[0]["data"]["reason"] == "Jam"
    assert ended[0]["data"]["episode_id"] == started[0]["data"]["episode_id"]
    assert ended[0]["data"]["order_id"] == "PO-77"
    assert ended[0]["data"]["duration_seconds"] > 0
    scrap = of_type(events, "scrap.recorded")
    assert sum(e["data"]["quantity"] for e in scrap) == 8
    assert scrap[0]["data"]["counter_from"] == 2**32 - 5
    # Every CloudEvent has the contract's attributes; ids are unique; sequence increases.
    for e in events:
        assert e["specversion"] == "1.0" and e["source"] == "/sites/plant-t/lines/l1/machines/m1"
        assert e["agentid"] == "test-edge" and e["datacontenttype"] == "application/json"
    assert len({e["id"] for e in events}) == len(events)
    seqs = [int(e["sequence"]) for e in events]
    assert seqs == sorted(seqs) == list(range(1, len(events) + 1))


async def test_receiver_down_then_503s_then_back_delivers_everything_once(
        tmp_path: Path, plc: ModbusSimulator) -> None:
    rx_port = free_port()
    url = f"http://127.0.0.1:{rx_port}/events"
    port = plc.port
    assert port is not None
    rt = Runtime(make_config(tmp_path, port, url))
    await plc.set_value(TAGS["st"], 1)
    await rt.start()
    receiver = Receiver(tmp_path / "rx.db", port=rx_port)
    try:
        det = rt.detectors["m1"]
        await wait_until(lambda: det.state.value == "running", what="first poll")
        for n in range(3):  # three episodes while nobody listens
            await plc.set_value(TAGS["st"], 3 if n % 2 == 0 else 4)
            await wait_until(lambda: det.episode is not None and det.episode.announced,
                             what="episode announced")
            await plc.set_value(TAGS["st"], 1)
            await wait_until(lambda: det.episode is None, what="episode ended")
        await rt.flush()
        fw = rt.forwarders["central"]
        await wait_until(lambda: fw.status()["consecutive_failures"] >= 2,
                         what="delivery failing while the receiver is down")
        detected = sum(rt.events_detected.values())
        assert detected == 6
        receiver.inject(503, count=3, retry_after="0")
        await receiver.start()
        await wait_until(lambda: receiver.stats()["received"] >= detected, timeout=15,
                         what="backlog delivered")
        stats = await rt.buffer.stats()
        await wait_until(lambda: fw.status()["delivered_total"] >= detected, what="settled")
    finally:
        await rt.stop()
    assert receiver.stats() == {"received": 6, "duplicates": 0}
    events = receiver.events()
    await receiver.aclose()
    assert [e["type"].rsplit(".", 1)[1] for e in events] == ["started", "ended"] * 3
    assert stats.sinks["central"].dead_letters == 0
