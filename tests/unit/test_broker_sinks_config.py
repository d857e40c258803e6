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
    ({"type": "nats", "servers": ["nats://s3cret@n1:4222"]}, "carries credentials"),
    ({"type": "mqtt", "url": "mqtts://s3cret@broker:8883"}, "carries credentials"),
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


# --------------------------------------------------------------------------- addressing faults

NATS_CONFIG = """
agent: {id: AGENT, site: SITE, data_dir: /tmp/edge-nats-tokens}
sources:
  plc: {type: modbus, host: 127.0.0.1, tags: {st: {table: holding, address: 0, type: uint16}}}
machines:
  MACHINE: {line: LINE, state: {tag: st, map: {1: running}}}
sinks:
  stream: {type: nats, servers: ["nats://127.0.0.1:4222"]SUBJECT}
"""


def _nats_config(agent: str = "edge-1", site: str = "s1", machine: str = "m1",
                 line: str = "l1", subject: str = "") -> str:
    return (NATS_CONFIG.replace("AGENT", agent).replace("SITE", site)
            .replace("MACHINE", machine).replace("LINE", line).replace("SUBJECT", subject))


@pytest.mark.parametrize(("kw", "where", "what"), [
    ({"machine": "press.1"}, "machines.\"press.1\"", "machine id 'press.1'"),
    ({"machine": "press."}, "machines.\"press.\"", "machine id 'press.'"),
    ({"line": "l.1"}, "line", "line 'l.1'"),
    ({"site": "plant.a"}, "agent.site", "site 'plant.a'"),
    ({"agent": "edge.1"}, "agent.id", "agent id 'edge.1'"),  # its own events: machine = id
])
def test_an_id_with_a_dot_in_a_nats_subject_is_refused_where_it_is(
        kw: dict[str, str], where: str, what: str) -> None:
    from agent.wiring.load import load_config_text
    from config.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config_text(_nats_config(**kw), "plant.yaml")
    issues = [i for i in caught.value.issues if "splits a NATS subject token" in i.message]
    assert len(issues) == 1, caught.value.issues
    assert what in issues[0].message and "sink 'stream'" in issues[0].message
    assert where in issues[0].path and issues[0].line is not None


def test_a_dot_in_an_id_the_subject_does_not_use_is_fine() -> None:
    from agent.wiring.load import load_config_text

    config = load_config_text(_nats_config(machine="press.1", agent="edge.1",
                                           subject=', subject: "uns.{site}.{line}.{type}"'))
    assert "press.1" in config.machines
    http = _nats_config(machine="press.1").replace(
        '{type: nats, servers: ["nats://127.0.0.1:4222"]}', '{type: http, url: "http://x/e"}')
    assert "press.1" in load_config_text(http).machines  # MQTT and HTTP: a dot is just a dot


@pytest.mark.parametrize(("source", "type_", "kind", "word"), [
    ("/sites/s/lines/l/machines/m", "plantedge.x#", "mqtt", "type 'x#'"),
    ("/sites/s/lines/l/machines/m", "plantedge.a/b", "mqtt", "type 'a/b'"),
    ("/sites/s/lines/l+/machines/m", "plantedge.ok", "mqtt", "line 'l+'"),
    ("/sites/s/lines/l/machines/press.1", "plantedge.ok", "nats", "machine 'press.1'"),
    ("/sites/s/lines/l/machines/>", "plantedge.ok", "nats", "machine '>'"),
    ("/sites/s/lines/l/machines/m", "plantedge.x y", "nats", "type 'x y'"),
    ("/sites/s/lines/l/machines/m", "plantedge.x..y", "nats", "type 'x..y'"),
    ("/sites/s/lines/l/machines/m", "", "nats", "type 'unknown'"),
])
def test_a_foreign_event_that_would_widen_its_topic_is_unfit(
        source: str, type_: str, kind: str, word: str) -> None:
    from agent.sinks.addressing import unfit

    template = MqttSinkConfig.model_fields["topic"].default if kind == "mqtt" \
        else NatsSinkConfig.model_fields["subject"].default
    address = address_of(_event(source, type_), "edge-1")
    why = unfit(template, address, kind)
    if word == "type 'unknown'":  # no type at all: addressed as 'unknown', which is fine
        assert why is None
        return
    assert why is not None and word in why


def test_our_own_events_are_fit_for_both() -> None:
    from agent.sinks.addressing import unfit

    for source in ("/sites/plant-a/lines/line-1/machines/filler_1",
                   "/sites/plant-a/agents/edge-01"):
        address = address_of(_event(source, "plantedge.downtime.started"), "edge-01")
        assert unfit(MqttSinkConfig.model_fields["topic"].default, address, "mqtt") is None
        assert unfit(NatsSinkConfig.model_fields["subject"].default, address, "nats") is None


def test_a_credential_in_a_broker_url_is_refused_without_repeating_it() -> None:
    from agent.wiring.load import load_config_text
    from config.errors import ConfigError

    text = _nats_config().replace("nats://127.0.0.1", "nats://s3cret@127.0.0.1")
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "plant.yaml")
    assert "carries credentials" in str(caught.value) and "s3cret" not in str(caught.value)
