"""Supervision of long-lived sessions: reconnect with backoff, log transitions once, watchdog.

Every source runs under one ``Supervisor`` (docs/architecture.md: one dead device never stalls
another). The supervised callable is **one session**; when it raises, the supervisor records the
error, waits a backoff delay (exponential, full jitter) and starts a new session.

States::

    starting --mark_up()--> up --session ends--> down --backoff--> starting
                                                  ^                   |
                                                  +---session ends----+

Logging (style rule 8): one WARNING when the component becomes unavailable, one INFO when it
recovers (with how long it was down and how many attempts it took); repeated failures while
down are DEBUG. A watchdog ends a session that looks alive but has not shown progress
(``progress()``) for ``watchdog`` seconds, so a hung peer cannot keep a session open forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from config.backoff import Backoff
from config.errors import EdgeAgentError
from config.tasks import cancel_and_wait

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)


class _WatchdogExpired(Exception):
    pass


class Supervisor:
    def __init__(self, kind: str, name: str, session: Callable[[], Awaitable[None]], *,
                 backoff: Backoff, watchdog: float | None = None,
                 on_down: Callable[[str], None] | None = None) -> None:
        self.kind = kind
        self.name = name
        self._session = session
        self._backoff = backoff
        self._watchdog = watchdog
        self._on_down = on_down
        self.state = "starting"
        self.last_error: str | None = None
        self.since = time.time()
        self.attempts = 0
        self._down_since_mono: float | None = None
        self._last_progress = time.monotonic()

    def mark_up(self) -> None:
        """The session is established (called by the session itself)."""
        self.progress()
        if self.state == "up":
            return
        if self._down_since_mono is not None:
            log.info("%s %s recovered after %.1fs and %d attempt(s)", self.kind, self.name,
                     time.monotonic() - self._down_since_mono, self.attempts,
                     extra={"component": self.name, "transition": "up"})
        else:
            log.info("%s %s is connected", self.kind, self.name,
                     extra={"component": self.name, "transition": "up"})
        self.state, self.since = "up", time.time()
        self._down_since_mono = None
        self.last_error = None
        self.attempts = 0
        self._backoff.reset()

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def status(self) -> dict[str, object]:
        return {"state": self.state, "since": self.since, "last_error": self.last_error,
                "attempts": self.attempts}

    async def run(self) -> None:
        """Run sessions until cancelled."""
        while True:
            self._last_progress = time.monotonic()
            try:
                await self._one_session()
                error = "session ended"
            except asyncio.CancelledError:
                raise
            except _WatchdogExpired:
                error = f"no progress for {self._watchdog:g}s (watchdog)"
            except EdgeAgentError as exc:
                error = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug in a plugin must not end supervision
                log.exception("%s %s session failed unexpectedly", self.kind, self.name)
                error = f"{type(exc).__name__}: {exc}"
            self._went_down(error)
            await asyncio.sleep(self._backoff.next_delay())

    async def _one_session(self) -> None:
        if self._watchdog is None:
            await self._session()
            return
        task = asyncio.ensure_future(self._session())
        try:
            while not task.done():
                idle = time.monotonic() - self._last_progress
                left = self._watchdog - idle
                if left <= 0:
                    # Not a suppressed await: a stop cancelling us meanwhile must end
                    # supervision, not be taken for the session's own cancel.
                    await cancel_and_wait(task)
                    raise _WatchdogExpired
                await asyncio.wait([task], timeout=left)
            task.result()
        finally:
            # Cancelled again while it runs on: a cancel lost in the protocol library must
            # not leave a session polling the device after supervision ended.
            await cancel_and_wait(task)

    def _went_down(self, error: str) -> None:
        self.attempts += 1
        self.last_error = error
        if self.state != "down":
            log.warning("%s %s is unavailable: %s; retrying with backoff", self.kind, self.name,
                        error, extra={"component": self.name, "transition": "down"})
            self.state, self.since = "down", time.time()
            self._down_since_mono = time.monotonic()
        else:
            log.debug("%s %s still unavailable (attempt %d): %s", self.kind, self.name,
                      self.attempts, error)
        if self._on_down is not None:
            self._on_down(error)
