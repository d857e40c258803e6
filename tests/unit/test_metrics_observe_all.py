"""``observe_all`` (one update per bucket for a batch of delivery delays) must give the same
series as observing each value, with this prometheus_client; and the fallback must too."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from agent.sinks.instrumented import observe_all
from config.recent import RecentValues

_BOUNDS = (0.1, 0.5, 1.0, 2.5, 60.0)
_VALUES = [0.0, 0.1, 0.10000001, 0.5, 0.7, 1.0, 2.5, 2.6, 59.9, 60.0, 61.0, 1e9, 0.3, 0.3]


def _series(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value
            for m in registry.collect() for s in m.samples}


def _pair() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, Histogram]:
    ra, rb = CollectorRegistry(), CollectorRegistry()
    a = Histogram("d", "delay", ["sink"], registry=ra, buckets=_BOUNDS).labels(sink="s")
    b = Histogram("d", "delay", ["sink"], registry=rb, buckets=_BOUNDS).labels(sink="s")
    return ra, a, rb, b


def test_bulk_observe_gives_the_series_of_one_observe_per_value() -> None:
    ra, bulk, rb, single = _pair()
    observe_all(bulk, _VALUES)
    observe_all(bulk, [])
    for v in _VALUES:
        single.observe(v)
    got, want = _series(ra), _series(rb)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert got[("d_bucket", "0.1")] == 2 and got[("d_count", "")] == len(_VALUES)


def test_a_histogram_kept_otherwise_is_observed_one_by_one() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    plain = Plain()
    observe_all(plain, [1.0, math.inf, 0.0])  # type: ignore[arg-type]
    assert plain.seen == [1.0, math.inf, 0.0]


def test_recent_values_extend_keeps_the_last_window() -> None:
    recent = RecentValues(window=3)
    recent.extend("s", [])
    assert recent.status() == {}
    recent.extend("s", [1.0, 2.0])
    recent.add("s", 3.0)
    recent.extend("s", [4.0])
    assert recent.status()["s"]["count"] == 3 and recent.status()["s"]["max"] == 4.0
