"""Alarm events -> samples, and the refresh bookkeeping for servers that send the
RefreshStart/RefreshEnd markers to every event item, or only to the Server object, or never."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
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


def test_an_alarm_cleared_during_a_refresh_is_not_in_its_answer() -> None:
    """Live events may come between ConditionRefresh and RefreshEnd (on a tag that sees no
    markers of its own, everything after the call is collected): the latest state of each
    condition wins, so a door raised and cleared meanwhile is not reported active."""
    feeds = AlarmFeeds({A: "a"}, marker=MARKER)
    feeds.begin_refresh(0.0)
    out = run(feeds, [(A, cond("Door")), (MARKER, event(_O.RefreshStartEventType)),
                      (A, cond("Jam")), (A, cond("Door", active=False)),
                      (A, cond("Jam")),  # the refresh's copy of a live event: once
                      (MARKER, event(_O.RefreshEndEventType))])
    assert active(out, "a") == ["Jam"]


def test_a_branch_state_is_not_the_condition_state() -> None:
    """A server with condition branches sends the state of an earlier activation (still to be
    acknowledged) with a BranchId, live and in every refresh: that is history, not an active
    alarm of the condition itself."""
    branch = cond("Door")
    branch.BranchId = ua.NodeId(77, 1)
    feeds = AlarmFeeds({A: "a"}, marker=MARKER)
    feeds.begin_refresh(0.0)
    out = run(feeds, [(MARKER, event(_O.RefreshStartEventType)), (A, branch),
                      (A, cond("Door", active=False)), (MARKER, event(_O.RefreshEndEventType))])
    assert active(out, "a") == []
    assert run(feeds, [(A, branch)]) == []
    main = cond("Door")
    main.BranchId = ua.NodeId()  # servers without branches send a null BranchId
    ((_, body),) = run(feeds, [(A, main)])
    assert body["kind"] == "alarm" and body["active"] is True


def test_a_machine_taking_reasons_from_a_tag_that_is_no_alarm_tag_is_refused() -> None:
    from agent.wiring.load import load_config_text
    from config.errors import ConfigError

    text = """
agent: {id: e, site: s}
sources:
  p: {type: opcua, endpoint: "opc.tcp://h:4840",
      tags: {st: {node: "ns=1;s=A"}, al: {node: "ns=1;s=B"}, ok: {node: "i=2253", kind: alarms}}}
machines:
  m: {line: l, state: {tag: st, map: {1: running}}, downtime: {alarms: {tag: al}}}
  n: {line: l, state: {tag: st, map: {1: running}}, downtime: {alarms: {tag: ok}}}
sinks: {c: {type: http, url: "http://h/e"}}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.yaml")
    (issue,) = [str(i) for i in info.value.issues]
    assert issue.startswith("c.yaml:7:") and "machines.m.downtime.alarms.tag" in issue
    assert "not an OPC UA tag of kind: alarms" in issue


def test_the_source_node_is_also_given_by_namespace_uri() -> None:
    """Tags name nodes as nsu=<uri>;... (stable when the server renumbers its namespaces), so
    a machine's alarm ``sources`` and rules may too: the sample carries both forms."""
    from agent.detect.alarms import ActiveAlarms
    from agent.detect.config import AlarmsRule

    feeds = AlarmFeeds({A: "a"}, namespaces=["http://opcfoundation.org/UA/", "urn:acme:plant"])
    ((_, body),) = run(feeds, [(A, cond("Door"))])
    assert (body["source_node"], body["source_nsu"]) == ("ns=1;i=5", "nsu=urn:acme:plant;i=5")
    rule = AlarmsRule.model_validate({
        "tag": "a", "sources": ["nsu=urn:acme:plant;i=5"],
        "reasons": [{"source": "nsu=urn:acme:plant;i=5", "code": "DOOR"}]})
    alarms = ActiveAlarms(rule)
    assert alarms.apply(json.dumps(body))
    choice = alarms.reason({})
    assert choice is not None and choice.code == "DOOR"


def test_an_unknown_alarm_set_gives_no_reason() -> None:
    """A bad sample of the alarm tag (a session before its ConditionRefresh, a lost link)
    empties the set: a stop then has no alarm reason rather than a stale one."""
    from datetime import timedelta

    from agent.detect.config import MachineConfig
    from agent.detect.machine import MachineDetector
    from config.model import Quality, TagSample

    det = MachineDetector("m", MachineConfig.model_validate({
        "line": "l", "state": {"tag": "st", "map": {1: "running", 3: "down"}},
        "downtime": {"alarms": {"tag": "al"}}}), "s")
    t0 = utcnow()
    door = json.dumps({"kind": "alarm", "condition": "Door", "source": "M", "active": True})
    det.on_samples([TagSample("st", 1, Quality.GOOD, t0, t0),
                    TagSample("al", door, Quality.GOOD, t0, t0)])
    assert det.alarms is not None and det.alarms.active
    t1 = t0 + timedelta(seconds=1)
    det.on_samples([TagSample("al", None, Quality.BAD, t1, None, "unknown")])
    assert not det.alarms.active and det.dirty
    t2 = t1 + timedelta(seconds=1)
    events = det.on_samples([TagSample("st", 3, Quality.GOOD, t2, t2)])
    assert [e.data["reason_code"] for e in events] == [None]
