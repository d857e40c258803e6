"""The buffer interface: durable events, per-sink delivery state, detector state.

Every implementation (``sqlite.py`` in production, ``memory.py`` as the reference for the
contract tests) keeps these invariants (docs/buffer.md):

1. ``append(events, states)`` is atomic: the events and the detector states that produced them
   are committed together or not at all. An event id is stored at most once (a second append of
   the same id is ignored, not duplicated).
2. Each event gets one delivery row per sink known at append time. Row states per sink::

       pending --lease()--> leased --settle(accepted)--> (deleted)
                              |     --settle(dead)-----> dead_letter --replay--> pending
                              |     --settle(retry)----> pending
                              +---lease expiry / reopen---> pending

   A leased row is never deleted before it is settled. Leases left by a crash return to pending
   on open; a lease older than its timeout is offered again.
3. ``lease(sink, n)`` returns the oldest rows of that sink in append order (``seq``), so first
   deliveries keep detection order. One sink's rows never block another sink's.
4. An event whose rows are all settled as accepted is deleted; dead letters are kept until
   replayed or purged.
5. Capacity (``max_size``): ``drop_oldest`` deletes the oldest pending events to make room,
   ``reject_new`` refuses the new ones; either way the count per event type is recorded and
   read by ``peek_drops()`` so the runtime can emit a ``plantedge.data.gap`` event; the append
   that stores that event names the counts it reports (``reported``) and they leave the drops
   in the same transaction, so a crash leaves either the counts or their report, never neither.
   Nothing is dropped silently.
6. Disk full is a state: ``append`` raises ``StorageFullError`` and commits nothing; everything
   committed before stays; later appends succeed once space returns.

The interface is synchronous: the runtime calls it from one dedicated writer thread
(``AsyncBuffer`` in ``buffer/writer.py``), handing it batches, never single rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from config.errors import FatalError, RetryableError

__all__ = [
    "AppendResult",
    "Buffer",
    "BufferCorruptError",
    "BufferOpenError",
    "BufferStats",
    "BufferUnavailableError",
    "DeadLetter",
    "Drops",
    "LeasedEvent",
    "NewEvent",
    "Settlement",
    "SinkStats",
    "check_batch",
]


class BufferCorruptError(FatalError):
    """The buffer file is not a readable SQLite database (or a page of it is damaged)."""


class BufferOpenError(FatalError):
    """The buffer file cannot be opened at all (permissions, missing directory, read-only fs)."""


class BufferUnavailableError(RetryableError):
    """A storage call failed for a transient reason (lock held too long, I/O error)."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event ready to be stored: its id, ordering key, type, time and CloudEvent JSON."""

    id: str
    key: str  # ordering key (machine id)
    type: str
    time: str  # RFC 3339, as in the payload
    payload: str  # the CloudEvent as JSON text, exactly what is delivered


@dataclass(frozen=True, slots=True)
class LeasedEvent:
    seq: int
    id: str
    key: str
    type: str
    payload: str
    attempts: int  # deliveries tried before this lease


@dataclass(frozen=True, slots=True)
class DeadLetter:
    sink: str
    seq: int
    id: str
    type: str
    payload: str
    status: int | None
    detail: str
    failed_at: str  # RFC 3339


