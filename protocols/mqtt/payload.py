"""Turning one MQTT message into samples of the ``topic`` tags it matches.

A message is parsed at most once, however many tags read it (a status message often carries
the state, the reason and the order). Each tag then takes its value:

- with ``value: <json path>``: the JSON value there, checked against ``value_type``;
- without: the whole payload as UTF-8 text; ``auto`` makes it a number when it is one (JSON
  number syntax), text otherwise; ``number``/``bool``/``string`` insist.

Anything that does not fit (invalid JSON, NaN/Infinity, a missing key, an object where a value
was expected, a boolean where a number was configured, non-UTF-8 bytes) raises ``DecodeError``
with a sentence saying what and where; the caller turns it into a bad sample. Nothing is
converted by guesswork: ``"12"`` is not the number 12 when the tag wants a number.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from config.errors import DecodeError
from config.model import Value, parse_time
from protocols.mqtt.config import TimestampFormat, TopicTag, ValueType
from protocols.mqtt.jsonpath import JsonPath, extract, format_path

__all__ = ["Message", "TopicReader", "excerpt"]

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_EPOCH_MS_ABOVE = 1e11  # 1e11 s is the year 5138; 1e11 ms is 1973
_SCALARS = frozenset({str, int, float, bool})


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every message: json.loads with options builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def excerpt(data: bytes | bytearray, limit: int = 60) -> str:
    """A short printable view of a payload for logs."""
    text = repr(data[:limit])
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


class Message:
    """One received payload; the JSON document is parsed on first use and kept."""

    __slots__ = ("_doc", "_error", "data")

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self._doc: Any = None
        self._error: str | None = None

    def document(self) -> Any:
        if self._doc is None and self._error is None:
            try:
                self._doc = _DECODER.decode(self.data.decode("utf-8"))
            except UnicodeDecodeError:
                self._error = "payload is not JSON (not UTF-8 text)"
            except (ValueError, RecursionError) as exc:
                self._error = f"payload is not JSON ({_short(exc)})"
        if self._error is not None:
            raise DecodeError(self._error)
        return self._doc


@dataclass(frozen=True, slots=True)
class TopicReader:
    """The compiled reading rule of one ``topic`` tag."""

    tag: str
    value_path: JsonPath | None
    value_type: ValueType
    timestamp_path: JsonPath | None
    timestamp_format: TimestampFormat

    @classmethod
    def of(cls, tag_id: str, tag: TopicTag) -> TopicReader:
        return cls(tag_id, tag.value_path, tag.value_type, tag.timestamp_path,
                   tag.timestamp_format)

    def read(self, msg: Message) -> tuple[Value, datetime | None]:
        """(value, source time); DecodeError when the message does not give one."""
        if self.value_path is None:
            value = self._raw(msg.data)
        else:
            value = self._typed(_at(msg.document(), self.value_path, "value"))
        ts = None
        if self.timestamp_path is not None:
            ts = self._time(_at(msg.document(), self.timestamp_path, "timestamp"))
        return value, ts

    def _raw(self, data: bytes | bytearray) -> Value:
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DecodeError("payload is not UTF-8 text") from None
        kind = self.value_type
        if kind is ValueType.STRING:
            return text
        if kind is ValueType.BOOL:
            if text in ("true", "false"):
                return text == "true"
            raise DecodeError(f"payload {text[:40]!r} is not true or false")
        if _NUMBER.fullmatch(text):
            number = float(text)
            if not math.isfinite(number):
                raise DecodeError(f"payload {text[:40]!r} is out of range")
            return int(text) if text.lstrip("-").isdigit() else number
        if kind is ValueType.NUMBER:
            raise DecodeError(f"payload {text[:40]!r} is not a number")
        return text

    def _typed(self, v: Any) -> Value:
        kind = self.value_type
        if kind is ValueType.AUTO and type(v) in _SCALARS:
            return v
        where = format_path(self.value_path or ())
        if isinstance(v, bool):
            ok = kind in (ValueType.AUTO, ValueType.BOOL)
        elif isinstance(v, int | float):
            ok = kind in (ValueType.AUTO, ValueType.NUMBER)
        elif isinstance(v, str):
            ok = kind in (ValueType.AUTO, ValueType.STRING)
        else:
            what = "null" if v is None else "an array" if isinstance(v, list) else "an object"
            raise DecodeError(f"{where} is {what}, not a value")
        if not ok:
            raise DecodeError(f"{where} is {_json_kind(v)} {_short_value(v)}, expected "
                              f"{'a ' + kind.value if kind is not ValueType.AUTO else 'a value'}")
        return v

    def _time(self, v: Any) -> datetime:
        fmt = self.timestamp_format
        try:
            if isinstance(v, str) and fmt in (TimestampFormat.AUTO, TimestampFormat.RFC3339):
                return parse_time(v)
            if isinstance(v, int | float) and not isinstance(v, bool) \
                    and fmt is not TimestampFormat.RFC3339:
                ms = fmt is TimestampFormat.EPOCH_MS or (
                    fmt is TimestampFormat.AUTO and abs(v) > _EPOCH_MS_ABOVE)
                return datetime.fromtimestamp(v / 1000.0 if ms else v, UTC)
        except (ValueError, OverflowError, OSError) as exc:
            where = format_path(self.timestamp_path or ())
            raise DecodeError(f"timestamp {where} {_short_value(v)}: {_short(exc)}") from exc
        where = format_path(self.timestamp_path or ())
        wanted = ("an RFC 3339 time or an epoch number" if fmt is TimestampFormat.AUTO
                  else fmt.value)
        raise DecodeError(f"timestamp {where} is {_json_kind(v)} {_short_value(v)}, not "
                          f"{wanted}")


def _at(doc: Any, path: JsonPath, what: str) -> Any:
    try:
        return extract(doc, path)
    except LookupError as exc:
        raise DecodeError(f"{what}: {exc}") from None


def _json_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "text"
    return "null" if v is None else "a structure"


def _short_value(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 80 else text[:77] + "..."
