"""Leases and grouped settles of the SQLite buffer, held in the process's memory.

A lease never meant anything outside the process that took it (every open returned leased rows
to pending), so since schema version 2 it is not written at all: a delivery row in the file is
``pending`` or ``dead``, and this table says which pending rows this process holds::

    pending (file) --take--> leased --accept--> settled --flush--> (row deleted in the file)
         ^                     |  \\--retry / dead: written at once, leaves the table
         +---expiry / release / give_back (the leaser stopped)

- ``leased``: seq -> deadline (the buffer's monotonic clock). ``renew`` moves a deadline;
  ``expire`` returns rows whose deadline passed to pending (they are offered again).
- ``settled``: accepted rows whose deletion is not committed yet. The buffer deletes them in
  the next write transaction (an append carries them for free) or when enough piled up or
  they waited long enough (``SqliteBuffer.settle_delay``). A crash before that only means the
  rows are pending again at the next start and re-sent; the receiver deduplicates them.
- ``floor``: every pending row of the sink with ``seq <= floor`` is held (leased or settled),
  so a lease scans from ``floor`` instead of skipping all held rows again. Rows going back to
  pending lower it; a write by another connection (the CLI's replay) resets it to 0.

Held rows (leased or settled) are never offered by ``lease`` and never dropped for capacity.
Everything here is per process and lost at exit, by design.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["LeaseTable", "SinkLeases", "runs"]


@dataclass(slots=True)
class SinkLeases:
    leased: dict[int, float] = field(default_factory=dict)  # seq -> deadline
    due: float = math.inf  # earliest deadline in ``leased`` (inf: none)
    settled: set[int] = field(default_factory=set)
    floor: int = 0

    def held_above_floor(self) -> int:
        floor = self.floor
        return sum(1 for s in self.leased if s > floor) + sum(
            1 for s in self.settled if s > floor)

    def is_held(self, seq: int) -> bool:
        return seq in self.leased or seq in self.settled


class LeaseTable:
    """Per sink ``SinkLeases``; see the module docstring. Not thread-safe (the buffer's
    writer thread is its only user)."""

    def __init__(self) -> None:
        self._sinks: dict[str, SinkLeases] = {}

    def of(self, sink: str) -> SinkLeases:
        got = self._sinks.get(sink)
        if got is None:
            got = self._sinks[sink] = SinkLeases()
        return got

    def clear(self) -> None:
        self._sinks.clear()

    def forget_floors(self) -> None:
        """Another connection changed rows: scan each sink from its start again."""
        for s in self._sinks.values():
            s.floor = 0

    def expire(self, sink: str, now: float) -> int:
        """Leases of ``sink`` whose deadline passed go back to pending; how many."""
        s = self.of(sink)
        if s.due > now:
            return 0
        gone = [seq for seq, until in s.leased.items() if until <= now]
        for seq in gone:
            del s.leased[seq]
        if gone:
            s.floor = min(s.floor, min(gone) - 1)
        s.due = min(s.leased.values(), default=math.inf)
        return len(gone)

    def take(self, sink: str, seqs: Iterable[int], until: float) -> None:
        s = self.of(sink)
        for seq in seqs:
            s.leased[seq] = until
        if s.leased:
            s.due = min(s.due, until)

    def renew(self, sink: str, seqs: Iterable[int], until: float) -> int:
        """Move the deadline of rows still leased; rows not leased are ignored. How many."""
        s = self.of(sink)
        n = 0
        for seq in seqs:
            if seq in s.leased:
                s.leased[seq] = until
                n += 1
        if n:
            s.due = min(s.leased.values(), default=math.inf)
        return n

    def give_back(self, sink: str, seqs: Iterable[int]) -> int:
        """Leased rows back to pending (their leaser stopped); settled rows stay. How many."""
        s = self.of(sink)
        back = [seq for seq in seqs if s.leased.pop(seq, None) is not None]
        if back:
            s.floor = min(s.floor, min(back) - 1)
            s.due = min(s.leased.values(), default=math.inf)
        return len(back)

    def release(self, sink: str, seqs: Iterable[int]) -> None:
        """Rows that are pending again (retry) or left pending for good (dead, written)."""
        s = self.of(sink)
        low = None
        for seq in seqs:
            s.leased.pop(seq, None)
            s.settled.discard(seq)
            low = seq if low is None else min(low, seq)
        if low is not None:
            s.floor = min(s.floor, low - 1)

    def accept(self, sink: str, seqs: Iterable[int]) -> int:
        """Accepted rows: settled until their deletion commits. How many were newly settled."""
        s = self.of(sink)
        before = len(s.settled)
        for seq in seqs:
            s.leased.pop(seq, None)
            s.settled.add(seq)
        return len(s.settled) - before

    def settled_count(self) -> int:
        return sum(len(s.settled) for s in self._sinks.values())

    def take_settled(self) -> dict[str, list[int]]:
        """The settled rows by sink (sorted), leaving none; the caller deletes them."""
        out = {name: sorted(s.settled) for name, s in self._sinks.items() if s.settled}
        for s in self._sinks.values():
            s.settled = set()
        return out

    def held(self) -> set[int]:
        """Every seq held for any sink (capacity must not drop these events)."""
        out: set[int] = set()
        for s in self._sinks.values():
            out.update(s.leased)
            out.update(s.settled)
        return out

    def counts(self, sink: str) -> tuple[int, int]:
        """(leased, settled) rows of ``sink``."""
        s = self._sinks.get(sink)
        return (0, 0) if s is None else (len(s.leased), len(s.settled))


def runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``seqs`` as ``(first, last)`` runs of consecutive integers.

    The buffer deletes settled rows one range per statement; a range must hold nothing but the
    rows given (a row in flight, a dead letter or an event this sink has no row for may sit
    between two settled ones), and a run without a gap cannot hold anything else."""
    if not seqs:
        return []
    out: list[tuple[int, int]] = []
    first = prev = seqs[0]
    for seq in seqs[1:]:
        if seq != prev + 1:
            out.append((first, prev))
            first = seq
        prev = seq
    out.append((first, prev))
    return out
