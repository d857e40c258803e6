"""The last N values of a figure and their quantiles (for ``/status``, next to Prometheus
histograms that keep the long view). Bounded memory: ``window`` floats per label."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["WINDOW", "RecentValues", "quantiles"]

WINDOW = 500  # values per label: a few hours of a busy machine's events


def quantiles(values: list[float]) -> dict[str, float | int]:
    """count, p50, p90, p99 and max of ``values`` (nearest rank; not empty)."""
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))], 3)

    return {"count": n, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99),
            "max": round(ordered[-1], 3)}


class RecentValues:
    """``add(label, value)``; ``status()`` gives the quantiles per label that has values."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._values: dict[str, deque[float]] = {}

    def add(self, label: str, value: float) -> None:
        values = self._values.get(label)
        if values is None:
            values = self._values[label] = deque(maxlen=self._window)
        values.append(value)

    def extend(self, label: str, values: list[float]) -> None:
        if not values:
            return
        got = self._values.get(label)
        if got is None:
            got = self._values[label] = deque(maxlen=self._window)
        got.extend(values)

    def status(self) -> dict[str, dict[str, float | int]]:
        return {k: quantiles(list(v)) for k, v in sorted(self._values.items()) if v}
