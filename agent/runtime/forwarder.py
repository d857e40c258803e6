"""The forwarder: moves one sink's buffered events to it, exactly once, in order per machine.

One forwarder per sink; it is the only leaser of that sink's rows. It leases the oldest rows,
sends them in requests of at most ``sink.max_batch`` events with up to ``sink.max_in_flight``
requests at once, and settles every row it leased as accepted or dead. The sink classifies;
the forwarder decides (answers other than "all accepted": ``settling.py``)::

                  wake() / poll
          +------+ ----------> lease ---- rows ----> +------------+   requests in flight,
          | idle |                                   | delivering |   more leased while
          +------+ <--------- no rows -------------- +------------+   they run
                                                           |  ^
                           an answer not "all accepted":  v  | every row of it settled
                            wait for the other requests, +-------------+
                            then work on it alone:       | retrying /  |
                            backoff, split, dead-letter  | held        |
                                                         +-------------+

Invariants:

- Per machine order: a request never carries a row of a machine (``LeasedEvent.key``) that
  another request in flight carries (``batching.py``), rows are taken in seq order, and while
  any request's answer is being worked on alone nothing new is sent. So a machine's event never
  reaches the receiver before every earlier event of that machine was accepted or dead-lettered.
  Retries re-send the same rows in the same order; splits and bisection keep order too.
- Every leased row ends settled as accepted or dead, or pending again (never dropped): a stop
  gives unsettled rows back (below), a crash loses the leases with the process (the buffer
  starts with none). The receiver deduplicates by event id, so a row delivered but not yet
  settled at a crash is re-sent and answered 409, which settles it.
- Leases cannot be reclaimed while their rows are held: every lease first renews every row
  the forwarder holds (queued, in flight, being retried), in the same call on the buffer's
  thread, and only a lease reclaims expired rows. However long an outage lasts, no row is
  offered to this forwarder twice; "a duplicate on the wire" needs a crash or an answer lost
  in a timeout.
- Leasing ahead: while requests run, the next block is leased once fewer rows are waiting
  than one lease gives (at least one round of requests); an empty lease ends that until a
  ``wake()``.
- A stop lets the requests in flight finish and settle (``drain_timeout``), sends nothing new,
  and gives every row it still holds back to the buffer (pending at once). A forwarder that
  replaces this one (a reload) therefore starts from the oldest undelivered row of each
  machine; rows left leased would have been offered only after ``lease_timeout``, after the
  newer rows of the same machines (order broken). A row whose request was cancelled may have
  reached the receiver: it is sent again and deduplicated there.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from agent.runtime.batching import Lanes
from agent.runtime.settling import AsyncLeaseBuffer, ForwarderState, Settling
from agent.sinks.base import Delivery, Outcome, Sink
from agent.sinks.config import RetryPolicy
from buffer.base import LeasedEvent, Settlement
from config.tasks import cancel_and_wait, run_to_end, wait_event

__all__ = ["AsyncLeaseBuffer", "Forwarder", "ForwarderState"]

log = logging.getLogger(__name__)


class Forwarder(Settling):
    """Run with ``await run()`` in a task; ``wake()`` after new events are committed;
    ``status()`` for /status; ``await stop(drain_timeout)`` to end it."""

    def __init__(self, sink: Sink, buffer: AsyncLeaseBuffer, policy: RetryPolicy, *,
                 lease_batch: int | None = None, rng: random.Random | None = None,
                 poll_interval: float = 5.0) -> None:
        super().__init__(sink, buffer, policy, rng)
        self._in_flight = max(1, sink.max_in_flight)
        size = sink.max_batch
        # A lease feeds a few rounds of requests (one buffer round trip, many requests), and
        # the next one is asked for while a whole lease is still waiting: the buffer's thread
        # may be busy with a grouped deletion for a while (a 4096-row flush of a drain took
        # 50-150 ms on a loaded 2-core machine), and requests must not run dry behind it.
        # Measured (bench_sinks.py, NATS, 500 x 2): asking at 1000 waiting rows left the sink
        # with nothing in flight for 0.5-1.2 s of a 3.5 s drain; at 3000, 0.1-0.4 s. Capped
        # at 3000 rows (unless one round is more): 6000 leased ahead for HTTP 500 x 4 added
        # 23 MB of RSS to bench_drain.py.
        round_ = size * self._in_flight
        per_lease = round_ if size <= 1 else max(round_, min(3 * round_, 3000))
        self._lease_limit = max(1, lease_batch or per_lease)
        self._lease_ahead = max(round_, self._lease_limit) if size > 1 else round_
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None
        self._holding: dict[int, None] = {}  # seqs leased and not settled (renewed per lease)
        self._leasing: asyncio.Future[list[LeasedEvent]] | None = None  # the last lease call

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
        try:
            await self._loop()
        finally:
            self.state = ForwarderState.IDLE
            # To its end even if the stop cancels again meanwhile (cancel_and_wait repeats
            # its cancel each second): waiting for a slow lease must not leave the rows leased.
            await run_to_end(self._give_back())

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            # Clear before leasing: a wake() during the lease is then not lost.
            self._wake.clear()
            rows = await self._lease_or_back_off()
            if rows is None:
                continue
            if not rows:
                if self.state is ForwarderState.RETRYING:
                    self._answered()
                self.state = ForwarderState.IDLE
                await wait_event(self._wake, self._poll_interval)
                continue
            if self.state is ForwarderState.RETRYING:
                self._answered()  # only a lease failure leaves us here: the buffer is back
            if self.state is ForwarderState.IDLE:
                self.state = ForwarderState.DELIVERING
            if not await self._pump(rows, more=len(rows) >= self._lease_limit):
                # The last lease found nothing more and nothing was committed since (no
                # wake): idle without asking the buffer again (a hop to its thread per event
                # on a quiet agent). The poll below still looks every poll_interval.
                if self.state is ForwarderState.RETRYING:
                    self._answered()  # as after an empty lease
                self.state = ForwarderState.IDLE
                await wait_event(self._wake, self._poll_interval)

    async def _give_back(self) -> None:
        """Leaving: the rows still held go back to pending (see the module docstring)."""
        leasing = self._leasing
        if leasing is not None and not leasing.done():
            await asyncio.wait({leasing})  # its rows are held once it is done
        held, self._holding = list(self._holding), {}
        if not held:
            return
        try:
            # Shielded: a cancel while leaving must not lose the give-back half-way.
            await asyncio.shield(self._buffer.release(self.sink.name, held))
        except Exception:
            log.warning("sink %s: could not give back %d leased events; they are offered "
                        "again when their lease times out", self.sink.name, len(held),
                        exc_info=True)

    async def stop(self, drain_timeout: float) -> None:
        """Stop after the requests in flight (and their settlement); a backoff ends at once.
        Past ``drain_timeout`` they are cancelled. The rows still held are given back."""
        self._stopping.set()
        self._wake.set()
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=drain_timeout)
        if not done:
            log.warning("sink %s: delivery still in flight after %.1fs; abandoning it "
                        "(its events stay buffered)", self.sink.name, drain_timeout)
            await cancel_and_wait(task)

    # ------------------------------------------------------------------ leasing

    async def _lease(self) -> list[LeasedEvent]:
        # The buffer call runs on to the end even if this coroutine is cancelled (a stop
        # cancels the lease ahead): what it leased is held all the same, and given back.
        call = asyncio.ensure_future(self._buffer.lease(self.sink.name, self._lease_limit,
                                                        renew=list(self._holding)))
        call.add_done_callback(self._hold)
        self._leasing = call
        return await asyncio.shield(call)

    def _hold(self, call: asyncio.Future[list[LeasedEvent]]) -> None:
        if not call.cancelled() and call.exception() is None:
            self._holding.update(dict.fromkeys(r.seq for r in call.result()))

    async def _lease_or_back_off(self) -> list[LeasedEvent] | None:
        try:
            return await self._lease()
        except Exception as exc:
            if self.state is not ForwarderState.RETRYING:
                log.exception("sink %s: cannot lease events from the buffer", self.sink.name)
            await self._failed(f"cannot lease from the buffer: {exc}", None,
                               ForwarderState.RETRYING, attempt=False)
            return None

    def _release(self, rows: list[LeasedEvent]) -> None:
        for r in rows:
            self._holding.pop(r.seq, None)

    # ------------------------------------------------------------------ the delivery pump

    async def _pump(self, rows: list[LeasedEvent], *, more: bool = True) -> bool:
        """Deliver ``rows`` and what can be leased meanwhile, until nothing is left to send
        (or stopping: rows not sent stay leased). ``more``: the buffer may hold more rows
        (the lease that gave ``rows`` was full); a short lease means it held no more then,
        and only a ``wake()`` (a commit) says otherwise, so no lease ahead is asked for
        before one. Returns False when the buffer had nothing more at the end (the last
        lease was short and no wake came since), True otherwise."""
        size = self.sink.max_batch
        remaining = Lanes()
        remaining.add(rows)
        busy: set[str] = set()  # keys with a request in flight
        flights: dict[asyncio.Future[Delivery], list[LeasedEvent]] = {}
        # Settles of accepted requests run behind the next requests (the buffer's thread may
        # be busy with a lease or a grouped deletion); at most 2 x max_in_flight at a time.
        settling: set[asyncio.Future[bool]] = set()
        ahead: asyncio.Future[list[LeasedEvent]] | None = None
        troubled: list[tuple[list[LeasedEvent], Delivery]] = []
        # more: the last lease was full (or a wake() came since); a short lease means the
        # buffer held no more unheld rows at that moment.
        lease_failed = False
        try:
            while True:
                stopping = self._stopping.is_set()
                while remaining and not troubled and not stopping and \
                        len(flights) < self._in_flight:
                    free = self._in_flight - len(flights)
                    chunk = remaining.take(busy, size, remaining.cap(busy, free))
                    if not chunk:
                        break
                    busy.update(r.key for r in chunk)
                    flights[asyncio.ensure_future(self._send(chunk))] = chunk
                if self._wake.is_set():
                    self._wake.clear()
                    more = True
                if ahead is None and more and not troubled and not stopping and \
                        len(remaining) < self._lease_ahead:
                    ahead = asyncio.ensure_future(self._lease())
                if not flights:
                    if troubled:
                        if not await self._work_alone(troubled):
                            return True
                        troubled = []
                        continue
                    if ahead is None and not settling:
                        return more or stopping or lease_failed
                waiting: set[asyncio.Future[Any]] = set(flights)
                if ahead is not None:
                    waiting.add(ahead)
                if settling and (not waiting or len(settling) >= 2 * self._in_flight):
                    waiting |= settling
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for fut in [f for f in done if f in settling]:
                    settling.discard(fut)
                    if not fut.result():
                        return True  # stopping while the buffer would not settle
                if ahead is not None and ahead in done:
                    got, ahead = ahead, None
                    try:
                        leased = got.result()
                    except Exception:
                        log.exception("sink %s: cannot lease events from the buffer",
                                      self.sink.name)
                        # The run loop leases (and backs off) next, at once.
                        leased, more, lease_failed = [], False, True
                    more = more and len(leased) >= self._lease_limit
                    remaining.add(leased)
                for fut in [f for f in done if f in flights]:
                    chunk = flights.pop(fut)
                    # Accepted (or answered for good) at the receiver: the machine is free
                    # for its next request even before the settle is written.
                    busy.difference_update(r.key for r in chunk)
                    delivery = fut.result()
                    if delivery.outcome is Outcome.ACCEPTED:
                        settling.add(asyncio.ensure_future(self._settle_accepted(chunk)))
                    else:
                        troubled.append((chunk, delivery))
        finally:
            await self._wind_down(flights, ahead, settling)

    async def _send(self, chunk: list[LeasedEvent]) -> Delivery:
        return await self._attempt(chunk)

    async def _settle_accepted(self, chunk: list[LeasedEvent]) -> bool:
        """Settle a request the receiver accepted whole; False if stopping first (its rows
        stay leased and are re-sent after a restart, answered 409)."""
        if not await self._settle(Settlement(accepted=[r.seq for r in chunk])):
            return False
        self._release(chunk)
        self._succeeded()
        return True

    async def _work_alone(self, troubled: list[tuple[list[LeasedEvent], Delivery]]) -> bool:
        """Resolve each troubled request on its own, oldest first; False if stopping."""
        first = True
        for chunk, delivery in sorted(troubled, key=lambda t: t[0][0].seq):
            # The others' RETRY/HOLD answers are as old as the first one's recovery: ask again.
            stale = not first and delivery.outcome in (Outcome.RETRY, Outcome.HOLD)
            if stale:
                self.retried_total += 1  # a failed attempt all the same
            if not await self._resolve(chunk, None if stale else delivery):
                return False
            self._release(chunk)
            first = False
        return True

    async def _wind_down(self, flights: dict[asyncio.Future[Delivery], list[LeasedEvent]],
                         ahead: asyncio.Future[list[LeasedEvent]] | None,
                         settling: set[asyncio.Future[bool]]) -> None:
        """Leaving the pump (done, stopping, cancelled): requests and the lease ahead are
        cancelled (their rows stay leased); settles already started are waited for (they
        finish at once when stopping, and the buffer call itself is shielded)."""
        pending: list[asyncio.Future[Any]] = list(flights)
        if ahead is not None:
            pending.append(ahead)
        for fut in pending:
            if not fut.done():
                fut.cancel()
        if pending or settling:
            await asyncio.gather(*pending, *settling, return_exceptions=True)
