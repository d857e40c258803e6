"""A model-based test of the SQLite buffer with crashes: hypothesis ``RuleBasedStateMachine``.

tests/contract/test_buffer_contract.py already compares SqliteBuffer with the reference
MemoryBuffer over random operation sequences (clean reopen, expiry, replay, purge). This
machine adds what that comparison cannot express: a crash in the middle of a transaction (the
connection goes away with an uncommitted write open and no clean stop recorded, then the file
is opened again) and invariants stated directly against a model of what was acknowledged:

- nothing committed is lost: per sink, pending + leased + dead = appended - accepted;
- nothing settled (accepted or dead-lettered) is ever leased again;
- per machine (ordering key), leases and the pending list follow append order;
- detector states are exactly the last committed ones; an interrupted write leaves no trace.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from buffer.base import LeasedEvent, NewEvent, Settlement
from buffer.sqlite import SqliteBuffer

SINKS = ("a", "b")
KEYS = ("m1", "m2")
LEASE_TIMEOUT = 10.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BufferWithCrashes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.path = Path(self._tmp.name) / "buffer.db"
        self.clock = _Clock()
        self.buf = self._new()
        self.next_id = 0
        self.order: dict[str, list[str]] = {k: [] for k in KEYS}  # append order per key
        self.appended: list[str] = []
        self.accepted: dict[str, set[str]] = {s: set() for s in SINKS}
        self.dead: dict[str, set[str]] = {s: set() for s in SINKS}
        self.held: dict[str, dict[int, LeasedEvent]] = {s: {} for s in SINKS}
        self.states: dict[str, str] = {}

    def _new(self) -> SqliteBuffer:
        return SqliteBuffer(self.path, 2**40, synchronous="OFF", lease_timeout=LEASE_TIMEOUT,
                            clock=self.clock)

    @initialize()
    def open(self) -> None:
        self.buf.open(SINKS)

    def teardown(self) -> None:
        self.buf.close()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ rules

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=0, max_size=5),
          state=st.sampled_from(["s1", "s2", "s3"]))
    def append(self, keys: list[str], state: str) -> None:
        events = []
        for key in keys:
            self.next_id += 1
            i = f"e{self.next_id:04d}"
            events.append(NewEvent(i, key, "plantedge.scrap.recorded",
                                   "2026-01-01T00:00:00.000Z", f'{{"id":"{i}"}}'))
        self.buf.append(events, {"m1": state})
        for e in events:
            self.order[e.key].append(e.id)
            self.appended.append(e.id)
        self.states["m1"] = state

    @rule(sink=st.sampled_from(SINKS), n=st.integers(1, 6))
    def lease(self, sink: str, n: int) -> None:
        rows = self.buf.lease(sink, n)
        for r in rows:
            assert r.id not in self.accepted[sink], f"{r.id} leased again after acceptance"
            assert r.id not in self.dead[sink], f"{r.id} leased again after dead-lettering"
            # Everything held was leased after the last expiry, crash or reopen: still valid.
            assert r.seq not in self.held[sink], f"{r.id} leased twice while its lease was valid"
        for key in KEYS:
            ids = [r.id for r in rows if r.key == key]
            assert ids == sorted(ids, key=self.order[key].index), f"{key} out of order: {ids}"
        for r in rows:
            self.held[sink][r.seq] = r

    @rule(sink=st.sampled_from(SINKS),
          outcomes=st.lists(st.sampled_from(["accepted", "retry", "dead", "keep"]),
                            max_size=6))
    def settle(self, sink: str, outcomes: list[str]) -> None:
        held = list(self.held[sink].values())
        s = Settlement()
        for row, outcome in zip(held, outcomes, strict=False):
            if outcome == "keep":
                continue
            del self.held[sink][row.seq]
            if outcome == "accepted":
                s.accepted.append(row.seq)
                self.accepted[sink].add(row.id)
            elif outcome == "retry":
                s.retry.append(row.seq)
            else:
                s.dead[row.seq] = (422, f"refused {row.id}")
                self.dead[sink].add(row.id)
        self.buf.settle(sink, s)

    @rule()
    def expire(self) -> None:
        self.clock.now += LEASE_TIMEOUT + 1  # held leases may now be offered again
        for sink in SINKS:
            self.held[sink].clear()

    @rule(n=st.integers(1, 4))
    def crash_mid_write(self, n: int) -> None:
        """An append in flight when the process dies: its transaction is open, nothing of it
        was acknowledged; no clean stop is recorded."""
        conn = self.buf._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        for j in range(n):
            conn.execute("INSERT INTO events(id, key, type, time, payload, created_at) "
                         "VALUES (?, 'm1', 't', 't', '{}', 't')", (f"lost-{self.next_id}-{j}",))
        conn.execute("UPDATE detector_state SET state = 'never committed'")
        conn.close()  # the process is gone: SQLite rolls the open transaction back
        self.buf._conn = None
        self.buf._owner = False  # and it never recorded a clean stop
        self.buf = self._new()
        self.buf.open(SINKS)
        for sink in SINKS:
            self.held[sink].clear()  # leases die with the process

    @precondition(lambda self: self.appended)
    @rule()
    def clean_reopen(self) -> None:
        self.buf.close()
        self.buf = self._new()
        self.buf.open(SINKS)
        for sink in SINKS:
            self.held[sink].clear()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def nothing_committed_is_lost(self) -> None:
        for sink in SINKS:
            undelivered = [r.id for r in self.buf.pending(sink, 100_000)]
            dead = {d.id for d in self.buf.dead_letters(sink, 100_000)}
            expected = set(self.appended) - self.accepted[sink] - self.dead[sink]
            assert set(undelivered) == expected, (sink, set(undelivered) ^ expected)
            assert dead == self.dead[sink]
            for key in KEYS:
                mine = [i for i in undelivered if i in set(self.order[key])]
                assert mine == [i for i in self.order[key] if i in set(mine)], \
                    f"{sink}/{key}: pending out of append order"

    @invariant()
    def states_are_the_last_committed(self) -> None:
        assert self.buf.load_states() == self.states

    @invariant()
    def counts_agree(self) -> None:
        stats = self.buf.stats()
        for sink in SINKS:
            s = stats.sinks[sink]
            expected = set(self.appended) - self.accepted[sink] - self.dead[sink]
            assert s.pending + s.leased == len(expected)
            assert s.dead_letters == len(self.dead[sink])


def _settings(cls: Any) -> Any:
    cls.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
    return cls


TestBufferWithCrashes = _settings(BufferWithCrashes).TestCase
