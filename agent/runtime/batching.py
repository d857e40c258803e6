"""Forming requests from leased rows: which rows may go out together, and now.

Used by the forwarder (``forwarder.py``). The rule kept here: a machine's event never reaches
the receiver before an earlier event of that machine was accepted or dead-lettered. So two
requests in flight at once never share an ordering key (the machine id, ``LeasedEvent.key``):
``Lanes`` keeps the rows waiting to be sent in one FIFO per key (seq order, as leased), and
``take`` forms a request only from keys with no request in flight, taking each key's rows from
the front. Within one request rows are in seq order (the receiver processes an array in order).

To let several requests run at once, a request takes at most ``cap`` keys: with 8 machines and
4 free request slots, each request carries the rows of 2 machines. Keys are taken in the order
their rows first arrived, so the machine waiting longest goes first.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterable

from agent.sinks.base import OutboundEvent
from buffer.base import LeasedEvent

__all__ = ["Lanes", "halves", "outbound"]


class Lanes:
    """Rows leased and not yet sent, one FIFO per ordering key."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[LeasedEvent]] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, rows: Iterable[LeasedEvent]) -> None:
        lanes = self._lanes
        n = 0
        for row in rows:
            lane = lanes.get(row.key)
            if lane is None:
                lane = lanes[row.key] = deque()
            lane.append(row)
            n += 1
        self.count += n

    def cap(self, busy: Collection[str], free_slots: int) -> int:
        """Keys one request may take so that ``free_slots`` requests share the free keys."""
        free = sum(1 for k in self._lanes if k not in busy)
        return max(1, math.ceil(free / max(free_slots, 1)))

    def take(self, busy: Collection[str], size: int, cap: int) -> list[LeasedEvent]:
        """Up to ``size`` rows of at most ``cap`` keys not in ``busy``, in seq order."""
        chunk: list[LeasedEvent] = []
        keys = 0
        for key in list(self._lanes):
            if key in busy:
                continue
            lane = self._lanes[key]
            room = size - len(chunk)
            if len(lane) <= room:
                chunk.extend(lane)
                del self._lanes[key]
            else:
                chunk.extend(lane.popleft() for _ in range(room))
            keys += 1
            if len(chunk) >= size or keys >= cap:
                break
        if keys > 1:
            chunk.sort(key=_seq)  # a few sorted runs: linear
        self.count -= len(chunk)
        return chunk


def _seq(row: LeasedEvent) -> int:
    return row.seq


def halves(rows: list[LeasedEvent]) -> tuple[list[LeasedEvent], list[LeasedEvent]]:
    mid = len(rows) // 2
    return rows[:mid], rows[mid:]


def outbound(row: LeasedEvent) -> OutboundEvent:
    return OutboundEvent(row.id, None, row.payload)  # source: read only if a sink asks
