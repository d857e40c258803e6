"""``MemoryBuffer``: the reference implementation of ``Buffer``, without durability.

It exists so the contract suite (tests/contract/test_buffer_contract.py) states the semantics
once and holds ``SqliteBuffer`` to them; it is also handy in detector and forwarder tests.
Everything lives in dicts keyed by ``seq``; ``close()`` followed by ``open()`` keeps the
contents (like reopening a file) and returns leases to pending, as a restart would.

Size model: each event counts the length of its strings plus a fixed overhead, and each
delivery row a smaller one. The capacity policy is the one of ``SqliteBuffer`` (see its module
docstring), minus page granularity: ``drop_oldest`` drops exactly enough events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from buffer.base import (
    AppendResult,
    Buffer,
    BufferStats,
    DeadLetter,
    Drops,
    LeasedEvent,
    NewEvent,
    Settlement,
    SinkStats,
    check_batch,
)
from buffer.capacity import (
    GAP_TYPE,
    carried_drops,
    drop_keys,
    sink_key,
    split_drops,
    within_share,
)
from buffer.config import WhenFull
from config.model import format_time, utcnow

__all__ = ["MemoryBuffer"]

_EVENT_OVERHEAD = 64
_ROW_OVERHEAD = 32


@dataclass(slots=True)
class _Row:
    state: str = "pending"  # pending | leased | dead
    attempts: int = 0
    leased_until: float = 0.0
    status: int | None = None
    detail: str = ""
    failed_at: str = ""


class MemoryBuffer(Buffer):
    def __init__(self, max_size: int = 2**62,
                 when_full: WhenFull | str = WhenFull.DROP_OLDEST,
                 lease_timeout: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_size = int(max_size)
        self.when_full = WhenFull(when_full)
        self.lease_timeout = float(lease_timeout)
        self._clock = clock
        self._open = False
        self._sinks: tuple[str, ...] = ()
        self._known_sinks: dict[str, None] = {}
        self._events: dict[int, NewEvent] = {}  # insertion order == seq order
        self._by_id: dict[str, int] = {}
        self._rows: dict[str, dict[int, _Row]] = {}  # sink -> seq -> row
        self._states: dict[str, str] = {}
        self._next_seq = 1
        self._size = 0
        self._drops = Drops()
        self._dropped_total = 0

    def open(self, sinks: Sequence[str]) -> None:
        if self._open:
            raise RuntimeError("buffer is already open")
        self._open = True
        self._sinks = tuple(dict.fromkeys(sinks))
        for name in self._sinks:
            self._known_sinks.setdefault(name, None)
            self._rows.setdefault(name, {})
        for rows in self._rows.values():
            for row in rows.values():
                if row.state == "leased":
                    row.state = "pending"

    def close(self) -> None:
        self._open = False

    def _check(self) -> None:
        if not self._open:
            raise RuntimeError("buffer is not open")

    @staticmethod
    def _event_size(e: NewEvent) -> int:
        return len(e.id) + len(e.key) + len(e.type) + len(e.time) + len(e.payload) \
            + _EVENT_OVERHEAD

    def _delete_event(self, seq: int) -> None:
        e = self._events.pop(seq)
        del self._by_id[e.id]
        self._size -= self._event_size(e)
        for rows in self._rows.values():
            if rows.pop(seq, None) is not None:
                self._size -= _ROW_OVERHEAD

    # ------------------------------------------------------------------ append / states

    def append(self, events: Sequence[NewEvent], states: Mapping[str, str], *,
               reported: Drops | None = None) -> AppendResult:
        self._check()
        check_batch(events, states)
        if reported is not None:
            left = Counter(self._drops.by_type)
            left.subtract(drop_keys(reported.by_type, reported.by_sink))
            self._drops.by_type = {t: c for t, c in left.items() if c > 0}
            if not self._drops.by_type:
                self._drops = Drops()
        new: list[int] = []
        for e in events:
            if e.id in self._by_id:
                continue
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            self._events[seq] = e
            self._by_id[e.id] = seq
            self._size += self._event_size(e)
            for sink in self._sinks:
                self._rows[sink][seq] = _Row()
                self._size += _ROW_OVERHEAD
            new.append(seq)
        self._states.update(states)
        lost_new = self._enforce_capacity(set(new))
        rejected = lost_new if self.when_full is WhenFull.REJECT_NEW else 0
        return AppendResult(stored=len(new) - lost_new, rejected=rejected,
                            unreported_drops=bool(self._drops.by_type))

    def _enforce_capacity(self, new: set[int]) -> int:
        removed: Counter[str] = Counter()
        carried: Counter[str] = Counter()  # counts reported by dropped gap events
        lost_new = 0
        spared = self._within_share(new)
        while self._size > self.max_size:
            victim = self._victim(new, spared)
            if victim is None and spared:
                spared = []  # nothing left that only over-share sinks need
                continue
            if victim is None:
                break
            event = self._events[victim]
            if event.type == GAP_TYPE:
                carried.update(carried_drops(event.payload))
            else:
                removed[event.type] += 1
            carried.update(sink_key(sink, event.type) for sink, rows in self._rows.items()
                           if victim in rows)
            lost_new += victim in new
            self._delete_event(victim)
        if removed or carried:
            now = format_time(utcnow())
            for t, c in (removed + carried).items():
                self._drops.by_type[t] = self._drops.by_type.get(t, 0) + c
            self._drops.first_at = self._drops.first_at or now
            self._drops.last_at = now
            self._dropped_total += sum(removed.values())
        return lost_new

    def _within_share(self, new: set[int]) -> list[str]:
        # reject_new decides before the batch goes in (as the SQLite buffer does).
        skip = new if self.when_full is WhenFull.REJECT_NEW else set()
        usage = {sink: len(rows.keys() - skip) for sink, rows in self._rows.items()
                 if sink in self._sinks}
        return within_share(usage, len(self._events) - len(skip))

    def _victim(self, new: set[int], spared: Sequence[str] = ()) -> int | None:
        reject = self.when_full is WhenFull.REJECT_NEW
        if reject and not spared:
            return max((s for s in new if s in self._events), default=None)

        def states(seq: int) -> set[str]:
            return {rows[seq].state for rows in self._rows.values() if seq in rows}

        with_dead = None
        for seq in self._events:
            if (reject and seq in new) or any(seq in self._rows[sink] for sink in spared):
                continue
            st = states(seq)
            if "leased" in st:
                continue
            if "dead" not in st:
                return seq
            if with_dead is None:
                with_dead = seq
        return with_dead

    def load_states(self) -> dict[str, str]:
        self._check()
        return dict(self._states)

    def peek_drops(self) -> Drops:
        self._check()
        d = self._drops  # by_type holds the drops-table keys, sink keys too (capacity.py)
        by_type, by_sink = split_drops(d.by_type)
        return Drops(by_type, by_sink, d.first_at, d.last_at)

    def take_drops(self) -> Drops:
        self._check()
        drops, self._drops = self._drops, Drops()
        drops.by_type, drops.by_sink = split_drops(drops.by_type)
        return drops

    # ------------------------------------------------------------------ lease / settle

    def lease(self, sink: str, limit: int) -> list[LeasedEvent]:
        self._check()
        if limit <= 0:
            return []
        now = self._clock()
        rows = self._rows.get(sink, {})
        for row in rows.values():
            if row.state == "leased" and row.leased_until <= now:
                row.state = "pending"
        out: list[LeasedEvent] = []
        for seq in sorted(rows):
            if len(out) >= limit:
                break
            row = rows[seq]
            if row.state != "pending":
                continue
            row.state, row.leased_until = "leased", now + self.lease_timeout
            e = self._events[seq]
            out.append(LeasedEvent(seq, e.id, e.key, e.type, e.payload, row.attempts))
        return out

    def renew(self, sink: str, seqs: Sequence[int]) -> None:
        self._check()
        rows = self._rows.get(sink, {})
        until = self._clock() + self.lease_timeout
        for seq in seqs:
            row = rows.get(seq)
            if row is not None and row.state == "leased":
                row.leased_until = until

    def release(self, sink: str, seqs: Sequence[int]) -> None:
        self._check()
        rows = self._rows.get(sink, {})
        for seq in seqs:
            row = rows.get(seq)
            if row is not None and row.state == "leased":
                row.state = "pending"

    def settle(self, sink: str, settlement: Settlement) -> None:
        self._check()
        rows = self._rows.get(sink, {})
        now = format_time(utcnow())
        for seq in settlement.retry:
            row = rows.get(seq)
            if row is not None and row.state != "dead":
                row.state, row.attempts = "pending", row.attempts + 1
        for seq, (status, detail) in settlement.dead.items():
            row = rows.get(seq)
            if row is not None and row.state != "dead":
                row.state, row.attempts = "dead", row.attempts + 1
                row.status, row.detail, row.failed_at = status, detail, now
        for seq in settlement.accepted:
            if rows.pop(seq, None) is not None:
                self._size -= _ROW_OVERHEAD
                self._drop_if_orphan(seq)

    def _drop_if_orphan(self, seq: int) -> None:
        if seq in self._events and not any(seq in rows for rows in self._rows.values()):
            self._delete_event(seq)

    # ------------------------------------------------------------------ dead letters, views

    def _dead(self, sink: str | None,
              ids: Sequence[str] | None) -> list[tuple[str, int, _Row]]:
        wanted = None if ids is None else set(ids)
        out = []
        for name, rows in self._rows.items():
            if sink is not None and name != sink:
                continue
            for seq, row in rows.items():
                if row.state == "dead" and (wanted is None or self._events[seq].id in wanted):
                    out.append((name, seq, row))
        out.sort(key=lambda t: (t[1], t[0]))
        return out

    def dead_letters(self, sink: str | None = None, limit: int = 1000) -> list[DeadLetter]:
        self._check()
        out = []
        for name, seq, row in self._dead(sink, None)[:limit]:
            e = self._events[seq]
            out.append(DeadLetter(name, seq, e.id, e.type, e.payload, row.status, row.detail,
                                  row.failed_at))
        return out

    def replay_dead_letters(self, sink: str | None = None,
                            ids: Sequence[str] | None = None) -> int:
        self._check()
        found = self._dead(sink, ids)
        for _, _, row in found:
            row.state, row.attempts, row.status, row.detail, row.failed_at = \
                "pending", 0, None, "", ""
        return len(found)

    def purge_dead_letters(self, sink: str | None = None,
                           ids: Sequence[str] | None = None) -> int:
        self._check()
        found = self._dead(sink, ids)
        for name, seq, _ in found:
            del self._rows[name][seq]
            self._size -= _ROW_OVERHEAD
            self._drop_if_orphan(seq)
        return len(found)

    def pending(self, sink: str | None = None, limit: int = 1000) -> list[LeasedEvent]:
        self._check()
        attempts: dict[int, int] = {}
        for name, rows in self._rows.items():
            if sink is not None and name != sink:
                continue
            for seq, row in rows.items():
                if row.state in ("pending", "leased"):
                    attempts[seq] = max(attempts.get(seq, 0), row.attempts)
        out = []
        for seq in sorted(attempts)[:limit]:
            e = self._events[seq]
            out.append(LeasedEvent(seq, e.id, e.key, e.type, e.payload, attempts[seq]))
        return out

    def stats(self) -> BufferStats:
        self._check()
        sinks = {}
        for name in {**dict.fromkeys(self._sinks), **self._known_sinks}:
            rows = self._rows.get(name, {})
            states = Counter(r.state for r in rows.values())
            undelivered = [s for s, r in rows.items() if r.state != "dead"]
            sinks[name] = SinkStats(
                pending=states["pending"], leased=states["leased"], dead_letters=states["dead"],
                oldest_pending_time=self._events[min(undelivered)].time if undelivered else None)
        return BufferStats(events=len(self._events), size_bytes=self._size,
                           max_size=self.max_size, sinks=sinks,
                           dropped_total=self._dropped_total)
