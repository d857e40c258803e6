"""The runtime's parts, owned by name: sources with their supervisors, detectors, and sinks with
their forwarders, each with its task.

``Components`` is the only place that creates, starts, stops or replaces a part; ``Runtime.start``
and live reload (``agent/runtime/reload.py``) both go through its operations, so the two cannot
wire a part differently.

States of one named part::

    (absent) --start_*--> running --stop_*--> (absent)
                             |
                             +--replace_*--> stop the old one, then start the new one under the
                                             same name (a sink's buffered events stay: the
                                             buffer's cursor is per sink name)

Invariants:
- At most one task per source name and one forwarder task per sink name; a task is found by
  its name in the dictionaries here, never by its repr.
- Stopping a source cancels its supervisor task and waits for it; stopping a sink lets its
  forwarder finish the attempt in flight (bounded by ``timeout``) before the sink is closed.
- ``by_tag`` always indexes exactly the current detectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from agent.detect import MachineDetector
from agent.runtime.forwarder import AsyncLeaseBuffer, Forwarder
from agent.runtime.supervisor import Supervisor
from agent.sinks.base import Sink
from agent.sinks.config import SinkConfig
from agent.wiring.build import build_sink, build_source
from agent.wiring.schema import SourceConfig
from config.backoff import Backoff
from config.tasks import cancel_all, cancel_and_wait
from protocols.base import Source

__all__ = ["Components", "SinkSlot", "SourceSlot"]

log = logging.getLogger(__name__)

# A source session that shows no progress for this many stale periods is restarted.
_WATCHDOG_STALE_PERIODS = 4
_WATCHDOG_FLOOR = 10.0

SessionFactory = Callable[[str, Source], Callable[[], Awaitable[None]]]


@dataclass(slots=True)
class SourceSlot:
    """One source, its supervisor and what the runtime has seen of it."""

    source: Source
    supervisor: Supervisor
    task: asyncio.Task[None] | None = None
    samples_total: int = 0
    bad_total: int = 0
    last_sample_mono: float | None = None
    last_good_mono: float | None = None
    bad_tags: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SinkSlot:
    """One sink and the forwarder that owns its deliveries."""

    sink: Sink
    forwarder: Forwarder
    task: asyncio.Task[None] | None = None


class Components:
    def __init__(self, buffer: AsyncLeaseBuffer, session_for: SessionFactory,
                 wrap_sink: Callable[[Sink], Sink], agent_id: str = "edge-agent") -> None:
        self._buffer = buffer
        self._agent_id = agent_id
        self._session_for = session_for
        self._wrap_sink = wrap_sink
        self.sources: dict[str, SourceSlot] = {}
        self.sinks: dict[str, SinkSlot] = {}
        self.detectors: dict[str, MachineDetector] = {}
        self.by_tag: dict[str, list[MachineDetector]] = {}

    # ------------------------------------------------------------------ sources

    def start_source(self, name: str, config: SourceConfig) -> SourceSlot:
        source = build_source(name, config)
        # A source whose tags never go stale (MQTT by default: a quiet topic is not a dead
        # machine) has no watchdog either.
        watchdog = (None if math.isinf(source.stale_after)
                    else max(_WATCHDOG_FLOOR, _WATCHDOG_STALE_PERIODS * source.stale_after))
        supervisor = Supervisor("source", name, self._session_for(name, source),
                                backoff=Backoff(config.backoff.initial, config.backoff.max),
                                watchdog=watchdog)
        slot = SourceSlot(source, supervisor)
        self.sources[name] = slot
        slot.task = asyncio.create_task(supervisor.run(), name=f"source:{name}")
        return slot

    async def stop_source(self, name: str) -> bool:
        """Stop one source (False when there is none of that name)."""
        slot = self.sources.pop(name, None)
        if slot is None:
            return False
        await cancel_and_wait(slot.task)
        return True

    async def replace_source(self, name: str, config: SourceConfig) -> SourceSlot:
        await self.stop_source(name)
        return self.start_source(name, config)

    async def stop_sources(self) -> None:
        """Stop every source at shutdown; the slots stay, so their counters can still be read."""
        # Together: a session slow to end (a close waiting on its server) delays no other.
        await cancel_all([slot.task for slot in self.sources.values() if slot.task is not None])

    # ------------------------------------------------------------------ sinks

    def start_sink(self, name: str, config: SinkConfig) -> SinkSlot:
        old = self.sinks.get(name)
        if old is not None and old.task is not None and not old.task.done():
            # Two forwarders of one sink would each lease its rows: order per machine lost.
            raise RuntimeError(f"sink {name} already has a running forwarder; stop it first")
        sink = build_sink(name, config, self._agent_id)
        forwarder = Forwarder(self._wrap_sink(sink), self._buffer, config.retry)
        slot = SinkSlot(sink, forwarder)
        self.sinks[name] = slot
        slot.task = asyncio.create_task(forwarder.run(), name=f"forwarder:{name}")
        return slot

    async def stop_sink(self, name: str, timeout: float) -> bool:
        """Let the forwarder finish its attempt in flight (at most ``timeout``), then close."""
        slot = self.sinks.pop(name, None)
        if slot is None:
            return False
        await _halt(slot, timeout)
        return True

    async def replace_sink(self, name: str, config: SinkConfig, timeout: float) -> SinkSlot:
        await self.stop_sink(name, timeout)
        slot = self.start_sink(name, config)
        slot.forwarder.wake()  # its buffered events wait: start at once
        return slot

    async def stop_sinks(self, timeout: float) -> None:
        """Stop every sink at shutdown; their forwarders drain in parallel within ``timeout``
        (the slots stay, so their counters can still be read)."""
        await asyncio.gather(*(_halt(slot, timeout) for slot in self.sinks.values()),
                             return_exceptions=True)

    @property
    def forwarders(self) -> dict[str, Forwarder]:
        return {name: slot.forwarder for name, slot in self.sinks.items()}

    def wake_forwarders(self) -> None:
        for slot in self.sinks.values():
            slot.forwarder.wake()

    # ------------------------------------------------------------------ detectors

    def set_detectors(self, detectors: Mapping[str, MachineDetector]) -> None:
        """Make ``detectors`` the current set and index them by the tags they read."""
        self.detectors = dict(detectors)
        by_tag: dict[str, list[MachineDetector]] = {}
        for det in self.detectors.values():
            for tag in det.tags:
                by_tag.setdefault(tag, []).append(det)
        self.by_tag = by_tag

    def detectors_for(self, tag: str) -> Iterable[MachineDetector]:
        return self.by_tag.get(tag, ())


async def _halt(slot: SinkSlot, timeout: float) -> None:
    with contextlib.suppress(Exception):
        await slot.forwarder.stop(timeout)
    await cancel_and_wait(slot.task)
    with contextlib.suppress(Exception):
        await slot.sink.aclose()


