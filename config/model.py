"""The data that flows through the agent: samples in, events out.

Leaf module: imports nothing from the project. ``protocols/`` and ``buffer/`` may import it.

Flow::

    Source --TagSample--> MachineDetector --Event--> Buffer --(CloudEvent JSON)--> Sink

Invariants:
- Every datetime here is timezone-aware UTC.
- A ``TagSample`` with ``quality != GOOD`` may carry ``value=None``; a bad sample is never a
  guessed value (docs/architecture.md).
- ``Event.id`` is deterministic: a UUIDv5 over the facts that identify the event, so re-detecting
  the same fact after a crash gives the same id (docs/delivery.md).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "DATA_SCHEMA",
    "DATA_SCHEMA_VERSION",
    "EVENT_NAMESPACE",
    "Event",
    "EventType",
    "MachineState",
    "Quality",
    "TagSample",
    "Value",
    "age_seconds",
    "data_schema_uri",
    "event_id",
    "format_time",
    "parse_time",
    "utcnow",
]

Value = bool | int | float | str | None

# Fixed namespace for event ids. Changing it changes every id ever produced: never do that.
EVENT_NAMESPACE = uuid.UUID("6f1d2c7e-3b4a-5e8f-9a0b-1c2d3e4f5a6b")


class Quality(StrEnum):
    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class MachineState(StrEnum):
    RUNNING = "running"
    IDLE = "idle"
    DOWN = "down"
    PLANNED = "planned"
    UNKNOWN = "unknown"


class EventType(StrEnum):
    DOWNTIME_STARTED = "plantedge.downtime.started"
    DOWNTIME_ENDED = "plantedge.downtime.ended"
    SCRAP_RECORDED = "plantedge.scrap.recorded"
    SIGNAL_LOST = "plantedge.signal.lost"
    SIGNAL_RESTORED = "plantedge.signal.restored"
    DATA_GAP = "plantedge.data.gap"
    DOWNTIME_CLASSIFIED = "plantedge.downtime.classified"


# The versioned data contract of each event type. ``config/event_schemas/<type>/v<major>.json``
# is its JSON Schema, whose ``$id`` is the ``dataschema`` attribute every event carries.
# MAJOR.MINOR: a minor version only adds optional fields (a receiver built for 1.0 reads 1.3);
# anything else (a field removed, renamed, retyped, newly required) is a new major version in a
# new file, and the old file stays. tests/contract/test_event_schemas.py holds the rule against
# a frozen copy of the first release's schemas.
DATA_SCHEMA_VERSION: dict[EventType, str] = {t: "1.0" for t in EventType} | {
    EventType.DATA_GAP: "1.1",  # 1.1: dropped_by_sink (issue 15)
}


def data_schema_uri(type_: str, version: str) -> str:
    return f"urn:plant-edge-agent:event:{type_}:{version}"


DATA_SCHEMA: dict[EventType, str] = {
    t: data_schema_uri(t.value, v) for t, v in DATA_SCHEMA_VERSION.items()}


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and a ``Z`` suffix."""
    t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 (``Z`` or an offset); a naive time is taken as UTC."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC)


def age_seconds(rfc3339: str | None, now: datetime | None = None) -> float | None:
    """Seconds since an RFC 3339 time (never negative); None when absent or unreadable."""
    if rfc3339 is None:
        return None
    try:
        return round(max(0.0, ((now or utcnow()) - parse_time(rfc3339)).total_seconds()), 3)
    except ValueError:
        return None


def event_id(source: str, type_: str, *facts: object) -> str:
    """Deterministic event id: UUIDv5 over the source, the type and the identifying facts."""
    key = "|".join([source, type_, *(str(f) for f in facts)])
    return str(uuid.uuid5(EVENT_NAMESPACE, key))


@dataclass(slots=True)
class TagSample:
    """One observed value of one configured tag. Treat it as immutable once emitted.

    Not ``frozen``: a frozen dataclass costs ~3x more to construct, and a sample is built for
    every tag on every poll (it was the largest single cost of the detection benchmark).

    ``source_time`` is the protocol's own timestamp when it has one (OPC UA, some MQTT payloads);
    ``agent_time`` is when the agent received it. ``time`` is what detection uses.
    ``detail`` says why a sample is not good (shown in /status and logs).
    """

    tag: str
    value: Value
    quality: Quality
    agent_time: datetime
    source_time: datetime | None = None
    detail: str | None = None

    @property
    def time(self) -> datetime:
        return self.source_time or self.agent_time

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD


@dataclass(frozen=True, slots=True)
class Event:
    """A business fact, ready to be buffered and delivered as a CloudEvents 1.0 object.

    ``key`` is the ordering key (the machine id, or ``agent`` for agent-level events such as
    data gaps): first deliveries keep detection order per key (docs/delivery.md).
    """

    id: str
    type: EventType
    source: str
    time: datetime
    key: str
    sequence: int
    data: dict[str, Any] = field(default_factory=dict)

    def to_cloudevent(self, agent_id: str, detected_at: datetime | None = None) -> dict[str, Any]:
        """``detected_at``: when the agent committed it (the ``detectedat`` extension
        attribute, so a receiver can tell detection lag from delivery delay); left out by
        ``replay``, which has no commit."""
        doc = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": str(self.type),
            "time": format_time(self.time),
            "datacontenttype": "application/json",
            "dataschema": DATA_SCHEMA[self.type],
            "agentid": agent_id,
            "sequence": str(self.sequence),
            "data": self.data,
        }
        if detected_at is not None:
            doc["detectedat"] = format_time(detected_at)
        return doc

    def to_json(self, agent_id: str, detected_at: datetime | None = None) -> str:
        return json.dumps(self.to_cloudevent(agent_id, detected_at), separators=(",", ":"),
                          sort_keys=True)
