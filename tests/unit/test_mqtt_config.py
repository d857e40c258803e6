"""The MQTT source configuration: URLs, topics, tag kinds, TLS rules, located YAML errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from agent.wiring.load import load_config_text
from config.errors import ConfigError
from protocols.mqtt.config import MqttSourceConfig, SparkplugTag, TopicTag
from protocols.mqtt.source import MqttSource


def cfg(**kw: Any) -> MqttSourceConfig:
    data: dict[str, Any] = {"type": "mqtt", "url": "mqtt://broker", "client_id": "edge",
                            "tags": {"t": {"topic": "a/b"}}}
    data.update(kw)
    return MqttSourceConfig.model_validate(data)


@pytest.mark.parametrize(("url", "host", "port", "tls"), [
    ("mqtt://broker", "broker", 1883, False),
    ("mqtts://broker.plant-a.local", "broker.plant-a.local", 8883, True),
    ("mqtt://10.0.0.5:1884", "10.0.0.5", 1884, False),
    ("mqtts://[fd00::1]:8884/", "fd00::1", 8884, True),
])
def test_urls(url: str, host: str, port: int, tls: bool) -> None:
    c = cfg(url=url)
    assert (c.host, c.port, c.use_tls) == (host, port, tls)


@pytest.mark.parametrize("url", ["tcp://broker", "mqtt://", "mqtt://a b", "mqtt://h:0",
                                 "mqtt://h:70000", "mqtt://h/path", "broker:1883"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValidationError, match=r"mqtt://host|port must be 1\.\.65535"):
        cfg(url=url)


@pytest.mark.parametrize("topic", ["a/#/b", "a/b#", "a+/b", "", "#/a"])
def test_bad_topic_filters(topic: str) -> None:
    with pytest.raises(ValidationError, match="topic"):
        cfg(tags={"t": {"topic": topic}})


def test_tag_kinds_and_defaults() -> None:
    c = cfg(protocol=5, tags={
        "a": {"topic": "x/+/y", "value": "$.v[0]"},
        "b": {"type": "sparkplug", "group": "g", "node": "n", "metric": "M"}})
    assert c.protocol.value == "5"
    a, b = c.tags["a"], c.tags["b"]
    assert isinstance(a, TopicTag) and a.qos == 1 and a.value_path == ("v", 0)
    assert isinstance(b, SparkplugTag) and b.device is None and b.qos == 0
    assert c.session.value == "persistent" and c.stale_after is None


@pytest.mark.parametrize(("kw", "message"), [
    ({"tags": {"t": {"topic": "a", "value": "state"}}}, "starts with '\\$'"),
    ({"tags": {"t": {"topic": "a", "qos": 2}}}, "qos"),
    ({"tags": {"t": {"type": "sparkplug", "group": "g/h", "node": "n", "metric": "M"}}},
     "not a Sparkplug id"),
    ({"tags": {"t": {"type": "opcua", "topic": "a"}}}, "type"),
    ({"tags": {"t": {"topic": "a", "metric": "M"}}}, "Extra inputs"),
    ({"tls": {"ca_file": "ca.pem"}}, "'tls' options need an mqtts:// url"),
    ({"url": "mqtts://b", "tls": {"certificate": "c.pem"}}, "go together"),
    ({"password": "x"}, "'password' needs 'username'"),
    ({"keep_alive": "100ms"}, "keep_alive"),
    ({"protocol": "4"}, "protocol"),
    ({"tags": {}}, "at least 1"),
])
def test_invalid(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        cfg(**kw)


def test_stale_after_is_never_unless_configured() -> None:
    assert math.isinf(MqttSource("s", cfg()).stale_after)
    assert cfg().effective_stale_after is None
    assert MqttSource("s", cfg(stale_after="30s")).stale_after == 30.0


def test_subscriptions_merge_filters_and_take_the_highest_qos() -> None:
    source = MqttSource("s", cfg(tags={
        "a": {"topic": "x/y", "value": "$.a", "qos": 0},
        "b": {"topic": "x/y", "value": "$.b", "qos": 1},
        "c": {"topic": "z/#", "qos": 0},
        "d": {"type": "sparkplug", "group": "g", "node": "n", "metric": "M"},
        "e": {"type": "sparkplug", "group": "g", "node": "n", "device": "d", "metric": "M"},
    }))
    assert source.subscriptions == {"x/y": 1, "z/#": 0, "spBv1.0/g/+/n/#": 0}


def test_yaml_errors_are_located(monkeypatch: pytest.MonkeyPatch) -> None:
    text = """\
agent: {id: a, site: s}
sources:
  broker:
    type: mqtt
    url: mqtt://broker
    client_id: edge
    tags:
      oven.state: {topic: "plant/#/x", value: $.state}
"""
    with pytest.raises(ConfigError) as err:
        load_config_text(text, "cfg.yaml")
    message = str(err.value)
    assert message.startswith("cfg.yaml:8:")
    assert message == ("cfg.yaml:8:20: sources.broker.tags.\"oven.state\".topic: topic "
                       "'plant/#/x': '#' must be the whole last level (a/b/#)")


def test_password_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", "s3cret")
    text = """\
agent: {id: a, site: s}
sources:
  broker:
    type: mqtt
    url: mqtts://broker:8883
    client_id: edge
    username: edge
    password: ${env:MQTT_PASSWORD}
    tls: {ca_file: pki/ca.pem}
    tags:
      t: {topic: a/b}
"""
    c = load_config_text(text, "/etc/edge/cfg.yaml").sources["broker"]
    assert isinstance(c, MqttSourceConfig)
    assert c.password is not None and c.password.reveal() == "s3cret"
    assert "s3cret" not in repr(c)
    assert c.tls is not None and str(c.tls.ca_file) == "/etc/edge/pki/ca.pem"
