"""Sparkplug B payloads: a hand-written protobuf wire-format decoder and encoder.

Why hand-written: the agent needs the ``Payload`` and ``Payload.Metric`` messages of the
Sparkplug B schema (``sparkplug_b.proto``) and nothing else, and protobuf's wire format is small
(varints, 32/64-bit fixed, length-delimited). Decoding it directly avoids a ``protobuf``
dependency and generated code; unknown fields are skipped by wire type, as protobuf requires, so
newer edge nodes that send fields we do not model (properties, metadata, datasets, templates)
still decode.

Fields modelled (numbers from sparkplug_b.proto)::

    Payload: 1 timestamp uint64 | 2 metrics repeated Metric | 3 seq uint64 | 4 uuid string
             | 5 body bytes
    Metric:  1 name string | 2 alias uint64 | 3 timestamp uint64 | 4 datatype uint32
             | 5 is_historical bool | 6 is_transient bool | 7 is_null bool
             | 10 int_value uint32 | 11 long_value uint64 | 12 float_value float
             | 13 double_value double | 14 boolean_value bool | 15 string_value string
             | 16 bytes_value bytes   (8 metadata, 9 properties, 17-19 dataset/template/
                                       extension are skipped)

Signed Sparkplug types travel as two's complement in the unsigned fields (Int8/16/32 in
``int_value``, Int64 in ``long_value``); ``metric_value`` undoes that by the declared datatype.
Malformed input raises ``DecodeError`` (truncated data, a bad wire type, a varint over 10 bytes).

Topics: ``spBv1.0/<group>/<NBIRTH|NDATA|NDEATH|NCMD|DBIRTH|DDATA|DDEATH|DCMD>/<node>[/<device>]``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from config.errors import DecodeError
from config.model import Value

__all__ = ["NAMESPACE", "DataType", "Metric", "Payload", "SparkplugTopic", "decode_payload",
           "encode_payload", "metric_value", "parse_topic", "rebirth_request"]

NAMESPACE = "spBv1.0"
_MESSAGE_TYPES = frozenset({"NBIRTH", "NDATA", "NDEATH", "NCMD", "DBIRTH", "DDATA", "DDEATH",
                            "DCMD", })


class DataType(IntEnum):
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19


_SIGNED_BITS = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}


@dataclass(slots=True)
class Metric:
    name: str | None = None
    alias: int | None = None
    timestamp: int | None = None  # ms since the epoch
    datatype: int | None = None
    is_historical: bool = False
    is_transient: bool = False
    is_null: bool = False
    int_value: int | None = None
    long_value: int | None = None
    float_value: float | None = None
    double_value: float | None = None
    boolean_value: bool | None = None
    string_value: str | None = None
    bytes_value: bytes | None = None


@dataclass(slots=True)
class Payload:
    timestamp: int | None = None
    metrics: list[Metric] = field(default_factory=list)
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    group: str
    message_type: str
    node: str
    device: str | None


def parse_topic(topic: str) -> SparkplugTopic | None:
    """The parts of a Sparkplug B topic, or None if ``topic`` is not one (STATE, other)."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[2] not in _MESSAGE_TYPES:
        return None
    device = parts[4] if len(parts) == 5 else None
    if (device is None) != parts[2].startswith("N"):
        return None
    return SparkplugTopic(parts[1], parts[2], parts[3], device)


