"""What a machine's state is derived from, and whether it can be known: the state tag (or,
without one, the production counter) and the quality of those inputs.

The signal says whether the state is known::

    none (never seen) ──every input good──> ok ──an input bad, stale or unmapped──> lost
                                             ^                                        │
                                             └──────────every input good again────────┘

Invariants:
- One ``signal.lost`` when the first input goes bad, one ``signal.restored`` when the last one
  is good again (with a known state); never a second ``lost`` while lost.
- Staleness is judged on the agent's clock (sample ``agent_time``, tick time): a tag with no
  sample for ``stale_after`` is recorded like a bad sample, so only a fresh sample of it
  restores the signal. Its bookkeeping is not saved: after a restart the tag is watched anew.
- ``base_state`` is what the inputs alone say (before the stall rule); ``running_since`` is
  when they last started saying "running".
"""

from __future__ import annotations

from datetime import datetime, timedelta

from agent.detect.config import MachineConfig
from agent.detect.outbox import Outbox
from agent.detect.state import derive_state
from config.model import EventType, MachineState, TagSample, format_time

__all__ = ["StateInputs"]


class StateInputs:
    def __init__(self, cfg: MachineConfig, stale_after: float | None, out: Outbox) -> None:
        self._rule = cfg.state
        # The tag whose quality (and freshness) decides whether the machine's state is known.
        self.signal_tag = cfg.state.tag or cfg.state.production_counter
        self.stale_after = stale_after
        self._stale_td = timedelta(seconds=stale_after) if stale_after else None
        self._out = out
        self.base_state = MachineState.UNKNOWN
        self.running_since: datetime | None = None
        self.signal = "none"  # none (never seen) | ok | lost
        self.signal_detail: str | None = None
        self.lost_at: datetime | None = None
        self.bad_inputs: dict[str, str] = {}  # tags the state depends on that are bad now
        self._last_good: datetime | None = None  # agent time of the last good signal sample
        self._watch_since: datetime | None = None  # agent time of the first tick

    def seen(self, agent_time: datetime) -> None:
        """A good sample of the signal tag that changed nothing: it is fresh."""
        self._last_good = agent_time

    def state_sample(self, s: TagSample) -> str | None:
        """Apply a sample of the state tag to ``base_state``; returns why the state cannot be
        known from it (bad quality, a value the rule does not map), or None."""
        new = derive_state(self._rule, s.value) if s.good else MachineState.UNKNOWN
        if new is MachineState.UNKNOWN:
            self.base_state = MachineState.UNKNOWN
            return s.detail or (f"{s.tag} is {s.quality.value}" if not s.good
                                else f"{s.tag} value {s.value!r} is not mapped to a state")
        if new is MachineState.RUNNING and self.base_state is not MachineState.RUNNING:
            self.running_since = s.time
        self.base_state = new
        return None

    def counting(self, t: datetime) -> None:
        """Without a state tag, a readable production counter means running (the stall rule
        decides when it is not)."""
        if self.base_state is not MachineState.RUNNING:
            self.running_since = t
        self.base_state = MachineState.RUNNING

    def stale(self, now: datetime) -> tuple[str, str] | None:
        """(tag, why) when the signal tag has just gone without a sample for too long."""
        if self._watch_since is None:
            self._watch_since = now
        tag = self.signal_tag
        if self._stale_td is None or tag is None or tag in self.bad_inputs:
            return None
        if now - (self._last_good or self._watch_since) <= self._stale_td:
            return None
        self._out.dirty = True
        return tag, f"no sample of {tag} for {self.stale_after:g}s"

    def lose(self, tag: str, t: datetime, why: str, last_state: MachineState) -> bool:
        """Input ``tag`` is bad; True when this loses the signal (``signal.lost`` emitted)."""
        self.bad_inputs[tag] = why
        if self.signal == "lost":
            return False
        self._out.emit(EventType.SIGNAL_LOST, t, (format_time(t),), {
            "lost_at": format_time(t), "detail": why, "last_state": last_state.value})
        self.signal, self.signal_detail, self.lost_at = "lost", why, t
        return True

    def clear(self, s: TagSample) -> bool:
        """A good sample of input ``s.tag``; True when every input is good now."""
        self.bad_inputs.pop(s.tag, None)
        if s.tag == self.signal_tag:
            self._last_good = s.agent_time
        return not self.bad_inputs

    def restore(self, t: datetime, state: MachineState) -> bool:
        """Every input is good and says ``state``: the signal is ok. True when it was lost
        (``signal.restored`` emitted)."""
        was_lost = self.signal == "lost"
        if was_lost:
            self._out.emit(EventType.SIGNAL_RESTORED, t, (format_time(t),), {
                "lost_at": format_time(self.lost_at) if self.lost_at else None,
                "restored_at": format_time(t), "state": state.value})
            self.lost_at = None
        self.signal, self.signal_detail = "ok", None
        return was_lost
