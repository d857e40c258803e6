"""Scrap from counters and quantities, summed into windows.

Counter arithmetic (``counter_increase``)::

    new >= last                      increase = new - last   (unless > max_step: a jump)
    new <  last, near the top        rollover: increase = (2**bits - last) + new
    new <  last, otherwise           reset:    increase = new (counted since the reset)

"Near the top" means the rollover increase is at most ``max_step`` (when configured) or a
quarter of the counter's range. An increase is never negative.

Windows are aligned to multiples of ``window`` seconds since the epoch, so the same samples give
the same window boundaries (and event ids) after a restart. A window closes when time passes
its end or when the production order changes inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["CounterStep", "ScrapWindow", "counter_increase", "window_bounds"]


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
    order_id: str | None = None
    reason_code: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(),
                "quantity": self.quantity, "counter_from": self.counter_from,
                "counter_to": self.counter_to, "order_id": self.order_id,
                "reason_code": self.reason_code}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> ScrapWindow:
        def _int(v: object) -> int | None:
            return int(v) if isinstance(v, int | str) else None

        def _str(v: object) -> str | None:
            return v if isinstance(v, str) else None

        return cls(start=datetime.fromisoformat(str(d["start"])),
                   end=datetime.fromisoformat(str(d["end"])),
                   quantity=float(str(d["quantity"])), counter_from=_int(d.get("counter_from")),
                   counter_to=_int(d.get("counter_to")), order_id=_str(d.get("order_id")),
                   reason_code=_str(d.get("reason_code")))