def metric_value(m: Metric) -> Value:
    """The metric's value as a Python scalar, by its datatype; DecodeError when it has none
    we can represent (datasets, templates, files) or the value field is missing."""
    if m.is_null:
        return None
    dt = m.datatype
    if dt in _SIGNED_BITS:
        raw = m.int_value if m.int_value is not None else m.long_value
        if dt == DataType.INT64 and m.long_value is not None:
            raw = m.long_value
        if raw is None:
            raise DecodeError(f"metric {m.name or m.alias}: no integer value")
        # Masking to the declared width reads both sign-extended and narrow encodings.
        return _signed(raw, _SIGNED_BITS[DataType(dt)])
    if dt in (DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64,
              DataType.DATETIME):
        raw = m.long_value if m.long_value is not None else m.int_value
        if raw is None:
            raise DecodeError(f"metric {m.name or m.alias}: no integer value")
        return raw
    if dt == DataType.FLOAT:
        return _need(m, m.float_value)
    if dt == DataType.DOUBLE:
        return _need(m, m.double_value)
    if dt == DataType.BOOLEAN:
        return _need(m, m.boolean_value)
    if dt in (DataType.STRING, DataType.TEXT, DataType.UUID):
        return _need(m, m.string_value)
    if dt is None:
        # No datatype (allowed in data messages when the birth gave it): take the one value set.
        for v in (m.string_value, m.boolean_value, m.double_value, m.float_value,
                  m.long_value, m.int_value):
            if v is not None:
                return v
        raise DecodeError(f"metric {m.name or m.alias}: no value")
    raise DecodeError(f"metric {m.name or m.alias}: datatype {_type_name(dt)} is not supported "
                      "as a tag value")


def _need(m: Metric, v: Value) -> Value:
    if v is None:
        raise DecodeError(f"metric {m.name or m.alias}: no value for datatype "
                          f"{_type_name(m.datatype)}")
    return v


def _type_name(dt: int | None) -> str:
    try:
        return DataType(dt).name if dt is not None else "none"
    except ValueError:
        return str(dt)


def _signed(raw: int, bits: int) -> int:
    raw &= (1 << bits) - 1
    return raw - (1 << bits) if raw >> (bits - 1) else raw


# --------------------------------------------------------------------------- wire format

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(10):
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if i == 9:
            break
    raise DecodeError("varint longer than 10 bytes")


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for every field; LEN values as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        value: int | bytes
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            if pos + 8 > n:
                raise DecodeError("truncated 64-bit field")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _I32:
            if pos + 4 > n:
                raise DecodeError("truncated 32-bit field")
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > n:
                raise DecodeError("truncated length-delimited field")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise DecodeError(f"unsupported wire type {wire} (field {number})")
        out.append((number, wire, value))
    return out


def _as_int(wire: int, v: int | bytes, what: str) -> int:
    if wire != _VARINT or not isinstance(v, int):
        raise DecodeError(f"{what}: expected a varint")
    return v


def _as_bytes(wire: int, v: int | bytes, what: str) -> bytes:
    if wire != _LEN or not isinstance(v, bytes):
        raise DecodeError(f"{what}: expected length-delimited data")
    return v


def _as_text(wire: int, v: int | bytes, what: str) -> str:
    try:
        return _as_bytes(wire, v, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what}: not UTF-8") from exc


def _decode_metric(buf: bytes) -> Metric:
    m = Metric()
    for number, wire, v in _fields(buf):
        if number == 1:
            m.name = _as_text(wire, v, "metric name")
        elif number == 2:
            m.alias = _as_int(wire, v, "alias")
        elif number == 3:
            m.timestamp = _as_int(wire, v, "metric timestamp")
        elif number == 4:
            m.datatype = _as_int(wire, v, "datatype")
        elif number in (5, 6, 7, 14):
            flag = bool(_as_int(wire, v, "boolean"))
            if number == 5:
                m.is_historical = flag
            elif number == 6:
                m.is_transient = flag
            elif number == 7:
                m.is_null = flag
            else:
                m.boolean_value = flag
        elif number == 10:
            m.int_value = _as_int(wire, v, "int_value") & 0xFFFFFFFF
        elif number == 11:
            m.long_value = _as_int(wire, v, "long_value") & 0xFFFFFFFFFFFFFFFF
        elif number == 12:
            if wire != _I32 or not isinstance(v, bytes):
                raise DecodeError("float_value: expected a 32-bit field")
            m.float_value = struct.unpack("<f", v)[0]
        elif number == 13:
            if wire != _I64 or not isinstance(v, bytes):
                raise DecodeError("double_value: expected a 64-bit field")
            m.double_value = struct.unpack("<d", v)[0]
        elif number == 15:
            m.string_value = _as_text(wire, v, "string_value")
        elif number == 16:
            m.bytes_value = _as_bytes(wire, v, "bytes_value")
    return m


