"""A machine's context: the production order it works on and what explains its stops (the PLC
reason tag, the active alarms).

Context tags are applied before the state in a batch, so an order or a reason read in the
same poll as a stop is already known when the episode opens.

Invariants:
- Only a change is news: a re-read of the same reason code (after a restart, or while the
  signal is not steady) never changes the open episode's reasons, so it never undoes an
  operator's classification.
- A reason code that changes while no episode is open is judged after the whole batch (a stop
  read in the same poll takes it instead); then it may classify the last ended episode (rules
  in ``agent/detect/classify.py``). It stays the machine's current reason either way.
- An order that changes during an episode is listed in its ``later_order_ids``; the episode
  keeps the order it started under.
"""

from __future__ import annotations

from datetime import datetime

from agent.detect.alarms import ActiveAlarms, AlarmReasonChoice
from agent.detect.classify import Classifier
from agent.detect.config import DowntimeRule
from agent.detect.episode import Episode
from agent.detect.outbox import Outbox
from agent.detect.state import reason_code
from config.model import TagSample

__all__ = ["Context"]


class Context:
    def __init__(self, rule: DowntimeRule, out: Outbox) -> None:
        self._reasons = rule.reasons
        self._out = out
        self.order: str | None = None
        self.reason: str | None = None
        self.reason_since: datetime | None = None  # time of the last reason sample applied
        self.alarms = ActiveAlarms(rule.alarms) if rule.alarms else None
        # A reason that changed while no episode was open, within one batch.
        self.late_reason: tuple[str, datetime] | None = None

    def on_order(self, s: TagSample, ep: Episode | None) -> bool:
        """Apply a good sample of the order tag; True when the order changed."""
        new = (str(s.value).strip() if s.value is not None else "") or None
        if new == self.order:
            return False
        self.order = new
        self._out.dirty = True
        if ep is not None and new and new != ep.order_id and new not in ep.later_order_ids:
            ep.later_order_ids.append(new)
        return True

    def on_reason(self, s: TagSample, ep: Episode | None) -> None:
        """Apply a good sample of the reason tag."""
        code = reason_code(s.value)
        changed = code != self.reason
        if ep is None and code is not None and changed:
            # Judged after the whole batch: a stop read in the same poll takes it instead.
            self.late_reason = (code, s.time)
        self.reason = code
        self.reason_since = s.time
        if ep is not None and code is not None and changed:
            if ep.reason_code is None:
                ep.reason_code = code
            ep.last_reason_code = code
        self._out.dirty = True

    def attribute_late_reason(self, ep: Episode | None, classifier: Classifier) -> None:
        """At the end of a batch: offer a changed reason to the last ended episode."""
        assert self.late_reason is not None
        code, t = self.late_reason
        self.late_reason = None
        if ep is None and classifier.on_plc_reason(code, t):
            # The code stays the machine's current reason (a PLC that latches it hands it to
            # the next stop, as before): only its change is news, never its re-reading.
            self._out.dirty = True

    def on_alarm(self, s: TagSample, ep: Episode | None) -> None:
        """Apply a good sample of the alarm tag."""
        assert self.alarms is not None
        if not self.alarms.apply(s.value):
            return
        self._out.dirty = True
        alarm = self.alarm_reason()
        if ep is not None and ep.reason_code is None and alarm is not None:
            # An alarm that arrives just after the stop still explains it.
            ep.reason_code = ep.last_reason_code = alarm.code
            ep.reason_text = alarm.text

    def alarm_reason(self) -> AlarmReasonChoice | None:
        """The reason the active alarms give for a stop, if any."""
        return self.alarms.reason(self._reasons) if self.alarms else None
