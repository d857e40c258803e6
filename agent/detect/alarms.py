"""A machine's active alarms, from the samples of an OPC UA alarm tag, as a stop reason.

Pure: ``apply(sample value)`` updates the set, ``reason()`` answers from it. The samples are
JSON texts made by the OPC UA source (``protocols/opcua/alarms.py``)::

    {"kind": "alarm", "condition", "source", "source_node", "event_type", "active",
     "message", "severity"}                     one activation or clearing
    {"kind": "active", "alarms": [...]}         after a (re)connect: the whole active set,
                                                 which replaces what was known

An alarm is identified by (source node or source name, condition name). Only alarms of the
machine's ``sources`` (when given) count. ``reason()`` picks the most severe active alarm,
then the earliest activated, and maps it with the first matching rule; an unmapped alarm gives
its condition name as the code and its message as the text.

Invariant: a value that is not such a JSON text changes nothing (it is reported by ``apply``
returning False); the set only changes on a well-formed sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.detect.config import AlarmReason, AlarmsRule

__all__ = ["ActiveAlarms", "AlarmReasonChoice"]


@dataclass(frozen=True, slots=True)
class AlarmReasonChoice:
    code: str
    text: str | None
    category: str | None


def _key(alarm: dict[str, Any]) -> str:
    return f"{alarm.get('source_node') or alarm.get('source')}|{alarm.get('condition')}"


class ActiveAlarms:
    def __init__(self, rule: AlarmsRule) -> None:
        self.rule = rule
        self.tag = rule.tag
        self._sources = frozenset(rule.sources)
        # key -> (activation order, alarm fields)
        self.active: dict[str, tuple[int, dict[str, Any]]] = {}
        self._order = 0

    def _mine(self, alarm: dict[str, Any]) -> bool:
        if not self._sources:
            return True
        return alarm.get("source") in self._sources or alarm.get("source_node") in self._sources

    def apply(self, value: object) -> bool:
        """Apply one sample value; False if it is not an alarm sample (nothing changes)."""
        if not isinstance(value, str):
            return False
        try:
            body = json.loads(value)
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        if body.get("kind") == "active" and isinstance(body.get("alarms"), list):
            before = {k: v for k, v in self.active.items()}
            self.active = {}
            for alarm in body["alarms"]:
                if isinstance(alarm, dict) and self._mine(alarm):
                    key = _key(alarm)
                    # An alarm that stays active keeps its place in the activation order.
                    order = before[key][0] if key in before else self._next()
                    self.active[key] = (order, alarm)
            return True
        if body.get("kind") == "alarm":
            if not self._mine(body):
                return True
            key = _key(body)
            if body.get("active"):
                if key not in self.active:
                    self.active[key] = (self._next(), body)
                else:
                    self.active[key] = (self.active[key][0], body)
            else:
                self.active.pop(key, None)
            return True
        return False

    def _next(self) -> int:
        self._order += 1
        return self._order

    def reason(self, texts: dict[str, str]) -> AlarmReasonChoice | None:
        """The reason the active alarms give, or None when none is active."""
        if not self.active:
            return None
        _, alarm = min(self.active.values(),
                       key=lambda item: (-int(item[1].get("severity") or 0), item[0]))
        for rule in self.rule.reasons:
            if _matches(rule, alarm):
                text = rule.text or texts.get(rule.code) or alarm.get("message") or None
                return AlarmReasonChoice(rule.code, text,
                                         rule.category.value if rule.category else None)
        code = str(alarm.get("condition") or alarm.get("source") or "alarm")
        return AlarmReasonChoice(code, texts.get(code) or alarm.get("message") or None, None)

    def to_json(self) -> dict[str, Any]:
        return {"order": self._order,
                "active": [[k, o, a] for k, (o, a) in sorted(self.active.items())]}

    def restore(self, d: dict[str, Any]) -> None:
        self._order = int(d.get("order", 0))
        self.active = {str(k): (int(o), dict(a)) for k, o, a in d.get("active", [])}


def _matches(rule: AlarmReason, alarm: dict[str, Any]) -> bool:
    if rule.condition is not None and rule.condition != alarm.get("condition"):
        return False
    if rule.source is not None and rule.source not in (alarm.get("source"),
                                                       alarm.get("source_node")):
        return False
    return rule.event_type is None or rule.event_type == alarm.get("event_type")
