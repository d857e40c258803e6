"""``AsyncBuffer``: the asyncio face of a ``Buffer``, confined to one writer thread.

Every call runs on one dedicated thread (a single-worker ``ThreadPoolExecutor``), in the order
the coroutines were called, so the SQLite connection is only ever used by that thread and the
event loop never blocks on an fsync. Hand it batches, never single rows: a thread hop costs
more than a row's write (docs/library-notes.md).

Cancellation: cancelling a coroutine does not stop its call on the writer thread. A cancelled
``append`` may still have committed; because event ids are deterministic, appending the same
events again is harmless (duplicates are ignored).

Lifecycle: ``open`` -> calls -> ``aclose``. ``aclose`` is idempotent and safe after a failed
``open``; calls after it raise ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from buffer.base import (
    AppendResult,
    Buffer,
    BufferStats,
    DeadLetter,
    Drops,
    LeasedEvent,
    NewEvent,
    Settlement,
)

__all__ = ["AsyncBuffer"]

_T = TypeVar("_T")


class AsyncBuffer:
    def __init__(self, buffer: Buffer, *, thread_name: str = "buffer-writer") -> None:
        self.buffer = buffer
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=thread_name)

    async def _call(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._executor is None:
            raise RuntimeError("buffer is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def open(self, sinks: Sequence[str]) -> None:
        await self._call(self.buffer.open, list(sinks))

    async def append(self, events: Sequence[NewEvent], states: Mapping[str, str], *,
                     reported: Drops | None = None) -> AppendResult:
        # Copies: the caller may reuse its lists while the writer thread works.
        if reported is None:
            return await self._call(self.buffer.append, list(events), dict(states))
        return await self._call(functools.partial(self.buffer.append, reported=reported),
                                list(events), dict(states))

    async def load_states(self) -> dict[str, str]:
        return await self._call(self.buffer.load_states)

    async def lease(self, sink: str, limit: int,
                    renew: Sequence[int] = ()) -> list[LeasedEvent]:
        """Lease; first renew the rows in ``renew`` (what the caller still holds), in the same
        call on the writer thread, so the lease cannot offer those again."""
        return await self._call(self._renew_and_lease, sink, limit, list(renew))

    def _renew_and_lease(self, sink: str, limit: int, renew: list[int]) -> list[LeasedEvent]:
        if renew:
            self.buffer.renew(sink, renew)
        return self.buffer.lease(sink, limit)

    async def release(self, sink: str, seqs: Sequence[int]) -> None:
        await self._call(self.buffer.release, sink, list(seqs))

    async def settle(self, sink: str, settlement: Settlement) -> None:
        await self._call(self.buffer.settle, sink, settlement)

    async def stats(self) -> BufferStats:
        return await self._call(self.buffer.stats)

    async def take_drops(self) -> Drops:
        return await self._call(self.buffer.take_drops)

    async def peek_drops(self) -> Drops:
        return await self._call(self.buffer.peek_drops)

    async def dead_letters(self, sink: str | None = None,
                           limit: int = 1000) -> list[DeadLetter]:
        return await self._call(self.buffer.dead_letters, sink, limit)

    async def replay_dead_letters(self, sink: str | None = None,
                                  ids: Sequence[str] | None = None) -> int:
        return await self._call(self.buffer.replay_dead_letters, sink,
                                None if ids is None else list(ids))

    async def purge_dead_letters(self, sink: str | None = None,
                                 ids: Sequence[str] | None = None) -> int:
        return await self._call(self.buffer.purge_dead_letters, sink,
                                None if ids is None else list(ids))

    async def pending(self, sink: str | None = None, limit: int = 1000) -> list[LeasedEvent]:
        return await self._call(self.buffer.pending, sink, limit)

    async def aclose(self) -> None:
        """Close the buffer on its thread, then stop the thread. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(executor, self.buffer.close)
        finally:
            # Everything queued before has run (one worker, FIFO): nothing to wait for.
            executor.shutdown(wait=False)