def decode_payload(data: bytes | bytearray) -> Payload:
    """Decode a Sparkplug B ``Payload``; DecodeError if ``data`` is not valid protobuf for it."""
    p = Payload()
    for number, wire, v in _fields(bytes(data)):
        if number == 1:
            p.timestamp = _as_int(wire, v, "timestamp")
        elif number == 2:
            p.metrics.append(_decode_metric(_as_bytes(wire, v, "metric")))
        elif number == 3:
            p.seq = _as_int(wire, v, "seq")
        elif number == 4:
            p.uuid = _as_text(wire, v, "uuid")
        elif number == 5:
            p.body = _as_bytes(wire, v, "body")
    return p


def _put_varint(out: bytearray, value: int) -> None:
    value &= 0xFFFFFFFFFFFFFFFF
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _put_key(out: bytearray, number: int, wire: int) -> None:
    _put_varint(out, number << 3 | wire)


def _put_len(out: bytearray, number: int, data: bytes) -> None:
    _put_key(out, number, _LEN)
    _put_varint(out, len(data))
    out += data


def _encode_metric(m: Metric) -> bytes:
    out = bytearray()
    if m.name is not None:
        _put_len(out, 1, m.name.encode("utf-8"))
    for number, v in ((2, m.alias), (3, m.timestamp), (4, m.datatype)):
        if v is not None:
            _put_key(out, number, _VARINT)
            _put_varint(out, v)
    for number, flag in ((5, m.is_historical), (6, m.is_transient), (7, m.is_null)):
        if flag:
            _put_key(out, number, _VARINT)
            _put_varint(out, 1)
    if m.int_value is not None:
        _put_key(out, 10, _VARINT)
        _put_varint(out, m.int_value & 0xFFFFFFFF)
    if m.long_value is not None:
        _put_key(out, 11, _VARINT)
        _put_varint(out, m.long_value)
    if m.float_value is not None:
        _put_key(out, 12, _I32)
        out += struct.pack("<f", m.float_value)
    if m.double_value is not None:
        _put_key(out, 13, _I64)
        out += struct.pack("<d", m.double_value)
    if m.boolean_value is not None:
        _put_key(out, 14, _VARINT)
        _put_varint(out, int(m.boolean_value))
    if m.string_value is not None:
        _put_len(out, 15, m.string_value.encode("utf-8"))
    if m.bytes_value is not None:
        _put_len(out, 16, m.bytes_value)
    return bytes(out)


def encode_payload(p: Payload) -> bytes:
    """Encode a ``Payload`` (rebirth requests, test and demo edge nodes)."""
    out = bytearray()
    if p.timestamp is not None:
        _put_key(out, 1, _VARINT)
        _put_varint(out, p.timestamp)
    for m in p.metrics:
        _put_len(out, 2, _encode_metric(m))
    if p.seq is not None:
        _put_key(out, 3, _VARINT)
        _put_varint(out, p.seq)
    if p.uuid is not None:
        _put_len(out, 4, p.uuid.encode("utf-8"))
    if p.body is not None:
        _put_len(out, 5, p.body)
    return bytes(out)


def rebirth_request(timestamp_ms: int) -> bytes:
    """The NCMD payload asking an edge node to publish its births again."""
    return encode_payload(Payload(timestamp=timestamp_ms, metrics=[Metric(
        name="Node Control/Rebirth", timestamp=timestamp_ms, datatype=DataType.BOOLEAN,
        boolean_value=True)]))
