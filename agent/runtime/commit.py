"""Group commit of detections: events and the detector states that produced them, one transaction.

::

    detector --take(det, events)--> pending events + dirty machine ids
        --(commit_interval: a burst shares one transaction and one fsync)--> buffer.append
        --on_commit()--> forwarders woken

Invariants:
- A commit takes the pending events *and* the snapshots of the detectors that produced them at
  the same instant on the event loop, so the buffer always holds a detector state together with
  exactly the events it implies. Re-detection after a crash therefore gives the same ids.
- A failed commit puts everything back in front of the queue, in order, and is retried with
  backoff; nothing is lost while it fails. Disk full is a state (``full``), not a fault.
- While commits fail, detections wait in memory up to ``MAX_UNCOMMITTED``; beyond it the oldest
  are dropped, counted and reported by one ``plantedge.data.gap`` event once commits work again.
- The agent's own sequence (for its data-gap events) is saved with every commit under the state
  key ``AGENT_STATE_KEY``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from agent.detect import MachineDetector
from buffer.base import NewEvent
from buffer.writer import AsyncBuffer
from config import failpoints
from config.backoff import Backoff
from config.errors import EdgeAgentError, StorageFullError
from config.model import Event, EventType, event_id, format_time, utcnow

__all__ = ["AGENT_STATE_KEY", "MAX_UNCOMMITTED", "Committer"]

log = logging.getLogger(__name__)

AGENT_STATE_KEY = "__agent__"
# Detections held in memory while the buffer cannot commit (disk full); beyond this the oldest
# are dropped and reported as a data gap. Events are small: this is tens of MB at most.
MAX_UNCOMMITTED = 100_000


class Committer:
    def __init__(self, buffer: AsyncBuffer, detectors: Callable[[], Mapping[str, MachineDetector]],
                 *, agent_id: str, site: str, interval: float, when_full: str,
                 on_commit: Callable[[], None]) -> None:
        self._buffer = buffer
        self._detectors = detectors
        self._agent_id = agent_id
        self._site = site
        self.agent_source = f"/sites/{site}/agents/{agent_id}"
        self._interval = interval
        self._when_full = when_full
        self._on_commit = on_commit
        self._queue: list[Event] = []
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._agent_sequence = 0
        self._memory_drops: dict[str, int] = {}
        self._memory_drop_span: tuple[str | None, str | None] = (None, None)
        self.error: str | None = None
        self.full = False
        self.committed_total = 0
        self.detected: dict[tuple[str, str], int] = {}  # (machine, type) -> count

    @property
    def uncommitted(self) -> int:
        """Events detected but not committed yet."""
        return len(self._queue)

    def restore(self, states: Mapping[str, str]) -> None:
        saved = states.get(AGENT_STATE_KEY)
        if saved and saved.isascii() and saved.isdigit():
            self._agent_sequence = int(saved)

    # ------------------------------------------------------------------ intake

    def take(self, det: MachineDetector, events: list[Event]) -> None:
        """What one detector returned; its state is committed with the events when dirty."""
        if det.dirty:
            self._dirty.add(det.machine_id)
        if events:
            for e in events:
                key = (det.machine_id, e.type.value)
                self.detected[key] = self.detected.get(key, 0) + 1
            self._queue.extend(events)
            self._wakeup.set()
        elif det.dirty:
            self._wakeup.set()

    def forget(self, machine_id: str) -> None:
        """A removed machine: its state is no longer committed."""
        self._dirty.discard(machine_id)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            await self._wakeup.wait()
            # Group commit: let a burst of detections share one transaction and one fsync.
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except StorageFullError as exc:
                self._failed(exc, full=True, what="buffer cannot commit: %s; detected events "
                             "are held in memory and retried")
                await asyncio.sleep(backoff.next_delay())
                self._wakeup.set()
            except EdgeAgentError as exc:
                self._failed(exc, full=False, what="buffer commit failed: %s; retrying")
                await asyncio.sleep(backoff.next_delay())
                self._wakeup.set()
            else:
                if self.error is not None:
                    log.info("buffer commits work again")
                self.error, self.full = None, False
                backoff.reset()

    def _failed(self, exc: EdgeAgentError, *, full: bool, what: str) -> None:
        if self.error is None:
            log.error(what, exc)
        self.error, self.full = str(exc), full
        self._bound_uncommitted()

    async def flush(self) -> None:
        """Commit everything detected so far (events plus the states that produced them)."""
        self._wakeup.clear()
        if not self._queue and not self._dirty:
            return
        detectors = self._detectors()
        events, self._queue = self._queue, []
        dirty, self._dirty = {m for m in self._dirty if m in detectors}, set()
        states = {mid: detectors[mid].snapshot() for mid in dirty}
        for mid in dirty:
            detectors[mid].dirty = False
        states[AGENT_STATE_KEY] = str(self._agent_sequence)
        rows = [NewEvent(id=e.id, key=e.key, type=e.type.value, time=format_time(e.time),
                         payload=e.to_json(self._agent_id)) for e in events]
        try:
            failpoints.hit("before_commit")
            await self._buffer.append(rows, states)
        except BaseException:
            # Nothing committed: put everything back in front, in order, and retry later.
            self._queue[:0] = events
            self._dirty |= dirty
            for mid in dirty:
                detectors[mid].dirty = True
            raise
        self.committed_total += len(rows)
        failpoints.hit("after_commit")
        if self._memory_drops:
            by_type, self._memory_drops = self._memory_drops, {}
            (first, last), self._memory_drop_span = self._memory_drop_span, (None, None)
            self._queue_data_gap(by_type, first, last,
                                 f"commits failed and more than {MAX_UNCOMMITTED} detections "
                                 "waited in memory")
        drops = await self._buffer.take_drops()
        if drops.total:
            self._queue_data_gap(drops.by_type, drops.first_at, drops.last_at)
        self._on_commit()

    def _bound_uncommitted(self) -> None:
        """While commits fail, detections wait in memory; past a bound the oldest are dropped
        and counted, and a data gap reports them once commits work again."""
        excess = len(self._queue) - MAX_UNCOMMITTED
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
        reason = reason or f"buffer full ({self._when_full})"
        log.error("%s: dropped %d event(s): %s", reason, total, by_type)
        self._queue.append(Event(
            id=event_id(self.agent_source, EventType.DATA_GAP.value, first, last, total,
                        self._agent_sequence),
            type=EventType.DATA_GAP, source=self.agent_source, time=utcnow(), key="agent",
            sequence=self._agent_sequence,
            data={"agent": self._agent_id, "site": self._site,
                  "dropped": total, "dropped_by_type": by_type, "first_dropped_at": first,
                  "last_dropped_at": last, "reason": reason}))
        self._wakeup.set()
