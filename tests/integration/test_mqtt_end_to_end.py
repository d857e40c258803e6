"""Mosquitto -> agent (Runtime) -> reference receiver: JSON state and reject messages become
downtime and scrap events; a broker killed mid-stream is reconnected to and resubscribed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import wait_until
from support.configs import http_sink_yaml
from support.mosquitto import MosquittoBroker, Publisher, needs_mosquitto

from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from agent.wiring.schema import Config

pytestmark = needs_mosquitto


def make_config(tmp: Path, broker_url: str, sink_url: str) -> Config:
    text = f"""
agent: {{id: test-edge, site: plant-t, data_dir: "{tmp / 'agent'}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  line2-broker:
    type: mqtt
    url: {broker_url}
    client_id: test-edge-line2
    protocol: 5
    keep_alive: 5s
    backoff: {{initial: 50ms, max: 300ms}}
    tags:
      oven.state: {{topic: plant-t/line2/oven/status, value: $.state, qos: 1}}
      oven.reject: {{topic: plant-t/line2/oven/reject, value: $.qty, value_type: number,
                    qos: 1}}
machines:
  oven-2:
    line: line-2
    state: {{tag: oven.state, map: {{RUNNING: running, STOPPED: down, MAINT: planned}}}}
    downtime: {{min_duration: 100ms}}
    scrap: {{quantity_tag: oven.reject, window: 1s}}
""" + http_sink_yaml(sink_url, max_backoff="500ms")
    return load_config_text(text, "<test>")


def of_type(events: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"plantedge.{suffix}"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


async def test_state_and_reject_messages_become_events_across_a_broker_restart(
        tmp_path: Path, broker: MosquittoBroker) -> None:
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    rt = Runtime(make_config(tmp_path, broker.url, receiver.url))
    pub = Publisher(broker.port)
    await rt.start()
    try:
        det = rt.detectors["oven-2"]
        sup = rt.sources["line2-broker"].supervisor
        assert sup._watchdog is None  # a quiet topic must not restart the session

        info = rt.sources["line2-broker"]

        async def until_subscribed(state: str) -> None:
            # Right after CONNACK the SUBSCRIBE may still be in flight: repeat an idempotent
            # state message until one arrives. Reject messages are then sent exactly once.
            for _ in range(50):
                seen = info.samples_total
                pub.publish("plant-t/line2/oven/status", json.dumps({"state": state}))
                try:
                    await wait_until(lambda seen=seen: info.samples_total > seen, timeout=0.2)
                    return
                except AssertionError:
                    continue
            raise AssertionError("the subscription never became live")

        await wait_until(lambda: sup.state == "up", what="connected")
        await until_subscribed("RUNNING")
        assert det.state.value == "running"
        pub.publish("plant-t/line2/oven/status", json.dumps({"state": "STOPPED"}))
        for qty in (2, 3):
            pub.publish("plant-t/line2/oven/reject", json.dumps({"qty": qty}))
        pub.publish("plant-t/line2/oven/reject", b"garbage")  # bad, counted, not scrap
        await wait_until(lambda: det.episode is not None and det.episode.announced,
                         what="downtime announced")

        # The broker dies mid-episode and comes back empty (no persistence): the agent must
        # reconnect and subscribe again by itself.
        pub.close()
        broker.kill()
        await wait_until(lambda: sup.state == "down", what="source down")
        broker.start()
        pub = Publisher(broker.port, client_id="test-publisher-2")
        await wait_until(lambda: sup.state == "up", timeout=15, what="source up again")
        await until_subscribed("STOPPED")
        pub.publish("plant-t/line2/oven/reject", json.dumps({"qty": 4}))
        pub.publish("plant-t/line2/oven/status", json.dumps({"state": "RUNNING"}))

        def done() -> bool:
            ev = receiver.events()
            return len(of_type(ev, "downtime.ended")) == 1 and receiver_total(receiver) >= 9

        await wait_until(done, timeout=15, what="ended + scrap delivered")
    finally:
        pub.close()
        await rt.stop()
    events = receiver.events()
    await receiver.aclose()
    started, ended = of_type(events, "downtime.started"), of_type(events, "downtime.ended")
    assert len(started) == 1 and len(ended) == 1
    assert started[0]["data"]["category"] == "unplanned"
    assert ended[0]["data"]["episode_id"] == started[0]["data"]["episode_id"]
    # Every reject message counted exactly once (2 + 3 before the restart, 4 after).
    assert sum(e["data"]["quantity"] for e in of_type(events, "scrap.recorded")) == 9
    # The broker loss made the state tag bad: the signal was lost and came back.
    assert len(of_type(events, "signal.lost")) >= 1
    assert ended[0]["data"]["had_signal_gap"] is True


def receiver_total(receiver: Receiver) -> float:
    return sum(e["data"]["quantity"] for e in of_type(receiver.events(), "scrap.recorded"))
