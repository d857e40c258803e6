"""One machine's detector: state, downtime episodes, signal quality, scrap, order context.

Pure and synchronous: ``on_samples(batch)`` and ``on_tick(now)`` return events; nothing here
reads a clock or does I/O, so tests feed recorded samples and a fake time.

Machine states and what they mean for downtime episodes::

    running ──leaves running──> down/idle/planned  (episode opens at the sample time;
       ^                              │             category unplanned/idle/planned)
       └──────returns to running──────┘             (episode ends)
    any ──state tag bad, stale or unmapped──> unknown   (signal.lost; an open episode stays
                                                          open and gets had_signal_gap)
    unknown ──good state sample──> its state            (signal.restored)

Invariants:
- An episode's ``started`` is emitted once ``min_duration`` has passed (by sample or tick), its
  ``ended`` exactly once after that. Stops shorter than ``min_duration`` are micro-stops: no
  events, counted onto the next ``ended`` as ``microstops``/``microstop_seconds``.
- A category change inside an episode (down -> planned) ends it and opens a new one.
- Missing data never invents downtime: a machine that was running and then goes silent is
  ``unknown``, and a downtime seen after the gap starts at the first good sample.
- Event ids are UUIDv5 over (source, type, episode start or scrap window and counter range), so
  the same facts give the same ids after a restart. ``sequence`` is part of the saved state.
- ``snapshot()`` captures everything needed to continue after a restart (the runtime commits it
  in the same transaction as the events it produced).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from agent.detect.scrap import ScrapWindow, counter_increase, window_bounds
from agent.detect.state import derive_state, value_key
from agent.model import Event, EventType, MachineState, TagSample, event_id, format_time
from config.models import MachineConfig

__all__ = ["MachineDetector"]

_CATEGORY = {MachineState.DOWN: "unplanned", MachineState.PLANNED: "planned",
             MachineState.IDLE: "idle"}
_STATE_VERSION = 1


@dataclass(slots=True)
class _Episode:
    episode_id: str
    started_at: datetime
    category: str
    reason_code: str | None
    last_reason_code: str | None
    order_id: str | None
    later_order_ids: list[str] = field(default_factory=list)
    had_signal_gap: bool = False
    announced: bool = False


class MachineDetector:
    def __init__(self, machine_id: str, cfg: MachineConfig, site: str, *,
                 counter_bits: int = 32, stale_after: float | None = None) -> None:
        self.machine_id = machine_id
        self.cfg = cfg
        self.site = site
        self.source = f"/sites/{site}/lines/{cfg.line}/machines/{machine_id}"
        self.counter_bits = cfg.scrap.counter_bits if cfg.scrap and cfg.scrap.counter_bits \
            else counter_bits
        self.stale_after = stale_after
        self.tags = frozenset(tag for _, tag in cfg.tag_refs())
        self._reset()

    def _reset(self) -> None:
        self.sequence = 0
        self.state = MachineState.UNKNOWN
        self.state_since: datetime | None = None
        self.signal = "none"  # none (never seen) | ok | lost
        self.signal_detail: str | None = None
        self.lost_at: datetime | None = None
        self.episode: _Episode | None = None
        self.order: str | None = None
        self.reason: str | None = None
        self.counter_last: int | None = None
        self.window: ScrapWindow | None = None
        self.microstops = 0
        self.microstop_seconds = 0.0
        self.counter_anomalies = 0
        self.dirty = False
        # Not persisted: agent-clock bookkeeping for staleness.
        self._last_good_state: datetime | None = None
        self._watch_since: datetime | None = None

    # ------------------------------------------------------------------ inputs

    def on_samples(self, samples: Iterable[TagSample]) -> list[Event]:
        """Apply a batch: context tags (order, reason) first, then state, then scrap, so a
        reason or order read in the same poll as a stop is already known when it opens."""
        out: list[Event] = []
        mine = [s for s in samples if s.tag in self.tags]
        if not mine:
            return out
        ctx = {self.cfg.order_tag, self.cfg.downtime.reason_tag} - {None}
        for s in sorted(mine, key=lambda s: (0 if s.tag in ctx else
                                             1 if s.tag == self.cfg.state.tag else 2)):
            out.extend(self.on_sample(s))
        return out

    def on_sample(self, s: TagSample) -> list[Event]:
        out: list[Event] = []
        cfg = self.cfg
        if s.tag == cfg.order_tag and s.good:
            self._on_order(s, out)
        if s.tag == cfg.downtime.reason_tag and s.good:
            self._on_reason(s)
        if s.tag == cfg.state.tag:
            self._on_state_sample(s, out)
        if cfg.scrap and s.good and s.tag in (cfg.scrap.counter, cfg.scrap.quantity_tag):
            self._on_scrap(s, out)
        if out:
            self.dirty = True
        return out

    def on_tick(self, now: datetime) -> list[Event]:
        out: list[Event] = []
        if self._watch_since is None:
            self._watch_since = now
        if self.stale_after is not None and self.signal != "lost":
            seen = self._last_good_state or self._watch_since
            if (now - seen).total_seconds() > self.stale_after and (
                    self.signal == "ok" or self.episode is not None):
                self._lose_signal(now, f"no sample of {self.cfg.state.tag} for "
                                  f"{self.stale_after:g}s", out)
        self._maybe_announce(now, out)
        if self.window is not None and now >= self.window.end:
            self._close_window(self.window.end, out)
        if out:
            self.dirty = True
        return out

    # ------------------------------------------------------------------ state and episodes

    def _on_state_sample(self, s: TagSample, out: list[Event]) -> None:
        new = derive_state(self.cfg.state, s.value) if s.good else MachineState.UNKNOWN
        if new is MachineState.UNKNOWN:
            why = s.detail or (f"{s.tag} is {s.quality.value}" if not s.good
                               else f"{s.tag} value {s.value!r} is not mapped to a state")
            self._lose_signal(s.time, why, out)
            return
        self._last_good_state = s.agent_time
        if self.signal == "lost":
            self._emit(out, EventType.SIGNAL_RESTORED, s.time, (format_time(s.time),), {
                "lost_at": format_time(self.lost_at) if self.lost_at else None,
                "restored_at": format_time(s.time), "state": new.value})
            self.lost_at = None
        self.signal, self.signal_detail = "ok", None
        self._apply_state(new, s.time, out)
        self._maybe_announce(s.time, out)

    def _lose_signal(self, t: datetime, detail: str, out: list[Event]) -> None:
        if self.signal == "lost":
            return
        if self.signal == "ok" or self.episode is not None:
            self._emit(out, EventType.SIGNAL_LOST, t, (format_time(t),), {
                "lost_at": format_time(t), "detail": detail,
                "last_state": self.state.value})
        self.signal, self.signal_detail, self.lost_at = "lost", detail, t
        self.state, self.state_since = MachineState.UNKNOWN, t
        if self.episode is not None:
            self.episode.had_signal_gap = True
        self.dirty = True

    def _apply_state(self, new: MachineState, t: datetime, out: list[Event]) -> None:
        if new == self.state:
            return
        self.state, self.state_since = new, t
        self.dirty = True
        if new is MachineState.RUNNING:
            if self.episode is not None:
                self._close_episode(t, out)
            return
        category = _CATEGORY[new]
        if self.episode is not None and self.episode.category != category:
            self._close_episode(t, out)
        if self.episode is None:
            self.episode = _Episode(
                episode_id=event_id(self.source, "episode", format_time(t)), started_at=t,
                category=category, reason_code=self.reason, last_reason_code=self.reason,
                order_id=self.order)

    def _maybe_announce(self, now: datetime, out: list[Event]) -> None:
        ep = self.episode
        if ep is None or ep.announced:
            return
        if (now - ep.started_at).total_seconds() >= self.cfg.downtime.min_duration:
            ep.announced = True
            self._emit(out, EventType.DOWNTIME_STARTED, ep.started_at,
                       (format_time(ep.started_at),), self._episode_data(ep))

    def _close_episode(self, t: datetime, out: list[Event]) -> None:
        ep = self.episode
        assert ep is not None
        self._maybe_announce(t, out)
        duration = max(0.0, (t - ep.started_at).total_seconds())
        if ep.announced:
            data = self._episode_data(ep)
            data.update(ended_at=format_time(max(t, ep.started_at)),
                        duration_seconds=round(duration, 3),
                        last_reason_code=ep.last_reason_code,
                        microstops=self.microstops,
                        microstop_seconds=round(self.microstop_seconds, 3))
            self._emit(out, EventType.DOWNTIME_ENDED, max(t, ep.started_at),
                       (format_time(ep.started_at),), data)
            self.microstops, self.microstop_seconds = 0, 0.0
        else:
            self.microstops += 1
            self.microstop_seconds += duration
        self.episode = None
        self.dirty = True

    def _episode_data(self, ep: _Episode) -> dict[str, Any]:
        data: dict[str, Any] = {
            "episode_id": ep.episode_id, "category": ep.category,
            "reason_code": ep.reason_code, "started_at": format_time(ep.started_at),
            "order_id": ep.order_id, "had_signal_gap": ep.had_signal_gap,
        }
        text = self.cfg.downtime.reasons.get(ep.reason_code or "")
        if text:
            data["reason"] = text
        if ep.later_order_ids:
            data["later_order_ids"] = list(ep.later_order_ids)
        return data

    def _on_reason(self, s: TagSample) -> None:
        code = value_key(s.value)
        self.reason = None if code in ("", "0", "None") else code
        ep = self.episode
        if ep is not None and self.reason is not None:
            if ep.reason_code is None:
                ep.reason_code = self.reason
            ep.last_reason_code = self.reason
        self.dirty = True

    def _on_order(self, s: TagSample, out: list[Event]) -> None:
        order = str(s.value).strip() if s.value is not None else ""
        new = order or None
        if new == self.order:
            return
        self.order = new
        self.dirty = True
        ep = self.episode
        if ep is not None and new and new != ep.order_id and new not in ep.later_order_ids:
            ep.later_order_ids.append(new)
        if self.window is not None and self.window.quantity > 0:
            end = max(s.time, self.window.start)
            self._close_window(end, out)

    # ------------------------------------------------------------------ scrap

    def _on_scrap(self, s: TagSample, out: list[Event]) -> None:
        scrap = self.cfg.scrap
        assert scrap is not None
        v = s.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            return
        if scrap.counter is not None:
            value = int(v)
            last, self.counter_last = self.counter_last, value
            self.dirty = True
            if last is None:
                return
            step = counter_increase(last, value, self.counter_bits, scrap.max_step)
            if step.kind == "jump":
                self.counter_anomalies += 1
            if step.increase > 0:
                self._add_scrap(s.time, step.increase, last, value, out)
        elif v > 0:
            self._add_scrap(s.time, float(v), None, None, out)

    def _add_scrap(self, t: datetime, qty: float, c_from: int | None, c_to: int | None,
                   out: list[Event]) -> None:
        assert self.cfg.scrap is not None
        if self.window is not None and t >= self.window.end:
            self._close_window(self.window.end, out)
        if self.window is None:
            start, end = window_bounds(t, self.cfg.scrap.window)
            self.window = ScrapWindow(start=start, end=end, order_id=self.order,
                                      reason_code=self.reason)
        w = self.window
        w.quantity += qty
        if c_from is not None and w.counter_from is None:
            w.counter_from = c_from
        if c_to is not None:
            w.counter_to = c_to
        self.dirty = True

    def _close_window(self, end: datetime, out: list[Event]) -> None:
        w = self.window
        assert w is not None
        self.window = None
        if w.quantity <= 0:
            return
        data: dict[str, Any] = {
            "quantity": int(w.quantity) if float(w.quantity).is_integer() else w.quantity,
            "window_start": format_time(w.start),
            "window_end": format_time(end), "order_id": w.order_id,
            "reason_code": w.reason_code,
        }
        if w.counter_from is not None:
            data.update(counter_from=w.counter_from, counter_to=w.counter_to)
        self._emit(out, EventType.SCRAP_RECORDED, end,
                   (format_time(w.start), w.counter_from, w.counter_to, data["quantity"]), data)
        if end < w.end and self.cfg.scrap is not None:
            # Split at an order change: the rest of the aligned window is a new window.
            self.window = ScrapWindow(start=end, end=w.end, order_id=self.order,
                                      reason_code=self.reason)

    # ------------------------------------------------------------------ output and state

    def _emit(self, out: list[Event], type_: EventType, t: datetime, facts: tuple[object, ...],
              data: dict[str, Any]) -> None:
        self.sequence += 1
        body = {"machine": self.machine_id, "line": self.cfg.line, "site": self.site}
        if "order_id" not in data:
            body["order_id"] = self.order  # type: ignore[assignment]
        body.update(data)
        out.append(Event(id=event_id(self.source, type_.value, *facts), type=type_,
                         source=self.source, time=t, key=self.machine_id,
                         sequence=self.sequence, data=body))

    def snapshot(self) -> str:
        ep = asdict(self.episode) if self.episode else None
        if ep:
            ep["started_at"] = ep["started_at"].isoformat()
        return json.dumps({
            "v": _STATE_VERSION, "sequence": self.sequence, "state": self.state.value,
            "state_since": self.state_since.isoformat() if self.state_since else None,
            "signal": self.signal, "signal_detail": self.signal_detail,
            "lost_at": self.lost_at.isoformat() if self.lost_at else None,
            "episode": ep, "order": self.order, "reason": self.reason,
            "counter_last": self.counter_last,
            "window": self.window.to_json() if self.window else None,
            "microstops": self.microstops, "microstop_seconds": self.microstop_seconds,
            "counter_anomalies": self.counter_anomalies,
        }, sort_keys=True)

    def restore(self, text: str) -> None:
        """Continue from a snapshot. An unreadable snapshot raises ValueError (the runtime
        logs it and starts this machine fresh rather than guessing)."""
        d = json.loads(text)
        if d.get("v") != _STATE_VERSION:
            raise ValueError(f"unknown detector state version {d.get('v')!r}")
        self._reset()
        self.sequence = int(d["sequence"])
        self.state = MachineState(d["state"])
        self.state_since = _dt(d.get("state_since"))
        self.signal, self.signal_detail = d["signal"], d.get("signal_detail")
        self.lost_at = _dt(d.get("lost_at"))
        if d.get("episode"):
            ep = dict(d["episode"])
            ep["started_at"] = datetime.fromisoformat(ep["started_at"])
            self.episode = _Episode(**ep)
        self.order, self.reason = d.get("order"), d.get("reason")
        self.counter_last = d.get("counter_last")
        self.window = ScrapWindow.from_json(d["window"]) if d.get("window") else None
        self.microstops = int(d.get("microstops", 0))
        self.microstop_seconds = float(d.get("microstop_seconds", 0.0))
        self.counter_anomalies = int(d.get("counter_anomalies", 0))

    def status(self) -> dict[str, Any]:
        ep = self.episode
        return {
            "state": self.state.value,
            "since": format_time(self.state_since) if self.state_since else None,
            "signal": self.signal, "signal_detail": self.signal_detail,
            "order_id": self.order,
            "open_downtime": None if ep is None else {
                "episode_id": ep.episode_id, "category": ep.category,
                "started_at": format_time(ep.started_at), "reason_code": ep.reason_code,
                "reported": ep.announced},
            "counter_anomalies": self.counter_anomalies,
        }


def _dt(v: object) -> datetime | None:
    return datetime.fromisoformat(v) if isinstance(v, str) else None
