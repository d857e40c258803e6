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
- The agent's own sequence (for its data-gap events) is saved under the state key
  ``AGENT_STATE_KEY`` by the first commit and by every commit after it changed (the commit that
  holds the data-gap event that used it): an unchanged row is not rewritten, one page of WAL
  less per commit.
- Drops are looked for (``peek_drops``, a hop to the writer thread) only when the buffer may
  hold some: at start (a crash may have left some) and when an append says it recorded some
  (``AppendResult.unreported_drops``), not after every commit.
- Capacity drops recorded by the buffer are reported by a data-gap event committed in the same
  transaction that takes their counts out of the buffer (``append(reported=...)``): a crash
  leaves the counts or their report, never neither.
- Acknowledgements after commit: a source may hand ``after_commit(ack)`` after emitting a batch
  (MQTT QoS 1). The ack joins the queue; the next successful commit (which holds every event
  and state change taken before it) runs it; a failed commit keeps it queued. ``soon`` asks for
  that commit without waiting out the group commit interval.
- Every committed event carries ``detectedat`` (the commit time) in its payload; ``observe``
  gets the committed events with that time (the detection-lag figures).
- ``commit_now`` lets a caller outside the sample/tick path (an operator's reason) wait until
  its event is committed; the event goes through the same queue, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from agent.detect import MachineDetector
from agent.detect.history import EpisodeHistory
from buffer.base import NewEvent
from buffer.writer import AsyncBuffer
from config import failpoints
from config.backoff import Backoff
from config.errors import EdgeAgentError, StorageFullError
from config.model import Event, EventType, event_id, format_time, utcnow
from config.tasks import within

__all__ = ["AGENT_STATE_KEY", "MAX_UNCOMMITTED", "Committer"]

log = logging.getLogger(__name__)

AGENT_STATE_KEY = "__agent__"
# Detections held in memory while the buffer cannot commit (disk full); beyond this the oldest
# are dropped and reported as a data gap. Events are small: this is tens of MB at most.
MAX_UNCOMMITTED = 100_000


class Committer:
    def __init__(self, buffer: AsyncBuffer, detectors: Callable[[], Mapping[str, MachineDetector]],
                 *, agent_id: str, site: str, interval: float, when_full: str,
                 on_commit: Callable[[], None],
                 observe: Callable[[Sequence[Event], datetime], None] | None = None) -> None:
        self._buffer = buffer
        self._detectors = detectors
        self._agent_id = agent_id
        self._site = site
        self.agent_source = f"/sites/{site}/agents/{agent_id}"
        self._interval = interval
        self._when_full = when_full
        self._on_commit = on_commit
        self._observe = observe
        # Events someone waits to see committed (a reason entered over HTTP): id -> futures.
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._queue: list[Event] = []
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()
        self._soon = asyncio.Event()
        self._acks: list[Callable[[], None]] = []
        self._drops_unreported = True  # the buffer may hold drops from before a crash
        self._agent_sequence = 0
        self._saved_sequence: int | None = None  # the agent sequence as last committed
        self._memory_drops: dict[str, int] = {}
        self._memory_drop_span: tuple[str | None, str | None] = (None, None)
        self.error: str | None = None
        self.full = False
        self.committed_total = 0
        self.detected: dict[tuple[str, str], int] = {}  # (machine, type) -> count
        self.history = EpisodeHistory()  # recent downtime per machine, for people (/status)

    @property
    def uncommitted(self) -> int:
        """Events detected but not committed yet."""
        return len(self._queue)

    def restore(self, states: Mapping[str, str]) -> None:
        saved = states.get(AGENT_STATE_KEY)
        if saved and saved.isascii() and saved.isdigit():
            self._agent_sequence = self._saved_sequence = int(saved)

    # ------------------------------------------------------------------ intake

    def take(self, det: MachineDetector, events: list[Event]) -> None:
        """What one detector returned; its state is committed with the events when dirty."""
        if det.dirty:
            self._dirty.add(det.machine_id)
        for note in det.take_notes():
            log.info("machine %s: %s", det.machine_id, note)
        if events:
            trail = log.isEnabledFor(logging.DEBUG)
            for e in events:
                key = (det.machine_id, e.type.value)
                self.detected[key] = self.detected.get(key, 0) + 1
                if trail:
                    log.debug("event %s detected: %s", e.id, e.type.value,
                              extra=_trail(e, "detected"))
            self.history.take(det.machine_id, events)
            self._queue.extend(events)
            self._wakeup.set()
        elif det.dirty:
            self._wakeup.set()

    def after_commit(self, ack: Callable[[], None], *, soon: bool = False) -> None:
        """Run ``ack`` after the next successful commit (see the module docstring)."""
        self._acks.append(ack)
        self._wakeup.set()
        if soon:
            self._soon.set()

    @property
    def acks_waiting(self) -> int:
        return len(self._acks)

    async def commit_now(self, det: MachineDetector, events: list[Event],
                         wait_for: str | None, timeout: float) -> bool:
        """Take what ``det`` just produced outside a sample or tick and wait until the event
        ``wait_for`` is committed (with the detector state), or ``timeout``: False then (it
        stays queued and commits later, like any detection). An id that is neither among
        ``events`` nor waited for already is committed; then, if ``det`` has new state (an
        idempotency key), the wait is for the next commit, which saves it."""
        fut: asyncio.Future[None] | None = None
        if wait_for is not None and (wait_for in self._waiters or
                                     any(e.id == wait_for for e in events)):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(wait_for, []).append(fut)
        elif wait_for is not None and det.dirty:
            # No new event, but new state (a request's idempotency key): the answer stands
            # once that state is committed, so it waits for the next commit.
            committed = fut = asyncio.get_running_loop().create_future()

            def ack() -> None:
                if not committed.done():
                    committed.set_result(None)
            self.after_commit(ack, soon=True)
        self.take(det, events)
        self._wakeup.set()
        if fut is None:
            return True
        try:
            await within(asyncio.shield(fut), timeout)
            return True
        except (TimeoutError, StorageFullError):
            return False

    def forget(self, machine_id: str) -> None:
        """A removed machine: its state is no longer committed."""
        self._dirty.discard(machine_id)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            await self._wakeup.wait()
            # Group commit: let a burst of detections share one transaction and one fsync,
            # unless a source's window of unacknowledged messages is filling up.
            if not self._soon.is_set():
                soon = asyncio.ensure_future(self._soon.wait())
                try:
                    await asyncio.wait([soon], timeout=self._interval)
                finally:
                    soon.cancel()
            self._soon.clear()
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
        acks, self._acks = self._acks, []
        if not self._queue and not self._dirty:
            _run_acks(acks)
            if self._drops_unreported:
                await self._report_drops()
            return
        detectors = self._detectors()
        events, self._queue = self._queue, []
        dirty, self._dirty = {m for m in self._dirty if m in detectors}, set()
        states = {mid: detectors[mid].snapshot() for mid in dirty}
        for mid in dirty:
            detectors[mid].dirty = False
        sequence = self._agent_sequence
        if sequence != self._saved_sequence:
            states[AGENT_STATE_KEY] = str(sequence)
        detected_at = utcnow()  # the detectedat attribute: a commit takes milliseconds
        rows = [NewEvent(id=e.id, key=e.key, type=e.type.value, time=format_time(e.time),
                         payload=e.to_json(self._agent_id, detected_at)) for e in events]
        try:
            failpoints.hit("before_commit")
            result = await self._buffer.append(rows, states)
        except BaseException:
            # Nothing committed: put everything back in front, in order, and retry later.
            self._queue[:0] = events
            self._acks[:0] = acks
            self._dirty |= dirty
            for mid in dirty:
                detectors[mid].dirty = True
            raise
        self._saved_sequence = sequence
        self._drops_unreported = self._drops_unreported or result.unreported_drops
        self.committed_total += len(rows)
        self._committed(events, detected_at)
        failpoints.hit("after_commit")
        _run_acks(acks)
        if self._memory_drops:
            by_type, self._memory_drops = self._memory_drops, {}
            (first, last), self._memory_drop_span = self._memory_drop_span, (None, None)
            self._queue_data_gap(by_type, first, last,
                                 f"commits failed and more than {MAX_UNCOMMITTED} detections "
                                 "waited in memory")
        if self._drops_unreported:
            await self._report_drops()
        self._on_commit()

    async def _report_drops(self) -> None:
        """Commit a data gap for the drops the buffer recorded, in the same transaction that
        takes those counts out of it. The gap's own append may drop again; the next commit
        looks once more."""
        drops = await self._buffer.peek_drops()
        self._drops_unreported = bool(drops.total)
        if not drops.total:
            return
        sequence = self._agent_sequence + 1
        gap = self._data_gap_event(sequence, drops.by_type, drops.first_at, drops.last_at,
                                   None, drops.by_sink)
        detected_at = utcnow()
        row = NewEvent(id=gap.id, key=gap.key, type=gap.type.value, time=format_time(gap.time),
                       payload=gap.to_json(self._agent_id, detected_at))
        result = await self._buffer.append([row], {AGENT_STATE_KEY: str(sequence)},
                                           reported=drops)
        self._agent_sequence = self._saved_sequence = sequence
        self._drops_unreported = result.unreported_drops
        self.committed_total += 1
        self._committed([gap], detected_at)
        self._wakeup.set()

    def _committed(self, events: list[Event], detected_at: datetime) -> None:
        if self._observe is not None and events:
            self._observe(events, detected_at)
        if log.isEnabledFor(logging.DEBUG):
            for e in events:
                log.debug("event %s committed: %s", e.id, e.type.value,
                          extra=_trail(e, "committed"))
        if self._waiters:
            for e in events:
                for fut in self._waiters.pop(e.id, ()):
                    if not fut.done():
                        fut.set_result(None)

    def _bound_uncommitted(self) -> None:
        """While commits fail, detections wait in memory; past a bound the oldest are dropped
        and counted, and a data gap reports them once commits work again."""
        excess = len(self._queue) - MAX_UNCOMMITTED
        if excess <= 0:
            return
        dropped, self._queue = self._queue[:excess], self._queue[excess:]
        for e in dropped:  # a waiter learns it will not see this one (a data gap says so)
            for fut in self._waiters.pop(e.id, ()):
                if not fut.done():
                    fut.set_exception(StorageFullError("dropped before it could be committed"))
        for e in dropped:
            self._memory_drops[e.type.value] = self._memory_drops.get(e.type.value, 0) + 1
        self._memory_drop_span = (self._memory_drop_span[0] or format_time(dropped[0].time),
                                  format_time(dropped[-1].time))

    def _queue_data_gap(self, by_type: dict[str, int], first: str | None,
                        last: str | None, reason: str | None = None) -> None:
        self._agent_sequence += 1
        self._queue.append(self._data_gap_event(self._agent_sequence, by_type, first, last,
                                                reason))
        self._wakeup.set()

    def _data_gap_event(self, sequence: int, by_type: dict[str, int], first: str | None,
                        last: str | None, reason: str | None,
                        by_sink: dict[str, dict[str, int]] | None = None) -> Event:
        """``by_sink``: which sink lost what (buffer drops); left out when every sink lost
        the same (detections dropped before they reached the buffer)."""
        total = sum(by_type.values())
        reason = reason or f"buffer full ({self._when_full})"
        log.error("%s: dropped %d event(s): %s%s", reason, total, by_type,
                  f"; lost per sink: {by_sink}" if by_sink else "")
        extra = {"dropped_by_sink": by_sink} if by_sink else {}
        return Event(
            id=event_id(self.agent_source, EventType.DATA_GAP.value, first, last, total,
                        sequence),
            type=EventType.DATA_GAP, source=self.agent_source, time=utcnow(), key="agent",
            sequence=sequence,
            data={"agent": self._agent_id, "site": self._site,
                  "dropped": total, "dropped_by_type": by_type, "first_dropped_at": first,
                  "last_dropped_at": last, "reason": reason, **extra})


def _run_acks(acks: list[Callable[[], None]]) -> None:
    for ack in acks:
        try:
            ack()
        except Exception:  # one source's failure must not cost the others their acks
            log.exception("acknowledging committed samples failed")


def _trail(e: Event, stage: str) -> dict[str, Any]:
    """Structured log fields that let an integrator follow one event through the agent."""
    return {"stage": stage, "event_id": e.id, "episode_id": e.data.get("episode_id"),
            "machine": e.key}
