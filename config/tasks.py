"""Waiting with a time limit, and cancelling a task so that it really ends.

Why this module exists: on Python 3.11, ``asyncio.wait_for`` returns the inner result when a
cancellation of the waiting task arrives in the same loop iteration as that result (fixed in
3.12 by rewriting it on ``asyncio.timeout``). The cancellation is then lost: a loop that
waits on a frequently set event, or a library waiting on frequent responses, runs on, and
``task.cancel(); await task`` waits for ever. Our own code therefore never calls
``asyncio.wait_for`` (ruff bans it) and waits with ``asyncio.timeout`` instead, through
``wait_event`` and ``within`` below.

The libraries do call it: pymodbus for each response, asyncua's ``Subscription.next_event``,
nats-py for each request. So a cancel sent into their code can be swallowed too.
``cancel_and_wait`` is the one way the agent stops a task: it cancels again while the task
runs on, so a lost cancellation costs one more interval instead of a stop that never ends.

Invariants of ``cancel_and_wait``:
- when it returns, the task is done (cancelled, failed or finished);
- the task's own exception or CancelledError never reaches the caller (it is retrieved, so
  asyncio does not log "exception was never retrieved");
- a cancellation of the *caller* is not swallowed: it propagates once the task is done (it
  is held back until then, and the task is still cancelled again each ``again_after``).

Why the caller's cancel waits for the task: stops nest. A supervisor cancelled by a stop runs
``cancel_and_wait(session)`` in its ``finally``, and the stop cancels the supervisor again
after a second. Were that second cancel let through at once, it would end the supervisor's
wait before its own repeat, and a session whose one cancel a library lost would run on with
nobody left to stop it (still polling the PLC after a reload replaced its source). The same
is true of ``asyncio.TaskGroup``, which also waits for its children when it is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a task has to end after a cancel before it is cancelled again. Long enough for
#: a cleanup that awaits a shielded close (a session close is bounded by its own timeout and
#: a second cancel only stops waiting for it), short enough that a lost cancel is a blip.
AGAIN_AFTER = 1.0


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True when it is set."""
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    return event.is_set()


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable`` with a time limit (TimeoutError past it), without the lost
    cancellation of ``asyncio.wait_for`` on Python 3.11."""
    async with asyncio.timeout(timeout):
        return await awaitable


async def run_to_end(awaitable: Awaitable[T]) -> T:
    """``await awaitable`` to its end even when the caller is cancelled meanwhile; the
    caller's cancel is re-raised once it has ended. For a cleanup that must not stop half-way
    because a stop repeats its cancel (a give-back of leases); only for work that its own
    calls bound."""
    fut = asyncio.ensure_future(awaitable)
    held: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait({fut})
        except asyncio.CancelledError as exc:
            held = held or exc
    if held is not None:
        if not fut.cancelled():
            fut.exception()  # retrieved: the caller's cancel is what it hears of
        raise held
    return fut.result()


async def cancel_and_wait(task: asyncio.Future[Any] | None, *,
                          again_after: float = AGAIN_AFTER) -> None:
    """Cancel ``task`` and return once it is done (see the module docstring)."""
    if task is None or task.done():
        return
    task.cancel()
    await _until_done(task, again_after)


async def cancel_all(tasks: list[asyncio.Task[Any]], *,
                     again_after: float = AGAIN_AFTER) -> None:
    """Cancel every task at once, then wait until each is done."""
    for t in tasks:
        t.cancel()
    held: asyncio.CancelledError | None = None
    for t in tasks:
        try:
            await _until_done(t, again_after)
        except asyncio.CancelledError as exc:  # the caller's, held until every task is done
            held = held or exc
    if held is not None:
        raise held


async def _until_done(task: asyncio.Future[Any], again_after: float) -> None:
    # A cancel is only repeated after ``again_after``: a second cancel sent at once would
    # interrupt the cleanup (a finally with an await) that the first one started.
    loop = asyncio.get_running_loop()
    asks = 1
    again_at = loop.time() + again_after
    held: asyncio.CancelledError | None = None  # the caller's own cancel, until the task ends
    while not task.done():
        if loop.time() >= again_at:
            task.cancel()
            asks += 1
            again_at = loop.time() + again_after
        try:
            await asyncio.wait({task}, timeout=max(0.0, again_at - loop.time()))
        except asyncio.CancelledError as exc:
            # The caller's (a stop of a stop): re-raised once the task is done. The schedule
            # above stays, so repeated cancels of the caller do not postpone the repeat.
            held = held or exc
    if asks > 1:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        # Either a cleanup that took longer than ``again_after`` or a lost cancellation.
        log.warning("task %s ran on after a cancel; it ended after %d cancels, %.1fs apart",
                    name, asks, again_after)
    if not task.cancelled():
        task.exception()  # retrieved: a failure at stop is not news
    if held is not None:
        raise held
