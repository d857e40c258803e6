"""Forming requests from leased rows: which rows may go out together, and now.

Pure functions used by the forwarder (``forwarder.py``). The rule they keep: a machine's
event never reaches the receiver before an earlier event of that machine was accepted or
dead-lettered. So two requests in flight at once never share an ordering key (the machine id,
``LeasedEvent.key``): ``next_chunk`` takes rows only of keys not in flight, in seq order, and
once a key is skipped, every later row of it is skipped too (it stays behind its earlier rows).
Within one request rows stay in seq order, which the receiver processes in array order.

To let several requests run at once, a chunk takes at most ``key_cap`` keys: with 8 machines
and 4 free request slots, each request carries the rows of 2 machines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence

from agent.sinks.base import OutboundEvent
from buffer.base import LeasedEvent

__all__ = ["halves", "key_cap", "next_chunk", "outbound", "source_of"]


def key_cap(remaining: Sequence[LeasedEvent], busy: Collection[str], free_slots: int) -> int:
    """Keys one new request may take so that ``free_slots`` requests can share the free keys."""
    free = {r.key for r in remaining} - set(busy)
    return max(1, math.ceil(len(free) / max(free_slots, 1)))


def next_chunk(remaining: list[LeasedEvent], busy: Collection[str], size: int,
               cap: int) -> tuple[list[LeasedEvent], list[LeasedEvent]]:
    """(rows for the next request, rows left) from ``remaining`` (seq order)."""
    chunk: list[LeasedEvent] = []
    left: list[LeasedEvent] = []
    taken: set[str] = set()
    for row in remaining:
        key = row.key
        if len(chunk) < size and key not in busy and (key in taken or len(taken) < cap):
            chunk.append(row)
            taken.add(key)
        else:
            # Once a row of a key is left, so is every later one: the condition only gets
            # stricter along the list (the chunk fills, ``taken`` grows to the cap).
            left.append(row)
    return chunk, left


def halves(rows: list[LeasedEvent]) -> tuple[list[LeasedEvent], list[LeasedEvent]]:
    mid = len(rows) // 2
    return rows[:mid], rows[mid:]


def outbound(row: LeasedEvent) -> OutboundEvent:
    return OutboundEvent(row.id, source_of(row.payload), row.payload)


_SOURCE_KEY = '"source":"'
_NEXT_KEY = ',"specversion":"'


def source_of(payload: str) -> str:
    """The top-level ``source`` of a CloudEvent's JSON text.

    Parsing every payload cost more than anything else the forwarder does per event in a
    backlog drain, so the agent's own serialisation (compact, sorted keys: ``source`` is
    followed by ``specversion`` at the top level) is read without parsing; anything else falls
    back to ``json.loads``."""
    i = payload.rfind(_SOURCE_KEY)
    if i >= 0:
        start = i + len(_SOURCE_KEY)
        end = payload.find('"', start)
        value = payload[start:end]
        if end > 0 and "\\" not in value and payload.startswith(_NEXT_KEY, end + 1):
            return value
    try:
        source = json.loads(payload).get("source", "")
    except (ValueError, AttributeError):
        source = ""
    return source if isinstance(source, str) else ""
