"""OPC UA DataValues as samples: status -> quality, timestamps, value types.

A value of the wrong type (tag ``type``) or a non-scalar is bad, with a detail naming the tag
and the node; an Uncertain status gives an uncertain sample; a Bad status a bad one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from config.model import Quality, TagSample, Value
from protocols.opcua.config import OpcuaValueType, TimestampChoice

__all__ = ["to_sample"]

_PLAIN = frozenset({bool, int, float, str})
_FITS = {OpcuaValueType.BOOL: frozenset({bool}), OpcuaValueType.INT: frozenset({int}),
         OpcuaValueType.FLOAT: frozenset({float, int}), OpcuaValueType.STRING: frozenset({str})}


def _aware(t: datetime | None) -> datetime | None:
    if t is None or t.tzinfo is UTC:  # asyncua decodes to aware UTC already
        return t
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _convert(raw: Any, expected: OpcuaValueType | None) -> tuple[Value, str | None]:
    """(value, None) or (None, why it is not usable)."""
    kind = type(raw)  # fast path for the common case (exact types, bool is not an int here)
    if expected is None:
        if kind in _PLAIN:
            return raw, None
    elif kind in _FITS[expected]:
        return (float(raw) if expected is OpcuaValueType.FLOAT else raw), None
    if isinstance(raw, ua.LocalizedText):
        raw = raw.Text
    if isinstance(raw, list | tuple):
        return None, f"an array of {len(raw)} values, not a single value"
    if raw is not None and not isinstance(raw, bool | int | float | str):
        return None, f"a {type(raw).__name__}, not a number, boolean or text"
    if expected is None or raw is None:
        return raw, None
    if expected is OpcuaValueType.BOOL and isinstance(raw, bool):
        return raw, None
    if expected is OpcuaValueType.INT and isinstance(raw, int) and not isinstance(raw, bool):
        return raw, None
    if expected is OpcuaValueType.FLOAT and isinstance(raw, int | float) \
            and not isinstance(raw, bool):
        return float(raw), None
    if expected is OpcuaValueType.STRING and isinstance(raw, str):
        return raw, None
    return None, f"{type(raw).__name__} value {raw!r}, but the tag expects {expected.value}"


def to_sample(tag_id: str, node: str, dv: Any, expected: OpcuaValueType | None,
              timestamp: TimestampChoice, now: datetime) -> TagSample:
    """One DataValue as a TagSample (see the module docstring for the mapping)."""
    status = dv.StatusCode if dv.StatusCode is not None else ua.StatusCode()
    if timestamp is TimestampChoice.SOURCE:
        t = _aware(dv.SourceTimestamp) or _aware(dv.ServerTimestamp)
    elif timestamp is TimestampChoice.SERVER:
        t = _aware(dv.ServerTimestamp) or _aware(dv.SourceTimestamp)
    else:
        t = None
    if status.is_bad():
        return TagSample(tag_id, None, Quality.BAD, now, t,
                         f"tag {tag_id} (node {node}): {status.name}"
                         + (f": {status.doc}" if status.doc else ""))
    raw = dv.Value.Value if dv.Value is not None else None
    value, problem = _convert(raw, expected)
    if problem is not None:
        return TagSample(tag_id, None, Quality.BAD, now, t,
                         f"tag {tag_id} (node {node}): the node delivers {problem}")
    if status.is_uncertain():
        return TagSample(tag_id, value, Quality.UNCERTAIN, now, t,
                         f"tag {tag_id} (node {node}): {status.name}")
    if value is None:
        return TagSample(tag_id, None, Quality.BAD, now, t,
                         f"tag {tag_id} (node {node}): the node has no value")
    return TagSample(tag_id, value, Quality.GOOD, now, t)
