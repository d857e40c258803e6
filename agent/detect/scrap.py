"""Scrap from counters and quantities, summed into windows.

Counter arithmetic (``counter_increase``)::

    new >= last                      increase = new - last   (unless > max_step: a jump)
    new <  last, near the top        rollover: increase = (2**bits - last) + new
    new <  last, otherwise           reset:    increase = new (counted since the reset)

"Near the top" means the rollover increase is at most ``max_step`` (when configured) or a
quarter of the counter's range. An increase is never negative; a jump is reported (counted in
``anomalies``), never posted as scrap.

Three ways to count (``ScrapRule``): one scrap ``counter``; ``quantity_tag`` (every good sample
adds its value: reject messages); ``total_counter`` + ``good_counter`` (scrap is the increase of
all parts minus the increase of good parts over a window, never below zero).

Windows are aligned to multiples of ``window`` seconds since the epoch, so the same samples give
the same window boundaries (and event ids) after a restart. A window closes when time passes
its end, or early when the production order changes inside it (the rest of the aligned window
becomes a new window for the new order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from agent.detect.config import ScrapRule
from agent.detect.state import reason_code
from config.model import EventType, TagSample, format_time

__all__ = ["CounterStep", "ScrapTracker", "ScrapWindow", "counter_increase", "window_bounds"]

Emit = Callable[[EventType, datetime, tuple[object, ...], dict[str, Any]], object]


@dataclass(frozen=True, slots=True)
class CounterStep:
    increase: int
    kind: str  # "count" | "rollover" | "reset" | "jump"


def counter_increase(last: int, new: int, bits: int, max_step: int | None) -> CounterStep:
    span = 1 << bits
    last, new = last % span, new % span  # signed counters wrap like unsigned ones
    if new >= last:
        inc = new - last
        if max_step is not None and inc > max_step:
            return CounterStep(0, "jump")
        return CounterStep(inc, "count")
    rolled = span - last + new
    limit = max_step if max_step is not None else span // 4
    if rolled <= limit:
        return CounterStep(rolled, "rollover")
    if max_step is not None and new > max_step:
        return CounterStep(0, "jump")
    return CounterStep(new, "reset")


def window_bounds(t: datetime, window: float) -> tuple[datetime, datetime]:
    ts = t.timestamp()
    start = (ts // window) * window
    return (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(start + window, UTC))


@dataclass(slots=True)
class ScrapWindow:
    """An open aggregation window (serialised into the detector state)."""

    start: datetime
    end: datetime
    quantity: float = 0
    counter_from: int | None = None
    counter_to: int | None = None
    total: int = 0  # total_counter increase (total/good mode)
    good: int = 0  # good_counter increase
    order_id: str | None = None
    reason_code: str | None = None
    clock_adjusted: bool = False

    @property
    def scrap(self) -> float:
        return self.quantity + max(0, self.total - self.good)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"], d["end"] = self.start.isoformat(), self.end.isoformat()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScrapWindow:
        d = dict(d)
        d["start"] = datetime.fromisoformat(d["start"])
        d["end"] = datetime.fromisoformat(d["end"])
        return cls(**d)


class ScrapTracker:
    """Scrap rule of one machine; emits ``scrap.recorded`` through ``emit``."""

    def __init__(self, rule: ScrapRule, bits: int, emit: Emit) -> None:
        self.rule, self.bits, self._emit = rule, bits, emit
        self.tags = frozenset(t for t in (rule.counter, rule.quantity_tag, rule.total_counter,
                                          rule.good_counter, rule.reason_tag) if t)
        self.last: dict[str, int] = {}  # counter tag -> last value
        self.window: ScrapWindow | None = None
        self.reason: str | None = None
        self.anomalies = 0
        self.closed_until: datetime | None = None  # end of the last window closed

    def on_sample(self, s: TagSample, order: str | None) -> None:
        rule, v = self.rule, s.value
        if s.tag not in self.tags:
            return  # the machine's other tags (state, speed, order) are not scrap
        if s.tag == rule.reason_tag:
            code = reason_code(v)
            self.reason = code
            if self.window is not None and self.window.reason_code is None:
                self.window.reason_code = code
            return
        if isinstance(v, bool) or not isinstance(v, int | float):
            return
        if s.tag == rule.quantity_tag:
            if v > 0:
                self._window(s.time, order).quantity += float(v)
            return
        step = self._step(s.tag, int(v))
        if step is None or step.increase <= 0:
            return
        if s.tag == rule.counter:
            w = self._window(s.time, order)
            w.quantity += step.increase
            if w.counter_from is None:
                w.counter_from = (int(v) - step.increase) % (1 << self.bits)
            w.counter_to = int(v) % (1 << self.bits)
        elif s.tag == rule.total_counter:
            self._window(s.time, order).total += step.increase
        elif s.tag == rule.good_counter:
            self._window(s.time, order).good += step.increase

    def _step(self, tag: str, value: int) -> CounterStep | None:
        last = self.last.get(tag)
        self.last[tag] = value
        if last is None:
            return None  # the first reading is the baseline
        step = counter_increase(last, value, self.bits, self.rule.max_step)
        if step.kind == "jump":
            self.anomalies += 1
        return step

    def _window(self, t: datetime, order: str | None) -> ScrapWindow:
        if self.window is not None and t >= self.window.end:
            self.close(self.window.end)
        if self.window is None:
            start, end = window_bounds(t, self.rule.window)
            if self.closed_until is not None and start < self.closed_until:
                # A late sample (its time falls in a window already posted): a window is never
                # reopened, so it goes into a window starting where the posted one ended.
                start = self.closed_until
                end = max(end, window_bounds(start, self.rule.window)[1])
            self.window = ScrapWindow(start=start, end=end, order_id=order,
                                      reason_code=self.reason)
        return self.window

    def on_order_change(self, t: datetime, order: str | None) -> None:
        w = self.window
        if w is not None and (w.quantity or w.total or w.good):
            end = min(max(t, w.start), w.end)
            self.close(end)
            if end < w.end:
                self.window = ScrapWindow(start=end, end=w.end, order_id=order,
                                          reason_code=self.reason)
        elif w is not None:
            w.order_id = order

    def on_tick(self, now: datetime) -> None:
        if self.window is not None and now >= self.window.end:
            self.close(self.window.end)

    def close(self, end: datetime) -> None:
        w, self.window = self.window, None
        if w is None:
            return
        if self.closed_until is None or end > self.closed_until:
            self.closed_until = end
        if w.scrap <= 0:
            return
        qty = w.scrap
        data: dict[str, Any] = {
            "quantity": int(qty) if float(qty).is_integer() else qty,
            "window_start": format_time(w.start), "window_end": format_time(end),
            "order_id": w.order_id, "reason_code": w.reason_code,
        }
        if w.counter_from is not None:
            data.update(counter_from=w.counter_from, counter_to=w.counter_to)
        if self.rule.total_counter:
            data.update(total_increase=w.total, good_increase=w.good)
        if w.clock_adjusted:
            data["clock_adjusted"] = True
        self._emit(EventType.SCRAP_RECORDED, end,
                   (format_time(w.start), w.counter_from, w.counter_to, data["quantity"]), data)

    def to_json(self) -> dict[str, Any]:
        return {"last": self.last, "window": self.window.to_json() if self.window else None,
                "reason": self.reason, "anomalies": self.anomalies,
                "closed_until": self.closed_until.isoformat() if self.closed_until else None}

    def restore(self, d: dict[str, Any]) -> None:
        self.last = {str(k): int(v) for k, v in d.get("last", {}).items()}
        self.window = ScrapWindow.from_json(d["window"]) if d.get("window") else None
        self.reason = d.get("reason")
        self.anomalies = int(d.get("anomalies", 0))
        closed = d.get("closed_until")
        self.closed_until = datetime.fromisoformat(closed) if closed else None
