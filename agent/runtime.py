"""The runtime: wires sources -> detectors -> buffer -> forwarders -> sinks, and owns lifecycle.

Data flow (one way)::

    Supervisor(Source.run) --emit(samples)--> Runtime.on_samples --> MachineDetector
         --events + dirty states--> commit queue --(group commit, one txn)--> AsyncBuffer
         --wake()--> Forwarder(sink) --deliver--> Sink

Lifecycle (style rule 10): start opens the buffer, builds sinks and forwarders, restores
detector states, then starts sources, the ticker and the health server; stop reverses it:
sources first (no new samples), a final commit of what was detected, forwarders drain within
``stop_timeout``, then sinks and the buffer close. ``stop()`` is idempotent and safe after a
failed start.

Commit invariant: a commit takes the pending events *and* the snapshots of the detectors that
produced them at the same instant on the event loop, so the buffer always holds a detector state
together with exactly the events it implies (DESIGN section 1). If the commit fails (disk full),
the batch stays queued in memory and is retried; ``/readyz`` reports the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import __version__, failpoints
from agent.detect import MachineDetector
from agent.detect.build import build_detectors
from agent.errors import EdgeAgentError, StorageFullError
from agent.metrics import Metrics
from agent.model import (
    Event,
    EventType,
    TagSample,
    age_seconds,
    event_id,
    format_time,
    utcnow,
)
from agent.sinks.backoff import Backoff
from agent.sinks.base import Sink
from agent.sinks.forwarder import Forwarder
from agent.sinks.http import HttpSink
from agent.sinks.mqtt import MqttSink
from agent.sinks.nats import NatsSink
from agent.supervisor import Supervisor
from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer
from config.models import Config, HttpSinkConfig, MqttSinkConfig, SinkConfig
from protocols.base import Source, bad_samples
from protocols.registry import build_source

__all__ = ["Runtime", "build_sink"]

log = logging.getLogger("edge_agent.runtime")
_AGENT_STATE_KEY = "__agent__"
_TICK = 0.25
# Detections held in memory while the buffer cannot commit (disk full); beyond this the oldest
# are dropped and reported as a data gap. Events are small: this is tens of MB at most.
_MAX_UNCOMMITTED = 100_000


def build_sink(name: str, config: SinkConfig, agent_id: str) -> Sink:
    """The sink of one ``sinks:`` entry (its ``type`` picks the class)."""
    if isinstance(config, HttpSinkConfig):
        return HttpSink(name, config)
    if isinstance(config, MqttSinkConfig):
        return MqttSink(name, config, agent_id=agent_id)
    return NatsSink(name, config, agent_id=agent_id)


@dataclass(slots=True)
class _SourceInfo:
    source: Source
    supervisor: Supervisor
    samples_total: int = 0
    bad_total: int = 0
    last_sample_mono: float | None = None
    last_good_mono: float | None = None
    bad_tags: dict[str, str] = field(default_factory=dict)


class _Out:
    """The SampleSink handed to one source's sessions."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self._rt, self._name = runtime, name

    def emit(self, samples: Sequence[TagSample]) -> None:
        self._rt.on_samples(self._name, samples)

    def connected(self) -> None:
        self._rt.sources[self._name].supervisor.mark_up()


