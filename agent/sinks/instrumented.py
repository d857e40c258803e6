"""Delivery metrics observed as they happen: a Sink wrapper that times every attempt.

``DeliveryMetrics`` registers its families in a registry it is given (one per runtime, never
the process-global default, so several runtimes in one test process do not collide);
``InstrumentedSink`` delegates to a sink, timing each attempt, counting its outcome and
observing each accepted event's delivery delay: from its commit (the ``detectedat`` attribute)
to the acceptance, the agent's time to synchronise; an event buffered by an older version
without ``detectedat`` counts from its ``time``. The last delays per sink are kept for the
quantiles on ``/status`` (``recent``).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import math
import time
from collections.abc import Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from agent.sinks.base import Delivery, OutboundEvent, Outcome, Sink
from config.model import parse_time
from config.recent import RecentValues

__all__ = ["DeliveryMetrics", "InstrumentedSink", "observe_all"]

# ``*_created`` timestamp series per counter would double the output for no use on a dashboard
# (and break the fixed vocabulary); the agent owns its process, so switch them off globally.
disable_created_metrics()

# An attempt is one HTTP request: milliseconds on a LAN, up to the sink timeout when it hangs.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From the commit to the acceptance: a second normally, hours after an outage.
_DELAY_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
                  86400.0)


class DeliveryMetrics:
    """The families observed per attempt, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivery_seconds = Histogram(
            "edge_agent_delivery_duration_seconds", "Duration of one delivery attempt.",
            ["sink"], registry=registry, buckets=_LATENCY_BUCKETS)
        self.delivery_delay = Histogram(
            "edge_agent_event_delivery_delay_seconds",
            "From the event's commit in the buffer to its acceptance by the sink.",
            ["sink"], registry=registry, buckets=_DELAY_BUCKETS)
        self.recent = RecentValues()
        self.delivery_attempts = Counter(
            "edge_agent_delivery_attempts", "Delivery attempts by outcome.", ["sink", "type"],
            registry=registry)

    def instrument(self, sink: Sink) -> InstrumentedSink:
        return InstrumentedSink(sink, self)


class InstrumentedSink(Sink):
    """Delegates to a sink, timing each attempt and counting its outcome."""

    def __init__(self, inner: Sink, metrics: DeliveryMetrics) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self._latency = metrics.delivery_seconds.labels(sink=inner.name)
        self._delay = metrics.delivery_delay.labels(sink=inner.name)
        self._recent = metrics.recent
        self._attempts = metrics.delivery_attempts

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @property
    def max_in_flight(self) -> int:
        return self.inner.max_in_flight

    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        started = time.monotonic()
        delivery = await self.inner.deliver(events)
        self._latency.observe(time.monotonic() - started)
        self._attempts.labels(sink=self.name, type=delivery.outcome.value).inc()
        now = time.time()
        every = delivery.outcome is Outcome.ACCEPTED  # then no item needs looking at
        delays = []
        for e in events:
            if every or delivery.result_for(e.id).outcome is Outcome.ACCEPTED:
                when = _committed_time(e.payload)
                if when is not None:
                    delays.append(max(0.0, now - when))
        if delays:
            observe_all(self._delay, delays)
            self._recent.extend(self.name, delays)
        return delivery

    async def reload_credentials(self) -> None:
        await self.inner.reload_credentials()

    async def aclose(self) -> None:
        await self.inner.aclose()


_TIME_KEY = '"time":"'
_AFTER_TIME = ',"type":"'
_DETECTED_KEY = '"detectedat":"'
_AFTER_DETECTED = ',"id":"'


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each value, in one update per bucket.

    A backlog drain observes every delivered event: one observe per event (a lock per bucket
    and per sum, a walk over the bounds) was a tenth of the event loop's time. This reads the
    child's bounds, buckets and sum as prometheus_client 0.2x keeps them; should a version keep
    them otherwise, it observes one by one (``tests/unit/test_metrics_observe_all.py`` checks
    both give the same series)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if not (isinstance(bounds, list) and isinstance(buckets, list) and total is not None
            and len(bounds) == len(buckets) and bounds and bounds[-1] == math.inf):
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1  # the first bound >= v, as observe()
    total.inc(math.fsum(values))
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


@functools.lru_cache(maxsize=256)
def _timestamp(text: str) -> float:
    # Cached: the events of one commit share their ``detectedat``.
    if text.endswith("Z"):  # the agent's own format: fromisoformat reads it as UTC, fast
        return datetime.fromisoformat(text).timestamp()
    return parse_time(text).timestamp()


def _committed_time(payload: str) -> float | None:
    """The CloudEvent's ``detectedat`` (its commit) as a POSIX timestamp, else its ``time``.

    Read like ``_event_time``: in the agent's serialisation (sorted keys) the top-level
    ``detectedat`` follows ``data`` and ``datacontenttype`` and is followed by ``id``."""
    i = payload.rfind(_DETECTED_KEY)
    if i >= 0:
        start = i + len(_DETECTED_KEY)
        end = payload.find('"', start)
        if end > 0 and payload.startswith(_AFTER_DETECTED, end + 1):
            with contextlib.suppress(ValueError):
                return _timestamp(payload[start:end])
    elif '"detectedat"' not in payload:
        return _event_time(payload)  # buffered before the attribute existed
    try:
        doc = json.loads(payload)
        return parse_time(doc["detectedat"]).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return _event_time(payload)


def _event_time(payload: str) -> float | None:
    """The CloudEvent's ``time`` as a POSIX timestamp (None when unreadable).

    Called for every accepted event: parsing the whole payload was one of the largest
    per-event costs of a backlog drain, so the agent's own serialisation (compact, sorted
    keys: the top-level ``time`` is followed by ``type``) is read without parsing; anything
    else falls back to ``json.loads``."""
    try:
        i = payload.rfind(_TIME_KEY)
        if i >= 0:
            start = i + len(_TIME_KEY)
            end = payload.find('"', start)
            if end > 0 and payload.startswith(_AFTER_TIME, end + 1):
                return _timestamp(payload[start:end])
        doc = json.loads(payload)
        return parse_time(doc["time"]).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
