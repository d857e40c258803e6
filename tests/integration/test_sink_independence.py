"""Two sinks, one down: the other keeps delivering everything, and when the buffer fills, the
data gap events say that the down sink, and only it, lost what (real Mosquitto; the NATS
sink's server is simply not there)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until
from support.brokers import MqttConsumer
from support.events import check_event
from support.mosquitto import MosquittoBroker, needs_mosquitto

from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from config.model import Quality, TagSample, utcnow

pytestmark = [needs_mosquitto, pytest.mark.slow]


def config(tmp: Path, broker_url: str) -> Any:
    return load_config_text(f"""
agent: {{id: a1, site: s1, data_dir: "{tmp}", stop_timeout: 2s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {free_port()},
         tags: {{st: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: st, map: {{1: running, 3: down}}}}}}
sinks:
  uns: {{type: mqtt, url: "{broker_url}", batch_max_events: 200,
         retry: {{initial_backoff: 20ms, max_backoff: 200ms}}}}
  stream: {{type: nats, servers: ["nats://127.0.0.1:{free_port()}"], connect_timeout: 1s,
            retry: {{initial_backoff: 50ms, max_backoff: 500ms}}}}
buffer: {{commit_interval: 5ms, max_size: 256KiB}}
""", "<test>")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", max_queued_messages=100_000)
    b.start()
    yield b
    b.kill()


async def test_one_sink_down_the_other_delivers_and_drops_are_attributed(
        tmp_path: Path, broker: MosquittoBroker) -> None:
    consumer = MqttConsumer(broker.port)
    rt = Runtime(config(tmp_path / "agent", broker.url))
    await rt.start()
    try:
        t0 = utcnow()
        sent = 0
        for burst in range(30):  # 30 bursts of 40 state changes: ~1,200 events, ~600 KB
            for _ in range(40):
                rt.on_samples("plc", [TagSample("st", 3 if sent % 2 == 0 else 1,
                                                Quality.GOOD, t0 + timedelta(seconds=sent))])
                sent += 1
            detected = rt.events_detected
            await wait_until(lambda d=detected: consumer.distinct() >= _machine_events(d),
                             timeout=15, what=f"uns caught up after burst {burst}")
        await wait_until(lambda: _gaps(consumer), timeout=10, what="a data gap at uns")
        # Commit until a commit drops nothing more (each gap report is itself an event).
        stream_pending = await rt.buffer.pending("stream", limit=100_000)
        for _ in range(20):
            await rt.flush()
            before, stream_pending = stream_pending, await rt.buffer.pending("stream",
                                                                            limit=100_000)
            if [r.id for r in before] == [r.id for r in stream_pending] \
                    and rt.committer.uncommitted == 0:
                break
        status = await rt.status()
        detected_total = _machine_events(rt.events_detected)
    finally:
        await rt.stop()
        consumer.close()
    # The sink that was up got every event the machine produced, in order.
    machine_ids = {i for i, src, _ in consumer.copies.items if "/machines/" in src}
    assert len(machine_ids) == detected_total
    assert consumer.copies.order_violations() == []
    # Nobody told uns it lost anything: it did not. The reports follow the event contract.
    assert all(set(g["dropped_by_sink"]) == {"stream"} for g in _gaps(consumer))
    assert [p for raw in consumer.raw_of_type("plantedge.data.gap")
            for p in check_event(json.loads(raw))] == []
    # From the down sink's own view: the gap reports still waiting for it account exactly
    # for every machine event it lost (a report it lost itself is carried into a later one).
    lost: Counter[str] = Counter()
    for row in stream_pending:
        if row.type == "plantedge.data.gap":
            lost.update(json.loads(row.payload)["data"]["dropped_by_sink"]["stream"])
    machine_lost = sum(n for t, n in lost.items() if t != "plantedge.data.gap")
    still = sum(1 for r in stream_pending if r.type != "plantedge.data.gap")
    assert machine_lost > 0
    assert machine_lost + still == detected_total
    # /status shows both sinks with their own state.
    assert status["sinks"]["uns"]["state"] in ("idle", "delivering")
    assert status["sinks"]["stream"]["state"] == "retrying"
    assert "cannot connect to NATS" in status["sinks"]["stream"]["last_error"]
    assert status["sinks"]["uns"]["type"] == "mqtt" and status["sinks"]["stream"]["type"] == "nats"


def _machine_events(detected: dict[str, int]) -> int:
    return sum(n for t, n in detected.items() if t != "plantedge.data.gap")


def _gaps(consumer: MqttConsumer) -> list[dict[str, Any]]:
    return [json.loads(p)["data"] for p in consumer.raw_of_type("plantedge.data.gap")]
