"""Configuration of an MQTT source (``type: mqtt``): one broker connection, many tags.

Two kinds of tag, told apart by their ``type`` (absent means ``topic``)::

    oven.state:  {topic: plant/oven/status, value: $.state, qos: 1}            # JSON or raw
    press.speed: {type: sparkplug, group: plant-a, node: line2, device: press,
                  metric: Speed}                                                # Sparkplug B
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from config.base import Backoff, Strict
from config.secrets import Secret
from config.units import ByteSize, Duration, DurationOrZero
from protocols.mqtt.jsonpath import JsonPath, compile_path

__all__ = ["MqttProtocol", "MqttSourceConfig", "MqttTag", "MqttTls", "SessionMode",
           "SparkplugTag", "TimestampFormat", "TopicTag", "ValueType", "check_topic_filter"]

_URL = re.compile(r"^(mqtts?)://(\[[0-9A-Fa-f:.]+\]|[^\s:/?#\[\]]+)(?::(\d{1,5}))?/?$")


class MqttProtocol(StrEnum):
    V311 = "3.1.1"
    V5 = "5"


class SessionMode(StrEnum):
    """``persistent``: the broker keeps our subscriptions and queues QoS 1 messages while we
    are away (clean start off); ``clean``: every connection starts empty."""

    PERSISTENT = "persistent"
    CLEAN = "clean"


class ValueType(StrEnum):
    AUTO = "auto"
    NUMBER = "number"
    STRING = "string"
    BOOL = "bool"


class TimestampFormat(StrEnum):
    AUTO = "auto"
    RFC3339 = "rfc3339"
    EPOCH_S = "epoch_s"
    EPOCH_MS = "epoch_ms"


def check_topic_filter(topic: str) -> str:
    """An MQTT topic filter: '+' fills a whole level, '#' only as the whole last level."""
    if not topic:
        raise ValueError("a topic cannot be empty")
    if "\x00" in topic:
        raise ValueError("a topic cannot contain NUL")
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic {topic!r}: '#' must be the whole last level (a/b/#)")
        if "+" in level and level != "+":
            raise ValueError(f"topic {topic!r}: '+' must be a whole level (a/+/c)")
    return topic


class TopicTag(Strict):
    type: Literal["topic"] = Field("topic", description="A value from messages on a topic "
                                   "(JSON or the raw payload); the default tag type.")
    topic: str = Field(description="Topic filter; '+' (one level) and '#' (the rest) allowed. "
                       "Every matching message gives one sample.")
    value: str | None = Field(None, description="JSON path of the value in a JSON payload "
                              "($.state, $.data.items[0].v, $['key.with.dots']); leave out to "
                              "use the whole payload as text or number.")
    value_type: ValueType = Field(ValueType.AUTO, description="'auto' keeps the JSON type "
                                  "(number, text, boolean); 'number', 'string' or 'bool' insist "
                                  "on it: anything else is a bad sample, never converted by "
                                  "guesswork (a raw payload is parsed as that type).")
    timestamp: str | None = Field(None, description="JSON path of the source timestamp; "
                                  "without it samples carry the agent's receive time.")
    timestamp_format: TimestampFormat = Field(TimestampFormat.AUTO, description="'auto': text "
                                              "is RFC 3339, a number is epoch milliseconds "
                                              "when above 1e11, else epoch seconds.")
    qos: Literal[0, 1] = Field(1, description="Subscription QoS: 1 (at least once; queued by "
                               "the broker while the agent is away) or 0 (at most once).")

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        return check_topic_filter(v)

    @field_validator("value", "timestamp")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None:
            compile_path(v)
        return v

    @property
    def value_path(self) -> JsonPath | None:
        return None if self.value is None else compile_path(self.value)

    @property
    def timestamp_path(self) -> JsonPath | None:
        return None if self.timestamp is None else compile_path(self.timestamp)


class SparkplugTag(Strict):
    type: Literal["sparkplug"] = Field(description="A Sparkplug B metric.")
    group: str = Field(description="Sparkplug group id.")
    node: str = Field(description="Edge node id.")
    device: str | None = Field(None, description="Device id; leave out for a metric of the "
                               "edge node itself.")
    metric: str = Field(description="Metric name as announced in the birth certificate "
                        "(for example 'Status/State').")
    qos: Literal[0, 1] = Field(0, description="Subscription QoS for this node's topics "
                               "(Sparkplug edge nodes publish data with QoS 0).")

    @field_validator("group", "node", "device")
    @classmethod
    def _level(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/+#")):
            raise ValueError(f"{v!r} is not a Sparkplug id (no '/', '+' or '#')")
        return v


def _tag_kind(v: Any) -> str:
    kind = v.get("type", "topic") if isinstance(v, dict) else getattr(v, "type", "topic")
    return "sparkplug" if kind == "sparkplug" else "topic"


MqttTag = Annotated[Annotated[TopicTag, Tag("topic")] | Annotated[SparkplugTag, Tag("sparkplug")],
                    Discriminator(_tag_kind)]


class MqttTls(Strict):
    ca_file: Path | None = Field(None, description="PEM file with the CA certificate(s) that "
                                 "sign the broker's certificate (default: the system's trust "
                                 "store). The broker's host name is always checked.")
    certificate: Path | None = Field(None, description="PEM client certificate, for brokers "
                                     "that require one.")
    private_key: Path | None = Field(None, description="PEM private key of the client "
                                     "certificate.")

    @model_validator(mode="after")
    def _pair(self) -> MqttTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("'certificate' and 'private_key' go together")
        return self


class MqttSourceConfig(Strict):
    type: Literal["mqtt"] = Field(description="MQTT broker (JSON / raw payloads, Sparkplug B).")
    url: str = Field(description="mqtt://host[:port] (default port 1883) or mqtts://host[:port] "
                     "(TLS, default port 8883).")
    protocol: MqttProtocol = Field(MqttProtocol.V311, description="MQTT protocol version: "
                                   "'3.1.1' or '5'.")
    client_id: str = Field(min_length=1, max_length=128, description="Client id; unique on the "
                           "broker and stable across restarts (a persistent session belongs "
                           "to it).")
    username: str | None = Field(None, description="User name, if the broker wants one.")
    password: Secret | None = Field(None, description="Password: ${env:NAME} or ${file:/path}.")
    tls: MqttTls | None = Field(None, description="TLS options (mqtts:// only).")
    keep_alive: Duration = Field(30.0, description="Keep-alive interval; a broker silent for "
                                 "longer than this (after a ping) ends the session.")
    connect_timeout: Duration = Field(10.0, description="Time allowed for TCP, TLS and the "
                                      "broker's CONNACK.")
    session: SessionMode = Field(SessionMode.PERSISTENT, description="'persistent': the broker "
                                 "queues QoS 1 messages while the agent is away (Mosquitto "
                                 "keeps 1000 per client by default: max_queued_messages); "
                                 "'clean': start empty every time.")
    session_expiry: DurationOrZero = Field(3600.0, description="MQTT 5: how long the broker "
                                           "keeps a persistent session after a disconnect "
                                           "(3.1.1 brokers keep it until told otherwise).")
    max_payload: ByteSize = Field(256 * 1024, description="Larger payloads are rejected (the "
                                  "tag gets a bad sample), never parsed.")
    sparkplug_rebirth: Literal["request", "never"] = Field(
        "request", description="Sparkplug B: publish a rebirth request (NCMD 'Node "
        "Control/Rebirth') when a sequence gap or an unknown alias shows data was missed.")
    stale_after: Duration | None = Field(None, description="A tag with no message for this "
                                         "long is stale (default: never; a quiet topic is not "
                                         "a dead machine). When set, a session without any "
                                         "message for 4x this long is also restarted.")
    backoff: Backoff = Field(default_factory=Backoff, description="Reconnect backoff.")
    tags: dict[str, MqttTag] = Field(min_length=1, description="Tags by id.")

    @field_validator("tags", mode="wrap")
    @classmethod
    def _tag_errors_without_union_tag(cls, v: Any, handler: ValidatorFunctionWrapHandler
                                      ) -> Any:
        # Pydantic puts the union member ('topic') into the location of an error, which for a
        # tag without a 'type' key would read "tags.x.topic.topic". Drop it there.
        try:
            return handler(v)
        except ValidationError as exc:
            errors: list[InitErrorDetails] = []
            for err in exc.errors():
                loc = list(err["loc"])
                tag = v.get(loc[0]) if isinstance(v, dict) and loc else None
                if len(loc) > 1 and loc[1] == "topic" and isinstance(tag, dict) \
                        and "type" not in tag:
                    del loc[1]
                errors.append(InitErrorDetails(type=err["type"], loc=tuple(loc),
                                               input=err["input"], ctx=err.get("ctx", {})))
            raise ValidationError.from_exception_data(exc.title, errors) from None

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: object) -> object:
        # YAML reads `protocol: 5` as a number.
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        m = _URL.match(v)
        if m is None:
            raise ValueError(f"'{v}' is not mqtt://host[:port] or mqtts://host[:port]")
        if m.group(3) is not None and not 1 <= int(m.group(3)) <= 65535:
            raise ValueError(f"'{v}': port must be 1..65535")
        return v

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, v: float) -> float:
        if not 1 <= v <= 65535:
            raise ValueError("keep_alive must be between 1s and 65535s")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MqttSourceConfig:
        if self.tls is not None and not self.use_tls:
            raise ValueError("'tls' options need an mqtts:// url")
        if self.password is not None and self.username is None:
            raise ValueError("'password' needs 'username'")
        return self

    @property
    def use_tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        m = _URL.match(self.url)
        assert m is not None
        return m.group(2).strip("[]")

    @property
    def port(self) -> int:
        m = _URL.match(self.url)
        assert m is not None
        return int(m.group(3)) if m.group(3) else (8883 if self.use_tls else 1883)

    @property
    def effective_stale_after(self) -> float | None:
        return self.stale_after

    def counter_bits(self, tag: str) -> int | None:
        """Width of a counter tag for rollover; the protocol does not say (None)."""
        return None
