"""The southbound interface: what every protocol source provides.

A ``Source`` reads one device (or one broker) and turns what it reads into ``TagSample``s.

Contract (docs/architecture.md):

- The constructor does no I/O (validate early, connect late).
- ``run(out)`` is **one session**: connect, call ``out.connected()`` once the session works,
  then emit samples until the session breaks. It never returns normally; it ends by raising a
  ``RetryableError`` (translated from the library's exception with ``raise ... from``) or by
  being cancelled. The supervisor in ``agent/supervisor.py`` owns reconnect, backoff and
  log-once; a source does not retry its own connection.
- Within a session, a tag that cannot be read or decoded is emitted with ``Quality.BAD`` and a
  ``detail``; the other tags keep flowing. A lost connection marks every tag bad (the supervisor
  does this with ``bad_samples``), never a guessed value.
- ``out.emit`` is called on the event loop thread and must not block; it takes a batch.
- ``probe()`` connects, reads every tag once, disconnects: for ``edge-agent probe``.
- A source whose peer redelivers what was not acknowledged (MQTT QoS 1) acknowledges only
  once the effect is durable: after ``out.emit(batch)`` it hands ``out.when_committed(ack)``
  the acknowledgement of that batch, and the runtime calls it after the commit that holds
  everything emitted so far. A sink without ``when_committed`` (a probe, a test) is not
  durable: the source acknowledges at once. ``DurableSampleSink`` spells this out.

States of a supervised source::

    starting --connected()--> up --RetryableError--> down --backoff--> starting
                                         ^                                |
                                         +------------connected()---------+
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from config.model import Quality, TagSample, utcnow

__all__ = ["Ack", "DurableSampleSink", "SampleSink", "Source", "bad_samples", "next_poll_time"]

Ack = Callable[[], None]


class SampleSink(Protocol):
    def emit(self, samples: Sequence[TagSample]) -> None:
        """Hand over a batch of samples (non-blocking, event loop thread)."""

    def connected(self) -> None:
        """The session is established and reading works."""


class DurableSampleSink(SampleSink, Protocol):
    def when_committed(self, ack: Ack, *, soon: bool = False) -> None:
        """Call ``ack`` (on the event loop thread) once everything emitted before this call is
        committed: the events it caused and the detector states it changed. Never called if
        the process dies first, nor for samples the sink refused (the agent is stopping): the
        peer then redelivers. ``soon`` asks for that commit without waiting out the group
        commit interval (the peer's window of unacknowledged messages is filling up)."""


class Source(ABC):
    """One device or broker. Subclasses live in ``protocols/<name>/source.py``."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Set by the runtime: tag id -> the time since which detection lacks that tag's values
        # (None: nothing to catch up on). A source that can read the server's history (OPC UA
        # with ``history``) backfills from there after a (re)connect, before live values.
        self.resume_from: Callable[[str], datetime | None] | None = None

    @property
    @abstractmethod
    def tag_ids(self) -> list[str]:
        """The configured tag ids this source produces samples for."""

    @property
    @abstractmethod
    def stale_after(self) -> float:
        """Seconds without a good sample after which a tag counts as stale."""

    @abstractmethod
    async def run(self, out: SampleSink) -> None:
        """One session; see the module docstring."""

    @abstractmethod
    async def probe(self) -> list[TagSample]:
        """Connect, read every tag once, disconnect. Raises RetryableError if unreachable."""


def bad_samples(tags: Sequence[str], detail: str) -> list[TagSample]:
    """Bad-quality samples for every tag (the session is lost)."""
    now = utcnow()
    return [TagSample(tag=t, value=None, quality=Quality.BAD, agent_time=now, detail=detail)
            for t in tags]


def next_poll_time(last_tick: float, now: float, interval: float) -> float:
    """The first tick ``last_tick + k * interval`` (k >= 1) that is not in the past.

    Drift-free: ticks stay on the grid of the first one. A poll that overran skips the missed
    ticks rather than firing them back to back.
    """
    tick = last_tick + interval
    if now > tick and interval > 0:
        tick += math.ceil((now - tick) / interval) * interval
    return tick