class Runtime:
    def __init__(self, config: Config, *, config_hash: str | None = None) -> None:
        self.config = config
        self.config_hash = config_hash
        self.agent_source = f"/sites/{config.agent.site}/agents/{config.agent.id}"
        self.buffer = AsyncBuffer(SqliteBuffer(
            config.buffer_path, max_size=config.buffer.max_size,
            when_full=config.buffer.when_full, synchronous=config.buffer.synchronous.value,
            lease_timeout=config.buffer.lease_timeout))
        self.sources: dict[str, _SourceInfo] = {}
        self.detectors: dict[str, MachineDetector] = {}
        self._by_tag: dict[str, list[MachineDetector]] = {}
        self.forwarders: dict[str, Forwarder] = {}
        self._sinks: list[Sink] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._fw_tasks: list[asyncio.Task[None]] = []
        self._queue: list[Event] = []
        self._dirty: set[str] = set()
        self._commit_wakeup = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._agent_sequence = 0
        self.storage_error: str | None = None
        # Disk full is a state the agent handles (events wait in memory, /readyz says so),
        # not a fault a restart would cure; other commit failures are faults.
        self.storage_full = False
        self._memory_drops: dict[str, int] = {}
        self._memory_drop_span: tuple[str | None, str | None] = (None, None)
        self.started_at = time.time()
        self.events_by_machine: dict[tuple[str, str], int] = {}  # (machine, type) -> count
        self.metrics = Metrics(self)
        self.last_reload: dict[str, Any] | None = None
        self.committed_total = 0
        self._stopping = False
        self._stopped = False
        self.last_tick_mono = time.monotonic()
        self._clock_offset = time.time() - time.monotonic()
        self.clock_jumps = 0
        self.last_clock_jump: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        cfg.agent.data_dir.mkdir(parents=True, exist_ok=True)
        cfg.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        await self.buffer.open(list(cfg.sinks))
        for name, sink_cfg in cfg.sinks.items():
            sink = build_sink(name, sink_cfg, cfg.agent.id)
            self._sinks.append(sink)
            self.forwarders[name] = Forwarder(self.metrics.instrument(sink), self.buffer,
                                              sink_cfg.retry)
        for fw in self.forwarders.values():
            self._fw_tasks.append(asyncio.create_task(fw.run(), name=f"forwarder:{fw}"))
        states = await self.buffer.load_states()
        self._restore(states)
        self._committer = asyncio.create_task(self._commit_loop(), name="committer")
        for name, src_cfg in cfg.sources.items():
            source = build_source(name, src_cfg)
            sup = Supervisor("source", name, self._session(name), backoff=Backoff(
                src_cfg.backoff.initial, src_cfg.backoff.max),
                # A source whose tags never go stale (MQTT by default: a quiet topic is not a
                # dead machine) has no watchdog either.
                watchdog=None if math.isinf(source.stale_after)
                else max(10.0, 4 * source.stale_after))
            self.sources[name] = _SourceInfo(source, sup)
        for det in self.detectors.values():
            for tag in det.tags:
                self._by_tag.setdefault(tag, []).append(det)
        for name, info in self.sources.items():
            self._tasks.append(asyncio.create_task(info.supervisor.run(), name=f"source:{name}"))
        self._tasks.append(asyncio.create_task(self._tick_loop(), name="ticker"))
        log.info("agent %s %s started: %d source(s), %d machine(s), %d sink(s)",
                 cfg.agent.id, __version__, len(self.sources), len(self.detectors),
                 len(self.forwarders))

    def _restore(self, states: dict[str, str]) -> None:
        self.detectors = build_detectors(self.config)
        for mid, det in self.detectors.items():
            saved = states.get(mid)
            if saved:
                try:
                    det.restore(saved)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("machine %s: saved detector state is unreadable (%s); "
                              "starting it fresh", mid, exc)
        agent_state = states.get(_AGENT_STATE_KEY)
        if agent_state and agent_state.isdigit():
            self._agent_sequence = int(agent_state)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        timeout = self.config.agent.stop_timeout
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # Final commit of whatever was detected, then let forwarders finish in-flight work.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=timeout / 2)
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._committer
        await asyncio.gather(*(fw.stop(timeout / 2) for fw in self.forwarders.values()),
                             return_exceptions=True)
        for t in self._fw_tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for sink in self._sinks:
            with contextlib.suppress(Exception):
                await sink.aclose()
        await self.buffer.aclose()
        log.info("agent %s stopped", self.config.agent.id)

    async def reload(self, config: Config, config_hash: str | None = None) -> list[str]:
        """Apply a new configuration while running (rules in agent/reload.py); returns the
        components that changed."""
        from agent.reload import apply_config

        return await apply_config(self, config, config_hash)

    # ------------------------------------------------------------------ sources

    def _session(self, name: str) -> Any:
        async def session() -> None:
            info = self.sources[name]
            try:
                await info.source.run(_Out(self, name))
            except EdgeAgentError as exc:
                self.on_samples(name, bad_samples(info.source.tag_ids, f"{name}: {exc}"))
                raise
        return session

    def on_samples(self, source: str, samples: Sequence[TagSample]) -> None:
        info = self.sources.get(source)
        now = time.monotonic()
        if info is not None:
            info.supervisor.progress()
            info.samples_total += len(samples)
            info.last_sample_mono = now
            for s in samples:
                if s.good:
                    info.last_good_mono = now
                    info.bad_tags.pop(s.tag, None)
                else:
                    info.bad_total += 1
                    info.bad_tags[s.tag] = s.detail or s.quality.value
        touched: dict[str, list[TagSample]] = {}
        for s in samples:
            for det in self._by_tag.get(s.tag, ()):
                touched.setdefault(det.machine_id, []).append(s)
        for mid, batch in touched.items():
            det = self.detectors[mid]
            self._take(det, det.on_samples(batch))

    def _take(self, det: MachineDetector, events: list[Event]) -> None:
        if det.dirty:
            self._dirty.add(det.machine_id)
        if events:
            for e in events:
                key = (det.machine_id, e.type.value)
                self.events_by_machine[key] = self.events_by_machine.get(key, 0) + 1
            self._queue.extend(events)
            self._commit_wakeup.set()
        elif det.dirty:
            self._commit_wakeup.set()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self.last_tick_mono = time.monotonic()
            self._check_clock()
            now = utcnow()
            for det in self.detectors.values():
                self._take(det, det.on_tick(now))

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
        for det in self.detectors.values():
            det.note_clock_jump(jump)
            self._take(det, [])

    # ------------------------------------------------------------------ commits

    async def _commit_loop(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            await self._commit_wakeup.wait()
            # Group commit: let a burst of detections share one transaction and one fsync.
            await asyncio.sleep(self.config.buffer.commit_interval)
            try:
                await self.flush()
            except StorageFullError as exc:
                if self.storage_error is None:
                    log.error("buffer cannot commit: %s; detected events are held in memory "
                              "and retried", exc)
                self.storage_error, self.storage_full = str(exc), True
                self._bound_uncommitted()
                await asyncio.sleep(backoff.next_delay())
                self._commit_wakeup.set()
            except EdgeAgentError as exc:
                if self.storage_error is None:
                    log.error("buffer commit failed: %s; retrying", exc)
                self.storage_error, self.storage_full = str(exc), False
                self._bound_uncommitted()
                await asyncio.sleep(backoff.next_delay())
                self._commit_wakeup.set()
            else:
                if self.storage_error is not None:
                    log.info("buffer commits work again")
                self.storage_error, self.storage_full = None, False
                backoff.reset()

    async def flush(self) -> None:
        """Commit everything detected so far (events plus the states that produced them)."""
        self._commit_wakeup.clear()
        if not self._queue and not self._dirty:
            return
        events, self._queue = self._queue, []
        dirty, self._dirty = self._dirty, set()
        states = {mid: self.detectors[mid].snapshot() for mid in dirty}
        for mid in dirty:
            self.detectors[mid].dirty = False
        states[_AGENT_STATE_KEY] = str(self._agent_sequence)
        agent_id = self.config.agent.id
        rows = [NewEvent(id=e.id, key=e.key, type=e.type.value, time=format_time(e.time),
                         payload=e.to_json(agent_id)) for e in events]
        try:
            failpoints.hit("before_commit")
            await self.buffer.append(rows, states)
        except BaseException:
            # Nothing committed: put everything back in front, in order, and retry later.
            self._queue[:0] = events
            self._dirty |= dirty
            for mid in dirty:
                self.detectors[mid].dirty = True
            raise
        self.committed_total += len(rows)
        failpoints.hit("after_commit")
        if self._memory_drops:
            by_type, self._memory_drops = self._memory_drops, {}
            (first, last), self._memory_drop_span = self._memory_drop_span, (None, None)
            self._queue_data_gap(by_type, first, last,
                                 f"commits failed and more than {_MAX_UNCOMMITTED} detections "
                                 "waited in memory")
        drops = await self.buffer.take_drops()
        if drops.total:
            self._queue_data_gap(drops.by_type, drops.first_at, drops.last_at)
        for fw in self.forwarders.values():
            fw.wake()

    def _bound_uncommitted(self) -> None:
        """While commits fail, detections wait in memory; past a bound the oldest are dropped
        and counted, and a data gap reports them once commits work again."""
        excess = len(self._queue) - _MAX_UNCOMMITTED
        if excess <= 0:
            return
        dropped, self._queue = self._queue[:excess], self._queue[excess:]
        for e in dropped:
            self._memory_drops[e.type.value] = self._memory_drops.get(e.type.value, 0) + 1
        self._memory_drop_span = (self._memory_drop_span[0] or format_time(dropped[0].time),
                                  format_time(dropped[-1].time))

    def _queue_data_gap(self, by_type: dict[str, int], first: str | None,
                        last: str | None, reason: str | None = None) -> None:
        self._agent_sequence += 1
        total = sum(by_type.values())
        reason = reason or f"buffer full ({self.config.buffer.when_full.value})"
        log.error("%s: dropped %d event(s): %s", reason, total, by_type)
        t = utcnow()
        self._queue.append(Event(
            id=event_id(self.agent_source, EventType.DATA_GAP.value, first, last, total,
                        self._agent_sequence),
            type=EventType.DATA_GAP, source=self.agent_source, time=t, key="agent",
            sequence=self._agent_sequence,
            data={"agent": self.config.agent.id, "site": self.config.agent.site,
                  "dropped": total, "dropped_by_type": by_type, "first_dropped_at": first,
                  "last_dropped_at": last, "reason": reason}))
        self._commit_wakeup.set()

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
        return {
            "version": __version__,
            "agent_id": self.config.agent.id,
            "site": self.config.agent.site,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "config_hash": self.config_hash,
            "sources": sources,
            "machines": {mid: d.status() for mid, d in self.detectors.items()},
            "buffer": {
                "path": str(self.config.buffer_path),
                "events": stats.events,
                "size_bytes": stats.size_bytes,
                "max_size": stats.max_size,
                "dropped_total": stats.dropped_total,
                "storage_error": self.storage_error,
                "degraded_reason": getattr(self.buffer.buffer, "degraded_reason", None),
                "uncommitted": len(self._queue),
                "sinks": {name: {"pending": s.pending, "leased": s.leased,
                                 "dead_letters": s.dead_letters,
                                 "oldest_pending_time": s.oldest_pending_time,
                                 "oldest_pending_age_s": age_seconds(s.oldest_pending_time)}
                          for name, s in stats.sinks.items()},
            },
            "sinks": {name: fw.status() for name, fw in self.forwarders.items()},
            "events_detected": dict(self.events_detected),
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
