"""A model-based test of the SQLite buffer with crashes: hypothesis ``RuleBasedStateMachine``.

tests/contract/test_buffer_contract.py already compares SqliteBuffer with the reference
MemoryBuffer over random operation sequences (clean reopen, expiry, replay, purge). This
machine adds what that comparison cannot express: a crash in the middle of a transaction (the
connection goes away with an uncommitted write open and no clean stop recorded, then the file
is opened again) and invariants stated directly against a model of what was acknowledged:

- nothing committed is lost: per sink, the file's pending rows minus those accepted and not
  yet deleted (grouped deletes, ``leases.py``) are exactly appended - accepted - dead, checked
  against the file without committing the grouped deletes;
- a crash (or a kill) before a grouped delete commits only brings back rows that were
  accepted (re-sent, deduplicated by the receiver), never loses one; a clean stop brings back
  none;
- nothing settled (accepted or dead-lettered) is ever leased again by the same process;
- a lease renewed (as the forwarder renews all it holds before each lease) is never offered
  again before its new deadline; a released row is offered again at once;
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
        # Rows this "process" holds, with the deadline the model expects for each.
        self.held: dict[str, dict[int, tuple[LeasedEvent, float]]] = {s: {} for s in SINKS}
        self.resent = 0  # accepted rows a crash brought back (the path must be exercised)
        self.states: dict[str, str] = {}

    def _new(self) -> SqliteBuffer:
        # A long settle delay: grouped deletes wait for the next write (or stats), so a crash
        # finds some of them uncommitted.
        return SqliteBuffer(self.path, 2**40, synchronous="OFF", lease_timeout=LEASE_TIMEOUT,
                            clock=self.clock, settle_delay=1e9, settle_rows=10**6)

    @initialize()
    def open(self) -> None:
        self.buf.open(SINKS)

    def teardown(self) -> None:
        self.buf.close()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ rules

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=5),
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
        now = self.clock.now
        valid = {r.id for r, until in self.held[sink].values() if until > now}
        offerable = set(self.appended) - self.accepted[sink] - self.dead[sink] - valid
        rows = self.buf.lease(sink, n)
        assert len(rows) == min(n, len(offerable)), f"offered {len(rows)} of {offerable}"
        for r in rows:
            assert r.id not in self.accepted[sink], f"{r.id} leased again after acceptance"
            assert r.id not in self.dead[sink], f"{r.id} leased again after dead-lettering"
            got = self.held[sink].get(r.seq)
            assert got is None or got[1] <= now, f"{r.id} leased twice while its lease was valid"
        for key in KEYS:
            ids = [r.id for r in rows if r.key == key]
            assert ids == sorted(ids, key=self.order[key].index), f"{key} out of order: {ids}"
        # The lease returned every row past its deadline to pending (re-offered or not).
        self.held[sink] = {seq: v for seq, v in self.held[sink].items() if v[1] > now}
        for r in rows:
            self.held[sink][r.seq] = (r, now + LEASE_TIMEOUT)

    @rule(sink=st.sampled_from(SINKS), n=st.integers(1, 6))
    def deliver(self, sink: str, n: int) -> None:
        """The common case: lease, and the receiver accepts all (the delete is grouped)."""
        self.lease(sink, n)
        self.settle(sink, ["accepted"] * len(self.held[sink]))

    @rule(sink=st.sampled_from(SINKS), n=st.integers(1, 6))
    def forwarder_lease(self, sink: str, n: int) -> None:
        """The forwarder's lease: renew all it holds, then lease (one call on the writer)."""
        self.renew(sink)
        self.lease(sink, n)

    @rule(sink=st.sampled_from(SINKS))
    def renew(self, sink: str) -> None:
        """What the forwarder does before each lease: renew every row it holds."""
        self.buf.renew(sink, list(self.held[sink]))
        until = self.clock.now + LEASE_TIMEOUT
        self.held[sink] = {seq: (r, until) for seq, (r, _) in self.held[sink].items()}

    @rule(sink=st.sampled_from(SINKS))
    def release(self, sink: str) -> None:
        """A forwarder that stops gives back what it holds (and may name accepted rows)."""
        accepted = [seq for seq in self.buf._leases.of(sink).settled]
        self.buf.release(sink, [*self.held[sink], *accepted])
        self.held[sink].clear()

    @rule(dt=st.sampled_from([LEASE_TIMEOUT * 0.4, LEASE_TIMEOUT * 0.7, LEASE_TIMEOUT + 1]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt  # held leases past their deadline may be offered again

    @rule()
    def check_stats(self) -> None:
        """``stats`` commits the grouped deletes first and then counts exactly."""
        stats = self.buf.stats()
        for sink in SINKS:
            st_ = stats.sinks[sink]
            expected = set(self.appended) - self.accepted[sink] - self.dead[sink]
            assert st_.pending + st_.leased == len(expected)
            assert st_.leased == len(self.held[sink])
            assert st_.dead_letters == len(self.dead[sink])

    @rule(sink=st.sampled_from(SINKS),
          outcomes=st.lists(st.sampled_from(["accepted", "retry", "dead", "keep"]),
                            max_size=6))
    def settle(self, sink: str, outcomes: list[str]) -> None:
        held = [r for r, _ in self.held[sink].values()]
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
        self._restart(clean=False)

    def _restart(self, *, clean: bool) -> None:
        self.buf = self._new()
        self.buf.open(SINKS)
        for sink in SINKS:
            self.held[sink].clear()  # leases die with the process
            back = {i for i, _ in self._file_pending(sink)} - (
                set(self.appended) - self.accepted[sink] - self.dead[sink])
            # Only accepted rows whose grouped delete was not committed come back; after a
            # clean stop, none.
            assert back <= self.accepted[sink], (sink, back - self.accepted[sink])
            assert not (clean and back), (sink, back)
            self.accepted[sink] -= back  # pending again: they will be sent (and deduplicated)
            self.resent += len(back)

    @precondition(lambda self: self.appended)
    @rule()
    def clean_reopen(self) -> None:
        self.buf.close()
        self._restart(clean=True)

    # ------------------------------------------------------------------ invariants

    def _file_pending(self, sink: str) -> list[tuple[str, int]]:
        """(id, seq) of the sink's pending rows as committed in the file, in seq order; read
        on the buffer's connection without committing its grouped deletes."""
        conn = self.buf._conn
        assert conn is not None
        return [(str(i), int(s)) for i, s in conn.execute(
            "SELECT e.id, d.seq FROM deliveries d JOIN events e ON e.seq = d.seq "
            "WHERE d.sink = ? AND d.state = 'pending' ORDER BY d.seq", (sink,))]

    @invariant()
    def nothing_committed_is_lost(self) -> None:
        for sink in SINKS:
            settled = self.buf._leases.of(sink).settled
            undelivered = [i for i, seq in self._file_pending(sink) if seq not in settled]
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



def _settings(cls: Any) -> Any:
    cls.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
    return cls


TestBufferWithCrashes = _settings(BufferWithCrashes).TestCase
