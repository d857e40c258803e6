"""Where the parts of one machine's detector put what they produce: numbered events, and the
mark that the saved state changed.

Invariants:
- ``sequence`` counts every event the machine has emitted; it is part of the saved state and of
  every event id (UUIDv5 over source, type, the event's facts and the sequence), so two facts
  that look alike (a signal lost twice in one instant) stay two events, and the same facts give
  the same ids after a restart.
- Every event carries the machine, line and site, and the current order unless its data names
  one itself.
- ``dirty`` is set by any part whose saved state changed and by taking events out; the runtime
  clears it once it has committed the state (with those events).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from config.model import Event, EventType, event_id

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, source: str, machine_id: str, line: str, site: str,
                 order: Callable[[], str | None]) -> None:
        self.source = source
        self._key = machine_id
        self._base: dict[str, Any] = {"machine": machine_id, "line": line, "site": site}
        self._order = order
        self.sequence = 0
        self.dirty = False
        self._events: list[Event] = []

    def emit(self, type_: EventType, t: datetime, facts: tuple[object, ...],
             data: dict[str, Any]) -> str:
        """Number an event and hold it until ``drain``; returns its id."""
        self.sequence += 1
        body = dict(self._base)
        if "order_id" not in data:
            body["order_id"] = self._order()
        body.update(data)
        eid = event_id(self.source, type_.value, *facts, self.sequence)
        self._events.append(Event(id=eid, type=type_, source=self.source, time=t,
                                  key=self._key, sequence=self.sequence, data=body))
        return eid

    def drain(self) -> list[Event]:
        """The events emitted since the last drain, oldest first."""
        if not self._events:
            return []
        out, self._events = self._events, []
        self.dirty = True
        return out
