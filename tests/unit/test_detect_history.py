"""The ring of recent episodes that /status, the status page and `top` show: a stop classified
after it ended (operator, API, late PLC reason) shows its new reason there too."""

from __future__ import annotations

from datetime import timedelta

from test_detect_classify import CFG, T0, feed, stop

from agent.detect.history import EpisodeHistory
from agent.detect.machine import MachineDetector


def test_a_late_classification_updates_the_episode_people_see() -> None:
    d = MachineDetector("m1", CFG, "s1")
    history = EpisodeHistory()
    history.take("m1", feed(d, 0, st=1, rsn=0))
    other = stop(d, 10, 40)
    events = feed(d, 100, st=3) + feed(d, 130, st=1)
    history.take("m1", events)
    ep = str(events[-1].data["episode_id"])
    now = T0 + timedelta(minutes=10)
    assert [e["reason_code"] for e in history.recent("m1", now)] == [None]  # `other` not fed
    _, classified = d.classify(ep, "9", None, "operator", now)
    history.take("m1", classified)
    shown = history.recent("m1", now)[-1]
    assert shown["episode_id"] == ep and shown["reason_code"] == "9"
    assert shown["reason"] == "Changeover" and shown["category"] == "planned"
    assert shown["classified_by"] == "operator"
    _, unknown = d.classify(other, "7", None, "operator", now)  # not in the ring: no change
    history.take("m1", unknown)
    assert history.recent("m1", now)[-1] == shown and len(history.recent("m1", now)) == 1
