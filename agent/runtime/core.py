"""The runtime: sources -> detectors -> buffer -> forwarders -> sinks, and their lifecycle.

Data flow (one way)::

    Supervisor(Source.run) --emit(samples)--> Runtime.on_samples --> MachineDetector
         --events + dirty states--> Committer --(group commit, one txn)--> AsyncBuffer
         --wake()--> Forwarder(sink) --deliver--> Sink

The parts are owned by name in ``Components`` (``agent/runtime/components.py``); the commit
invariant lives in ``Committer`` (``agent/runtime/commit.py``); live reload is a plan applied
through the components' operations (``agent/runtime/reload.py``).

Lifecycle (ordered): start opens the buffer, starts sinks and forwarders, restores detector
states, then starts the committer, the sources and the ticker; stop reverses it: sources first
(no new samples), a final commit of what was detected, forwarders drain within
``stop_timeout``, then sinks and the buffer close. ``stop()`` is idempotent and safe after a
failed start.

Acknowledgements after commit (MQTT QoS 1, see ``Committer``): on stop, new samples are refused
first, then what was taken is committed and acknowledged while the sources' connections are
still open, and only then are the sources cancelled: a message read after that point is never
acknowledged, and the peer redelivers it to the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.detect import MachineDetector
from agent.detect.classify import RECENT
from agent.detect.history import EpisodeHistory
from agent.runtime.commit import Committer
from agent.runtime.components import Components, SourceSlot
from agent.runtime.figures import DetectionFigures
from agent.runtime.forwarder import Forwarder
from agent.sinks.instrumented import DeliveryMetrics
from agent.wiring.build import build_detectors
from agent.wiring.schema import Config
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer
from config.errors import EdgeAgentError
from config.model import Event, TagSample, age_seconds, format_time, utcnow
from config.recent import WINDOW
from config.tasks import cancel_all, within
from protocols.base import Source, bad_samples

__all__ = ["Runtime"]

log = logging.getLogger(__name__)
_TICK = 0.25


class _Out:
    """The SampleSink handed to one source's sessions."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self._rt, self._name = runtime, name

    def emit(self, samples: Sequence[TagSample]) -> None:
        if self._rt.accepting:
            self._rt.on_samples(self._name, samples)

    def when_committed(self, ack: Callable[[], None], *, soon: bool = False) -> None:
        if self._rt.accepting:  # refused samples are never acknowledged: redelivered
            self._rt.committer.after_commit(ack, soon=soon)

    def connected(self) -> None:
        slot = self._rt.sources.get(self._name)
        if slot is not None:
            slot.supervisor.mark_up()


