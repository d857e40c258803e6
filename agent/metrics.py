"""Prometheus metrics of one runtime (served as ``/metrics`` by the health endpoint).

Vocabulary (the metric vocabulary, ``edge_agent_<thing>_<unit>[_total]``; labels only
``source``, ``machine``, ``sink`` and ``type``, all bounded by the configuration or by an enum)::

    edge_agent_samples_received_total{source}          samples handed over by a source
    edge_agent_samples_bad_total{source}               of those, bad or uncertain quality
    edge_agent_source_up{source}                       1 while the session is up, else 0
    edge_agent_events_detected_total{machine,type}     events detected (type: downtime.started..)
    edge_agent_events_delivered_total{sink}            events the sink accepted
    edge_agent_delivery_retries_total{sink}            failed attempts that will be retried
    edge_agent_events_dead_lettered_total{sink}        events moved to the dead-letter table
    edge_agent_delivery_attempts_total{sink,type}      attempts by outcome (accepted, retry, ..)
    edge_agent_delivery_duration_seconds{sink}         histogram of one delivery attempt
    edge_agent_event_detection_lag_seconds{machine}    histogram: event time -> committed
    edge_agent_event_delivery_delay_seconds{sink}      histogram: committed -> accepted
    edge_agent_reasons_unattributed_total{machine}     PLC reasons no stop could take
    edge_agent_sink_held{sink}                         1 while the sink is held (401/403)
    edge_agent_buffer_pending_events{sink}             events waiting for the sink
    edge_agent_buffer_oldest_pending_age_seconds{sink} age of the oldest of them
    edge_agent_buffer_dead_letters{sink}               events in the dead-letter table
    edge_agent_buffer_size_bytes / _max_size_bytes     buffer file size and its limit
    edge_agent_buffer_dropped_events_total             events dropped by the capacity policy
    edge_agent_disk_free_bytes                         free space where the buffer lives
    edge_agent_ready                                   1 when /readyz answers 200
    edge_agent_uptime_seconds                          since the runtime was created
    edge_agent_build_info{version,python}              always 1; the labels say what runs
    edge_agent_machine_state{machine,state}            1 for the machine's current state, 0
                                                       for the others (running, idle, down,
                                                       planned, unknown): a state timeline
    edge_agent_machine_open_downtime_seconds{machine}  age of the open downtime episode (0
                                                       when none)
    process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
                                                       the standard process collector (Linux)

``build_info`` is the one family with labels outside the vocabulary: the Prometheus convention
for "which version runs where" (``count by (version) (edge_agent_build_info)``); its values are
fixed for the life of the process. ``state`` is bounded by the MachineState enum.

The two event histograms are the agent's time to detect (``agent/runtime/figures.py``) and
time to synchronise (``agent/sinks/instrumented.py``); ``/status`` shows their recent
quantiles under ``latency``. Each event carries its commit time as the ``detectedat``
attribute, so a receiver can compute the same figures.

Most values are read from the runtime when scraped (one registry per runtime, never the
process-global default registry, so several runtimes in one test process do not collide); only
the attempt counter and the latency and delay histograms are observed as they happen, by
``agent.sinks.instrumented.InstrumentedSink`` wrapped around each sink, and the detection lag
by the committer.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from buffer.base import BufferStats
from config.model import MachineState, age_seconds, utcnow

if TYPE_CHECKING:
    from agent.runtime import Runtime

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Scrape-time view of one runtime, rendered from the runtime's own registry (where the
    sinks' attempt counters and histograms live, see ``agent/sinks/instrumented.py``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = runtime.registry
        self._snapshot = _RuntimeCollector(runtime)
        self.registry.register(self._snapshot)
        # RSS, CPU seconds, open fds, start time: read from /proc at scrape time.
        ProcessCollector(registry=self.registry)

    def render(self, stats: BufferStats | None = None, *, ready: bool | None = None,
               disk_free: int | None = None) -> bytes:
        """Scrape: ``stats``/``ready``/``disk_free`` are the values the health endpoint just
        computed (so one scrape reads the buffer once); ``None`` leaves those families out."""
        snap = self._snapshot
        snap.stats = stats
        snap.ready, snap.disk_free = ready, disk_free
        try:
            return generate_latest(self.registry)
        finally:
            snap.stats = None

    def close(self) -> None:
        """Take the runtime view out of the registry (a new health server may add its own)."""
        self.registry.unregister(self._snapshot)


class _RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stats: BufferStats | None = None
        self.ready: bool | None = None
        self.disk_free: int | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values exist only at scrape time

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        received = CounterMetricFamily("edge_agent_samples_received",
                                       "Samples received from a source.", labels=["source"])
        bad = CounterMetricFamily("edge_agent_samples_bad",
                                  "Samples of bad or uncertain quality.", labels=["source"])
        up = GaugeMetricFamily("edge_agent_source_up", "1 while the source session is up.",
                               labels=["source"])
        for name, info in rt.sources.items():
            received.add_metric([name], info.samples_total)
            bad.add_metric([name], info.bad_total)
            up.add_metric([name], 1.0 if info.supervisor.state == "up" else 0.0)
        yield from (received, bad, up)

        detected = CounterMetricFamily("edge_agent_events_detected", "Events detected.",
                                       labels=["machine", "type"])
        for (machine, etype), n in sorted(rt.events_by_machine.items()):
            detected.add_metric([machine, etype.removeprefix("plantedge.")], n)
        yield detected

        delivered = CounterMetricFamily("edge_agent_events_delivered",
                                        "Events accepted by the sink.", labels=["sink"])
        retries = CounterMetricFamily("edge_agent_delivery_retries",
                                      "Failed delivery attempts that will be retried.",
                                      labels=["sink"])
        dead = CounterMetricFamily("edge_agent_events_dead_lettered",
                                   "Events moved to the dead-letter table.", labels=["sink"])
        held = GaugeMetricFamily("edge_agent_sink_held", "1 while the sink is held (401/403).",
                                 labels=["sink"])
        for name, fw in rt.forwarders.items():
            delivered.add_metric([name], fw.delivered_total)
            retries.add_metric([name], fw.retried_total)
            dead.add_metric([name], fw.dead_lettered_total)
            held.add_metric([name], 1.0 if fw.held_reason is not None
                            and str(fw.state) == "held" else 0.0)
        yield from (delivered, retries, dead, held)

        unattributed = CounterMetricFamily(
            "edge_agent_reasons_unattributed",
            "PLC reason codes set while no stop could take them (after the grace period, after "
            "another stop began, or before any stop was reported).",
            labels=["machine"])
        for mid, det in sorted(rt.detectors.items()):
            unattributed.add_metric([mid], det.classifier.unattributed_total)
        yield unattributed

        if self.stats is not None:
            yield from _buffer_metrics(self.stats)
        if self.disk_free is not None:
            yield GaugeMetricFamily("edge_agent_disk_free_bytes",
                                    "Free space on the file system of the buffer.",
                                    value=self.disk_free)
        if self.ready is not None:
            yield GaugeMetricFamily("edge_agent_ready", "1 when /readyz answers 200.",
                                    value=1.0 if self.ready else 0.0)
        yield GaugeMetricFamily("edge_agent_uptime_seconds", "Seconds since the agent started.",
                                value=max(0.0, time.time() - rt.started_at))
        build = GaugeMetricFamily("edge_agent_build_info", "Always 1; the labels say what runs.",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build
        yield from _machine_metrics(rt)


def _machine_metrics(rt: Runtime) -> Iterator[Metric]:
    state = GaugeMetricFamily("edge_agent_machine_state",
                              "1 for the machine's current state, 0 for the others.",
                              labels=["machine", "state"])
    open_dt = GaugeMetricFamily("edge_agent_machine_open_downtime_seconds",
                                "Age of the machine's open downtime episode (0 when none).",
                                labels=["machine"])
    now = utcnow()
    for mid, det in rt.detectors.items():
        for s in MachineState:
            state.add_metric([mid, s.value], 1.0 if det.state is s else 0.0)
        ep = det.episode
        open_dt.add_metric([mid], 0.0 if ep is None
                           else max(0.0, (now - ep.started_at).total_seconds()))
    yield from (state, open_dt)


def _buffer_metrics(stats: BufferStats) -> Iterator[Metric]:
    pending = GaugeMetricFamily("edge_agent_buffer_pending_events",
                                "Events waiting for delivery to the sink.", labels=["sink"])
    oldest = GaugeMetricFamily("edge_agent_buffer_oldest_pending_age_seconds",
                               "Age of the oldest event waiting for the sink (0 when none).",
                               labels=["sink"])
    dead = GaugeMetricFamily("edge_agent_buffer_dead_letters",
                             "Events in the dead-letter table.", labels=["sink"])
    for name, s in stats.sinks.items():
        pending.add_metric([name], s.pending + s.leased)
        oldest.add_metric([name], age_seconds(s.oldest_pending_time) or 0.0)
        dead.add_metric([name], s.dead_letters)
    yield from (pending, oldest, dead)
    yield GaugeMetricFamily("edge_agent_buffer_size_bytes", "Size of the buffer file.",
                            value=stats.size_bytes)
    yield GaugeMetricFamily("edge_agent_buffer_max_size_bytes", "Configured buffer limit.",
                            value=stats.max_size)
    yield CounterMetricFamily("edge_agent_buffer_dropped_events",
                              "Events dropped by the buffer's capacity policy.",
                              value=stats.dropped_total)
