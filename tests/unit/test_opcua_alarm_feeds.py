"""Alarm events -> samples, and the refresh bookkeeping for servers that send the
RefreshStart/RefreshEnd markers to every event item, or only to the Server object, or never."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from asyncua import ua

from config.model import utcnow
from protocols.opcua.alarms import AlarmFeeds

_O = ua.ObjectIds
A, B, MARKER = 11, 12, 99


def event(type_id: int, condition: str = "", active: bool = True) -> Any:
    fields: dict[str, Any] = {"EventType": ua.NodeId(type_id), "ConditionName": condition,
                              "SourceName": "M", "SourceNode": ua.NodeId(5, 1),
                              "Message": ua.LocalizedText(f"{condition} text"), "Severity": 500,
                              "Retain": True, "ActiveState/Id": active, "Time": utcnow()}
    return SimpleNamespace(**fields)


def cond(name: str, active: bool = True) -> Any:
    return event(_O.OffNormalAlarmType, name, active)


def run(feeds: AlarmFeeds, items: list[tuple[int, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for handle, ev in items:
        out += [(s.tag, json.loads(str(s.value))) for s in feeds.take(handle, ev, utcnow(), 0.0)]
    return out


def active(samples: list[tuple[str, dict[str, Any]]], tag: str) -> list[str]:
    (body,) = [b for t, b in samples if t == tag and b["kind"] == "active"]
    return [a["condition"] for a in body["alarms"]]


def test_markers_on_every_item() -> None:
    feeds = AlarmFeeds({A: "a", B: "b"})
    feeds.begin_refresh(0.0)
    out = run(feeds, [(A, event(_O.RefreshStartEventType)), (A, cond("Door")),
                      (A, event(_O.RefreshEndEventType)),
                      (B, event(_O.RefreshStartEventType)), (B, cond("Jam")),
                      (B, cond("Old", active=False)), (B, event(_O.RefreshEndEventType))])
    assert active(out, "a") == ["Door"]
    assert [b["alarms"] for t, b in out if t == "b"][-1][0]["condition"] == "Jam"
    assert not feeds.refreshing
    # After the refresh, events are samples of their own.
    (after,) = run(feeds, [(A, cond("Door", active=False))])
    assert after[1]["kind"] == "alarm" and after[1]["active"] is False


def test_markers_only_on_the_server_object() -> None:
    feeds = AlarmFeeds({A: "a"}, marker=MARKER)
    feeds.begin_refresh(0.0)
    out = run(feeds, [(MARKER, event(_O.RefreshStartEventType)), (A, cond("Door")),
                      (MARKER, event(_O.RefreshEndEventType))])
    assert out == [("a", {"kind": "active", "alarms": [{
        "condition": "Door", "source": "M", "source_node": "ns=1;i=5", "event_type": "i=10637",
        "active": True, "message": "Door text", "severity": 500}]})]


def test_no_end_marker_ever() -> None:
    feeds = AlarmFeeds({A: "a"})
    feeds.begin_refresh(0.0)
    assert run(feeds, [(A, cond("Door"))]) == []
    assert feeds.expire(1.0, utcnow()) == []
    (sample,) = feeds.expire(AlarmFeeds.REFRESH_LIMIT + 1, utcnow())
    assert json.loads(str(sample.value))["alarms"][0]["condition"] == "Door"


def test_queue_overflow_asks_for_a_refresh_and_unknown_items_are_ignored() -> None:
    feeds = AlarmFeeds({A: "a"})
    assert run(feeds, [(A, event(_O.EventQueueOverflowEventType)), (77, cond("X"))]) == []
    assert feeds.overflowed