@dataclass(slots=True)
class Settlement:
    """The outcome of one delivery attempt for leased rows of one sink (by seq)."""

    accepted: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    # seq -> (HTTP status or None, excerpt of the reason)
    dead: dict[int, tuple[int | None, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AppendResult:
    stored: int  # new events committed (duplicates of stored ids are not counted)
    rejected: int  # refused by reject_new (counted in drops as well)
    # Whether the buffer holds drops not yet reported (``peek_drops`` would find some) once
    # this append committed: a caller that reports drops need not ask after every commit.
    # True when unknown (the safe side: the caller looks).
    unreported_drops: bool = True


@dataclass(slots=True)
class Drops:
    """Events dropped by the capacity policy since the last ``take_drops()``."""

    by_type: dict[str, int] = field(default_factory=dict)
    # Delivery rows lost per sink and event type: which sink lost what (a sink that had
    # already delivered an event lost nothing when it was dropped).
    by_sink: dict[str, dict[str, int]] = field(default_factory=dict)
    first_at: str | None = None
    last_at: str | None = None

    @property
    def total(self) -> int:
        return sum(self.by_type.values())


@dataclass(frozen=True, slots=True)
class SinkStats:
    pending: int
    leased: int
    dead_letters: int
    oldest_pending_time: str | None  # event time of the oldest undelivered event


@dataclass(frozen=True, slots=True)
class BufferStats:
    events: int
    size_bytes: int
    max_size: int
    sinks: dict[str, SinkStats]
    dropped_total: int


def check_batch(events: Sequence[NewEvent], states: Mapping[str, str]) -> None:
    """Refuse malformed input before anything is written: a ``ValueError`` naming the event
    and field (a bad batch is the caller's bug; retrying it would never succeed)."""
    # Fast path (it runs on every commit, for every event): decide "all good" in one pass,
    # and only walk the fields one by one to name the problem.
    if all(isinstance(e, NewEvent) and isinstance(e.id, str) and e.id
           and isinstance(e.key, str) and isinstance(e.type, str) and isinstance(e.time, str)
           and isinstance(e.payload, str) for e in events) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in states.items()):
        return
    for e in events:
        if not isinstance(e, NewEvent):
            raise ValueError(f"expected NewEvent, got {type(e).__name__}")
        for name in ("id", "key", "type", "time", "payload"):
            value = getattr(e, name)
            if not isinstance(value, str) or (name == "id" and not value):
                raise ValueError(f"event {e.id!r}: {name} must be non-empty text"
                                 if name == "id" else
                                 f"event {e.id!r}: {name} must be text, not "
                                 f"{type(value).__name__}")
    for key, state in states.items():
        if not isinstance(key, str) or not isinstance(state, str):
            raise ValueError(f"detector state {key!r}: key and state must be text")


class Buffer(ABC):
    """See the module docstring for the invariants every implementation keeps."""

    @abstractmethod
    def open(self, sinks: Sequence[str]) -> None:
        """Open (create or migrate), reclaim leases, register the sink names."""

    @abstractmethod
    def close(self) -> None:
        """Idempotent; safe after a failed open."""

    @abstractmethod
    def append(self, events: Sequence[NewEvent], states: Mapping[str, str], *,
               reported: Drops | None = None) -> AppendResult:
        """Commit events and detector states (key -> JSON) in one transaction.

        ``reported``: drop counts (from ``peek_drops``) that a data-gap event in ``events``
        reports; they are subtracted from the recorded drops in the same transaction.
        Malformed input raises ``ValueError`` (see ``check_batch``) and writes nothing."""

    @abstractmethod
    def load_states(self) -> dict[str, str]:
        """Detector states as last committed."""

    @abstractmethod
    def lease(self, sink: str, limit: int) -> list[LeasedEvent]:
        """Lease up to ``limit`` of the oldest pending rows of ``sink`` (append order)."""

    @abstractmethod
    def renew(self, sink: str, seqs: Sequence[int]) -> None:
        """Restart the lease timeout of these rows if they are still leased (others are
        ignored): a leaser renews what it holds, so its rows in flight are never offered
        again while it lives."""

    @abstractmethod
    def release(self, sink: str, seqs: Sequence[int]) -> None:
        """Give back rows this leaser holds and will not settle (a forwarder that stops):
        they are pending again at once. Rows not leased (settled, dead, gone) are left
        alone, so an accepted row is never offered again by a release."""

    @abstractmethod
    def settle(self, sink: str, settlement: Settlement) -> None:
        """Apply one attempt's outcome; rows not named stay leased."""

    @abstractmethod
    def stats(self) -> BufferStats:
        ...

    @abstractmethod
    def take_drops(self) -> Drops:
        """Drops since the last call (then reset). The runtime uses ``peek_drops`` and
        ``append(reported=...)`` instead, which cannot lose the counts in a crash."""

    @abstractmethod
    def peek_drops(self) -> Drops:
        """Drops recorded and not yet reported (nothing is cleared)."""

    @abstractmethod
    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        ...

    @abstractmethod
    def replay_dead_letters(self, sink: str | None = None,
                            ids: Sequence[str] | None = None) -> int:
        """Return dead letters (all, or those with these event ids) to pending; the count."""

    @abstractmethod
    def purge_dead_letters(self, sink: str | None = None,
                           ids: Sequence[str] | None = None) -> int:
        """Delete dead letters (all, or those with these event ids); the count of rows deleted.

        An event is deleted with its last delivery row."""

    @abstractmethod
    def pending(self, sink: str | None = None, limit: int = 1000) -> list[LeasedEvent]:
        """Undelivered rows (pending or leased), oldest first, without leasing them."""
