"""The mqtt and nats sink configs (clear errors where they are wrong) and event addressing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from agent.sinks.addressing import address_of, event_type_of, render
from agent.sinks.base import OutboundEvent
from agent.sinks.config import MqttSinkConfig, NatsSinkConfig, SinkConfig
from agent.sinks.mqtt import _EventProperties
from agent.wiring.build import build_sink

SINK = TypeAdapter(SinkConfig)


def errors(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        SINK.validate_python(doc)
    return str(info.value)


def test_mqtt_defaults_and_url_parts() -> None:
    cfg = SINK.validate_python({"type": "mqtt", "url": "mqtts://broker.plant:8884"})
    assert isinstance(cfg, MqttSinkConfig)
    assert (cfg.host, cfg.port, cfg.use_tls) == ("broker.plant", 8884, True)
    assert cfg.topic == "{site}/{line}/{machine}/events/{type}" and cfg.protocol == "5"
    plain = SINK.validate_python({"type": "mqtt", "url": "mqtt://10.0.0.5"})
    assert isinstance(plain, MqttSinkConfig) and plain.port == 1883 and not plain.use_tls
    sink = build_sink("uns", plain, "plant-a-edge-01")
    assert sink.client_id == "plant-a-edge-01-uns"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("doc", "message"), [
    ({"type": "mqtt", "url": "http://broker"}, "is not mqtt://host[:port]"),
    ({"type": "mqtt", "url": "mqtt://b", "topic": "{site}/{cell}/x"},
     "unknown placeholder '{cell}'"),
    ({"type": "mqtt", "url": "mqtt://b", "topic": "{site}/#"}, "wildcards"),
    ({"type": "mqtt", "url": "mqtt://b", "protocol": "4"}, "protocol"),
    ({"type": "nats", "servers": ["mqtt://x"]}, "is not nats://host[:port] or tls://host"),
    ({"type": "nats", "servers": []}, "servers"),
    ({"type": "nats", "servers": ["nats://x"], "subject": "a..b"}, "empty token"),
    ({"type": "nats", "servers": ["nats://x"], "subject": "plantedge.>"}, "wildcards"),
    ({"type": "nats", "servers": ["nats://x"], "token": "t", "username": "u",
      "password": "p"}, "not token and username"),
    ({"type": "nats", "servers": ["nats://x"], "username": "u"}, "go together"),
    ({"type": "kafka", "brokers": ["k:9092"]}, "does not match any of the expected tags"),
])
def test_bad_broker_sink_configs_say_what_is_wrong(doc: dict[str, Any], message: str) -> None:
    assert message in errors(doc)


def test_nats_defaults() -> None:
    cfg = SINK.validate_python({"type": "nats", "servers": ["tls://n1:4222", "nats://n2"]})
    assert isinstance(cfg, NatsSinkConfig)
    assert cfg.subject == "plantedge.{site}.{line}.{machine}.{type}" and cfg.stream is None


def _event(source: str, type_: str) -> OutboundEvent:
    payload = json.dumps({"data": {"type": "nested-not-this"}, "id": "e1", "source": source,
                          "specversion": "1.0", "type": type_}, separators=(",", ":"),
                         sort_keys=True)
    return OutboundEvent("e1", source, payload)


def test_addressing_machine_and_agent_events() -> None:
    machine = _event("/sites/plant-a/lines/line-1/machines/filler-1", "plantedge.downtime.started")
    assert event_type_of(machine.payload) == "plantedge.downtime.started"
    addr = address_of(machine, "edge-1")
    assert render("{site}/{line}/{machine}/events/{type}", addr) == \
        "plant-a/line-1/filler-1/events/downtime.started"
    agent = _event("/sites/plant-a/agents/edge-1", "plantedge.data.gap")
    assert render("{site}/{line}/{machine}/events/{type}", address_of(agent, "x")) == \
        "plant-a/_agent/edge-1/events/data.gap"
    # Not the agent's own compact serialisation: parsed instead of scanned.
    loose = OutboundEvent("e2", "/elsewhere", '{ "type" : "plantedge.scrap.recorded" , "a": 1}')
    assert address_of(loose, "x").type == "scrap.recorded"
    assert address_of(loose, "x").site == "_unknown"


def test_packed_mqtt5_properties_match_paho() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    reference = Properties(PacketTypes.PUBLISH)
    reference.ContentType = "application/cloudevents+json"
    reference.UserProperty = [("id", "0b5f6c1e-8d1a-5c3e-9a57-2f0d6e4b1c77")]
    assert _EventProperties("0b5f6c1e-8d1a-5c3e-9a57-2f0d6e4b1c77").pack() == reference.pack()
