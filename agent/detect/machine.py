"""One machine's detector: state, downtime episodes, signal quality, scrap, order context.

Pure and synchronous: ``on_samples(batch)`` and ``on_tick(now)`` return events; nothing here
reads a clock or does I/O, so tests feed recorded samples and a fake time.

Machine states and what they mean for downtime episodes::

    running ──leaves running──> down/idle/planned  (episode opens at the sample time;
       ^                              │             category unplanned/idle/planned)
       └──────returns to running──────┘             (episode ends)
    running ──production counter still for stalled_after──> down, reason "no-output"
    any ──state tag bad, stale or unmapped──> unknown   (signal.lost; an open episode stays
                                                          open and gets had_signal_gap)
    unknown ──good state sample──> its state            (signal.restored)

Invariants:
- An episode's ``started`` is emitted once ``min_duration`` has passed (by sample or tick), its
  ``ended`` exactly once after that. Stops shorter than ``min_duration`` are micro-stops: no
  events, counted onto the next ``ended`` as ``microstops``/``microstop_seconds``.
- A category change inside an episode (down -> planned) ends it and opens a new one; with
  ``max_duration`` a long episode is cut into pieces linked by ``continued_from``.
- Missing data never invents downtime: a machine that was running and then goes silent is
  ``unknown``, and a downtime seen after the gap starts at the first good sample.
- Event ids are UUIDv5 over (source, type, episode start or scrap window and counter range), so
  the same facts give the same ids after a restart. ``sequence`` is part of the saved state.
- Durations come from sample times and are never negative.
- A reason after a stop ended (the PLC within ``reason_grace``, an operator, an API) never
  changes an event already sent: it is a ``downtime.classified`` event of its own (rules in
  ``agent/detect/classify.py``, whose state is saved with the rest).
- ``snapshot()`` captures everything needed to continue after a restart (the runtime commits it
  in the same transaction as the events it produced).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from agent.detect.alarms import ActiveAlarms, AlarmReasonChoice
from agent.detect.classify import Classification, Classifier
from agent.detect.config import MachineConfig
from agent.detect.episode import Episode, episode_data
from agent.detect.scrap import ScrapTracker
from agent.detect.snapshot import apply_state, dump_state, parse_state, status_view
from agent.detect.state import derive_state, reason_code
from config.model import (
    Event,
    EventType,
    MachineState,
    Quality,
    TagSample,
    event_id,
    format_time,
)

__all__ = ["MachineDetector"]

_CATEGORY = {MachineState.DOWN: "unplanned", MachineState.PLANNED: "planned",
             MachineState.IDLE: "idle"}
_GOOD = Quality.GOOD
_MISSING = object()
NO_OUTPUT = "no-output"


class MachineDetector:
    def __init__(self, machine_id: str, cfg: MachineConfig, site: str, *,
                 counter_bits: int = 32, stale_after: float | None = None) -> None:
        self.machine_id = machine_id
        self.cfg = cfg
        self.site = site
        self.source = f"/sites/{site}/lines/{cfg.line}/machines/{machine_id}"
        self.counter_bits = (cfg.scrap.counter_bits if cfg.scrap and cfg.scrap.counter_bits
                             else counter_bits)
        self.stale_after = cfg.stale_after or stale_after
        self.tags = frozenset(tag for _, tag in cfg.tag_refs())
        # Order in which a batch is applied: context (order, reasons), state, the rest.
        ctx = {cfg.order_tag, cfg.downtime.reason_tag, cfg.scrap.reason_tag if cfg.scrap
               else None, cfg.downtime.alarms.tag if cfg.downtime.alarms else None}
        self._rank = {t: 0 if t in ctx else 1 if t == cfg.state.tag else 2 for t in self.tags}
        self._stale_td = timedelta(seconds=self.stale_after) if self.stale_after else None
        # Tags whose every sample is a fact (a reject message of 2 followed by another of 2):
        # never skipped as "unchanged".
        self._every_sample = frozenset({cfg.scrap.quantity_tag} if cfg.scrap and
                                       cfg.scrap.quantity_tag else ())
        # The tag whose quality decides whether the machine's state is known.
        self.signal_tag = cfg.state.tag or cfg.state.production_counter
        self._reset()

    def _reset(self) -> None:
        self.sequence = 0
        self.state = MachineState.UNKNOWN
        self.state_since: datetime | None = None
        self.base_state = MachineState.UNKNOWN  # from the state tag alone (before stall rule)
        self.running_since: datetime | None = None
        self.signal = "none"  # none (never seen) | ok | lost
        self.signal_detail: str | None = None
        self.lost_at: datetime | None = None
        self.episode: Episode | None = None
        self.order: str | None = None
        self.reason: str | None = None
        self.reason_since: datetime | None = None  # time of the last reason sample applied
        self.prod_last: int | None = None
        self.prod_moved_at: datetime | None = None
        self.prod_blind = False
        self.bad_inputs: dict[str, str] = {}  # tags the state depends on that are bad now
        self.microstops = 0
        self.microstop_seconds = 0.0
        self.clock_jumps = 0
        self.dirty = False
        self._out: list[Event] = []
        self.scrap = (ScrapTracker(self.cfg.scrap, self.counter_bits, self._emit)
                      if self.cfg.scrap else None)
        self.alarms = ActiveAlarms(self.cfg.downtime.alarms) if self.cfg.downtime.alarms \
            else None
        self.classifier = Classifier(self.cfg.downtime, self._emit)
        self._late_reason: tuple[str, datetime] | None = None  # within one on_samples call
        # Not persisted: the last good value applied per tag (the hot path's memory) and
        # agent-clock bookkeeping for staleness.
        self._last_values: dict[str, object] = {}
        self._last_good_state: datetime | None = None
        self._watch_since: datetime | None = None

    @property
    def counter_last(self) -> int | None:
        if self.scrap is None or self.cfg.scrap is None or self.cfg.scrap.counter is None:
            return None
        return self.scrap.last.get(self.cfg.scrap.counter)

    # ------------------------------------------------------------------ inputs

    def on_samples(self, samples: Iterable[TagSample]) -> list[Event]:
        """Apply a batch: context tags (order, reasons) first, then state, then counters, so a
        reason or order read in the same poll as a stop is already known when it opens.

        Hot path (a poll of an unchanged machine): a good sample whose value equals the last
        one applied only refreshes the signal's freshness; time-based rules (min_duration,
        stalls, windows, staleness) are evaluated by ``on_tick``."""
        rank, last, good, signal_tag = self._rank, self._last_values, _GOOD, self.signal_tag
        steady = self.signal == "ok" and not self.bad_inputs
        todo: list[tuple[int, TagSample]] = []
        for s in samples:
            tag = s.tag
            r = rank.get(tag)
            if r is None:
                continue
            if s.quality is good:
                value = s.value
                if steady and last.get(tag, _MISSING) == value:
                    if tag == signal_tag:
                        self._last_good_state = s.agent_time
                    continue
                if tag not in self._every_sample:
                    last[tag] = value
            else:
                last.pop(tag, None)
            todo.append((r, s))
        if len(todo) > 1:
            todo.sort(key=_first)
        for _, s in todo:
            self._sample(s)
        if self._late_reason is not None:
            self._attribute_late_reason()
        return self._drain() if self._out else []

    def _sample(self, s: TagSample) -> None:
        cfg = self.cfg
        if s.tag == cfg.order_tag and s.good:
            self._on_order(s)
        if s.tag == cfg.downtime.reason_tag and s.good:
            self._on_reason(s)
        if self.alarms is not None and s.tag == self.alarms.tag:
            self._on_alarm(s)
        if s.tag == cfg.state.tag:
            self._on_state_sample(s)
        if s.tag == cfg.state.production_counter:
            self._on_production(s)
        if self.scrap is not None and s.good:
            self.scrap.on_sample(s, self.order)
            self.dirty = True

    def on_tick(self, now: datetime) -> list[Event]:
        if self._watch_since is None:
            self._watch_since = now
        tag = self.signal_tag
        if self._stale_td is not None and tag is not None and tag not in self.bad_inputs:
            seen = self._last_good_state or self._watch_since
            if now - seen > self._stale_td:
                # Recorded like a bad sample, so only a fresh sample of this tag restores it.
                why = f"no sample of {tag} for {self.stale_after:g}s"
                self.bad_inputs[tag] = why
                self.dirty = True
                self._lose_signal(now, why)
        if self.signal == "ok" and self.cfg.state.stalled_after is not None:
            self._evaluate(now)  # only the stall rule changes the state with time alone
        if self.episode is not None:
            self._maybe_announce(now)
            self._split_long(now)
        if self.scrap is not None and self.scrap.window is not None:
            self.scrap.on_tick(now)
        return self._drain() if self._out else []

    def history_needed_from(self, tag: str) -> datetime | None:
        """For a history backfill: the time since which this detector may have missed values
        of ``tag`` (its state and reason tags), or None.

        State tag: the start of the current state. Any later value that differs is a change
        not seen yet, and the value at that instant is the one the detector holds (feeding it
        again changes nothing). Reason tag: the later of that and the last reason value
        applied, so a reason the detector already attributed is never fed again (it would
        look like a new, late reason for a stop that has one)."""
        if tag == self.cfg.state.tag:
            return self.state_since
        if tag == self.cfg.downtime.reason_tag and self.state_since is not None:
            return max(self.state_since, self.reason_since or self.state_since)
        return None

    def note_clock_jump(self, seconds: float) -> None:
        """The agent's clock jumped; flag what is open so its events say so."""
        self.clock_jumps += 1
        if self.episode is not None:
            self.episode.clock_adjusted = True
        if self.scrap is not None and self.scrap.window is not None:
            self.scrap.window.clock_adjusted = True
        self.dirty = True

    def _drain(self) -> list[Event]:
        out, self._out = self._out, []
        if out:
            self.dirty = True
        return out

    # ------------------------------------------------------------------ state and episodes

    def _on_state_sample(self, s: TagSample) -> None:
        if self.cfg.state.tag is None:
            return  # only the stall rule decides: _on_production handles the counter
        new = derive_state(self.cfg.state, s.value) if s.good else MachineState.UNKNOWN
        if new is MachineState.UNKNOWN:
            self.base_state = MachineState.UNKNOWN
            self._input_bad(s, s.detail or (
                f"{s.tag} is {s.quality.value}" if not s.good
                else f"{s.tag} value {s.value!r} is not mapped to a state"))
            return
        if new is MachineState.RUNNING and self.base_state is not MachineState.RUNNING:
            self.running_since = s.time
        self.base_state = new
        self._input_good(s, new)

    def _on_production(self, s: TagSample) -> None:
        v = s.value
        if not s.good or isinstance(v, bool) or not isinstance(v, int | float):
            # Output cannot be seen: the stall rule cannot be judged, so the state is unknown
            # (never a stall invented from missing data).
            self.prod_blind = True
            self._input_bad(s, s.detail or f"{s.tag} is {s.quality.value}")
            return
        value = int(v)
        if self.prod_blind:
            # Seen again: whatever happened while blind is unknown, so the stall clock
            # restarts now instead of counting the blind time as "no output".
            self.prod_blind = False
            self.prod_moved_at = s.time
        if self.prod_last is not None and value != self.prod_last:
            self.prod_moved_at = s.time
        self.prod_last = value
        self.dirty = True
        if self.cfg.state.tag is None:
            if self.base_state is not MachineState.RUNNING:
                self.running_since = s.time
            self.base_state = MachineState.RUNNING
        self._input_good(s, self.base_state)

    def _input_bad(self, s: TagSample, why: str) -> None:
        self.bad_inputs[s.tag] = why
        self._lose_signal(s.time, why)

    def _input_good(self, s: TagSample, state: MachineState) -> None:
        """A good sample of a tag the state depends on: restore the signal when every such tag
        is good again, then re-evaluate the state at this sample's time."""
        self.bad_inputs.pop(s.tag, None)
        if s.tag == self.signal_tag:
            self._last_good_state = s.agent_time
        if self.bad_inputs or state is MachineState.UNKNOWN:
            return
        if self.signal == "lost":
            self._emit(EventType.SIGNAL_RESTORED, s.time, (format_time(s.time),), {
                "lost_at": format_time(self.lost_at) if self.lost_at else None,
                "restored_at": format_time(s.time), "state": state.value})
            self.lost_at = None
            if self.cfg.state.stalled_after is not None:
                # Output during the gap is unknown: the stall clock restarts now.
                self.prod_moved_at = s.time
        self.signal, self.signal_detail = "ok", None
        self._evaluate(s.time)
        self._maybe_announce(s.time)
        self._split_long(s.time)

    def _stall_start(self, now: datetime) -> datetime | None:
        """When output stopped, if the machine counts as stalled at ``now``."""
        limit = self.cfg.state.stalled_after
        if limit is None or self.prod_blind or self.base_state is not MachineState.RUNNING:
            return None
        refs = [t for t in (self.prod_moved_at, self.running_since) if t is not None]
        if not refs:
            return None
        ref = max(refs)
        return ref if (now - ref).total_seconds() >= limit else None

    def _evaluate(self, t: datetime) -> None:
        stalled_since = self._stall_start(t)
        if stalled_since is not None:
            if self.state is not MachineState.DOWN:
                self._apply_state(MachineState.DOWN, stalled_since, NO_OUTPUT)
        elif self.base_state is not MachineState.UNKNOWN:
            self._apply_state(self.base_state, t)

    def _lose_signal(self, t: datetime, detail: str) -> None:
        if self.signal == "lost":
            return
        self._emit(EventType.SIGNAL_LOST, t, (format_time(t),), {
            "lost_at": format_time(t), "detail": detail, "last_state": self.state.value})
        self.signal, self.signal_detail, self.lost_at = "lost", detail, t
        # state_since never goes back (a source clock stepping back): it is the floor for the
        # next episode's start, so episodes never overlap.
        self.state = MachineState.UNKNOWN
        self.state_since = max(t, self.state_since) if self.state_since else t
        if self.episode is not None:
            self.episode.had_signal_gap = True
        self.dirty = True

    def _apply_state(self, new: MachineState, t: datetime, reason: str | None = None) -> None:
        if new == self.state:
            return
        if self.state_since is not None and t < self.state_since:
            t = self.state_since  # a source clock that went backwards: never negative
        if self.episode is not None and t < self.episode.started_at:
            # A piece cut by max_duration starts after state_since: the next episode must not
            # start before it (a clock stepping back right after a cut made them overlap).
            t = self.episode.started_at
        self.state, self.state_since = new, t
        self.dirty = True
        if new is MachineState.RUNNING:
            if self.episode is not None:
                self._close_episode(t)
            return
        category = _CATEGORY[new]
        alarm = self._alarm_reason()
        if alarm is not None and alarm.category is not None:
            category = alarm.category
        if self.episode is not None and self.episode.category != category:
            self._close_episode(t)
        if self.episode is None:
            reason = reason or self.reason
            text = None
            if reason is None and alarm is not None:
                reason, text = alarm.code, alarm.text
            self._open_episode(t, category, reason, reason_text=text)

    def _alarm_reason(self) -> AlarmReasonChoice | None:
        return self.alarms.reason(self.cfg.downtime.reasons) if self.alarms else None

    def _on_alarm(self, s: TagSample) -> None:
        assert self.alarms is not None
        if not s.good:
            # Unknown (a new session before its ConditionRefresh, a lost link): no alarm
            # reason rather than a stale one.
            self.dirty = self.dirty or bool(self.alarms.active)
            self.alarms.active = {}
            return
        if not self.alarms.apply(s.value):
            return
        self.dirty = True
        ep = self.episode
        alarm = self._alarm_reason()
        if ep is not None and ep.reason_code is None and alarm is not None:
            # An alarm that arrives just after the stop still explains it.
            ep.reason_code = ep.last_reason_code = alarm.code
            ep.reason_text = alarm.text

    def _open_episode(self, t: datetime, category: str, reason: str | None,
                      continued_from: str | None = None, reason_text: str | None = None
                      ) -> None:
        # The sequence number makes two episodes clamped to the same start (a source clock
        # stepping back) distinct, and is itself restored with the state after a restart.
        self.classifier.on_opened()
        self.episode = Episode(
            episode_id=event_id(self.source, "episode", format_time(t), self.sequence),
            started_at=t,
            category=category, reason_code=reason, last_reason_code=reason,
            order_id=self.order, continued_from=continued_from, reason_text=reason_text)

    def _maybe_announce(self, now: datetime) -> None:
        ep = self.episode
        if ep is None or ep.announced:
            return
        if (now - ep.started_at).total_seconds() >= self.cfg.downtime.min_duration:
            ep.announced = True
            self._emit(EventType.DOWNTIME_STARTED, ep.started_at, (ep.episode_id,),
                       episode_data(ep, self.cfg.downtime.reasons))

    def _split_long(self, now: datetime) -> None:
        limit = self.cfg.downtime.max_duration
        while (limit and self.episode is not None and self.episode.announced
               and now >= self.episode.started_at + timedelta(seconds=limit)):
            ep = self.episode
            cut = ep.started_at + timedelta(seconds=limit)
            self._close_episode(cut, split=True)
            self._open_episode(cut, ep.category, ep.last_reason_code, ep.episode_id,
                               reason_text=ep.reason_text)
            assert self.episode is not None
            self.episode.had_signal_gap = self.signal == "lost"
            self._maybe_announce(now)

    def _close_episode(self, t: datetime, split: bool = False) -> None:
        ep = self.episode
        assert ep is not None
        self._maybe_announce(t)
        end = max(t, ep.started_at)
        duration = (end - ep.started_at).total_seconds()
        if ep.announced:
            data = episode_data(ep, self.cfg.downtime.reasons)
            data.update(ended_at=format_time(end), duration_seconds=round(duration, 3),
                        last_reason_code=ep.last_reason_code, microstops=self.microstops,
                        microstop_seconds=round(self.microstop_seconds, 3))
            if split:
                data["split"] = True
            self._emit(EventType.DOWNTIME_ENDED, end, (ep.episode_id,), data)
            self.microstops, self.microstop_seconds = 0, 0.0
            self.classifier.on_ended(ep, end, duration)
        else:
            self.microstops += 1
            self.microstop_seconds += duration
            self.classifier.on_unannounced_end()
        self.episode = None
        self.dirty = True

    def _on_reason(self, s: TagSample) -> None:
        code = reason_code(s.value)
        changed = code != self.reason
        if self.episode is None and code is not None and changed:
            # Judged after the whole batch: a stop read in the same poll takes it instead.
            self._late_reason = (code, s.time)
        self.reason = code
        self.reason_since = s.time
        ep = self.episode
        # Only a change is news: a re-read of the same code (after a restart, or while the
        # signal is not steady) never undoes an operator's classification of the open stop.
        if ep is not None and code is not None and changed:
            if ep.reason_code is None:
                ep.reason_code = code
            ep.last_reason_code = code
        self.dirty = True

    def _attribute_late_reason(self) -> None:
        assert self._late_reason is not None
        code, t = self._late_reason
        self._late_reason = None
        if self.episode is None and self.classifier.on_plc_reason(code, t):
            # The code stays the machine's current reason (a PLC that latches it hands it to
            # the next stop, as before): only its change is news, never its re-reading.
            self.dirty = True

    def classify(self, episode_id: str | None, code: str, text: str | None, by: str,
                 at: datetime) -> tuple[Classification, list[Event]]:
        """An operator's or an API's reason for an episode (rules in detect/classify.py).
        ``at`` is the classification time (the caller's clock: detection reads none).
        Raises EpisodeNotFound or UnknownCode, changing nothing."""
        result = self.classifier.classify(self.episode, episode_id, code, text, by, at)
        if result.created:
            self.dirty = True
        return result, self._drain() if self._out else []

    def episodes(self, recent: int) -> list[dict[str, Any]]:
        """The open (reported) episode and the ``recent`` latest ended ones, newest first."""
        return self.classifier.listing(self.episode, recent)

    def take_notes(self) -> list[str]:
        """Sentences for the runtime's log (a reason that could not be attributed)."""
        return self.classifier.take_notes()

    def _on_order(self, s: TagSample) -> None:
        new = (str(s.value).strip() if s.value is not None else "") or None
        if new == self.order:
            return
        self.order = new
        self.dirty = True
        ep = self.episode
        if ep is not None and new and new != ep.order_id and new not in ep.later_order_ids:
            ep.later_order_ids.append(new)
        if self.scrap is not None:
            self.scrap.on_order_change(s.time, new)

    # ------------------------------------------------------------------ output and state

    def _emit(self, type_: EventType, t: datetime, facts: tuple[object, ...],
              data: dict[str, Any]) -> str:
        self.sequence += 1
        body: dict[str, Any] = {"machine": self.machine_id, "line": self.cfg.line,
                                "site": self.site}
        if "order_id" not in data:
            body["order_id"] = self.order
        body.update(data)
        # The sequence is part of every id: two facts that look alike (a signal lost twice in
        # one instant) stay two events, and it is restored with the state after a restart.
        eid = event_id(self.source, type_.value, *facts, self.sequence)
        self._out.append(Event(id=eid, type=type_, source=self.source, time=t,
                               key=self.machine_id, sequence=self.sequence, data=body))
        return eid

    def snapshot(self) -> str:
        """Everything needed to continue after a restart, as text (agent/detect/snapshot.py)."""
        return dump_state(self)

    def restore(self, text: str) -> None:
        """Continue from a snapshot. An unreadable snapshot raises ValueError (the runtime
        logs it and starts this machine fresh rather than guessing)."""
        saved = parse_state(text)
        self._reset()
        apply_state(self, saved)

    def status(self) -> dict[str, Any]:
        return status_view(self)


def _first(item: tuple[int, TagSample]) -> int:
    return item[0]
