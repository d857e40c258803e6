"""Classifying episodes from the operator or an API, pure (no clock, no I/O), and across a
restart (the detector state goes through its JSON snapshot as through the buffer)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agent.detect.classify import RECENT, EpisodeNotFound, UnknownCode
from agent.detect.config import MachineConfig
from agent.detect.machine import MachineDetector
from config.model import Event, EventType, Quality, TagSample, parse_time

T0 = parse_time("2026-11-28T08:00:00Z")
CFG = MachineConfig.model_validate({
    "line": "l1", "state": {"tag": "st", "map": {"1": "running", "3": "down"}},
    "downtime": {"min_duration": "5s", "reason_tag": "rsn",
                 "reasons": {"7": "Bottle jam", "9": "Changeover"},
                 "reason_categories": {"9": "planned"}}})


def det() -> MachineDetector:
    return MachineDetector("m1", CFG, "s1")


def feed(d: MachineDetector, seconds: float, **values: object) -> list[Event]:
    t = T0 + timedelta(seconds=seconds)
    out = d.on_tick(t)
    out += d.on_samples([TagSample(tag, v, Quality.GOOD, t) for tag, v in values.items()])  # type: ignore[arg-type]
    return out


def restarted(d: MachineDetector) -> MachineDetector:
    fresh = det()
    fresh.restore(d.snapshot())
    return fresh


def stop(d: MachineDetector, start: float, end: float) -> str:
    feed(d, start, st=3)
    events = feed(d, end, st=1)
    assert events[-1].type is EventType.DOWNTIME_ENDED
    return str(events[-1].data["episode_id"])


def test_classify_the_latest_ended_stop_then_the_same_again_is_one_event() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    ep = stop(d, 10, 40)
    at = T0 + timedelta(minutes=30)  # long after reason_grace: the operator is not bound by it
    result, events = d.classify(None, "9", "changeover to 0.5 l", "operator", at)
    assert result.created and result.episode_id == ep
    assert [e.type for e in events] == [EventType.DOWNTIME_CLASSIFIED]
    e = events[0]
    assert e.id == result.event_id and e.time == at
    assert e.data["category"] == "planned" and e.data["reason"] == "Changeover"
    assert e.data["comment"] == "changeover to 0.5 l" and e.data["classified_by"] == "operator"
    again, more = d.classify(ep, "9", "changeover to 0.5 l", "operator", at)
    assert not again.created and again.event_id == e.id and more == []
    # After a restart the same request still finds it: no second event.
    d2 = restarted(d)
    again, more = d2.classify(ep, "9", "changeover to 0.5 l", "operator", at)
    assert not again.created and again.event_id == e.id and more == []
    listed = d2.episodes(5)
    assert listed[0]["episode_id"] == ep and listed[0]["reason_code"] == "9"
    assert listed[0]["classified_by"] == "operator"


def test_a_crash_before_the_commit_gives_the_same_id_on_the_retry() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    stop(d, 10, 40)
    saved = d.snapshot()  # what the buffer holds: the classification was never committed
    at = T0 + timedelta(minutes=2)
    first, _ = d.classify(None, "7", None, "api", at)
    d2 = det()
    d2.restore(saved)
    retry, _ = d2.classify(None, "7", None, "api", at + timedelta(seconds=3))
    assert retry.event_id == first.event_id and retry.created


def test_unknown_code_and_episode_change_nothing() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    with pytest.raises(EpisodeNotFound):
        d.classify(None, "7", None, "api", T0)  # nothing reported yet
    ep = stop(d, 10, 40)
    before, d.dirty = d.snapshot(), False  # as after the runtime's commit
    with pytest.raises(UnknownCode) as exc:
        d.classify(ep, "42", None, "api", T0)
    assert exc.value.known == ["7", "9"]
    with pytest.raises(EpisodeNotFound):
        d.classify("nope", "7", None, "api", T0)
    assert d.snapshot() == before and not d.dirty


def test_an_unreported_stop_is_not_classified_yet() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    feed(d, 10, st=3)  # shorter than min_duration so far
    ep = d.episode
    assert ep is not None and not ep.announced
    with pytest.raises(EpisodeNotFound, match="not reported yet"):
        d.classify(ep.episode_id, "7", None, "operator", T0 + timedelta(seconds=11))


def test_open_stop_classified_its_end_carries_the_code_across_a_restart() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    feed(d, 10, st=3)
    feed(d, 16, st=3)  # announced
    result, events = d.classify(None, "7", None, "operator", T0 + timedelta(seconds=20))
    assert result.created and events[0].data["ended_at"] is None
    d = restarted(d)
    again, more = d.classify(None, "7", None, "operator", T0 + timedelta(seconds=21))
    assert not again.created and more == []
    ended = feed(d, 40, st=1)
    assert ended[-1].type is EventType.DOWNTIME_ENDED
    assert ended[-1].data["reason_code"] == "7"
    assert d.episodes(1)[0]["classified_by"] == "operator"


@pytest.mark.parametrize("restart", [False, True])
def test_a_reread_plc_code_never_undoes_an_operators_code_for_the_open_stop(
        restart: bool) -> None:
    """The PLC says 7 during the stop, the operator says 9; the PLC's unchanged 7 read again
    (the first poll after a restart) is not news: the end carries 9 either way, as a restart
    anywhere must change nothing."""
    d = det()
    feed(d, 0, st=1, rsn=0)
    feed(d, 10, st=3, rsn=7)
    feed(d, 16, st=3)  # announced
    d.classify(None, "9", None, "operator", T0 + timedelta(seconds=20))
    if restart:
        d = restarted(d)
    feed(d, 30, st=3, rsn=7)
    ended = feed(d, 40, st=1, rsn=7)
    assert ended[-1].type is EventType.DOWNTIME_ENDED
    assert ended[-1].data["reason_code"] == "9" and ended[-1].data["last_reason_code"] == "9"


def test_only_the_last_recent_ended_stops_are_kept() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    eps = [stop(d, 100 * i + 10, 100 * i + 40) for i in range(RECENT + 3)]
    listed = d.episodes(RECENT + 10)
    assert [e["episode_id"] for e in listed] == list(reversed(eps[-RECENT:]))
    with pytest.raises(EpisodeNotFound):
        d.classify(eps[0], "7", None, "api", T0)


def test_a_late_reason_after_grace_is_counted_and_noted_not_dropped_silently() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    ep = stop(d, 10, 40)
    assert feed(d, 40 + 301, rsn=7) == []
    assert d.classifier.unattributed_total == 1
    notes = d.take_notes()
    assert len(notes) == 1 and ep in notes[0] and "grace 300s" in notes[0]
    status = d.status()
    assert status["unattributed_reasons"] == 1
    assert status["last_unattributed_reason"]["code"] == "7"
    assert restarted(d).classifier.unattributed_total == 1


def test_reason_grace_zero_turns_late_reasons_off() -> None:
    """Documented: with 0s late reasons are off, even one stamped the instant the stop ended
    (a source with its own timestamps can deliver it in the next batch)."""
    doc = CFG.model_dump(mode="json")
    doc["downtime"]["reason_grace"] = "0s"
    d = MachineDetector("m1", MachineConfig.model_validate(doc), "s1")
    feed(d, 0, st=1, rsn=0)
    stop(d, 10, 40)
    assert feed(d, 40, rsn=7) == []
    assert d.classifier.unattributed_total == 1


def test_a_reason_before_any_reported_stop_is_counted_not_dropped_silently() -> None:
    d = det()
    feed(d, 0, st=1, rsn=0)
    feed(d, 20, st=3)
    feed(d, 22, st=1)  # a micro-stop: nothing reported yet
    assert feed(d, 25, rsn=9) == []
    assert d.classifier.unattributed_total == 1
    notes = d.take_notes()
    assert len(notes) == 1 and "'9'" in notes[0] and "no stop has been reported" in notes[0]
    assert d.status()["last_unattributed_reason"]["last_episode_id"] is None
    assert feed(d, 26, rsn=9) == [] and d.classifier.unattributed_total == 1  # not news
