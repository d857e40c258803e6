"""The forwarder: moves one sink's buffered events to it, exactly once, in order.

One forwarder per sink; it is the only leaser of that sink's rows. It leases the oldest rows,
asks the sink for one attempt at a time and settles every row it leased as accepted or dead,
retrying the rest. The sink classifies; the forwarder decides (docs/delivery.md)::

                  wake() / poll
          +------+ ----------> lease ---- rows ----> +------------+
          | idle |                                   | delivering | <------------------+
          +------+ <--------- no rows -------------- +------------+                    |
                                                      |   |   |   \\ ACCEPTED: settle   |
                          RETRY (408/429/5xx/network) |   |   |    TOO_LARGE/REJECTED:  |
                                                      v   |   |    split in halves, or  |
                                               +----------+   |    dead-letter a single |
                                               | retrying |   |                         |
                                               +----------+   | HOLD (401/403)          |
                                    backoff, then the SAME rows v                       |
                                               again     +------+ reload creds, backoff,|
                                                         | held | re-probe SAME rows ---+
                                                         +------+

Invariants:

- Every leased row ends settled as accepted or dead, or stays leased (never dropped): a
  stop or crash leaves unsettled rows leased and the buffer returns them to pending when it is
  next opened (or when the lease times out). The receiver deduplicates by event id, so a row
  delivered but not yet settled at a crash is re-sent and answered 409, which settles it.
- Retries re-send the same leased rows, in the same order, before anything newer is leased:
  first deliveries keep detection order per machine. Splits and bisection keep order too (the
  first half goes first).
- A rejected single event (or an item rejected inside a 207) is dead-lettered with its status
  and body excerpt and never goes back into the loop; a rejected batch is bisected to find it.
- Backoff is exponential with full jitter between ``policy.initial_backoff`` and
  ``policy.max_backoff``; ``Retry-After`` is a floor, capped at ``max_backoff``. All waits are on
  the event loop's monotonic clock. A stop interrupts a backoff at once.
- Leases are not renewed during long retries: this forwarder is the only leaser of its sink, so
  an expired lease only matters after a crash, which is exactly when it should be offered again.
- Lease ahead (batch mode): while the first attempt of the last chunk of a lease is in
  flight, the next lease runs on the buffer's thread (at most one ahead), so a drain does not
  stop sending while rows are leased. Those rows are sent only after every earlier row is
  settled (order is kept); an empty lease ahead is not used (a ``wake()`` meanwhile must not be
  lost: the loop leases afresh). A stop leaves rows leased ahead leased, like any unsent row.
  Only a block leased less than ``_AHEAD_WITHIN`` seconds ago, with no failed attempt, leases
  ahead: a lease also reclaims expired leases, and the rows in flight must not be among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import deque
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Protocol

from agent.sinks.base import Delivery, OutboundEvent, Outcome, Sink
from agent.sinks.config import RetryPolicy
from buffer.base import LeasedEvent, Settlement
from config import failpoints
from config.backoff import Backoff
from config.model import format_time, utcnow

__all__ = ["AsyncLeaseBuffer", "Forwarder", "ForwarderState"]

log = logging.getLogger(__name__)


class AsyncLeaseBuffer(Protocol):
    """What the forwarder needs from the buffer (``buffer.writer.AsyncBuffer`` provides it)."""

    async def lease(self, sink: str, limit: int) -> list[LeasedEvent]: ...

    async def settle(self, sink: str, settlement: Settlement) -> None: ...


class ForwarderState(StrEnum):
    IDLE = "idle"
    DELIVERING = "delivering"
    RETRYING = "retrying"
    HELD = "held"


def _outbound(row: LeasedEvent) -> OutboundEvent:
    return OutboundEvent(row.id, _source_of(row.payload), row.payload)


_SOURCE_KEY = '"source":"'
_NEXT_KEY = ',"specversion":"'


def _source_of(payload: str) -> str:
    """The top-level ``source`` of a CloudEvent's JSON text.

    Parsing every payload cost more than anything else the forwarder does per event in a
    backlog drain, so the agent's own serialisation (compact, sorted keys: ``source`` is
    followed by ``specversion`` at the top level) is read without parsing; anything else falls
    back to ``json.loads``."""
    i = payload.rfind(_SOURCE_KEY)
    if i >= 0:
        start = i + len(_SOURCE_KEY)
        end = payload.find('"', start)
        value = payload[start:end]
        if end > 0 and "\\" not in value and payload.startswith(_NEXT_KEY, end + 1):
            return value
    try:
        source = json.loads(payload).get("source", "")
    except (ValueError, AttributeError):
        source = ""
    return source if isinstance(source, str) else ""


def _episode_of(payload: str) -> str | None:
    """The ``data.episode_id`` of a CloudEvent's JSON text (dead letters only: rare)."""
    try:
        episode = json.loads(payload).get("data", {}).get("episode_id")
    except (ValueError, AttributeError):
        return None
    return episode if isinstance(episode, str) else None


