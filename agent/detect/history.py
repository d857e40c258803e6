"""A ring of recent downtime episodes per machine, for people looking at the agent.

Fed with the events a detector returns: each ``downtime.ended`` adds one closed episode
(start, end, category, reason); a later ``downtime.classified`` of an episode still in the
ring (an operator, an API, a late PLC reason) updates its reason (and category, when the code
implies one), so people see what the central system gets. ``/status`` shows the ring; the
status page draws it as a timeline of the last shift, ``edge-agent top`` shows the open one.

Invariants: memory only; after a restart the ring is seeded with the ended episodes the
detector state keeps for classification (its last ``RECENT``, 20), so the timeline shows at
least those; the buffer and the central system keep the record of truth. Bounded by
``per_machine`` entries and by ``keep_seconds`` of age, so a machine flapping all day costs at
most ``per_machine`` small dicts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from config.model import Event, EventType, format_time, parse_time

__all__ = ["SHIFT_SECONDS", "EpisodeHistory"]

SHIFT_SECONDS = 8 * 3600.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EpisodeHistory:
    def __init__(self, per_machine: int = 200, keep_seconds: float = SHIFT_SECONDS) -> None:
        self._per_machine = per_machine
        self._keep = timedelta(seconds=keep_seconds)
        self._rings: dict[str, deque[dict[str, Any]]] = {}
        self._last: dict[str, dict[str, str]] = {}

    def take(self, machine: str, events: Iterable[Event]) -> None:
        for e in events:
            self._last[machine] = {"type": e.type.value.removeprefix("plantedge."),
                                   "time": format_time(e.time)}
            d = e.data
            if e.type is EventType.DOWNTIME_CLASSIFIED:
                self._classified(machine, d)
            if e.type is not EventType.DOWNTIME_ENDED:
                continue
            ring = self._rings.setdefault(machine, deque(maxlen=self._per_machine))
            ring.append({"episode_id": d.get("episode_id"),
                         "started_at": d.get("started_at"), "ended_at": d.get("ended_at"),
                         "category": d.get("category"), "reason_code": d.get("reason_code"),
                         "reason": d.get("reason"),
                         "duration_s": d.get("duration_seconds")})

    def seed(self, machine: str, episodes: list[dict[str, Any]]) -> None:
        """Fill an empty ring from a detector's episode listing (newest first; the open one,
        if any, is left out: ``/status`` shows it as the open downtime)."""
        if self._rings.get(machine):
            return
        ring = self._rings.setdefault(machine, deque(maxlen=self._per_machine))
        for e in reversed(episodes):
            if e.get("open"):
                continue
            ring.append({"episode_id": e.get("episode_id"), "started_at": e.get("started_at"),
                         "ended_at": e.get("ended_at"), "category": e.get("category"),
                         "reason_code": e.get("reason_code"), "reason": e.get("reason"),
                         "duration_s": e.get("duration_seconds"),
                         **({"classified_by": e["classified_by"]}
                            if e.get("classified_by") else {})})

    def _classified(self, machine: str, d: dict[str, Any]) -> None:
        # Newest first: a classification is almost always of one of the last stops.
        for ep in reversed(self._rings.get(machine, ())):
            if ep.get("episode_id") == d.get("episode_id"):
                ep["reason_code"], ep["reason"] = d.get("reason_code"), d.get("reason")
                if d.get("category"):
                    ep["category"] = d["category"]
                ep["classified_by"] = d.get("classified_by")
                return

    def last_event(self, machine: str) -> dict[str, str] | None:
        """The type and time of the last event detected for the machine (since start)."""
        return self._last.get(machine)

    def recent(self, machine: str, now: datetime) -> list[dict[str, Any]]:
        """Episodes that ended within ``keep_seconds`` of ``now``, oldest first."""
        ring = self._rings.get(machine)
        if not ring:
            return []
        cutoff = now - self._keep
        while ring and _ended(ring[0]) < cutoff:
            ring.popleft()
        return list(ring)


def _ended(ep: dict[str, Any]) -> datetime:
    try:
        return parse_time(str(ep["ended_at"]))
    except (ValueError, KeyError):
        return _EPOCH  # unreadable: the first to go
