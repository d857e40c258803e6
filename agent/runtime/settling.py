"""What the forwarder does with an answer: settle, retry, hold, split, bisect, dead-letter.

``Settling`` is the base of ``Forwarder`` (``forwarder.py``): its state and counters, the
buffer settle with its own retries, backoff, and ``_resolve``, which takes one request whose
answer was not a plain "all accepted" and works on it alone until every row is settled (or
the forwarder stops), exactly as the sequential forwarder always did::

    answer            done here
    ---------------   ------------------------------------------------------------------
    ACCEPTED          settle (accepted) — the caller did that already for the first answer
    RETRY             back off, send the SAME rows again
    HOLD (401/403)    mark held, back off, reload credentials, re-probe with the SAME rows
    TOO_LARGE         split in halves, first half first
    REJECTED          one event: dead-letter it; more: bisect (halves in order)
    207, mixed        settle accepted and rejected items; retry or hold the rest

Backoff is exponential with full jitter between ``policy.initial_backoff`` and
``policy.max_backoff``; ``Retry-After`` is a floor, capped at ``max_backoff``. A stop ends a
backoff at once. Buffer errors while settling are retried with the same backoff (a settle is
shielded from cancellation, so a stop never leaves one half-applied).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import deque
from collections.abc import Sequence
from enum import StrEnum
from typing import Protocol

from agent.runtime.batching import halves, outbound
from agent.sinks.base import Delivery, Outcome, Sink
from agent.sinks.config import RetryPolicy
from buffer.base import LeasedEvent, Settlement
from config import failpoints
from config.backoff import Backoff
from config.model import format_time, utcnow
from config.tasks import wait_event

__all__ = ["AsyncLeaseBuffer", "ForwarderState", "Settling"]

log = logging.getLogger(__name__)


class AsyncLeaseBuffer(Protocol):
    """What the forwarder needs from the buffer (``buffer.writer.AsyncBuffer`` provides it)."""

    async def lease(self, sink: str, limit: int,
                    renew: Sequence[int] = ()) -> list[LeasedEvent]: ...

    async def settle(self, sink: str, settlement: Settlement) -> None: ...

    async def release(self, sink: str, seqs: Sequence[int]) -> None: ...


class ForwarderState(StrEnum):
    IDLE = "idle"
    DELIVERING = "delivering"
    RETRYING = "retrying"
    HELD = "held"


def _episode_of(payload: str) -> str | None:
    """The ``data.episode_id`` of a CloudEvent's JSON text (dead letters only: rare)."""
    try:
        episode = json.loads(payload).get("data", {}).get("episode_id")
    except (ValueError, AttributeError):
        return None
    return episode if isinstance(episode, str) else None


class Settling:
    """State, counters and answer handling of a forwarder; see the module docstring."""

    def __init__(self, sink: Sink, buffer: AsyncLeaseBuffer, policy: RetryPolicy,
                 rng: random.Random | None) -> None:
        self.sink = sink
        self._buffer = buffer
        self._backoff = Backoff(policy.initial_backoff, policy.max_backoff, rng)
        self._stopping = asyncio.Event()
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
        self._settle_failing = False  # the last settle failed (logged once until one works)

    async def _attempt(self, chunk: list[LeasedEvent]) -> Delivery:
        try:
            return await self.sink.deliver([outbound(r) for r in chunk])
        except Exception as exc:  # a sink broke its contract: keep the rows, back off
            if self.state is not ForwarderState.RETRYING:
                log.exception("sink %s raised from deliver()", self.sink.name)
            return Delivery(Outcome.RETRY, detail=f"sink error: {exc!r}"[:500])

    async def _resolve(self, chunk: list[LeasedEvent], delivery: Delivery | None) -> bool:
        """Work on ``chunk`` (first answer ``delivery``, or None to send it first) until every
        row is settled; False if stopping first (the rest stay leased)."""
        queue = deque([chunk])
        answer: Delivery | None = delivery
        while queue:
            if answer is None:
                if self._stopping.is_set():
                    return False
                answer = await self._attempt(queue[0])
            delivery, answer = answer, None
            part = queue[0]
            # A 207 is ACCEPTED only when every item was: then it settles like a 2xx.
            if delivery.items and delivery.outcome is not Outcome.ACCEPTED:
                rest, ok = await self._per_item(part, delivery)
                if not ok:
                    return False
                if rest:
                    queue[0] = rest
                else:
                    queue.popleft()
                continue
            outcome = delivery.outcome
            if outcome is Outcome.ACCEPTED:
                if not await self._settle(Settlement(accepted=[r.seq for r in part])):
                    return False
                queue.popleft()
                self._succeeded()
            elif outcome is Outcome.RETRY:
                await self._failed(delivery.detail or "retry", delivery.retry_after,
                                   ForwarderState.RETRYING, delivery.status,
                                   trace_id=delivery.trace_id)
            elif outcome is Outcome.HOLD:
                await self._failed(delivery.detail or "held", None, ForwarderState.HELD,
                                   delivery.status, trace_id=delivery.trace_id)
            elif len(part) == 1:  # TOO_LARGE or REJECTED, one event: it is the poison
                dead = {part[0].seq: (delivery.status, delivery.detail)}
                if not await self._settle(Settlement(dead=dead)):
                    return False
                queue.popleft()
                self._dead_lettered(part, dead, delivery.trace_id)
                self._answered()
            else:  # TOO_LARGE: split; REJECTED: bisect. Either way, halves in order.
                first, second = halves(part)
                queue.popleft()
                queue.appendleft(second)
                queue.appendleft(first)
                self._answered()
        return True

    async def _per_item(self, chunk: list[LeasedEvent],
                        delivery: Delivery) -> tuple[list[LeasedEvent], bool]:
        """Apply a 207 that was not all accepted: (rows left to retry, False if stopping)."""
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
        if (accepted or dead) and not await self._settle(Settlement(accepted=accepted,
                                                                    dead=dead)):
            return chunk, False
        if dead:
            self._dead_lettered([r for r in chunk if r.seq in dead], dead, delivery.trace_id)
        if not rest:
            self._succeeded()
            return [], True
        if accepted:
            self._mark_success_time()
        if held is not None:
            await self._failed(held, None, ForwarderState.HELD, 207, trace_id=delivery.trace_id)
        else:
            await self._failed(f"{len(rest)} of {len(chunk)} events to retry: {retry_detail}",
                               delivery.retry_after, ForwarderState.RETRYING, 207,
                               trace_id=delivery.trace_id)
        return rest, True

    # ------------------------------------------------------------------ bookkeeping

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
                if not self._settle_failing:  # log the transition, not every repetition
                    self._settle_failing = True  # (settles of several requests may fail)
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
            if failures and self._settle_failing:
                log.info("sink %s: settled in the buffer after %d failed tries",
                         self.sink.name, failures)
                self._clear_error()
            self._settle_failing = False
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
        await wait_event(self._stopping, delay)
