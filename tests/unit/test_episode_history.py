"""The ring of recent downtime behind the status page's timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agent.detect.history import EpisodeHistory
from config.model import Event, EventType

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def _event(kind: EventType, at: datetime, **data: Any) -> Event:
    return Event(id=f"{kind.value}-{at.timestamp()}", type=kind, source="/m/m1", time=at,
                 key="m1", sequence=0, data=data)


def test_a_late_classification_updates_the_ended_episode() -> None:
    """An operator (or a PLC reason within the grace) classifies a stop after it ended: the
    timeline's episode shows the new reason and category, not 'no reason'."""
    h = EpisodeHistory()
    ended = T0 + timedelta(minutes=3)
    h.take("m1", [_event(EventType.DOWNTIME_ENDED, ended, episode_id="ep-1",
                         started_at="2026-03-02T10:00:00.000Z",
                         ended_at="2026-03-02T10:03:00.000Z", category="unplanned",
                         reason_code=None, duration_seconds=180.0)])
    h.take("m1", [_event(EventType.DOWNTIME_CLASSIFIED, ended + timedelta(minutes=1),
                         episode_id="ep-1", reason_code="31", reason="Changeover",
                         category="planned")])
    h.take("m1", [_event(EventType.DOWNTIME_CLASSIFIED, ended, episode_id="other",
                         reason_code="7")])  # another episode: nothing changes here
    [ep] = h.recent("m1", ended + timedelta(minutes=5))
    assert (ep["reason_code"], ep["reason"], ep["category"]) == ("31", "Changeover", "planned")
    assert h.last_event("m1") == {"type": "downtime.classified",
                                  "time": "2026-03-02T10:03:00.000Z"}
