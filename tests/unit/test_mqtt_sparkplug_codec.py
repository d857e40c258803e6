"""Sparkplug B: the protobuf wire codec (bytes by hand, round trips) and the host tracker."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.errors import DecodeError
from protocols.mqtt.config import SparkplugTag
from protocols.mqtt.sparkplug import (
    DataType,
    Metric,
    Payload,
    SparkplugTopic,
    decode_payload,
    encode_payload,
    metric_value,
    parse_topic,
    rebirth_request,
)
from protocols.mqtt.sparkplug_host import REBIRTH_HOLDOFF, SparkplugTracker

# --------------------------------------------------------------------------- wire format


def test_known_bytes_both_ways() -> None:
    metric = bytes([0x0A, 0x01, 0x41,        # 1 name "A"
                    0x10, 0x01,              # 2 alias 1
                    0x20, 0x0B,              # 4 datatype 11 (Boolean)
                    0x70, 0x01])             # 14 boolean_value true
    wire = bytes([0x08, 0x01,                # 1 timestamp 1
                  0x12, len(metric)]) + metric + bytes([0x18, 0x02])  # 2 metric, 3 seq 2
    p = Payload(timestamp=1, seq=2, metrics=[Metric(name="A", alias=1, datatype=11,
                                                    boolean_value=True)])
    assert encode_payload(p) == wire
    assert decode_payload(wire) == p


def test_fixed_width_and_multi_byte_varints() -> None:
    metric = (bytes([0x65]) + struct.pack("<f", 1.5)       # 12 float_value
              + bytes([0x69]) + struct.pack("<d", -2.25)   # 13 double_value
              + bytes([0x58, 0xAC, 0x02]))                 # 11 long_value 300
    m = decode_payload(bytes([0x12, len(metric)]) + metric).metrics[0]
    assert (m.float_value, m.double_value, m.long_value) == (1.5, -2.25, 300)


def test_unknown_and_unmodelled_fields_are_skipped() -> None:
    metric = encode_payload(Payload(metrics=[Metric(name="T", datatype=DataType.INT32,
                                                    int_value=7)]))[2:]
    extra = (bytes([0x42, 0x02, 0x08, 0x01])     # 8 metadata (a message): skipped
             + bytes([0x8A, 0x01, 0x00])        # 17 dataset_value, empty: skipped
             + bytes([0xF8, 0x06, 0x05]))       # 111 unknown varint
    data = bytes([0x12, len(metric) + len(extra)]) + metric + extra + bytes([0x98, 0x06, 0x01])
    p = decode_payload(data)
    assert [(m.name, metric_value(m)) for m in p.metrics] == [("T", 7)]


@pytest.mark.parametrize(("data", "message"), [
    (bytes([0x08]), "truncated varint"),
    (bytes([0x08] + [0xFF] * 10 + [0x01]), "varint longer than 10 bytes"),
    (bytes([0x12, 0x05, 0x0A]), "truncated length-delimited"),
    (bytes([0x0B]), "unsupported wire type 3"),
    (bytes([0x00, 0x01]), "field number 0"),
    (bytes([0x12, 0x02, 0x0A, 0x05]), "truncated length-delimited"),
    (bytes([0x12, 0x03, 0x0A, 0x01, 0xFF]), "metric name: not UTF-8"),
    (bytes([0x12, 0x02, 0x65, 0x00]), "truncated 32-bit"),
    (bytes([0x0A, 0x00]), "timestamp: expected a varint"),
])
def test_malformed_input_is_a_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_payload(data)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        p = decode_payload(data)
    except DecodeError:
        return
    assert all(isinstance(m, Metric) for m in p.metrics)
    assert p.seq is None or isinstance(p.seq, int)


_metric = st.builds(
    Metric,
    name=st.none() | st.text(max_size=8),
    alias=st.none() | st.integers(0, 2**64 - 1),
    timestamp=st.none() | st.integers(0, 2**63),
    datatype=st.none() | st.integers(0, 2**32 - 1),
    is_historical=st.booleans(), is_transient=st.booleans(), is_null=st.booleans(),
    int_value=st.none() | st.integers(0, 2**32 - 1),
    long_value=st.none() | st.integers(0, 2**64 - 1),
    float_value=st.none() | st.floats(width=32, allow_nan=False),
    double_value=st.none() | st.floats(allow_nan=False),
    boolean_value=st.none() | st.booleans(),
    string_value=st.none() | st.text(max_size=8),
    bytes_value=st.none() | st.binary(max_size=8))


@given(st.builds(Payload, timestamp=st.none() | st.integers(0, 2**64 - 1),
                 metrics=st.lists(_metric, max_size=4), seq=st.none() | st.integers(0, 255),
                 uuid=st.none() | st.text(max_size=8), body=st.none() | st.binary(max_size=8)))
def test_round_trip(p: Payload) -> None:
    assert decode_payload(encode_payload(p)) == p


# --------------------------------------------------------------------------- values, topics


@pytest.mark.parametrize(("metric", "value"), [
    (Metric(datatype=DataType.INT8, int_value=0xFFFFFFFF), -1),   # sign-extended encoding
    (Metric(datatype=DataType.INT8, int_value=0xFF), -1),         # narrow encoding
    (Metric(datatype=DataType.INT16, int_value=0xFFFF8000), -32768),
    (Metric(datatype=DataType.INT32, int_value=2**31), -(2**31)),
    (Metric(datatype=DataType.INT64, long_value=2**64 - 5), -5),
    (Metric(datatype=DataType.UINT32, int_value=2**32 - 1), 2**32 - 1),
    (Metric(datatype=DataType.UINT64, long_value=2**64 - 1), 2**64 - 1),
    (Metric(datatype=DataType.DATETIME, long_value=1700000000000), 1700000000000),
    (Metric(datatype=DataType.FLOAT, float_value=0.5), 0.5),
    (Metric(datatype=DataType.DOUBLE, double_value=1e300), 1e300),
    (Metric(datatype=DataType.BOOLEAN, boolean_value=False), False),
    (Metric(datatype=DataType.STRING, string_value="RUN"), "RUN"),
    (Metric(datatype=DataType.TEXT, string_value="t"), "t"),
    (Metric(datatype=DataType.INT32, is_null=True), None),
    (Metric(int_value=3), 3),  # no datatype: the one value present
])
def test_metric_values(metric: Metric, value: object) -> None:
    assert metric_value(metric) == value


@pytest.mark.parametrize("metric", [
    Metric(name="d", datatype=DataType.DATASET),
    Metric(name="f", datatype=DataType.FLOAT),  # no float_value
    Metric(name="n"),
    Metric(name="x", datatype=99, int_value=1),
])
def test_metric_without_a_usable_value(metric: Metric) -> None:
    with pytest.raises(DecodeError, match=f"metric {metric.name}"):
        metric_value(metric)


@pytest.mark.parametrize(("topic", "parsed"), [
    ("spBv1.0/g/NBIRTH/n", SparkplugTopic("g", "NBIRTH", "n", None)),
    ("spBv1.0/g/DDATA/n/d", SparkplugTopic("g", "DDATA", "n", "d")),
    ("spBv1.0/g/NDATA/n/d", None),  # node message with a device part
    ("spBv1.0/g/DDATA/n", None),    # device message without one
    ("spBv1.0/g/FOO/n", None),
    ("spBv1.0/STATE/host", None),
    ("spAv1.0/g/NDATA/n", None),
])
def test_parse_topic(topic: str, parsed: SparkplugTopic | None) -> None:
    assert parse_topic(topic) == parsed


def test_rebirth_request_payload() -> None:
    p = decode_payload(rebirth_request(1234))
    assert p.timestamp == 1234
    (m,) = p.metrics
    assert (m.name, m.datatype, m.boolean_value) == ("Node Control/Rebirth", 11, True)


# --------------------------------------------------------------------------- tracker

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def tracker() -> SparkplugTracker:
    tags = {
        "state": SparkplugTag(type="sparkplug", group="g", node="n", metric="State"),
        "speed": SparkplugTag(type="sparkplug", group="g", node="n", device="d",
                              metric="Speed"),
        "other": SparkplugTag(type="sparkplug", group="g", node="n", device="e",
                              metric="Speed", qos=1),
    }
    return SparkplugTracker(tags)


def send(t: SparkplugTracker, kind: str, metrics: list[Metric], seq: int | None,
         device: str | None = None, mono: float = 0.0) -> tuple[dict[str, object], object]:
    topic = SparkplugTopic("g", kind, "n", device)
    r = t.on_message(topic, encode_payload(Payload(timestamp=1_700_000_000_000,
                                                   metrics=metrics, seq=seq)), NOW, mono)
    return {s.tag: (s.value if s.good else f"BAD {s.detail}") for s in r.samples}, r.rebirth


def births(t: SparkplugTracker) -> None:
    send(t, "NBIRTH", [Metric(name="bdSeq", datatype=DataType.INT64, long_value=1),
                       Metric(name="State", alias=1, datatype=DataType.INT16, int_value=3)], 0)
    send(t, "DBIRTH", [Metric(name="Speed", alias=2, datatype=DataType.FLOAT,
                              float_value=1.0)], 1, "d")
    send(t, "DBIRTH", [Metric(name="Speed", alias=2, datatype=DataType.FLOAT,
                              float_value=9.0)], 2, "e")


def test_one_subscription_per_node_with_the_highest_qos() -> None:
    t = tracker()
    assert t.subscriptions({"state": 0, "speed": 0, "other": 1}) == {"spBv1.0/g/+/n/#": 1}


def test_births_then_alias_data_with_the_birth_datatype() -> None:
    t = tracker()
    births(t)
    samples, rebirth = send(t, "NDATA", [Metric(alias=1, int_value=0xFFFFFFFE)], 3)
    assert samples == {"state": -2} and rebirth is None  # INT16 from the birth: signed
    samples, _ = send(t, "DDATA", [Metric(alias=2, float_value=2.5)], 4, "d")
    assert samples == {"speed": 2.5}


def test_source_time_comes_from_the_metric_or_the_payload() -> None:
    t = tracker()
    r = t.on_message(SparkplugTopic("g", "NBIRTH", "n", None), encode_payload(Payload(
        timestamp=1_700_000_000_000, seq=0, metrics=[
            Metric(name="State", alias=1, datatype=DataType.INT16, int_value=1,
                   timestamp=1_700_000_000_500)])), NOW, 0.0)
    assert r.samples[0].source_time == datetime.fromtimestamp(1_700_000_000.5, UTC)


def test_seq_wraps_without_a_gap_and_a_gap_asks_once_per_holdoff() -> None:
    t = tracker()
    births(t)
    seq = 3
    for _ in range(300):
        _, rebirth = send(t, "NDATA", [Metric(alias=1, int_value=1)], seq % 256)
        assert rebirth is None
        seq += 1
    _, rebirth = send(t, "NDATA", [Metric(alias=1, int_value=1)], (seq + 1) % 256, mono=10.0)
    assert rebirth == ("g", "n")
    _, rebirth = send(t, "NDATA", [Metric(alias=1, int_value=1)], (seq + 5) % 256, mono=11.0)
    assert rebirth is None  # held off
    _, rebirth = send(t, "NDATA", [Metric(alias=1, int_value=1)], (seq + 9) % 256,
                      mono=10.0 + REBIRTH_HOLDOFF)
    assert rebirth == ("g", "n")


def test_unknown_alias_and_data_before_birth_ask_for_a_rebirth() -> None:
    t = tracker()
    samples, rebirth = send(t, "DDATA", [Metric(alias=2, float_value=1.0),
                                         Metric(name="Speed", float_value=3.0)], 7, "d")
    assert samples == {"speed": 3.0}  # a named metric is usable; the alias is not guessed
    assert rebirth == ("g", "n")
    births(t)
    _, rebirth = send(t, "DDATA", [Metric(alias=99, float_value=1.0)], 3, "d", mono=100.0)
    assert rebirth == ("g", "n")


def test_ddeath_and_ndeath() -> None:
    t = tracker()
    births(t)
    samples, _ = send(t, "DDEATH", [], 3, "d")
    assert samples == {"speed": "BAD Sparkplug DDEATH: device g/n/d is offline"}
    samples, _ = send(t, "NDEATH", [Metric(name="bdSeq", datatype=DataType.INT64,
                                           long_value=0)], None)
    assert samples == {}  # a will from an older connection (bdSeq 0, current birth 1)
    samples, _ = send(t, "NDEATH", [Metric(name="bdSeq", datatype=DataType.INT64,
                                           long_value=1)], None)
    assert set(samples) == {"state", "speed", "other"}
    assert all(str(v).startswith("BAD Sparkplug NDEATH") for v in samples.values())
    _, rebirth = send(t, "NDATA", [Metric(alias=1, int_value=1)], 0)
    assert rebirth == ("g", "n")  # dead until the next NBIRTH


def test_historical_null_and_commands() -> None:
    t = tracker()
    births(t)
    samples, _ = send(t, "NDATA", [Metric(alias=1, int_value=5, is_historical=True)], 3)
    assert samples == {}
    samples, _ = send(t, "NDATA", [Metric(alias=1, is_null=True)], 4)
    assert samples == {"state": "BAD tag state: metric State is null"}
    samples, rebirth = send(t, "NCMD", [Metric(name="Node Control/Rebirth",
                                               boolean_value=True)], None)
    assert samples == {} and rebirth is None


def test_undecodable_payload_marks_its_scope_bad_and_asks_for_a_rebirth() -> None:
    t = tracker()
    births(t)
    r = t.on_message(SparkplugTopic("g", "DDATA", "n", "d"), b"\x0b", NOW, 0.0)
    assert [s.tag for s in r.samples] == ["speed"] and not r.samples[0].good
    assert r.rebirth == ("g", "n") and "undecodable" in (r.problem or "")
