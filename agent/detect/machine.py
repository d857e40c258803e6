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
- ``snapshot()`` captures everything needed to continue after a restart (the runtime commits it
  in the same transaction as the events it produced).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

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
               else None}
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
        return self._drain() if self._out else []

    def _sample(self, s: TagSample) -> None:
        cfg = self.cfg
        if s.tag == cfg.order_tag and s.good:
            self._on_order(s)
        if s.tag == cfg.downtime.reason_tag and s.good:
            self._on_reason(s)
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
        self.state, self.state_since = new, t
        self.dirty = True
        if new is MachineState.RUNNING:
            if self.episode is not None:
                self._close_episode(t)
            return
        category = _CATEGORY[new]
        if self.episode is not None and self.episode.category != category:
            self._close_episode(t)
        if self.episode is None:
            self._open_episode(t, category, reason or self.reason)

    def _open_episode(self, t: datetime, category: str, reason: str | None,
                      continued_from: str | None = None) -> None:
        # The sequence number makes two episodes clamped to the same start (a source clock
        # stepping back) distinct, and is itself restored with the state after a restart.
        self.episode = Episode(
            episode_id=event_id(self.source, "episode", format_time(t), self.sequence),
            started_at=t,
            category=category, reason_code=reason, last_reason_code=reason,
            order_id=self.order, continued_from=continued_from)

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
            self._open_episode(cut, ep.category, ep.last_reason_code, ep.episode_id)
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
        else:
            self.microstops += 1
            self.microstop_seconds += duration
        self.episode = None
        self.dirty = True

    def _on_reason(self, s: TagSample) -> None:
        self.reason = reason_code(s.value)
        ep = self.episode
        if ep is not None and self.reason is not None:
            if ep.reason_code is None:
                ep.reason_code = self.reason
            ep.last_reason_code = self.reason
        self.dirty = True

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
              data: dict[str, Any]) -> None:
        self.sequence += 1
        body: dict[str, Any] = {"machine": self.machine_id, "line": self.cfg.line,
                                "site": self.site}
        if "order_id" not in data:
            body["order_id"] = self.order
        body.update(data)
        # The sequence is part of every id: two facts that look alike (a signal lost twice in
        # one instant) stay two events, and it is restored with the state after a restart.
        self._out.append(Event(id=event_id(self.source, type_.value, *facts, self.sequence),
                               type=type_,
                               source=self.source, time=t, key=self.machine_id,
                               sequence=self.sequence, data=body))

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
