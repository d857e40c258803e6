"""While the buffer cannot commit, the MQTT source stops reading instead of acknowledging QoS 1
messages into memory (issue 11, #1); once commits work again every message is taken, once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until
from support.mosquitto import MosquittoBroker, Publisher, needs_mosquitto

import protocols.mqtt.source as mqtt_source
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from config.errors import StorageFullError

pytestmark = needs_mosquitto

REJECT = "p/l1/m1/reject"


async def test_reading_pauses_while_commits_fail_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_source, "_MAX_OUTSTANDING", 10)
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    rt = Runtime(load_config_text(f"""
agent: {{id: bp, site: s1, data_dir: "{tmp_path / 'data'}", stop_timeout: 2s}}
sources:
  broker:
    type: mqtt
    url: {broker.url}
    client_id: bp-1
    backoff: {{initial: 50ms, max: 300ms}}
    tags:
      m1.state: {{topic: p/l1/m1/status, value: $.state, qos: 1}}
      m1.reject: {{topic: {REJECT}, value: $.qty, value_type: number, qos: 1}}
machines:
  m1: {{line: l1, state: {{tag: m1.state, map: {{RUNNING: running}}}},
        scrap: {{quantity_tag: m1.reject, window: 100ms}}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:{free_port()}/events"}}
buffer: {{commit_interval: 5ms}}
""", "<test>"))
    full = True
    failed = [0]
    real_append = rt.buffer.append

    async def append(rows: Any, states: Any) -> Any:
        if full:
            failed[0] += 1
            raise StorageFullError("database or disk is full")
        return await real_append(rows, states)

    monkeypatch.setattr(rt.buffer, "append", append)
    await rt.start()
    pub = Publisher(broker.port)
    try:
        info = rt.sources["broker"]
        source = info.source
        assert isinstance(source, mqtt_source.MqttSource)
        await wait_until(lambda: info.supervisor.state == "up", what="connected")
        await wait_until(lambda: source.subscriptions and source._conn is not None
                         and not source._conn._pending_subs, what="subscribed")
        for _ in range(60):
            pub.publish(REJECT, json.dumps({"qty": 1}))
        await wait_until(lambda: source._conn is not None and source._conn.paused,
                         what="reading paused")
        await wait_until(lambda: rt.storage_full, what="commits failing")
        taken = info.samples_total
        # Several failed commits later, still nothing more was read (nor acknowledged).
        seen = failed[0]
        await wait_until(lambda: failed[0] >= seen + 3, what="three more failed commits")
        assert taken <= 10, f"{taken} messages read while commits failed (cap 10)"
        assert info.samples_total == taken
        full = False
        await wait_until(lambda: info.samples_total == 60, timeout=10,
                         what="every message read once commits work")
        await wait_until(lambda: source.outstanding == 0, what="all acknowledged")
        assert source._conn is not None and not source._conn.paused
        assert source.redeliveries_skipped == 0
    finally:
        pub.close()
        await rt.stop()
        broker.kill()
