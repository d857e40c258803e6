"""Waits that keep a cancel, and cancels that end a task (config/tasks.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest

from config.tasks import cancel_all, cancel_and_wait, run_to_end, wait_event, within

Waiter = Callable[[asyncio.Event], Awaitable[object]]


async def _by_wait_event(ev: asyncio.Event) -> object:
    return await wait_event(ev, 10)


async def _by_within(ev: asyncio.Event) -> object:
    return await within(ev.wait(), 10)


async def _by_stdlib_wait_for(ev: asyncio.Event) -> object:
    return await asyncio.wait_for(ev.wait(), 10)


async def _lost_cancels(wait: Waiter, rounds: int = 60) -> int:
    """A loop woken all the time, as a forwarder is by commits, cancelled at each step of the
    loop's schedule after a wake; counts the cancels it survived."""
    lost = 0
    for i in range(rounds):
        ev = asyncio.Event()

        async def woken(ev: asyncio.Event = ev) -> None:
            while True:
                await wait(ev)
                ev.clear()

        task = asyncio.create_task(woken())
        await asyncio.sleep(0)
        ev.set()
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if not done:
            lost += 1
            await cancel_and_wait(task, again_after=0.05)
    return lost


@pytest.mark.parametrize("wait", [_by_wait_event, _by_within])
async def test_a_cancel_arriving_with_the_wake_up_is_kept(wait: Waiter) -> None:
    assert await _lost_cancels(wait) == 0


async def test_the_stdlib_wait_for_of_this_python_loses_such_cancels() -> None:
    """Why the module exists (ruff bans asyncio.wait_for in our code). When Python fixes it
    (3.12 does), this test says so and the ban can go."""
    import sys

    lost = await _lost_cancels(_by_stdlib_wait_for, rounds=12)
    if sys.version_info >= (3, 12):
        assert lost == 0
    else:
        assert lost > 0


async def test_wait_event_and_within_time_out() -> None:
    assert await wait_event(asyncio.Event(), 0.01) is False
    ev = asyncio.Event()
    ev.set()
    assert await wait_event(ev, 0) is True
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)
    assert await within(asyncio.sleep(0, "done"), None) == "done"


def _stubborn(swallow: int) -> tuple[asyncio.Task[None], list[int]]:
    """A task that takes its first ``swallow`` cancels for nothing, as a library's wait_for
    can."""
    seen = [0]

    async def body() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen[0] += 1
                if seen[0] > swallow:
                    raise

    return asyncio.create_task(body(), name="stubborn"), seen


async def test_cancel_and_wait_cancels_again_until_the_task_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    task, seen = _stubborn(swallow=2)
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="config.tasks"):
        await cancel_and_wait(task, again_after=0.02)
    assert task.cancelled()
    assert seen[0] == 3
    assert "stubborn ran on after a cancel; it ended after 3 cancels" in caplog.text


async def test_a_cleanup_is_not_interrupted_by_a_second_cancel_at_once() -> None:
    cleaned = asyncio.Event()

    async def body() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0.05)  # a short cleanup that awaits
            cleaned.set()

    tasks = [asyncio.create_task(body()) for _ in range(3)]
    await asyncio.sleep(0)
    await cancel_all(tasks, again_after=1.0)
    assert cleaned.is_set()
    assert all(t.cancelled() for t in tasks)


async def test_failures_of_the_task_stay_with_it_and_the_callers_cancel_propagates() -> None:
    async def fails() -> None:
        raise ValueError("at stop")

    failing = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(failing)  # done already: nothing raised, exception retrieved
    assert isinstance(failing.exception(), ValueError)

    inner, seen = _stubborn(swallow=1)
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait(inner, again_after=0.05))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    # The caller's cancel came through, but only once the task had ended (asked again after
    # its first cancel was swallowed).
    assert inner.cancelled()
    assert seen[0] == 2


async def test_a_stop_of_a_stop_still_ends_the_inner_task() -> None:
    """Stops nest (a supervisor stops its session in a finally). The outer stop's repeated
    cancels must not end the inner wait before it repeats its own cancel: the inner task,
    whose first cancel was lost, would run on with nobody left to stop it."""
    inner, seen = _stubborn(swallow=1)

    async def supervising() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await cancel_and_wait(inner, again_after=0.2)

    outer = asyncio.create_task(supervising())
    await asyncio.sleep(0)
    await cancel_and_wait(outer, again_after=0.05)  # repeats faster than the inner wait
    assert outer.cancelled()
    assert inner.done(), "the inner task runs on after its stop ended"
    assert seen[0] == 2


async def test_cancel_all_waits_for_every_task_when_its_caller_is_cancelled() -> None:
    tasks = [_stubborn(swallow=1)[0] for _ in range(3)]
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_all(tasks, again_after=0.05))
    await asyncio.sleep(0.01)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert all(t.cancelled() for t in tasks)


async def test_run_to_end_finishes_a_cleanup_through_repeated_cancels() -> None:
    finished = asyncio.Event()

    async def give_back() -> str:
        await asyncio.sleep(0.15)
        finished.set()
        return "given back"

    async def leaving() -> str:
        return await run_to_end(give_back())

    task = asyncio.create_task(leaving())
    await asyncio.sleep(0)
    await cancel_and_wait(task, again_after=0.02)  # several cancels during the cleanup
    assert task.cancelled() and finished.is_set()
    assert await run_to_end(give_back()) == "given back"
