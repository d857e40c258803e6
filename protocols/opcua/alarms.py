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

__all__ = ["AlarmFeeds", "alarm_filter", "condition_refresh_request", "refresh_marker_filter"]

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

    Refresh bookkeeping, per alarm tag (servers differ in which monitored items get the
    RefreshStart/RefreshEnd markers: the specification says every event item of the
    subscription; node-opcua sends them only to items on the Server object)::

        ConditionRefresh called ──> every tag collecting
        RefreshStart on tag X   ──> X collects afresh and waits for its own RefreshEnd
        RefreshEnd on any item  ──> the snapshot of that tag (if it had its own start) and of
                                    every tag that has not seen a RefreshStart of its own
                                    (the marker item on the Server object serves those)
        no RefreshEnd within REFRESH_LIMIT ──> whatever was collected is emitted

    The condition events of a refresh always come before its end marker in the publish
    stream, so a snapshot is complete when it is emitted.
    """

    REFRESH_LIMIT = 30.0

    def __init__(self, tags: dict[int, str], marker: int | None = None) -> None:
        self.tags = tags  # server handle -> tag id
        self.marker = marker  # server handle of the refresh-marker item, if one was added
        self.overflowed = False  # the server dropped events: ConditionRefresh again
        self._collecting: dict[str, list[dict[str, Any]]] = {}
        self._own_markers: set[str] = set()
        self._refresh_until = 0.0

    def __bool__(self) -> bool:
        return bool(self.tags)

    @property
    def refreshing(self) -> bool:
        return bool(self._collecting)

    def begin_refresh(self, now_mono: float) -> None:
        self.overflowed = False
        self._collecting = {tag: [] for tag in self.tags.values()}
        self._own_markers = set()
        self._refresh_until = now_mono + self.REFRESH_LIMIT

    def expire(self, now_mono: float, now: datetime) -> list[TagSample]:
        """End a refresh whose end marker never came."""
        if self._collecting and now_mono > self._refresh_until:
            return self._emit(list(self._collecting), now)
        return []

    def take(self, server_handle: int | None, event: Any, now: datetime,
             now_mono: float) -> list[TagSample]:
        tag = self.tags.get(server_handle if server_handle is not None else -1)
        marker = server_handle is not None and server_handle == self.marker
        if tag is None and not marker:
            return []
        get = event.__dict__.get
        etype = get("EventType")
        ident = etype.Identifier if isinstance(etype, ua.NodeId) and \
            etype.NamespaceIndex == 0 else None
        if ident == _O.RefreshStartEventType:
            if tag is not None:
                if not self._collecting:
                    self._refresh_until = now_mono + self.REFRESH_LIMIT
                self._collecting[tag] = []
                self._own_markers.add(tag)
            return []
        if ident == _O.RefreshEndEventType:
            done = [t for t in self._collecting if t not in self._own_markers]
            if tag is not None and tag in self._own_markers:
                self._own_markers.discard(tag)
                done.append(tag)
            return self._emit(done, now)
        if tag is None:
            return []  # the marker item carries nothing else
        if ident == _O.EventQueueOverflowEventType:
            self.overflowed = True
            return []
        fields = _fields(event)
        if tag in self._collecting:
            if fields["active"]:
                self._collecting[tag].append(fields)
            return []
        return [_sample(tag, {"kind": "alarm", **fields}, _time(get("Time")) or now, now)]

    def _emit(self, tags: list[str], now: datetime) -> list[TagSample]:
        out = []
        for tag in tags:
            alarms = self._collecting.pop(tag, None)
            if alarms is None:
                continue
            alarms.sort(key=lambda a: (a["source"] or "", a["condition"] or ""))
            out.append(_sample(tag, {"kind": "active", "alarms": alarms}, now, now))
        return out


def refresh_marker_filter() -> ua.EventFilter:
    """For the marker item on the Server object: only RefreshStart and RefreshEnd pass."""
    op = ua.SimpleAttributeOperand()
    op.TypeDefinitionId = _NodeId(_O.BaseEventType)
    op.BrowsePath = [ua.QualifiedName("EventType", 0)]
    op.AttributeId = ua.AttributeIds.Value
    el = ua.ContentFilterElement()
    el.FilterOperator = ua.FilterOperator.Or
    el.FilterOperands = [ua.ElementOperand(Index=1), ua.ElementOperand(Index=2)]
    elements = [el]
    for type_id in (_O.RefreshStartEventType, _O.RefreshEndEventType):
        of = ua.ContentFilterElement()
        of.FilterOperator = ua.FilterOperator.OfType
        of.FilterOperands = [ua.LiteralOperand(Value=ua.Variant(_NodeId(type_id)))]
        elements.append(of)
    where = ua.ContentFilter()
    where.Elements = elements
    return ua.EventFilter(SelectClauses=[op], WhereClause=where)


def _sample(tag: str, body: dict[str, Any], t: datetime, now: datetime) -> TagSample:
    return TagSample(tag, json.dumps(body, sort_keys=True, separators=(",", ":")),
                     Quality.GOOD, now, t)
