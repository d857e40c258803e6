"""Durations (``500ms``, ``5s``, ``2m``) and sizes (``2GiB``) as plant engineers write them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["DURATION_PATTERN", "ByteSize", "Duration", "DurationOrZero", "SizeOrZero",
           "format_duration", "parse_duration", "parse_size"]

# What the JSON Schema says a duration looks like (the parser also accepts spaces around it).
DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h|d)$"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_FACTORS = {
    None: 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}


def parse_duration(value: Any) -> float:
    """Seconds from ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1d"``. Bare numbers are refused
    so that nobody wonders whether ``5`` meant seconds or milliseconds."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"expected a duration like '500ms', '5s' or '2m', got {value!r}")
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a duration; write it like '500ms', '5s', '2m' or '1h'")
    return float(m.group(1)) * _DURATION_FACTORS[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def parse_size(value: Any) -> int:
    """Bytes from ``"2GiB"``, ``"500MB"``, ``"1048576"`` or an integer."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '2GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '2GiB' or '500MB', got {value!r}")
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a size; write it like '512MiB', '2GiB' or '500MB'")
    return int(float(m.group(1)) * _SIZE_FACTORS[m.group(2)])


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


# Intervals, timeouts, windows and capacities: zero makes no sense there (a division by zero,
# a loop that spins, a buffer that holds nothing), so it is refused with a located error.
# The few options where zero has a meaning use DurationOrZero / SizeOrZero.
DurationOrZero = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN,
                    "examples": ["500ms", "5s", "2m"]}),
]
Duration = Annotated[DurationOrZero, AfterValidator(_positive)]
SizeOrZero = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0},
                              {"type": "string", "pattern": _SIZE.pattern}],
                    "examples": ["512MiB", "2GiB"]}),
]
ByteSize = Annotated[SizeOrZero, AfterValidator(_positive)]
