"""One machine's detector: samples in, events out (state, downtime, signal, scrap, context).

Pure and synchronous: ``on_samples(batch)`` and ``on_tick(now)`` return events; nothing here
reads a clock or does I/O, so tests feed recorded samples and a fake time.

This module is the state machine and the coordinator; its parts live in their own modules:
the inputs and signal quality (``inputs.py``), the stall rule (``stall.py``), the episode
lifecycle (``downtime.py``), order and reasons (``context.py``), scrap (``scrap.py``), later
classification (``classify.py``), event numbering (``outbox.py``), the saved state
(``snapshot.py``).

Machine states and what they mean for downtime episodes::

    running ──leaves running──> down/idle/planned  (episode opens at the sample time;
       ^                              │             category unplanned/idle/planned, or the
       │                              │             category of the active alarm's reason)
       └──────returns to running──────┘             (episode ends)
    running ──production counter still for stalled_after──> down, reason "no-output"
    any ──state tag bad, stale or unmapped──> unknown   (signal.lost; an open episode stays
                                                          open and gets had_signal_gap)
    unknown ──good state sample──> its state            (signal.restored)

Invariants:
- A category change inside an episode (down -> planned) ends it and opens a new one; when its
  events go out (``min_duration``, micro-stops, ``max_duration`` pieces) is ``downtime.py``'s.
- Missing data never invents downtime: a machine that was running and then goes silent is
  ``unknown``, and a downtime seen after the gap starts at the first good sample.
- ``state_since`` never goes back (a source clock stepping back): it is the floor for the next
  episode's start, so episodes never overlap and durations are never negative.
- Event ids are UUIDv5 over (source, type, episode start or scrap window and counter range,
  sequence), so the same facts give the same ids after a restart (``outbox.py``).
- A reason after a stop ended (the PLC within ``reason_grace``, an operator, an API) never
  changes an event already sent: it is a ``downtime.classified`` event of its own.
- ``snapshot()`` captures everything needed to continue after a restart (the runtime commits it
  in the same transaction as the events it produced).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from agent.detect.alarms import ActiveAlarms
from agent.detect.classify import Classification, Classifier, key_digest
from agent.detect.config import MachineConfig
from agent.detect.context import Context
from agent.detect.downtime import Downtime
from agent.detect.episode import Episode
from agent.detect.inputs import StateInputs
from agent.detect.outbox import Outbox
from agent.detect.scrap import ScrapTracker
from agent.detect.snapshot import apply_state, dump_state, parse_state, status_view
from agent.detect.stall import NO_OUTPUT, StallRule
from config.model import Event, MachineState, Quality, TagSample

__all__ = ["MachineDetector"]

_CATEGORY = {MachineState.DOWN: "unplanned", MachineState.PLANNED: "planned",
             MachineState.IDLE: "idle"}
_GOOD = Quality.GOOD
_MISSING = object()


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
        # Tags whose every sample is a fact (a reject message of 2 followed by another of 2):
        # never skipped as "unchanged".
        self._every_sample = frozenset({cfg.scrap.quantity_tag} if cfg.scrap and
                                       cfg.scrap.quantity_tag else ())
        self._reset()

    def _reset(self) -> None:
        cfg = self.cfg
        self.state = MachineState.UNKNOWN
        self.state_since: datetime | None = None
        self.clock_jumps = 0
        self.outbox = Outbox(self.source, self.machine_id, cfg.line, self.site,
                             lambda: self.context.order)
        self.context = Context(cfg.downtime, self.outbox)
        self.inputs = StateInputs(cfg, self.stale_after, self.outbox)
        self.stall = StallRule(cfg.state.stalled_after, self.outbox)
        self.classifier = Classifier(cfg.downtime, self.outbox.emit)
        self.downtime = Downtime(cfg.downtime, self.outbox, self.classifier)
        self.scrap = (ScrapTracker(cfg.scrap, self.counter_bits, self.outbox.emit)
                      if cfg.scrap else None)
        # Not persisted: the last good value applied per tag (the hot path's memory).
        self._last_values: dict[str, object] = {}

    # Views of the parts, for the runtime, /status and tests.

    @property
    def episode(self) -> Episode | None:
        return self.downtime.episode

    @property
    def signal(self) -> str:
        return self.inputs.signal

    @property
    def order(self) -> str | None:
        return self.context.order

    @property
    def alarms(self) -> ActiveAlarms | None:
        return self.context.alarms

    @property
    def sequence(self) -> int:
        return self.outbox.sequence

    @property
    def dirty(self) -> bool:
        """The saved state changed since the runtime last committed it (which clears this)."""
        return self.outbox.dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self.outbox.dirty = value

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
        inputs = self.inputs
        rank, last, good, signal_tag = self._rank, self._last_values, _GOOD, inputs.signal_tag
        steady = inputs.signal == "ok" and not inputs.bad_inputs
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
                        inputs.seen(s.agent_time)
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
        if self.context.late_reason is not None:
            self.context.attribute_late_reason(self.downtime.episode, self.classifier)
        return self.outbox.drain()

    def _sample(self, s: TagSample) -> None:
        cfg, ctx = self.cfg, self.context
        if (s.tag == cfg.order_tag and s.good and ctx.on_order(s, self.downtime.episode)
                and self.scrap is not None):
            self.scrap.on_order_change(s.time, ctx.order)  # its window closes early
        if s.tag == cfg.downtime.reason_tag and s.good:
            ctx.on_reason(s, self.downtime.episode)
        if ctx.alarms is not None and s.tag == ctx.alarms.tag:
            ctx.on_alarm(s, self.downtime.episode)
        if s.tag == cfg.state.tag:
            self._on_state_sample(s)
        if s.tag == cfg.state.production_counter:
            self._on_production(s)
        if self.scrap is not None and s.good:
            self.scrap.on_sample(s, ctx.order)
            self.outbox.dirty = True

    def on_tick(self, now: datetime) -> list[Event]:
        stale = self.inputs.stale(now)
        if stale is not None:
            self._input_bad(*stale, now)
        if self.inputs.signal == "ok" and self.stall.limit is not None:
            self._evaluate(now)  # only the stall rule changes the state with time alone
        if self.downtime.episode is not None:
            self.downtime.follow(now, self.context.order, self.inputs.signal == "lost")
        if self.scrap is not None and self.scrap.window is not None:
            self.scrap.on_tick(now)
        return self.outbox.drain()

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
            return max(self.state_since, self.context.reason_since or self.state_since)
        return None

    def note_clock_jump(self, seconds: float) -> None:
        """The agent's clock jumped; flag what is open so its events say so."""
        self.clock_jumps += 1
        if self.downtime.episode is not None:
            self.downtime.episode.clock_adjusted = True
        if self.scrap is not None and self.scrap.window is not None:
            self.scrap.window.clock_adjusted = True
        self.outbox.dirty = True

    # ------------------------------------------------------------------ state

    def _on_state_sample(self, s: TagSample) -> None:
        if self.cfg.state.tag is None:
            return  # only the stall rule decides: _on_production handles the counter
        why = self.inputs.state_sample(s)
        if why is not None:
            self._input_bad(s.tag, why, s.time)
            return
        self._input_good(s, self.inputs.base_state)

    def _on_production(self, s: TagSample) -> None:
        if not self.stall.count(s):
            # Output cannot be seen: the stall rule cannot be judged, so the state is unknown
            # (never a stall invented from missing data).
            self._input_bad(s.tag, s.detail or f"{s.tag} is {s.quality.value}", s.time)
            return
        if self.cfg.state.tag is None:
            self.inputs.counting(s.time)
        self._input_good(s, self.inputs.base_state)

    def _input_bad(self, tag: str, why: str, t: datetime) -> None:
        if not self.inputs.lose(tag, t, why, self.state):
            return  # the signal was lost already
        self.state = MachineState.UNKNOWN
        self.state_since = max(t, self.state_since) if self.state_since else t
        if self.downtime.episode is not None:
            self.downtime.episode.had_signal_gap = True
        self.outbox.dirty = True

    def _input_good(self, s: TagSample, state: MachineState) -> None:
        """A good sample of a tag the state depends on: restore the signal when every such tag
        is good again, then re-evaluate the state at this sample's time."""
        if not self.inputs.clear(s) or state is MachineState.UNKNOWN:
            return
        if self.inputs.restore(s.time, state):
            self.stall.restart(s.time)  # output during the gap is unknown
        self._evaluate(s.time)
        self.downtime.follow(s.time, self.context.order, signal_lost=False)

    def _evaluate(self, t: datetime) -> None:
        inputs = self.inputs
        stalled_since = self.stall.stalled_since(t, inputs.base_state, inputs.running_since)
        if stalled_since is not None:
            if self.state is not MachineState.DOWN:
                self._apply_state(MachineState.DOWN, stalled_since, NO_OUTPUT)
        elif inputs.base_state is not MachineState.UNKNOWN:
            self._apply_state(inputs.base_state, t)

    def _apply_state(self, new: MachineState, t: datetime, reason: str | None = None) -> None:
        if new == self.state:
            return
        if self.state_since is not None and t < self.state_since:
            t = self.state_since  # a source clock that went backwards: never negative
        downtime = self.downtime
        if downtime.episode is not None and t < downtime.episode.started_at:
            # A piece cut by max_duration starts after state_since: the next episode must not
            # start before it (a clock stepping back right after a cut made them overlap).
            t = downtime.episode.started_at
        self.state, self.state_since = new, t
        self.outbox.dirty = True
        if new is MachineState.RUNNING:
            if downtime.episode is not None:
                downtime.close(t)
            return
        category = _CATEGORY[new]
        alarm = self.context.alarm_reason()
        if alarm is not None and alarm.category is not None:
            category = alarm.category
        if downtime.episode is not None and downtime.episode.category != category:
            downtime.close(t)
        if downtime.episode is None:
            reason = reason or self.context.reason
            text = None
            if reason is None and alarm is not None:
                reason, text = alarm.code, alarm.text
            downtime.open(t, category, reason, self.context.order, reason_text=text)

    # ------------------------------------------------------------------ classification

    def classify(self, episode_id: str | None, code: str, text: str | None, by: str,
                 at: datetime, key: str | None = None) -> tuple[Classification, list[Event]]:
        """An operator's or an API's reason for an episode (rules in detect/classify.py).
        ``at`` is the classification time (the caller's clock: detection reads none); ``key``
        the request's idempotency key. Raises EpisodeNotFound, UnknownCode or KeyReused,
        changing nothing."""
        known = key is None or key_digest(key) in self.classifier.keys
        result = self.classifier.classify(self.downtime.episode, episode_id, code, text, by,
                                          at, key)
        if result.created or not known:  # a new key is state too
            self.outbox.dirty = True
        return result, self.outbox.drain()

    def episodes(self, recent: int) -> list[dict[str, Any]]:
        """The open (reported) episode and the ``recent`` latest ended ones, newest first."""
        return self.classifier.listing(self.downtime.episode, recent)

    def take_notes(self) -> list[str]:
        """Sentences for the runtime's log (a reason that could not be attributed)."""
        return self.classifier.take_notes()

    # ------------------------------------------------------------------ saved state

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
