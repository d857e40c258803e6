"""OPC UA configuration and node id parsing/resolution (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest
from asyncua import ua
from pydantic import ValidationError

from config.model import Quality
from protocols.opcua.config import OpcuaSourceConfig, OpcuaValueType, TimestampChoice
from protocols.opcua.nodeids import (
    NodeIdSyntaxError,
    ParsedNodeId,
    UnknownNamespaceError,
    parse_node_id,
)
from protocols.opcua.session import chunks
from protocols.opcua.source import to_sample

NS = ["http://opcfoundation.org/UA/", "urn:other", "urn:acme:plant"]


@pytest.mark.parametrize("text,parsed", [
    ("i=2258", ParsedNodeId(0, "i", "2258")),
    ("ns=2;s=Filler.State", ParsedNodeId(2, "s", "Filler.State")),
    ("nsu=urn:acme:plant;s=Filler.State", ParsedNodeId("urn:acme:plant", "s", "Filler.State")),
    ("s=A;B", ParsedNodeId(0, "s", "A;B")),
    ("ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a",
     ParsedNodeId(1, "g", "09087e75-8e5e-499b-954f-f2a9603db28a")),
    ("ns=1;b=M/RbKBsRVkePCePcx24oRA==", ParsedNodeId(1, "b", "M/RbKBsRVkePCePcx24oRA==")),
])
def test_parse_accepts_the_standard_forms(text: str, parsed: ParsedNodeId) -> None:
    assert parse_node_id(text) == parsed


@pytest.mark.parametrize("text,words", [
    ("", "empty"), ("Filler.State", "i=, s=, g= or b="), ("ns=x;s=A", "not a number"),
    ("ns=2", "expected ';'"), ("nsu=;s=A", "needs a namespace URI"), ("i=abc", "numeric"),
    ("ns=1;g=zzz", "GUID"), ("ns=1;b=!!", "base64"), ("ns=1;s=", "empty"),
    ("ns=70000;s=A", "0 to 65535"),
])
def test_parse_rejects_with_a_message(text: str, words: str) -> None:
    with pytest.raises(NodeIdSyntaxError, match=words):
        parse_node_id(text)


def test_resolve_uses_the_current_namespace_array() -> None:
    node = parse_node_id("nsu=urn:acme:plant;s=Filler.State")
    assert node.resolve(NS) == ua.NodeId("Filler.State", 2)
    reordered = [NS[0], NS[2], NS[1]]
    assert node.resolve(reordered) == ua.NodeId("Filler.State", 1)
    with pytest.raises(UnknownNamespaceError, match="urn:acme:plant"):
        node.resolve(NS[:2])
    assert parse_node_id("i=2258").resolve([]) == ua.NodeId(2258, 0)


def base(**kw: Any) -> dict[str, Any]:
    return {"type": "opcua", "endpoint": "opc.tcp://plc:4840",
            "tags": {"a": {"node": "nsu=urn:acme:plant;s=A"}}, **kw}


def test_defaults_and_modes() -> None:
    cfg = OpcuaSourceConfig.model_validate(base())
    assert cfg.mode.value == "subscribe" and cfg.security is None
    assert cfg.timestamp is TimestampChoice.SOURCE
    assert cfg.effective_stale_after >= 10
    poll = OpcuaSourceConfig.model_validate(base(mode="poll", poll_interval="200ms"))
    assert poll.effective_stale_after == pytest.approx(3 * 0.2 + 5.0)


@pytest.mark.parametrize("extra,words", [
    ({"mode": "poll", "publishing_interval": "1s"},
     "publishing_interval belongs to mode: subscribe"),
    ({"poll_interval": "1s"}, "poll_interval belongs to mode: poll"),
    ({"endpoint": "http://plc"}, "opc.tcp://"),
    ({"password": "x"}, "'password' needs 'username'"),
    ({"security": {"policy": "Basic256Sha256"}}, "needs certificate, private_key, trust"),
    ({"security": {"policy": "None", "trust": "/x"}}, "policy None uses no certificates"),
    ({"security": {"policy": "Basic128Rsa15"}}, "Basic256Sha256"),
    ({"tags": {"a": {"node": "Filler"}}}, "i=, s=, g= or b="),
    ({"mode": "poll", "tags": {"a": {"node": "i=1", "deadband": {"value": 1}}}},
     "belong to mode: subscribe"),
])
def test_invalid_configs_say_why(extra: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        OpcuaSourceConfig.model_validate(base(**extra))


def test_chunks() -> None:
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([], 3) == []
    assert chunks([1], 0) == [[1]]


def _dv(value: Any, status: int = ua.StatusCodes.Good) -> Any:
    dv: Any = ua.DataValue
    return dv(ua.Variant(value), StatusCode=ua.StatusCode(status))


@pytest.mark.parametrize("raw,expected,value,quality", [
    (3, OpcuaValueType.INT, 3, Quality.GOOD),
    (3, None, 3, Quality.GOOD),
    (2.5, OpcuaValueType.FLOAT, 2.5, Quality.GOOD),
    (False, OpcuaValueType.BOOL, False, Quality.GOOD),
    (1, OpcuaValueType.BOOL, None, Quality.BAD),
    ("7", OpcuaValueType.INT, None, Quality.BAD),
    (3, OpcuaValueType.FLOAT, 3.0, Quality.GOOD),
    (True, OpcuaValueType.INT, None, Quality.BAD),
    (2.5, OpcuaValueType.INT, None, Quality.BAD),
    ("x", None, "x", Quality.GOOD),
    (ua.LocalizedText("Run"), OpcuaValueType.STRING, "Run", Quality.GOOD),
    ([1, 2], None, None, Quality.BAD),
    (b"\x00", None, None, Quality.BAD),
])
def test_values_are_checked_against_the_tag_type(raw: Any, expected: OpcuaValueType | None,
                                                 value: Any, quality: Quality) -> None:
    from config.model import utcnow

    s = to_sample("t", "ns=1;s=T", _dv(raw), expected, TimestampChoice.SOURCE, utcnow())
    assert (s.value, s.quality) == (value, quality)
    assert type(s.value) is type(value)  # 3 and 3.0 compare equal; the type must be right too
    if quality is Quality.BAD:
        assert s.detail is not None and "tag t (node ns=1;s=T)" in s.detail


@pytest.mark.parametrize(("tag", "extra", "message"), [
    ({"node": "i=2253", "kind": "alarms", "queue_size": 1}, {}, "queue_size of at least 2"),
    ({"node": "i=2253", "kind": "alarms", "type": "int"}, {}, "do not apply to kind: alarms"),
    ({"node": "i=2253", "kind": "alarms"}, {"mode": "poll"}, "alarm tags need mode: subscribe"),
])
def test_alarm_tags_are_checked(tag: dict[str, object], extra: dict[str, object],
                                message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        OpcuaSourceConfig.model_validate({"type": "opcua", "endpoint": "opc.tcp://h:4840",
                                          "tags": {"a": tag}, **extra})


def test_alarm_tag_queue_is_never_zero_or_one_by_default() -> None:
    cfg = OpcuaSourceConfig.model_validate({"type": "opcua", "endpoint": "opc.tcp://h:4840",
                                            "tags": {"a": {"node": "i=2253", "kind": "alarms"},
                                                     "v": {"node": "ns=1;s=V"}}})
    assert cfg.tags["a"].effective_queue_size == 1000
    assert cfg.tags["v"].effective_queue_size == 1