class Runtime:
    def __init__(self, config: Config, *, config_hash: str | None = None) -> None:
        self.config = config
        self.config_hash = config_hash
        self.buffer = AsyncBuffer(SqliteBuffer(
            config.buffer_path, max_size=config.buffer.max_size,
            when_full=config.buffer.when_full, synchronous=config.buffer.synchronous.value,
            lease_timeout=config.buffer.lease_timeout))
        # One registry per runtime (never the process-global one): the sinks' attempt
        # counters live here and the health endpoint renders it with the runtime's view.
        self.registry = CollectorRegistry(auto_describe=True)
        self.delivery_metrics = DeliveryMetrics(self.registry)
        self.detection_figures = DetectionFigures(self.registry)
        self.components = Components(self.buffer, self._session_for,
                                     self.delivery_metrics.instrument, agent_id=config.agent.id)
        self.committer = Committer(
            self.buffer, lambda: self.components.detectors, agent_id=config.agent.id,
            site=config.agent.site, interval=config.buffer.commit_interval,
            when_full=config.buffer.when_full.value,
            on_commit=self.components.wake_forwarders,
            observe=self.detection_figures.observe)
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = time.time()
        self.last_reload: dict[str, Any] | None = None
        self._stopped = False
        self.accepting = True  # False once stopping: new samples are not taken (nor acked)
        self.last_tick_mono = time.monotonic()
        self._clock_offset = time.time() - time.monotonic()
        self.clock_jumps = 0
        self.last_clock_jump: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the parts, read-only

    @property
    def sources(self) -> Mapping[str, SourceSlot]:
        return self.components.sources

    @property
    def detectors(self) -> Mapping[str, MachineDetector]:
        return self.components.detectors

    @property
    def forwarders(self) -> dict[str, Forwarder]:
        return self.components.forwarders

    @property
    def storage_error(self) -> str | None:
        return self.committer.error

    @property
    def storage_full(self) -> bool:
        """Disk full is a state the agent handles (events wait in memory, /readyz says so),
        not a fault a restart would cure; other commit failures are faults."""
        return self.committer.full

    @property
    def committed_total(self) -> int:
        return self.committer.committed_total

    @property
    def events_by_machine(self) -> dict[tuple[str, str], int]:
        return self.committer.detected

    @property
    def history(self) -> EpisodeHistory:
        return self.committer.history

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        cfg.agent.data_dir.mkdir(parents=True, exist_ok=True)
        cfg.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        await self.buffer.open(list(cfg.sinks))
        for name, sink_cfg in cfg.sinks.items():
            self.components.start_sink(name, sink_cfg)
        self._restore(await self.buffer.load_states())
        self._tasks.append(asyncio.create_task(self.committer.run(), name="committer"))
        for name, src_cfg in cfg.sources.items():
            self.components.start_source(name, src_cfg)
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="ticker"))
        log.info("agent %s %s started: %d source(s), %d machine(s), %d sink(s)",
                 cfg.agent.id, __version__, len(self.sources), len(self.detectors),
                 len(self.components.sinks))

    def _restore(self, states: dict[str, str]) -> None:
        detectors = build_detectors(self.config)
        for mid, det in detectors.items():
            saved = states.get(mid)
            if saved:
                try:
                    det.restore(saved)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("machine %s: saved detector state is unreadable (%s); "
                              "starting it fresh", mid, exc)
        self.components.set_detectors(detectors)
        self.committer.restore(states)
        for mid, det in detectors.items():
            # The stops the detector state remembers draw the timeline again after a restart.
            self.history.seed(mid, det.episodes(RECENT))

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        timeout = self.config.agent.stop_timeout
        # Commit and acknowledge what was taken while the sources' connections are open.
        self.accepting = False
        if self.committer.acks_waiting:
            with contextlib.suppress(Exception):
                await within(self.flush(), timeout / 4)
        await self.components.stop_sources()
        ticker = [t for t in self._tasks if t.get_name() == "ticker"]
        committer = [t for t in self._tasks if t.get_name() == "committer"]
        await cancel_all(ticker)
        # Final commit of whatever was detected, then let forwarders finish in-flight work.
        with contextlib.suppress(Exception):
            await within(self.flush(), timeout / 2)
        await cancel_all(committer)
        await self.components.stop_sinks(timeout / 2)
        await self.buffer.aclose()
        log.info("agent %s stopped", self.config.agent.id)

    async def reload(self, config: Config, config_hash: str | None = None) -> list[str]:
        """Apply a new configuration while running (rules in agent/runtime/reload.py);
        returns the components that changed."""
        from agent.runtime.reload import apply_config

        return await apply_config(self, config, config_hash)

    def adopt(self, config: Config, config_hash: str | None) -> None:
        """Make ``config`` the running configuration (reload calls this once its plan has
        stopped what the new configuration no longer has)."""
        self.config, self.config_hash = config, config_hash

    async def flush(self) -> None:
        """Commit everything detected so far (events plus the states that produced them)."""
        await self.committer.flush()

    async def commit_now(self, det: MachineDetector, events: list[Event],
                         wait_for: str | None, timeout: float) -> bool:
        """Commit what ``det`` produced outside a sample or tick (an operator's reason) and
        wait for ``wait_for`` to be committed; see ``Committer.commit_now``."""
        return await self.committer.commit_now(det, events, wait_for, timeout)

    # ------------------------------------------------------------------ samples and time

    def _session_for(self, name: str, source: Source) -> Callable[[], Awaitable[None]]:
        source.resume_from = self._resume_from

        async def session() -> None:
            try:
                await source.run(_Out(self, name))
            except EdgeAgentError as exc:
                self.on_samples(name, bad_samples(source.tag_ids, f"{name}: {exc}"))
                raise
        return session

    def _resume_from(self, tag: str) -> datetime | None:
        """Since when detection lacks ``tag``'s history (for a source's backfill)."""
        times = [t for det in self.components.by_tag.get(tag, ())
                 if (t := det.history_needed_from(tag)) is not None]
        return min(times) if times else None

    def on_samples(self, source: str, samples: Sequence[TagSample]) -> None:
        slot = self.components.sources.get(source)
        now = time.monotonic()
        if slot is not None:
            slot.supervisor.progress()
            slot.samples_total += len(samples)
            slot.last_sample_mono = now
            for s in samples:
                if s.good:
                    slot.last_good_mono = now
                    slot.bad_tags.pop(s.tag, None)
                else:
                    slot.bad_total += 1
                    slot.bad_tags[s.tag] = s.detail or s.quality.value
        touched: dict[str, list[TagSample]] = {}
        by_tag = self.components.by_tag
        for s in samples:
            for det in by_tag.get(s.tag, ()):
                touched.setdefault(det.machine_id, []).append(s)
        detectors = self.components.detectors
        for mid, batch in touched.items():
            det = detectors[mid]
            self.committer.take(det, det.on_samples(batch))

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self.last_tick_mono = time.monotonic()
            self._check_clock()
            now = utcnow()
            for det in self.components.detectors.values():
                self.committer.take(det, det.on_tick(now))

    def _check_clock(self) -> None:
        """Detect a step of the wall clock (NTP correction, manual set) against the monotonic
        clock; report it in /status and flag what is open so its events say so."""
        offset = time.time() - time.monotonic()
        jump = offset - self._clock_offset
        self._clock_offset = offset
        if abs(jump) <= self.config.agent.clock_jump_threshold:
            return
        self.clock_jumps += 1
        self.last_clock_jump = {"seconds": round(jump, 3), "at": format_time(utcnow())}
        log.warning("the system clock jumped by %+.1fs; open downtime episodes and scrap "
                    "windows are flagged clock_adjusted", jump)
        for det in self.components.detectors.values():
            det.note_clock_jump(jump)
            self.committer.take(det, [])

    # ------------------------------------------------------------------ status

    @property
    def events_detected(self) -> dict[str, int]:
        """Events detected per type (summed over machines)."""
        out: dict[str, int] = {}
        for (_, type_), n in self.events_by_machine.items():
            out[type_] = out.get(type_, 0) + n
        return out

    async def status(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = utcnow()
        stats = await self.buffer.stats()
        sources = {}
        for name, info in self.sources.items():
            sources[name] = {
                **info.supervisor.status(),
                "last_sample_age_s": None if info.last_sample_mono is None
                else round(now - info.last_sample_mono, 3),
                "last_good_sample_age_s": None if info.last_good_mono is None
                else round(now - info.last_good_mono, 3),
                "samples_total": info.samples_total,
                "bad_samples_total": info.bad_total,
                "bad_tags": dict(info.bad_tags),
            }
            # Protocol-specific detail (per-unit counters of an RTU line, ...), when offered.
            detail = getattr(info.source, "status", None)
            extra = detail() if callable(detail) else None
            if extra:
                sources[name]["detail"] = extra
        return {
            "version": __version__,
            "agent_id": self.config.agent.id,
            "site": self.config.agent.site,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "config_hash": self.config_hash,
            "sources": sources,
            "time": format_time(wall),
            "machines": {mid: {**d.status(), "last_event": self.history.last_event(mid),
                               "recent_downtime": self.history.recent(mid, wall)}
                         for mid, d in self.detectors.items()},
            "buffer": {
                "path": str(self.config.buffer_path),
                "events": stats.events,
                "size_bytes": stats.size_bytes,
                "max_size": stats.max_size,
                "dropped_total": stats.dropped_total,
                "storage_error": self.storage_error,
                "degraded_reason": getattr(self.buffer.buffer, "degraded_reason", None),
                "uncommitted": self.committer.uncommitted,
                "sinks": {name: {"pending": s.pending, "leased": s.leased,
                                 "dead_letters": s.dead_letters,
                                 "oldest_pending_time": s.oldest_pending_time,
                                 "oldest_pending_age_s": age_seconds(s.oldest_pending_time)}
                          for name, s in stats.sinks.items()},
            },
            "sinks": {name: {"type": getattr(self.config.sinks.get(name), "type", None),
                             **fw.status()} for name, fw in self.forwarders.items()},
            "events_detected": dict(self.events_detected),
            # Recent time to detect (per machine) and to synchronise (per sink), in seconds.
            "latency": {"window": WINDOW,
                        "detection_lag_s": self.detection_figures.recent.status(),
                        "delivery_delay_s": self.delivery_metrics.recent.status()},
            "clock": {"state": "adjusted" if self.clock_jumps else "steady",
                      "jumps": self.clock_jumps, "last_jump": self.last_clock_jump,
                      "threshold_s": self.config.agent.clock_jump_threshold},
        }

    def readiness(self) -> list[str]:
        """Reasons the agent is not ready (empty when ready)."""
        reasons = []
        if self.storage_error:
            reasons.append(f"buffer: {self.storage_error}")
        degraded = getattr(self.buffer.buffer, "degraded_reason", None)
        if degraded:
            reasons.append(f"buffer degraded: {degraded}")
        for name, fw in self.forwarders.items():
            st = fw.status()
            if st.get("state") == "held":
                reasons.append(f"sink {name} is held: {st.get('held_reason')}")
        return reasons

