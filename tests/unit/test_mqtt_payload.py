"""JSON path subset, payload decoding into tag values, topic matching."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.errors import DecodeError
from protocols.mqtt.config import TopicTag
from protocols.mqtt.jsonpath import compile_path, extract, format_path
from protocols.mqtt.payload import Message, TopicReader, excerpt
from protocols.mqtt.source import topic_matches

# --------------------------------------------------------------------------- JSON path


@pytest.mark.parametrize(("text", "steps"), [
    ("$", ()),
    ("$.state", ("state",)),
    ("$.data.items[0].v", ("data", "items", 0, "v")),
    ("$.a[-1]", ("a", -1)),
    ("$['temp.c']", ("temp.c",)),
    ('$["it\'s"][2]', ("it's", 2)),
    ("$['a\\'b']", ("a'b",)),
])
def test_paths_compile(text: str, steps: tuple[Any, ...]) -> None:
    assert compile_path(text) == steps


@pytest.mark.parametrize(("text", "message"), [
    ("state", "starts with '$'"),
    ("$.", "expected a key after '.' at position 2"),
    ("$.a[x]", "unexpected '[' at position 4"),
    ("$.a b", "unexpected ' ' at position 4"),
    ("$[*]", "unexpected '['"),
])
def test_bad_paths_say_where(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("$", r"\$")):
        compile_path(text)


def test_extract_and_its_errors() -> None:
    doc = {"data": {"items": [{"v": 1.5}, {"v": 2}]}, "n": None}
    assert extract(doc, compile_path("$.data.items[1].v")) == 2
    assert extract(doc, compile_path("$.data.items[-1].v")) == 2
    assert extract(doc, compile_path("$")) is doc
    with pytest.raises(LookupError, match=r"\$\.data\.items\[5\]: the array has 2 item"):
        extract(doc, compile_path("$.data.items[5]"))
    with pytest.raises(LookupError, match=r"\$\.data\.x is missing"):
        extract(doc, compile_path("$.data.x"))
    with pytest.raises(LookupError, match=r"\$\.n is null, not an object"):
        extract(doc, compile_path("$.n.x"))
    with pytest.raises(LookupError, match=r"\$\.data is an object, not an array"):
        extract(doc, compile_path("$.data[0]"))


@given(st.lists(st.one_of(st.integers(-5, 5), st.from_regex(r"[a-z_][a-z0-9_]{0,5}",
                                                            fullmatch=True)), max_size=5))
def test_format_then_compile_round_trips(steps: list[Any]) -> None:
    assert compile_path(format_path(tuple(steps))) == tuple(steps)


# --------------------------------------------------------------------------- payloads


def reader(**kw: Any) -> TopicReader:
    return TopicReader.of("t", TopicTag.model_validate({"topic": "a/b", **kw}))


def read(r: TopicReader, data: bytes | str) -> Any:
    return r.read(Message(data.encode() if isinstance(data, str) else data))


@pytest.mark.parametrize(("kw", "payload", "value"), [
    ({"value": "$.s"}, '{"s": "RUNNING"}', "RUNNING"),
    ({"value": "$.s"}, '{"s": 3}', 3),
    ({"value": "$.s"}, '{"s": 2.5}', 2.5),
    ({"value": "$.s"}, '{"s": true}', True),
    ({"value": "$.s", "value_type": "number"}, '{"s": -4}', -4),
    ({"value": "$.s", "value_type": "string"}, '{"s": "7"}', "7"),
    ({"value": "$.s", "value_type": "bool"}, '{"s": false}', False),
    ({}, "42", 42),
    ({}, " -1.5e3\n", -1500.0),
    ({}, "RUNNING", "RUNNING"),
    ({}, "007", "007"),  # not JSON number syntax: text, not a guessed 7
    ({"value_type": "string"}, "12", "12"),
    ({"value_type": "number"}, "12.25", 12.25),
    ({"value_type": "bool"}, "true", True),
])
def test_values(kw: dict[str, Any], payload: str, value: Any) -> None:
    got, ts = read(reader(**kw), payload)
    assert got == value and type(got) is type(value)
    assert ts is None


@pytest.mark.parametrize(("kw", "payload", "message"), [
    ({"value": "$.s"}, "nope", "payload is not JSON"),
    ({"value": "$.s"}, b"\xff\xfe\x00", "payload is not JSON"),
    ({"value": "$.s"}, '{"s": NaN}', "payload is not JSON"),
    ({"value": "$.s"}, '{"s": Infinity}', "payload is not JSON"),
    ({"value": "$.s"}, '{"s": null}', r"\$\.s is null, not a value"),
    ({"value": "$.s"}, '{"s": [1]}', r"\$\.s is an array, not a value"),
    ({"value": "$.s"}, '{"s": {"a": 1}}', r"\$\.s is an object, not a value"),
    ({"value": "$.s"}, '{"x": 1}', r"value: \$\.s is missing"),
    ({"value": "$.s", "value_type": "number"}, '{"s": "12"}', "is text '12', expected a number"),
    ({"value": "$.s", "value_type": "number"}, '{"s": true}', "is a boolean true, expected"),
    ({"value": "$.s", "value_type": "string"}, '{"s": 1}', "is a number 1, expected a string"),
    ({"value": "$.s", "value_type": "bool"}, '{"s": 1}', "expected a bool"),
    ({}, b"\xff\x00", "not UTF-8 text"),
    ({"value_type": "number"}, "twelve", "'twelve' is not a number"),
    ({"value_type": "number"}, "1e999", "out of range"),
    ({"value_type": "bool"}, "yes", "'yes' is not true or false"),
])
def test_undecodable_payloads(kw: dict[str, Any], payload: bytes | str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        read(reader(**kw), payload)


def test_one_parse_for_many_tags_and_the_error_is_remembered() -> None:
    msg = Message(b'{"a": 1, "b": "x"}')
    assert reader(value="$.a").read(msg)[0] == 1
    assert reader(value="$.b").read(msg)[0] == "x"
    bad = Message(b"{")
    for _ in range(2):
        with pytest.raises(DecodeError, match="not JSON"):
            reader(value="$.a").read(bad)


@pytest.mark.parametrize(("fmt", "ts", "expected"), [
    ("auto", '"2026-03-01T10:00:00Z"', datetime(2026, 3, 1, 10, tzinfo=UTC)),
    ("auto", '"2026-03-01T11:00:00+01:00"', datetime(2026, 3, 1, 10, tzinfo=UTC)),
    ("auto", "1772359200", datetime(2026, 3, 1, 10, tzinfo=UTC)),
    ("auto", "1772359200000", datetime(2026, 3, 1, 10, tzinfo=UTC)),
    ("epoch_ms", "1772359200500", datetime(2026, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("epoch_s", "1772359200.25", datetime(2026, 3, 1, 10, 0, 0, 250000, tzinfo=UTC)),
    ("rfc3339", '"2026-03-01T10:00:00Z"', datetime(2026, 3, 1, 10, tzinfo=UTC)),
])
def test_timestamps(fmt: str, ts: str, expected: datetime) -> None:
    r = reader(value="$.v", timestamp="$.ts", timestamp_format=fmt)
    value, got = read(r, f'{{"v": 1, "ts": {ts}}}')
    assert value == 1 and got == expected


@pytest.mark.parametrize(("fmt", "ts", "message"), [
    ("auto", "true", "is a boolean true, not an RFC 3339 time"),
    ("auto", '"yesterday"', "timestamp \\$.ts 'yesterday'"),
    ("rfc3339", "1772359200", "is a number 1772359200, not rfc3339"),
    ("epoch_s", '"2026-03-01T10:00:00Z"', "not epoch_s"),
    ("auto", "1e300", "timestamp"),
])
def test_bad_timestamps_make_the_sample_bad(fmt: str, ts: str, message: str) -> None:
    r = reader(value="$.v", timestamp="$.ts", timestamp_format=fmt)
    with pytest.raises(DecodeError, match=message):
        read(r, f'{{"v": 1, "ts": {ts}}}')


def test_excerpt_is_short_and_printable() -> None:
    assert excerpt(b"abc") == "b'abc'"
    long = excerpt(bytes(range(256)) * 10)
    assert long.endswith("... (2560 bytes)") and len(long) < 300


@given(st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c,
                                                                        max_size=3),
                    max_leaves=10))
def test_any_json_gives_a_value_or_a_decode_error(doc: Any) -> None:
    data = json.dumps(doc).encode()
    for kw in ({"value": "$.a[0]"}, {"value": "$"}, {}, {"value_type": "number"}):
        try:
            value, _ = read(reader(**kw), data)
        except DecodeError:
            continue
        assert isinstance(value, bool | int | float | str)


# --------------------------------------------------------------------------- topics


@pytest.mark.parametrize(("flt", "topic", "match"), [
    ("a/b", "a/b", True),
    ("a/b", "a/b/c", False),
    ("a/+/c", "a/x/c", True),
    ("a/+/c", "a/x/y/c", False),
    ("a/+", "a/", True),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("#", "a/b", True),
    ("#", "$SYS/broker", False),
    ("+/broker", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker", True),
    ("spBv1.0/g/+/n/#", "spBv1.0/g/DDATA/n/dev", True),
    ("spBv1.0/g/+/n/#", "spBv1.0/g/NBIRTH/n", True),
    ("spBv1.0/g/+/n/#", "spBv1.0/g/NBIRTH/other", False),
])
def test_topic_matching(flt: str, topic: str, match: bool) -> None:
    assert topic_matches(flt, topic) is match