# A block older than this does not lease ahead (far below any sensible lease timeout).
_AHEAD_WITHIN = 1.0


def _halves(rows: list[LeasedEvent]) -> tuple[list[LeasedEvent], list[LeasedEvent]]:
    mid = len(rows) // 2
    return rows[:mid], rows[mid:]


class Forwarder:
    """Run with ``await run()`` in a task; ``wake()`` after new events are committed;
    ``status()`` for /status; ``await stop(drain_timeout)`` to end it."""

    def __init__(self, sink: Sink, buffer: AsyncLeaseBuffer, policy: RetryPolicy, *,
                 lease_batch: int | None = None, rng: random.Random | None = None,
                 poll_interval: float = 5.0) -> None:
        self.sink = sink
        self._buffer = buffer
        # Batch mode leases a few sink batches at once (one buffer round trip feeds several
        # requests); single mode leases one row at a time, as before.
        per_lease = sink.max_batch if sink.max_batch <= 1 else min(sink.max_batch * 4,
                                                                   max(sink.max_batch, 2000))
        self._lease_limit = max(1, lease_batch or per_lease)
        self._backoff = Backoff(policy.initial_backoff, policy.max_backoff, rng)
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        # The settle of the last fully answered batch, still running on the buffer's writer
        # thread while the next batch is sent (at most one; see _settle_behind).
        self._behind: asyncio.Task[bool] | None = None
        # The next lease, started while the last chunk of the current one is in flight.
        self._ahead: asyncio.Future[list[LeasedEvent]] | None = None
        self._block_started = 0.0  # loop time of the current block's lease
        self._block_failed = False  # an attempt of the current block failed
        self.state = ForwarderState.IDLE
        self.last_success: str | None = None
        # The error of the current failure; cleared on recovery, when it moves to
        # previous_error (with the time it was last seen) so /status does not show a stale one.
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.previous_error: dict[str, str | None] | None = None
        self.held_reason: str | None = None
        self.consecutive_failures = 0
        self.delivered_total = 0
        self.retried_total = 0
        self.dead_lettered_total = 0

    def __repr__(self) -> str:
        return f"Forwarder(sink={self.sink.name!r}, state={self.state.value})"

    # ------------------------------------------------------------------ public surface

    def wake(self) -> None:
        """New events were committed: lease now instead of at the next poll."""
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "previous_error": self.previous_error,
            "consecutive_failures": self.consecutive_failures,
            "delivered_total": self.delivered_total,
            "retried_total": self.retried_total,
            "dead_lettered_total": self.dead_lettered_total,
            "held_reason": self.held_reason,
        }

    async def run(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"forwarder for sink {self.sink.name} is already running")
        self._task = asyncio.current_task()
        name = self.sink.name
        while not self._stopping.is_set():
            # Clear before leasing: a wake() during the lease is then not lost.
            self._wake.clear()
            try:
                rows = await self._leased_ahead()
                if not rows:
                    rows = await self._buffer.lease(name, self._lease_limit)
            except Exception as exc:
                if self.state is not ForwarderState.RETRYING:
                    log.exception("sink %s: cannot lease events from the buffer", name)
                await self._failed(f"cannot lease from the buffer: {exc}", None,
                                   ForwarderState.RETRYING, attempt=False)
                continue
            if not rows:
                if self.state is ForwarderState.RETRYING:
                    self._answered()
                self.state = ForwarderState.IDLE
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval)
                continue
            if self.state is ForwarderState.RETRYING:
                self._answered()  # only a lease failure leaves us here: the buffer is back
            if self.state is ForwarderState.IDLE:
                self.state = ForwarderState.DELIVERING
            self._block_started, self._block_failed = asyncio.get_running_loop().time(), False
            await self._drive(rows)
        with contextlib.suppress(Exception):  # rows leased ahead stay leased (see invariants)
            await self._leased_ahead()
        self.state = ForwarderState.IDLE

    async def stop(self, drain_timeout: float) -> None:
        """Stop after the attempt in flight (and its settlement); a backoff ends at once.
        Past ``drain_timeout`` the attempt is cancelled; its rows stay leased."""
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=drain_timeout)
        if not done:
            log.warning("sink %s: delivery still in flight after %.1fs; abandoning it "
                        "(its events stay buffered)", self.sink.name, drain_timeout)
            task.cancel()
            await asyncio.wait({task})

    # ------------------------------------------------------------------ the delivery loop

    async def _drive(self, rows: list[LeasedEvent]) -> None:
        """Deliver ``rows`` until each is settled, or until stopping (the rest stay leased)."""
        try:
            await self._drive_rows(rows)
        finally:
            await self._caught_up()  # nothing left settling when leasing again or stopping

    async def _drive_rows(self, rows: list[LeasedEvent]) -> None:
        size = self.sink.max_batch
        queue = deque(rows[i:i + size] for i in range(0, len(rows), size))
        while queue and not self._stopping.is_set():
            chunk = queue[0]
            if size > 1 and len(queue) == 1 and self._may_lease_ahead():
                self._lease_ahead()
            try:
                delivery = await self.sink.deliver([_outbound(r) for r in chunk])
            except Exception as exc:  # a sink broke its contract: keep the rows, back off
                if self.state is not ForwarderState.RETRYING:
                    log.exception("sink %s raised from deliver()", self.sink.name)
                delivery = Delivery(Outcome.RETRY, detail=f"sink error: {exc!r}"[:500])
            # A 207 is ACCEPTED only when every item of the chunk was: then it settles like a
            # 2xx for the whole chunk, without looking at each item.
            if delivery.items and delivery.outcome is not Outcome.ACCEPTED:
                rest, stop = await self._per_item(chunk, delivery)
                if rest:
                    queue[0] = rest
                else:
                    queue.popleft()
                if stop:
                    return
                continue
            outcome = delivery.outcome
            if outcome is Outcome.ACCEPTED:
                if not await self._settle_behind(Settlement(accepted=[r.seq for r in chunk])):
                    return
                queue.popleft()
                self._succeeded()
            elif outcome is Outcome.RETRY:
                await self._failed(delivery.detail or "retry", delivery.retry_after,
                                   ForwarderState.RETRYING, delivery.status,
                                   trace_id=delivery.trace_id)
            elif outcome is Outcome.HOLD:
                await self._failed(delivery.detail or "held", None, ForwarderState.HELD,
                                   delivery.status, trace_id=delivery.trace_id)
            elif len(chunk) == 1:  # TOO_LARGE or REJECTED, one event: it is the poison
                dead = {chunk[0].seq: (delivery.status, delivery.detail)}
                if not await self._settle(Settlement(dead=dead)):
                    return
                queue.popleft()
                self._dead_lettered(chunk, dead, delivery.trace_id)
                self._answered()
            else:  # TOO_LARGE: split; REJECTED: bisect. Either way, halves in order.
                first, second = _halves(chunk)
                queue.popleft()
                queue.appendleft(second)
                queue.appendleft(first)
                self._answered()

    async def _per_item(self, chunk: list[LeasedEvent],
                        delivery: Delivery) -> tuple[list[LeasedEvent], bool]:
        """Apply a 207: settle accepted and dead items; return (rows left, stop now)."""
        accepted: list[int] = []
        dead: dict[int, tuple[int | None, str]] = {}
        rest: list[LeasedEvent] = []
        held: str | None = None
        retry_detail = ""
        for row in chunk:
            item = delivery.result_for(row.id)
            if item.outcome is Outcome.ACCEPTED:
                accepted.append(row.seq)
            elif item.outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
                # A per-item verdict is already about one event: no bisection needed.
                dead[row.seq] = (item.status, item.detail)
            else:
                rest.append(row)
                if item.outcome is Outcome.HOLD:
                    held = held or item.detail or f"HTTP {item.status}"
                else:
                    retry_detail = retry_detail or item.detail or f"HTTP {item.status}"
        settlement = Settlement(accepted=accepted, dead=dead)
        if not rest:  # fully answered: settle behind the next request
            if (accepted or dead) and not await self._settle_behind(settlement):
                return chunk, True
            if dead:
                self._dead_lettered([r for r in chunk if r.seq in dead], dead, delivery.trace_id)
            self._succeeded()
            return [], False
        if not await self._caught_up() or (
                (accepted or dead) and not await self._settle(settlement)):
            return chunk, True
        if dead:
            self._dead_lettered([r for r in chunk if r.seq in dead], dead, delivery.trace_id)
        if accepted:
            self._mark_success_time()
        if held is not None:
            await self._failed(held, None, ForwarderState.HELD, 207, trace_id=delivery.trace_id)
        else:
            await self._failed(f"{len(rest)} of {len(chunk)} events to retry: {retry_detail}",
                               delivery.retry_after, ForwarderState.RETRYING, 207,
                               trace_id=delivery.trace_id)
        return rest, False

    # ------------------------------------------------------------------ bookkeeping

    async def _settle_behind(self, settlement: Settlement) -> bool:
        """Start settling a fully answered batch and return, so the next request goes out
        while the buffer's writer thread applies it (a drain then costs max(request, settle)
        per batch instead of the sum). At most one settle runs behind; the previous one is
        awaited first, and ``_drive`` awaits the last before it leases again or returns.
        Rows of a settle still running at a crash stay leased and are re-sent (409)."""
        if not await self._caught_up():
            return False
        self._behind = asyncio.ensure_future(self._settle(settlement))
        return True

    def _may_lease_ahead(self) -> bool:
        return self._ahead is None and not self._block_failed and \
            asyncio.get_running_loop().time() - self._block_started < _AHEAD_WITHIN

    def _lease_ahead(self) -> None:
        ahead = asyncio.ensure_future(self._buffer.lease(self.sink.name, self._lease_limit))
        # Retrieved here too, so a lease that fails after run() ended is not reported as
        # "exception never retrieved"; run() reads the result in _leased_ahead().
        ahead.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._ahead = ahead

    async def _leased_ahead(self) -> list[LeasedEvent]:
        """The rows of the lease started ahead (none if none was); its error if it failed."""
        ahead, self._ahead = self._ahead, None
        return [] if ahead is None else await ahead

    async def _caught_up(self) -> bool:
        """Wait for the settle running behind, if any; False if it gave up (stopping)."""
        task, self._behind = self._behind, None
        return True if task is None else await task

    async def _settle(self, settlement: Settlement) -> bool:
        """Settle, retrying buffer errors with backoff; False if stopping first (rows stay
        leased, the receiver's dedup makes the re-send harmless)."""
        if settlement.accepted:
            failpoints.hit("after_2xx_before_settle")
        failures = 0
        while True:
            try:
                # Shielded: a cancelled stop never leaves a half-applied settle behind.
                await asyncio.shield(self._buffer.settle(self.sink.name, settlement))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:  # log the transition, not every repetition
                    log.exception("sink %s: cannot settle %d delivered events in the buffer; "
                                  "retrying", self.sink.name,
                                  len(settlement.accepted) + len(settlement.dead))
                self._set_error(f"cannot settle in the buffer: {exc}")
                if self._stopping.is_set():
                    return False
                await self._pause(self._backoff.next_delay())
                if self._stopping.is_set():
                    return False
                continue
            if failures:
                log.info("sink %s: settled in the buffer after %d failed tries",
                         self.sink.name, failures)
                self._clear_error()
            self.delivered_total += len(settlement.accepted)
            return True

    def _mark_success_time(self) -> None:
        self.last_success = format_time(utcnow())

    def _succeeded(self) -> None:
        self._mark_success_time()
        self._answered()

    def _answered(self) -> None:
        """The endpoint gave a definitive answer: it is reachable and we are authorised."""
        if self.state in (ForwarderState.RETRYING, ForwarderState.HELD):
            log.info("sink %s recovered after %d failed attempts", self.sink.name,
                     self.consecutive_failures)
        self.state = ForwarderState.DELIVERING
        self.held_reason = None
        self.consecutive_failures = 0
        self._clear_error()
        self._backoff.reset()

    def _set_error(self, reason: str) -> None:
        self.last_error, self.last_error_at = reason, format_time(utcnow())

    def _clear_error(self) -> None:
        if self.last_error is not None:
            self.previous_error = {"error": self.last_error, "at": self.last_error_at}
        self.last_error = self.last_error_at = None

    def _dead_lettered(self, rows: Sequence[LeasedEvent],
                       dead: dict[int, tuple[int | None, str]],
                       trace_id: str | None = None) -> None:
        self.dead_lettered_total += len(dead)
        for row in rows:
            status, detail = dead[row.seq]
            episode = _episode_of(row.payload)
            log.error("sink %s refused event %s (%s%s, HTTP %s, trace %s): moved to dead "
                      "letters: %s", self.sink.name, row.id, row.type,
                      f", episode {episode}" if episode else "", status, trace_id,
                      detail[:200], extra={"stage": "dead_lettered", "event_id": row.id,
                                           "episode_id": episode, "trace_id": trace_id})

    async def _failed(self, detail: str, retry_after: float | None, state: ForwarderState,
                      status: int | None = None, *, attempt: bool = True,
                      trace_id: str | None = None) -> None:
        """A retryable or held attempt (or a buffer error when ``attempt`` is False): log the
        transition once (with the request's trace id, to find it at the receiver), then back
        off."""
        reason = f"HTTP {status}: {detail}" if status is not None else detail
        trace = f", trace {trace_id}" if trace_id else ""
        self._block_failed = True
        self._set_error(reason)
        self.consecutive_failures += 1
        if attempt:
            self.retried_total += 1
        if state is ForwarderState.HELD:
            if self.state is not ForwarderState.HELD:
                log.error("sink %s is held (%s%s); events stay buffered until the credentials "
                          "or permissions are fixed", self.sink.name, reason, trace,
                          extra={"sink": self.sink.name, "trace_id": trace_id})
            self.held_reason = reason
        elif self.state is not ForwarderState.RETRYING:
            log.warning("sink %s unavailable (%s%s); retrying with backoff", self.sink.name,
                        reason, trace, extra={"sink": self.sink.name, "trace_id": trace_id})
        self.state = state
        await self._pause(self._backoff.next_delay(retry_after))
        if state is ForwarderState.HELD and not self._stopping.is_set():
            try:
                await self.sink.reload_credentials()
            except Exception:
                log.exception("sink %s: reloading credentials failed", self.sink.name)

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
