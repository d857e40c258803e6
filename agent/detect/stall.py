"""The production-counter stall rule: a machine whose state says it runs but whose production
counter has not moved for ``stalled_after`` is down, with reason ``no-output``.

Invariants:
- Missing data never invents a stall: while the counter cannot be read (bad quality, not a
  number) the rule cannot be judged ("blind"), and when it reads again, or the machine's signal
  comes back, the stall clock restarts then: time that could not be seen never counts as "no
  output".
- A stall starts at the later of the counter's last movement and the start of running, so a
  machine that just started is given ``stalled_after`` to produce.
"""

from __future__ import annotations

from datetime import datetime

from agent.detect.outbox import Outbox
from config.model import MachineState, TagSample

__all__ = ["NO_OUTPUT", "StallRule"]

NO_OUTPUT = "no-output"


class StallRule:
    def __init__(self, stalled_after: float | None, out: Outbox) -> None:
        self.limit = stalled_after
        self._out = out
        self.last: int | None = None  # the counter's last good value
        self.moved_at: datetime | None = None  # when it last moved (or the clock restarted)
        self.blind = False  # the counter cannot be read now

    def count(self, s: TagSample) -> bool:
        """Apply a sample of the production counter; False when it cannot be read."""
        v = s.value
        if not s.good or isinstance(v, bool) or not isinstance(v, int | float):
            self.blind = True
            return False
        value = int(v)
        if self.blind:
            # Seen again: whatever happened while blind is unknown, so the stall clock
            # restarts now instead of counting the blind time as "no output".
            self.blind = False
            self.moved_at = s.time
        if self.last is not None and value != self.last:
            self.moved_at = s.time
        self.last = value
        self._out.dirty = True
        return True

    def restart(self, t: datetime) -> None:
        """The machine's signal is back: output during the gap is unknown."""
        if self.limit is not None:
            self.moved_at = t

    def stalled_since(self, now: datetime, base_state: MachineState,
                      running_since: datetime | None) -> datetime | None:
        """When output stopped, if the machine counts as stalled at ``now``."""
        limit = self.limit
        if limit is None or self.blind or base_state is not MachineState.RUNNING:
            return None
        refs = [t for t in (self.moved_at, running_since) if t is not None]
        if not refs:
            return None
        ref = max(refs)
        return ref if (now - ref).total_seconds() >= limit else None
