"""Forwarder + HttpSink + buffer against the real reference receiver, with outages and faults.

The buffer is the real ``AsyncBuffer`` over ``MemoryBuffer`` (and ``SqliteBuffer`` once), so
lease/settle/dead-letter semantics are the production ones.
"""

import asyncio
import contextlib
import inspect
import json
import random
import socket

import pytest

from agent.receiver import Receiver
from agent.runtime.forwarder import Forwarder, ForwarderState
from agent.sinks.config import HttpSinkConfig, RetryPolicy
from agent.sinks.http import HttpSink
from buffer.base import NewEvent
from buffer.memory import MemoryBuffer
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer

FAST = RetryPolicy(initial_backoff="10ms", max_backoff="100ms")


def new_event(i, machine="m1", size=0):
    doc = {"specversion": "1.0", "id": f"ev-{i:03d}",
           "source": f"/sites/s/lines/l/machines/{machine}",
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "datacontenttype": "application/json", "sequence": str(i),
           "data": {"quantity": i, "pad": "x" * size}}
    return NewEvent(doc["id"], machine, doc["type"], doc["time"], json.dumps(doc))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(predicate, within=10.0, what="condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def receiver(tmp_path):
    rx = Receiver(tmp_path / "rx.db", "127.0.0.1", 0)
    await rx.start()
    yield rx
    await rx.aclose()


@pytest.fixture
async def buf():
    ab = AsyncBuffer(MemoryBuffer())
    await ab.open(["erp"])
    yield ab
    await ab.aclose()


class Harness:
    """Starts forwarders in tasks and always stops them and their sinks."""

    def __init__(self):
        self.running = []

    def start(self, buffer, url, policy=FAST, rng_seed=1, poll=3600.0, **cfg):
        config = HttpSinkConfig.model_validate(
            {"type": "http", "url": url, "timeout": "2s", "retry": policy.model_dump(), **cfg})
        sink = HttpSink("erp", config)
        fw = Forwarder(sink, buffer, config.retry, rng=random.Random(rng_seed),
                       poll_interval=poll)
        task = asyncio.create_task(fw.run())
        self.running.append((fw, sink, task))
        return fw

    async def close(self):
        for fw, sink, task in self.running:
            await fw.stop(5.0)
            await sink.aclose()
            assert task.done()
            if not task.cancelled():
                task.result()  # surface any exception the loop died with


@pytest.fixture
async def harness():
    h = Harness()
    yield h
    await h.close()


async def append(buffer, events, fw=None):
    await buffer.append(events, {})
    if fw is not None:
        fw.wake()


async def drained(buffer):
    return not await buffer.pending("erp")


async def settled(fw, buf, n):
    """The buffer is empty and the forwarder has counted all n events as settled."""
    def counted():
        st = fw.status()
        return st["delivered_total"] + st["dead_lettered_total"] == n
    await wait_until(lambda: drained(buf), what="buffer drained")
    await wait_until(counted, what=f"{n} events counted as settled")


def received_ids(receiver):
    return [e["id"] for e in receiver.events()]


def assert_machine_order(receiver, ids):
    """Exactly ``ids`` arrived, once each, each machine's in the order of ``ids``. Requests
    for different machines run in parallel, so how machines interleave is free."""
    got = receiver.events()
    assert sorted(e["id"] for e in got) == sorted(ids)
    machine = {e["id"]: e["source"].rsplit("/", 1)[1] for e in got}
    for m in set(machine.values()):
        assert [e["id"] for e in got if machine[e["id"]] == m] == [
            i for i in ids if machine[i] == m], f"machine {m} out of order"


# ---------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("mode", ["single", "batch"])
async def test_delivers_everything_once_in_order(receiver, buf, harness, mode):
    fw = harness.start(buf, receiver.url, mode=mode, batch_max_events=7)
    events = [new_event(i, machine=f"m{i % 3}") for i in range(25)]
    await append(buf, events, fw)
    await settled(fw, buf, 25)
    assert_machine_order(receiver, [e.id for e in events])
    assert receiver.stats() == {"received": 25, "duplicates": 0}
    status = fw.status()
    assert status["delivered_total"] == 25
    assert status["dead_lettered_total"] == 0
    assert status["last_success"] is not None and status["last_success"].endswith("Z")
    await wait_until(lambda: fw.status()["state"] == "idle", what="idle")


async def test_wake_starts_delivery_without_polling(receiver, buf, harness):
    fw = harness.start(buf, receiver.url)  # polls once an hour: only wake() can help
    await wait_until(lambda: fw.state is ForwarderState.IDLE, what="idle")
    await wait_until(lambda: receiver.stats()["received"] == 0)
    await append(buf, [new_event(1)], fw)
    await wait_until(lambda: receiver.stats()["received"] == 1, what="delivery after wake")


async def test_sqlite_buffer_end_to_end(receiver, harness, tmp_path):
    ab = AsyncBuffer(SqliteBuffer(tmp_path / "buf.db", max_size=2**30))
    await ab.open(["erp"])
    try:
        fw = harness.start(ab, receiver.url, mode="batch", batch_max_events=10)
        receiver.inject(503, count=2)
        events = [new_event(i) for i in range(30)]
        await append(ab, events, fw)
        await wait_until(lambda: drained(ab), what="sqlite buffer drained")
        assert_machine_order(receiver, [e.id for e in events])
        await fw.stop(5.0)
    finally:
        await ab.aclose()


# ---------------------------------------------------------------------------- retry


async def test_5xx_is_retried_with_the_same_rows_in_order(receiver, buf, harness):
    fw = harness.start(buf, receiver.url, mode="batch", batch_max_events=4)
    receiver.inject(503, count=3)
    events = [new_event(i, machine=f"m{i % 2}") for i in range(10)]
    await append(buf, events, fw)
    await settled(fw, buf, 10)
    assert_machine_order(receiver, [e.id for e in events])
    failed = [r for r in receiver.requests if r.status == 503]
    assert len(failed) == 3
    # The retried request carried exactly the rows that failed: the oldest of one machine
    # (2 machines, 4 requests at most in flight: each request carries one machine).
    first_ok = next(r for r in receiver.requests if r.status == 207)
    assert first_ok.ids == [e.id for e in events[:8:2]]
    assert fw.status()["retried_total"] == 3
    assert fw.status()["consecutive_failures"] == 0
    # Recovered: no current error; the last one is kept with its time.
    assert fw.status()["last_error"] is None
    assert "503" in fw.status()["previous_error"]["error"]
    assert fw.status()["previous_error"]["at"]


async def test_retry_after_is_honoured(receiver, buf, harness):
    policy = RetryPolicy(initial_backoff="10ms", max_backoff="5s")
    fw = harness.start(buf, receiver.url, policy=policy)
    receiver.inject(429, count=1, retry_after="1")
    await append(buf, [new_event(1)], fw)
    await wait_until(lambda: drained(buf), what="drained")
    first, second = receiver.requests
    assert first.status == 429 and second.status == 201
    # A floor, not a timing measurement: the retry cannot have come before Retry-After.
    assert second.at - first.at >= 0.95


async def test_retry_after_is_capped_at_max_backoff(receiver, buf, harness):
    policy = RetryPolicy(initial_backoff="10ms", max_backoff="200ms")
    fw = harness.start(buf, receiver.url, policy=policy)
    receiver.inject(503, count=1, retry_after="3600")
    await append(buf, [new_event(1)], fw)
    # Without the cap this would wait an hour.
    await wait_until(lambda: drained(buf), within=10, what="capped retry")
    assert receiver.stats()["received"] == 1


async def test_connection_refused_then_receiver_started(buf, harness, tmp_path):
    port = free_port()
    fw = harness.start(buf, f"http://127.0.0.1:{port}/events", mode="batch",
                       batch_max_events=8)
    events = [new_event(i, machine=f"m{i % 4}") for i in range(30)]
    await append(buf, events, fw)
    await wait_until(lambda: fw.status()["consecutive_failures"] >= 3, what="failures")
    assert fw.status()["state"] == "retrying"
    assert "ConnectError" in fw.status()["last_error"]
    rx = Receiver(tmp_path / "late.db", "127.0.0.1", port)
    await rx.start()
    try:
        await wait_until(lambda: drained(buf), what="drained after receiver start")
        assert_machine_order(rx, [e.id for e in events])
        assert rx.stats() == {"received": 30, "duplicates": 0}
        assert fw.status()["state"] in ("delivering", "idle")
        assert fw.status()["consecutive_failures"] == 0
    finally:
        await fw.stop(5.0)
        await rx.aclose()


async def test_commit_then_timeout_is_deduplicated(receiver, buf, harness):
    receiver.inject_commit_then_delay(3.0)
    fw = harness.start(buf, receiver.url, timeout="300ms")
    await append(buf, [new_event(1)], fw)
    await settled(fw, buf, 1)
    assert receiver.stats() == {"received": 1, "duplicates": 1}
    assert [r.status for r in receiver.requests][-1] == 409
    status = fw.status()
    assert status["delivered_total"] == 1
    assert status["retried_total"] == 1
    assert status["last_error"] is None and "timeout" in status["previous_error"]["error"]


# ---------------------------------------------------------------------------- hold


async def test_401_holds_then_rotated_token_resumes_without_restart(receiver, buf, harness,
                                                                     tmp_path):
    token = tmp_path / "erp-token"
    token.write_text("expired")
    receiver.faults.require_token = "fresh"
    fw = harness.start(buf, receiver.url, mode="batch",
                       auth={"bearer_token": f"${{file:{token}}}"})
    events = [new_event(i) for i in range(5)]
    await append(buf, events, fw)
    await wait_until(lambda: fw.status()["state"] == "held", what="held")
    await wait_until(lambda: sum(r.status == 401 for r in receiver.requests) >= 3,
                     what="re-probes while held")
    status = fw.status()
    assert "401" in status["held_reason"]
    assert receiver.stats()["received"] == 0
    assert len(await buf.pending("erp")) == 5  # nothing dropped
    assert await buf.dead_letters("erp") == []

    token.write_text("fresh\n")
    await wait_until(lambda: drained(buf), what="drained after rotation")
    assert_machine_order(receiver, [e.id for e in events])
    assert fw.status()["held_reason"] is None
    assert fw.status()["state"] != "held"


# ---------------------------------------------------------------------------- 413 / poison


async def test_413_splits_the_batch(receiver, buf, harness):
    receiver.faults.max_batch_events = 3
    fw = harness.start(buf, receiver.url, mode="batch", batch_max_events=10)
    events = [new_event(i) for i in range(10)]
    await append(buf, events, fw)
    await wait_until(lambda: drained(buf), what="drained")
    assert_machine_order(receiver, [e.id for e in events])
    assert receiver.stats()["duplicates"] == 0
    assert any(r.status == 413 for r in receiver.requests)
    assert await buf.dead_letters("erp") == []


async def test_single_event_too_large_is_dead_lettered(receiver, buf, harness):
    receiver.faults.max_event_bytes = 2000
    fw = harness.start(buf, receiver.url)
    events = [new_event(0), new_event(1, size=5000), new_event(2)]
    await append(buf, events, fw)
    await settled(fw, buf, 3)
    assert received_ids(receiver) == ["ev-000", "ev-002"]
    dead = await buf.dead_letters("erp")
    assert [(d.id, d.status) for d in dead] == [("ev-001", 413)]
    assert fw.status()["dead_lettered_total"] == 1


async def test_poison_in_a_batch_is_isolated_by_bisection(receiver, buf, harness):
    receiver.faults.atomic_batches = True
    receiver.faults.reject_ids = {"ev-013"}
    fw = harness.start(buf, receiver.url, mode="batch", batch_max_events=20)
    events = [new_event(i, machine=f"m{i % 3}") for i in range(20)]
    await append(buf, events, fw)
    await settled(fw, buf, 20)
    assert_machine_order(receiver, [e.id for e in events if e.id != "ev-013"])
    dead = await buf.dead_letters("erp")
    assert [(d.id, d.status) for d in dead] == [("ev-013", 422)]
    assert "ev-013" in dead[0].detail
    # Bisection: far fewer requests than one per event.
    assert len(receiver.requests) <= 12
    status = fw.status()
    assert (status["delivered_total"], status["dead_lettered_total"]) == (19, 1)
    # The dead letter never comes back into the loop.
    await append(buf, [new_event(99)], fw)
    await wait_until(lambda: drained(buf), what="drained again")
    assert sum("ev-013" in r.ids for r in receiver.requests if len(r.ids) == 1) == 1


async def test_207_rejected_item_is_dead_lettered_without_bisection(receiver, buf, harness):
    receiver.faults.reject_ids = {"ev-004"}
    fw = harness.start(buf, receiver.url, mode="batch", batch_max_events=10)
    events = [new_event(i) for i in range(10)]
    await append(buf, events, fw)
    await wait_until(lambda: drained(buf), what="drained")
    assert len(receiver.requests) == 1
    assert_machine_order(receiver, [e.id for e in events if e.id != "ev-004"])
    assert [(d.id, d.status) for d in await buf.dead_letters("erp")] == [("ev-004", 422)]


async def test_207_partial_retry_resends_only_the_rest(receiver, buf, harness):
    fw = harness.start(buf, receiver.url, mode="batch", batch_max_events=10)
    receiver.inject(207, body=json.dumps({"results": [
        {"id": "ev-000", "status": 201}, {"id": "ev-001", "status": 503},
        {"id": "ev-002", "status": 201}]}))
    events = [new_event(i) for i in range(3)]
    await append(buf, events, fw)
    await settled(fw, buf, 3)
    # The injected 207 stored nothing; the retry carried only the unconfirmed event.
    assert receiver.requests[1].ids == ["ev-001"]
    assert received_ids(receiver) == ["ev-001"]
    assert fw.status()["delivered_total"] == 3


# ---------------------------------------------------------------------------- stop


async def test_stop_during_backoff_returns_at_once_and_gives_the_rows_back(receiver, buf,
                                                                           harness):
    policy = RetryPolicy(initial_backoff="10ms", max_backoff="1h")
    fw = harness.start(buf, receiver.url, policy=policy)
    receiver.inject(503, count=10, retry_after="3600")
    await append(buf, [new_event(1), new_event(2)], fw)
    await wait_until(lambda: fw.status()["state"] == "retrying", what="retrying")
    # stop() must not sit out the hour-long backoff (a failure here is a timeout, not a race).
    await asyncio.wait_for(fw.stop(drain_timeout=600), 10)
    # Nothing settled, nothing lost: the leased rows (one lease feeds max_in_flight single
    # requests; both are m1's, so only the first was sent) are given back, pending at once
    # (a forwarder replacing this one starts from them, not after the lease timeout).
    assert [p.id for p in await buf.pending("erp")] == ["ev-001", "ev-002"]
    assert (await buf.stats()).sinks["erp"].leased == 0
    assert receiver.stats()["received"] == 0


async def test_stop_waits_for_the_attempt_in_flight(receiver, buf, harness):
    receiver.inject_commit_then_delay(0.5)
    fw = harness.start(buf, receiver.url, timeout="5s")
    await append(buf, [new_event(1)], fw)
    await wait_until(lambda: len(receiver.requests) == 0 and receiver.stats()["received"] == 1,
                     what="request committed at the receiver")
    await fw.stop(drain_timeout=10)
    # The answer came back and was settled before run() returned.
    assert await drained(buf)
    assert fw.status()["delivered_total"] == 1


async def test_stop_past_drain_timeout_abandons_the_attempt(receiver, buf, harness):
    receiver.inject_commit_then_delay(30.0)
    fw = harness.start(buf, receiver.url, timeout="60s")
    await append(buf, [new_event(1)], fw)
    await wait_until(lambda: receiver.stats()["received"] == 1, what="committed")
    await asyncio.wait_for(fw.stop(drain_timeout=0.2), 10)
    assert [p.id for p in await buf.pending("erp")] == ["ev-001"]  # still buffered
    # Given back: its answer was lost with the cancelled request, so it is sent again (the
    # receiver answers 409), like after a timeout.
    assert (await buf.stats()).sinks["erp"].leased == 0
    assert fw.status()["delivered_total"] == 0


async def test_run_twice_is_refused(receiver, buf, harness):
    fw = harness.start(buf, receiver.url)
    await wait_until(lambda: fw._task is not None, what="run() started")
    with pytest.raises(RuntimeError, match="already running"):
        await fw.run()
    with contextlib.suppress(Exception):
        await fw.stop(1.0)


# ---------------------------------------------------------------------------- buffer trouble


class FlakyBuffer:
    """Passes calls to a real AsyncBuffer, failing the first few leases and settles."""

    def __init__(self, inner, lease_failures, settle_failures):
        self.inner = inner
        self.lease_failures = lease_failures
        self.settle_failures = settle_failures

    async def lease(self, sink, limit, renew=()):
        if self.lease_failures:
            self.lease_failures -= 1
            raise OSError("disk I/O error (injected)")
        return await self.inner.lease(sink, limit, renew)

    async def settle(self, sink, settlement):
        if self.settle_failures:
            self.settle_failures -= 1
            raise OSError("database is locked (injected)")
        await self.inner.settle(sink, settlement)

    async def release(self, sink, seqs):
        await self.inner.release(sink, seqs)


async def test_buffer_errors_are_retried_and_nothing_is_lost(receiver, buf, harness, caplog):
    flaky = FlakyBuffer(buf, lease_failures=2, settle_failures=3)
    fw = harness.start(flaky, receiver.url, mode="batch", batch_max_events=5)
    events = [new_event(i) for i in range(12)]
    await append(buf, events, fw)
    await settled(fw, buf, 12)
    assert (flaky.lease_failures, flaky.settle_failures) == (0, 0)
    # Each batch was sent once: a failed settle is retried, not the delivery.
    assert_machine_order(receiver, [e.id for e in events])
    assert receiver.stats()["duplicates"] == 0
    assert fw.status()["retried_total"] == 0  # buffer trouble is not a delivery retry
    assert fw.status()["consecutive_failures"] == 0
    assert fw.status()["last_error"] is None
    assert "cannot settle" in fw.status()["previous_error"]["error"]
    settle_logs = [r for r in caplog.records if "cannot settle" in r.getMessage()]
    assert len(settle_logs) == 1  # logged once, not per repetition


async def test_an_outage_is_logged_once_and_recovery_once(receiver, buf, harness, caplog):
    caplog.set_level("INFO", logger="agent.runtime")
    fw = harness.start(buf, receiver.url)
    receiver.inject(503, count=6)
    await append(buf, [new_event(i) for i in range(3)], fw)
    await settled(fw, buf, 3)
    messages = [r.getMessage() for r in caplog.records
                if r.name in ("agent.runtime.forwarder", "agent.runtime.settling")]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("recovered after 6 failed attempts" in m for m in messages) == 1


async def test_lease_batch_larger_than_the_sink_batch_is_chunked(receiver, buf, harness):
    config = HttpSinkConfig.model_validate({"type": "http", "url": receiver.url,
                                            "mode": "batch", "batch_max_events": 3})
    sink = HttpSink("erp", config)
    fw = Forwarder(sink, buf, FAST, lease_batch=10, poll_interval=3600.0)
    task = asyncio.create_task(fw.run())
    try:
        events = [new_event(i) for i in range(10)]
        await append(buf, events, fw)
        await settled(fw, buf, 10)
        assert [len(r.ids) for r in receiver.requests] == [3, 3, 3, 1]
        assert_machine_order(receiver, [e.id for e in events])
    finally:
        await fw.stop(5.0)
        await sink.aclose()
        await task


class CallLog:
    """Delegates lease/settle to a buffer and records the order of the calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    async def lease(self, sink, limit, renew=()):
        self.calls.append("lease")
        return await self.inner.lease(sink, limit, renew)

    async def settle(self, sink, settlement):
        self.calls.append("settle")
        await self.inner.settle(sink, settlement)

    async def release(self, sink, seqs):
        self.calls.append("release")
        await self.inner.release(sink, seqs)


async def test_batch_mode_leases_the_next_block_while_the_last_chunk_is_in_flight(receiver,
                                                                                   buf):
    config = HttpSinkConfig.model_validate({"type": "http", "url": receiver.url,
                                            "mode": "batch", "batch_max_events": 2})
    sink = HttpSink("erp", config)
    log = CallLog(buf)
    fw = Forwarder(sink, log, FAST, lease_batch=4, poll_interval=3600.0)
    task = asyncio.create_task(fw.run())
    try:
        events = [new_event(i) for i in range(8)]
        await append(buf, events, fw)
        await settled(fw, buf, 8)
        assert_machine_order(receiver, [e.id for e in events])
        assert [len(r.ids) for r in receiver.requests] == [2, 2, 2, 2]
        # The second block is leased before the first block's last chunk is settled.
        second_lease = log.calls.index("lease", 1)
        settles = [i for i, c in enumerate(log.calls) if c == "settle"]
        assert second_lease < settles[1], log.calls
        # The lease ahead after the second block finds nothing; it is not used, and a wake()
        # after it still delivers at once (the forwarder polls only once an hour).
        await wait_until(lambda: fw.state is ForwarderState.IDLE, what="idle")
        more = [new_event(i) for i in range(8, 11)]
        await append(buf, more, fw)
        await settled(fw, buf, 11)
        assert_machine_order(receiver, [e.id for e in events + more])
        assert receiver.stats() == {"received": 11, "duplicates": 0}
    finally:
        await fw.stop(5.0)
        await sink.aclose()
        await task


async def test_a_stop_gives_rows_leased_ahead_back_and_loses_nothing(receiver, buf):
    config = HttpSinkConfig.model_validate({"type": "http", "url": receiver.url,
                                            "mode": "batch", "batch_max_events": 2})
    sink = HttpSink("erp", config)
    fw = Forwarder(sink, buf, FAST, lease_batch=4, poll_interval=3600.0)
    receiver.inject_commit_then_delay(0.3, count=2)  # both chunks of the first block
    task = asyncio.create_task(fw.run())
    try:
        await append(buf, [new_event(i) for i in range(8)], fw)
        # The receiver records a request once it has answered it: the last chunk of the first
        # block is committed and its answer still delayed.
        await wait_until(lambda: len(receiver.requests) == 1 and
                         receiver.stats()["received"] == 4, what="first block committed")
        await fw.stop(5.0)
    finally:
        await sink.aclose()
        await task
    # The first block was answered and settled; the block leased ahead was never sent.
    assert fw.status()["delivered_total"] == 4
    assert [p.id for p in await buf.pending("erp")] == [new_event(i).id for i in range(4, 8)]
    assert (await buf.stats()).sinks["erp"].leased == 0  # given back: pending at once


async def test_a_sink_that_raises_is_treated_as_retry(buf):
    from agent.sinks.base import Delivery, Outcome, Sink

    class Broken(Sink):
        def __init__(self):
            super().__init__("erp")
            self.calls = []

        @property
        def max_batch(self):
            return 5

        async def deliver(self, events):
            self.calls.append([e.id for e in events])
            if len(self.calls) <= 2:
                raise ValueError("bug in a plugin")
            return Delivery(Outcome.ACCEPTED, 200)

    sink = Broken()
    fw = Forwarder(sink, buf, FAST, poll_interval=3600.0)
    task = asyncio.create_task(fw.run())
    try:
        await append(buf, [new_event(i) for i in range(3)], fw)
        await settled(fw, buf, 3)
        assert sink.calls == [["ev-000", "ev-001", "ev-002"]] * 3
        assert fw.status()["retried_total"] == 2
        assert "bug in a plugin" in fw.status()["previous_error"]["error"]
    finally:
        await fw.stop(5.0)
        await task


class _BusyOnSecondLease(AsyncBuffer):
    """The real buffer, whose second lease (the one leased ahead while the first request is
    in flight) takes 2.5 s, as it does while the buffer's thread works through a large
    grouped deletion on a slow card."""

    def __init__(self):
        super().__init__(MemoryBuffer())
        self.leases = 0

    async def lease(self, sink, limit, renew=()):
        self.leases += 1
        if self.leases == 2:
            await asyncio.sleep(2.5)
        return await super().lease(sink, limit, renew)


async def test_a_give_back_behind_a_slow_lease_survives_the_stops_second_cancel(receiver):
    """Past drain_timeout the stop cancels the forwarder, and cancels it again each second
    while it runs on (config/tasks.py). Its give-back first waits for the lease in progress;
    when that took over a second, the second cancel ended the give-back before it started,
    and the rows stayed leased until the lease timeout: a forwarder replacing this one (a
    reload) would send newer rows of the same machine first."""
    buf = _BusyOnSecondLease()
    await buf.open(["erp"])
    config = HttpSinkConfig.model_validate({"type": "http", "url": receiver.url,
                                            "timeout": "60s", "retry": FAST.model_dump()})
    sink = HttpSink("erp", config)
    # Leases of one row: the first one is full, so the next is leased ahead while the first
    # request is in flight (after a short lease nothing is leased before a wake).
    fw = Forwarder(sink, buf, FAST, lease_batch=1, poll_interval=3600.0)
    receiver.inject_commit_then_delay(30.0)
    task = asyncio.create_task(fw.run())
    try:
        await append(buf, [new_event(1)], fw)
        await wait_until(lambda: receiver.stats()["received"] == 1 and buf.leases == 2,
                         what="request in flight, the next lease under way")
        await asyncio.wait_for(fw.stop(drain_timeout=0.1), 10)
        assert task.done()
        assert [p.id for p in await buf.pending("erp")] == ["ev-001"]
        assert (await buf.stats()).sinks["erp"].leased == 0  # given back: pending at once
    finally:
        await sink.aclose()
        await buf.aclose()


class CountingBuffer(AsyncBuffer):
    """Counts the lease calls (each one a hop to the writer thread)."""

    def __init__(self, buffer):
        super().__init__(buffer)
        self.leases = 0

    async def lease(self, sink, limit, renew=()):
        self.leases += 1
        return await super().lease(sink, limit, renew)


async def test_a_quiet_agent_leases_once_per_commit(receiver, harness):
    """One event committed at a time: one lease delivers it. After a short lease nothing is
    leased again (ahead, or once the pump is done) before the next wake."""
    buf = CountingBuffer(SqliteBuffer(receiver.db_path.with_name("agent.db"), 2**30))
    await buf.open(["erp"])
    try:
        fw = harness.start(buf, receiver.url + "/events")
        await wait_until(lambda: buf.leases == 1, what="the first (empty) lease")
        await wait_until(lambda: fw.state is ForwarderState.IDLE, what="idle")
        for i in range(3):
            await append(buf, [new_event(i)], fw)
            await wait_until(lambda i=i: receiver.stats()["received"] == i + 1,
                             what=f"event {i} delivered")
            await wait_until(lambda i=i: fw.delivered_total == i + 1, what="settled")
            await wait_until(lambda: fw.state is ForwarderState.IDLE, what="idle again")
        assert buf.leases == 1 + 3
        assert fw.delivered_total == 3
        await harness.close()
        harness.running.clear()
        assert (await buf.stats()).sinks["erp"].pending == 0
    finally:
        await buf.aclose()
