"""A stop that arrives while the watchdog is ending a hung session still ends supervision.

Before, the watchdog waited for the hung session with a suppressed ``await``: a stop's cancel
arriving in that window was swallowed, supervision went on with a new session, and the
runtime's stop waited for it for ever.
"""

from __future__ import annotations

import asyncio

import pytest

from agent.runtime.supervisor import Supervisor
from config.backoff import Backoff
from config.tasks import cancel_and_wait


async def test_a_stop_during_the_watchdogs_cancel_ends_supervision() -> None:
    cleaning = asyncio.Event()
    sessions = 0

    async def hung_session() -> None:
        nonlocal sessions
        sessions += 1
        try:
            await asyncio.sleep(3600)  # no progress: the watchdog fires
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0.2)  # a session that takes a moment to close its link
            raise

    sup = Supervisor("source", "plc", hung_session, backoff=Backoff(0.01, 0.01),
                     watchdog=0.05)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(cleaning.wait(), timeout=5)
    task.cancel()  # the stop, while the watchdog waits for the session to finish
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "supervision went on after the stop"
    assert task.cancelled()
    assert sessions == 1


async def test_a_stop_while_a_session_runs_ends_supervision() -> None:
    started = asyncio.Event()

    async def session() -> None:
        started.set()
        await asyncio.sleep(3600)

    sup = Supervisor("source", "plc", session, backoff=Backoff(0.01, 0.01), watchdog=30)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(started.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5)


async def test_a_session_that_lost_its_cancel_ends_with_the_supervision() -> None:
    """A reload stops a source (cancel_and_wait on the supervisor) while its session sits in a
    library that loses the first cancel (asyncio.wait_for on 3.11). The supervisor's own
    repeated cancel of the session must still happen: before, the stop's repeat ended the
    supervisor's wait first and the session kept polling with nobody left to stop it."""
    started = asyncio.Event()
    cancels = 0
    sessions: list[asyncio.Task[object]] = []

    async def session() -> None:
        nonlocal cancels
        sessions.append(asyncio.current_task())  # type: ignore[arg-type]
        started.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise
                # the first one is lost, as wait_for loses it when a response arrives with it

    sup = Supervisor("source", "plc", session, backoff=Backoff(0.01, 0.01), watchdog=30)
    task = asyncio.create_task(sup.run())
    await asyncio.wait_for(started.wait(), timeout=5)
    await cancel_and_wait(task, again_after=0.05)  # the stop repeats faster than supervision
    assert task.cancelled()
    assert cancels == 2, "the session ran on after its supervision was stopped"
    assert len(sessions) == 1 and sessions[0].done()
