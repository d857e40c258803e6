"""Recent time-to-detect and time-to-synchronise figures for ``/status`` (MTTD / MTTS).

Two delays per event, both on the wall clock (they compare with event times, which are wall
clock too)::

    event time ──detection lag──> committed (``detectedat``) ──delivery delay──> accepted by a sink
    (the fact)   per machine                                     per sink

- Detection lag includes what the rules wait on purpose: a stop is reported once it lasted
  ``min_duration``, so ``downtime.started`` lags by at least that; a scrap window by the tick
  that closes it.
- Delivery delay is from the commit to the sink's acceptance: seconds on a healthy link, the
  length of an outage after one.

Prometheus histograms (``agent/metrics.py``) keep the long view; this module keeps the last
``WINDOW`` values per label so ``/status`` can show recent quantiles without a Prometheus.
Memory is bounded: labels are machines and sinks from the configuration (plus ``agent``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["WINDOW", "RecentFigures", "quantiles"]

WINDOW = 500  # values per label: a few hours of a busy machine's events


def quantiles(values: list[float]) -> dict[str, float | int]:
    """count, p50, p90, p99 and max of ``values`` (nearest rank; not empty)."""
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, int(q * n + 0.999999) - 1))], 3)

    return {"count": n, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99),
            "max": round(ordered[-1], 3)}


class RecentFigures:
    """The last ``WINDOW`` detection lags per machine and delivery delays per sink."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self.detection: dict[str, deque[float]] = {}
        self.delivery: dict[str, deque[float]] = {}

    def add_detection(self, machine: str, seconds: float) -> None:
        self._add(self.detection, machine, seconds)

    def add_delivery(self, sink: str, seconds: float) -> None:
        self._add(self.delivery, sink, seconds)

    def _add(self, table: dict[str, deque[float]], label: str, seconds: float) -> None:
        values = table.get(label)
        if values is None:
            values = table[label] = deque(maxlen=self._window)
        values.append(seconds)

    def status(self) -> dict[str, Any]:
        return {
            "window": self._window,
            "detection_lag_s": {k: quantiles(list(v)) for k, v in sorted(self.detection.items())
                                if v},
            "delivery_delay_s": {k: quantiles(list(v)) for k, v in sorted(self.delivery.items())
                                 if v},
        }
