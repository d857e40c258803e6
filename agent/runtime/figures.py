"""Time to detect: from an event's time to its commit, per machine (the MTTD half of the
figures; the delivery half is observed per sink in ``agent/sinks/instrumented.py``).

::

    event time ──detection lag──> committed (``detectedat``) ──delivery delay──> accepted
    (the fact)   per machine, here                             per sink, by the sink wrapper

The lag includes what the rules wait for on purpose: a stop is reported once it lasted
``min_duration``, so ``downtime.started`` lags by at least that; a scrap window by the tick that
closes it. Both figures are on the wall clock, like the event times they start from.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from config.model import Event
from config.recent import RecentValues

__all__ = ["DetectionFigures"]

# Milliseconds for a state change or a classification, min_duration (seconds to minutes) for a
# reported stop, a window for scrap.
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                3600.0)


class DetectionFigures:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag = Histogram(
            "edge_agent_event_detection_lag_seconds",
            "From the event's time to its commit in the buffer (includes min_duration).",
            ["machine"], registry=registry, buckets=_LAG_BUCKETS)
        self.recent = RecentValues()

    def observe(self, events: Sequence[Event], committed_at: datetime) -> None:
        """Events just committed at ``committed_at`` (label: the machine, or ``agent``)."""
        children: dict[str, Any] = {}
        for e in events:
            lag = max(0.0, (committed_at - e.time).total_seconds())
            child = children.get(e.key)
            if child is None:
                child = children[e.key] = self.lag.labels(machine=e.key)
            child.observe(lag)
            self.recent.add(e.key, lag)
