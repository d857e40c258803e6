"""A machine's downtime episodes: when one opens, is announced, is cut into pieces and ends.

The detector decides when the machine stops and runs again (and in which category); this
module turns that into episodes and their events::

    open (not announced) ──min_duration passed (sample or tick)──> announced: downtime.started
         │                                                               │
         └──ends before that: a micro-stop, no events──┐                 └──ends: downtime.ended
                                                       └──> counted onto the next ``ended``

Invariants:
- An episode's ``started`` is emitted once ``min_duration`` has passed, its ``ended`` exactly
  once after that. Stops shorter than ``min_duration`` are micro-stops: no events, counted onto
  the next ``ended`` as ``microstops``/``microstop_seconds``.
- With ``max_duration``, an announced episode is cut at each ``max_duration`` into pieces, each
  ended with ``split`` and the next one linked to it by ``continued_from``.
- An episode id is UUIDv5 over the source, the start and the machine's event sequence: two
  episodes clamped to the same start (a source clock stepping back) stay distinct, and the same
  facts give the same id after a restart (the sequence is saved).
- Durations come from sample times and are never negative.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from agent.detect.classify import Classifier
from agent.detect.config import DowntimeRule
from agent.detect.episode import Episode, episode_data
from agent.detect.outbox import Outbox
from config.model import EventType, event_id, format_time

__all__ = ["Downtime"]


class Downtime:
    def __init__(self, rule: DowntimeRule, out: Outbox, classifier: Classifier) -> None:
        self.rule = rule
        self._out = out
        self._classifier = classifier
        self.episode: Episode | None = None  # the open one
        self.microstops = 0  # since the last ended episode
        self.microstop_seconds = 0.0

    def open(self, t: datetime, category: str, reason: str | None, order: str | None,
             continued_from: str | None = None, reason_text: str | None = None) -> None:
        self._classifier.on_opened()
        self.episode = Episode(
            episode_id=event_id(self._out.source, "episode", format_time(t),
                                self._out.sequence),
            started_at=t,
            category=category, reason_code=reason, last_reason_code=reason,
            order_id=order, continued_from=continued_from, reason_text=reason_text)

    def follow(self, now: datetime, order: str | None, signal_lost: bool) -> None:
        """Time has passed: announce the open episode, cut it where it is too long."""
        self._announce(now)
        limit = self.rule.max_duration
        while (limit and self.episode is not None and self.episode.announced
               and now >= self.episode.started_at + timedelta(seconds=limit)):
            ep = self.episode
            cut = ep.started_at + timedelta(seconds=limit)
            self.close(cut, split=True)
            self.open(cut, ep.category, ep.last_reason_code, order, ep.episode_id,
                      reason_text=ep.reason_text)
            assert self.episode is not None
            self.episode.had_signal_gap = signal_lost
            self._announce(now)

    def close(self, t: datetime, split: bool = False) -> None:
        ep = self.episode
        assert ep is not None
        self._announce(t)
        end = max(t, ep.started_at)
        duration = (end - ep.started_at).total_seconds()
        if ep.announced:
            data = episode_data(ep, self.rule.reasons)
            data.update(ended_at=format_time(end), duration_seconds=round(duration, 3),
                        last_reason_code=ep.last_reason_code, microstops=self.microstops,
                        microstop_seconds=round(self.microstop_seconds, 3))
            if split:
                data["split"] = True
            self._out.emit(EventType.DOWNTIME_ENDED, end, (ep.episode_id,), data)
            self.microstops, self.microstop_seconds = 0, 0.0
            self._classifier.on_ended(ep, end, duration)
        else:
            self.microstops += 1
            self.microstop_seconds += duration
            self._classifier.on_unannounced_end()
        self.episode = None
        self._out.dirty = True

    def _announce(self, now: datetime) -> None:
        ep = self.episode
        if ep is None or ep.announced:
            return
        if (now - ep.started_at).total_seconds() >= self.rule.min_duration:
            ep.announced = True
            self._out.emit(EventType.DOWNTIME_STARTED, ep.started_at, (ep.episode_id,),
                           episode_data(ep, self.rule.reasons))
