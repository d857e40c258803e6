"""OPC UA Alarms & Conditions as samples: the event filter, ConditionRefresh, event -> sample.

A tag with ``kind: alarms`` is an event monitored item on an event notifier (the Server object
``i=2253`` or a machine object that is a notifier). Its samples are JSON texts, so they flow
through detection, replay and record like any other value::

    {"kind": "alarm", "condition": "DoorOpen", "source": "Filler", "source_node": "ns=1;s=..",
     "event_type": "i=10637", "active": true, "message": "...", "severity": 500}
    {"kind": "active", "alarms": [ {...one per active alarm, same fields...} ]}

The second form is a snapshot: after every (re)connect the source calls ConditionRefresh; the
server answers with RefreshStart, the current state of every retained condition, RefreshEnd.
What arrives in between is collected and emitted as one ``active`` sample at RefreshEnd, which
*replaces* what detection believed (alarms cleared while the agent was away are gone).

Queue size: the event item's queue is ``queue_size`` (default 1000, never 0: a server may
revise 0 to 1 and keep only the last event of a publishing interval). The where clause also
lets EventQueueOverflow events through; one makes the source run ConditionRefresh again, so
the active set is right even after the server dropped events.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from config.model import Quality, TagSample

__all__ = ["AlarmFeeds", "alarm_filter", "condition_refresh_request"]

_NodeId: Any = ua.NodeId
_O = ua.ObjectIds
# (attribute name in asyncua's Event, type that defines it, browse path)
_SELECT = (
    ("EventType", _O.BaseEventType, ("EventType",)),
    ("SourceNode", _O.BaseEventType, ("SourceNode",)),
    ("SourceName", _O.BaseEventType, ("SourceName",)),
    ("Time", _O.BaseEventType, ("Time",)),
    ("Message", _O.BaseEventType, ("Message",)),
    ("Severity", _O.BaseEventType, ("Severity",)),
    ("ConditionName", _O.ConditionType, ("ConditionName",)),
    ("Retain", _O.ConditionType, ("Retain",)),
    ("ActiveState/Id", _O.AlarmConditionType, ("ActiveState", "Id")),
)
_PASS_TYPES = (_O.AlarmConditionType, _O.RefreshStartEventType, _O.RefreshEndEventType,
               _O.EventQueueOverflowEventType)


def alarm_filter() -> ua.EventFilter:
    """Select the fields above; let AlarmConditionType (and subtypes), the refresh markers and
    queue-overflow events through."""
    select = []
    for _, type_id, path in _SELECT:
        op = ua.SimpleAttributeOperand()
        op.TypeDefinitionId = _NodeId(type_id)
        op.BrowsePath = [ua.QualifiedName(p, 0) for p in path]
        op.AttributeId = ua.AttributeIds.Value
        select.append(op)
    # Elements: 0 = Or(1, 2); 1 = Or(3, 4); 2 = Or(5, 6); 3..6 = OfType(each type).
    elements = []
    for a, b in ((1, 2), (3, 4), (5, 6)):
        el = ua.ContentFilterElement()
        el.FilterOperator = ua.FilterOperator.Or
        el.FilterOperands = [ua.ElementOperand(Index=a), ua.ElementOperand(Index=b)]
        elements.append(el)
    for type_id in _PASS_TYPES:
        el = ua.ContentFilterElement()
        el.FilterOperator = ua.FilterOperator.OfType
        el.FilterOperands = [ua.LiteralOperand(Value=ua.Variant(_NodeId(type_id)))]
        elements.append(el)
    where = ua.ContentFilter()
    where.Elements = elements
    return ua.EventFilter(SelectClauses=select, WhereClause=where)


def condition_refresh_request(subscription_id: int) -> ua.CallMethodRequest:
    req = ua.CallMethodRequest()
    req.ObjectId = _NodeId(_O.ConditionType)
    req.MethodId = _NodeId(_O.ConditionType_ConditionRefresh)
    req.InputArguments = [ua.Variant(subscription_id, ua.VariantType.UInt32)]
    return req


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.NodeId):
        return value.to_string()
    return str(value)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _fields(event: Any) -> dict[str, Any]:
    get = event.__dict__.get
    active = get("ActiveState/Id")
    return {"condition": _text(get("ConditionName")), "source": _text(get("SourceName")),
            "source_node": _text(get("SourceNode")), "event_type": _text(get("EventType")),
            "active": bool(active), "message": _text(get("Message")) or "",
            "severity": int(get("Severity") or 0)}


class AlarmFeeds:
    """Turns the events of a session's alarm tags into samples (see the module docstring).

    A refresh spans every alarm tag of the subscription: it begins when the source calls
    ConditionRefresh (or a RefreshStart arrives) and ends at the first RefreshEnd on any of
    them (servers differ in which monitored items get the markers; the condition events of a
    refresh always come before its end marker), or after ``REFRESH_LIMIT`` seconds if the
    server never sends one. Each tag then gets one ``active`` snapshot sample.
    """

    REFRESH_LIMIT = 30.0

    def __init__(self, tags: dict[int, str]) -> None:
        self.tags = tags  # server handle -> tag id
        self.overflowed = False  # the server dropped events: ConditionRefresh again
        self._snapshot: dict[str, list[dict[str, Any]]] | None = None
        self._refresh_until = 0.0

    def __bool__(self) -> bool:
        return bool(self.tags)

    @property
    def refreshing(self) -> bool:
        return self._snapshot is not None

    def begin_refresh(self, now_mono: float) -> None:
        self.overflowed = False
        self._snapshot = {tag: [] for tag in self.tags.values()}
        self._refresh_until = now_mono + self.REFRESH_LIMIT

    def expire(self, now_mono: float, now: datetime) -> list[TagSample]:
        """End a refresh whose end marker never came."""
        if self._snapshot is not None and now_mono > self._refresh_until:
            return self._end_refresh(now)
        return []

    def take(self, server_handle: int | None, event: Any, now: datetime,
             now_mono: float) -> list[TagSample]:
        tag = self.tags.get(server_handle if server_handle is not None else -1)
        if tag is None:
            return []
        get = event.__dict__.get
        etype = get("EventType")
        ident = etype.Identifier if isinstance(etype, ua.NodeId) and \
            etype.NamespaceIndex == 0 else None
        if ident == _O.RefreshStartEventType:
            if self._snapshot is None:
                self.begin_refresh(now_mono)
            return []
        if ident == _O.RefreshEndEventType:
            return self._end_refresh(now) if self._snapshot is not None else []
        if ident == _O.EventQueueOverflowEventType:
            self.overflowed = True
            return []
        fields = _fields(event)
        if self._snapshot is not None:
            if fields["active"]:
                self._snapshot[tag].append(fields)
            return []
        return [_sample(tag, {"kind": "alarm", **fields}, _time(get("Time")) or now, now)]

    def _end_refresh(self, now: datetime) -> list[TagSample]:
        snapshot, self._snapshot = self._snapshot or {}, None
        out = []
        for tag, alarms in snapshot.items():
            alarms.sort(key=lambda a: (a["source"] or "", a["condition"] or ""))
            out.append(_sample(tag, {"kind": "active", "alarms": alarms}, now, now))
        return out


def _sample(tag: str, body: dict[str, Any], t: datetime, now: datetime) -> TagSample:
    return TagSample(tag, json.dumps(body, sort_keys=True, separators=(",", ":")),
                     Quality.GOOD, now, t)
