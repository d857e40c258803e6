"""Corruption handling for the SQLite buffer: move the damaged file aside, read what can be read.

docs/buffer.md: a corrupt file is moved aside (``<file>.corrupt-<UTC timestamp>``), readable
rows are salvaged into a fresh file, readiness is degraded with the reason, and the agent keeps
collecting. This module does the first two halves without touching the fresh file;
``SqliteBuffer.open`` writes what it returns.

What survives: events (id, key, type, time, payload) from every readable page, in seq order, and
detector states. What does not: delivery progress. Every salvaged event is pending again for
every configured sink; receivers deduplicate by event id (docs/delivery.md), so an event that
was already delivered costs a duplicate request, never a duplicate fact. Dead-letter status is
lost the same way (such an event is tried again and dead-lettered again).

The scan is forward in seq order until the first unreadable page, then backward from the
newest until the first unreadable page again: a damaged region in the middle costs the events
on it (and possibly their neighbours), not the rest.
"""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer.base import NewEvent
from config.model import utcnow

__all__ = ["Salvage", "move_aside", "read_salvageable", "wal_missing"]

_SIDE_FILES = ("-wal", "-shm")


@dataclass(slots=True)
class Salvage:
    events: list[NewEvent] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what could not be read, and why


def move_aside(path: Path) -> Path:
    """Rename the file (and its WAL and shared-memory files, so the WAL is still read with it)
    to ``<file>.corrupt-<UTC timestamp>``; returns the new path of the main file."""
    stamp = utcnow().strftime("%Y%m%dT%H%M%S.%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    path.rename(aside)
    return aside


def wal_missing(path: Path) -> bool:
    """True when the write-ahead log of ``path`` is gone but its shared-memory index still
    says it held committed frames: the WAL was lost after an unclean stop (deleted, or not
    copied with the file). Opening would silently fall back to the last checkpoint, losing
    committed events and detector state, so the file is treated as damaged.

    The wal-index header (native byte order) has ``isInit`` at byte 12 and ``mxFrame`` (the
    last valid frame) at bytes 16-19. A clean close removes both side files; if both are gone
    this check cannot see a lost WAL (documented limit)."""
    wal = path.with_name(path.name + "-wal")
    shm = path.with_name(path.name + "-shm")
    if wal.exists() or not shm.exists() or not path.exists():
        return False
    try:
        with shm.open("rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[12] == 1 and int.from_bytes(head[16:20], sys.byteorder) > 0


def _event(row: tuple[Any, ...]) -> NewEvent | None:
    _, id_, key, type_, time_, payload = row
    if not all(isinstance(v, str) for v in (id_, key, type_, time_, payload)):
        return None  # a damaged row that still parses: not worth delivering as a fact
    return NewEvent(id=id_, key=key, type=type_, time=time_, payload=payload)


def _scan(conn: sqlite3.Connection, sql: str, params: tuple[object, ...],
          out: dict[int, NewEvent], problems: list[str]) -> None:
    try:
        for row in conn.execute(sql, params):
            e = _event(row)
            if e is not None and isinstance(row[0], int):
                out.setdefault(row[0], e)
    except sqlite3.DatabaseError as e:
        problems.append(f"events: {e}")


def read_salvageable(aside: Path) -> Salvage:
    """Read whatever events and detector states the damaged file still yields."""
    found = Salvage()
    try:
        conn = sqlite3.connect(f"{aside.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        found.problems.append(f"cannot open: {e}")
        return found
    try:
        events: dict[int, NewEvent] = {}
        columns = "seq, id, key, type, time, payload"
        _scan(conn, f"SELECT {columns} FROM events ORDER BY seq", (), events, found.problems)
        last = max(events, default=0)
        _scan(conn, f"SELECT {columns} FROM events WHERE seq > ? ORDER BY seq DESC", (last,),
              events, found.problems)
        found.events = [events[s] for s in sorted(events)]
        try:
            for key, state in conn.execute("SELECT key, state FROM detector_state"):
                if isinstance(key, str) and isinstance(state, str):
                    found.states[key] = state
        except sqlite3.DatabaseError as e:
            found.problems.append(f"detector_state: {e}")
    finally:
        conn.close()
    return found
