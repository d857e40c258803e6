"""The NATS JetStream sink against a real nats-server: Nats-Msg-Id dedup, PubAck settling,
a missing stream held with a clear message, token auth, and a server restarted mid-drain with
the stream counting what it stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port, wait_until
from support.brokers import (
    NatsServer,
    create_stream,
    fill_buffer,
    make_events,
    needs_nats,
    stream_copies,
)

from agent.runtime.forwarder import Forwarder
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import NatsSinkConfig, RetryPolicy
from agent.sinks.nats import NatsSink
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer

pytestmark = needs_nats


def sink_config(url: str, **extra: Any) -> NatsSinkConfig:
    return NatsSinkConfig.model_validate({"type": "nats", "servers": [url],
                                          "ack_timeout": "5s", "connect_timeout": "2s",
                                          **extra})


def outbound(n: int, **kw: Any) -> list[OutboundEvent]:
    return [OutboundEvent(e.id, json.loads(e.payload)["source"], e.payload)
            for e in make_events(n, **kw)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path / "nats")
    s.start()
    yield s
    s.kill()


@pytest.fixture
async def sink(server: NatsServer) -> AsyncIterator[NatsSink]:
    s = NatsSink("stream", sink_config(server.url, stream="EVENTS"), agent_id="edge-t")
    yield s
    await s.aclose()


async def test_publish_dedup_by_msg_id(server: NatsServer, sink: NatsSink) -> None:
    await create_stream(server.url)
    events = outbound(5)
    assert (await sink.deliver(events)).outcome is Outcome.ACCEPTED
    again = await sink.deliver(events)  # a re-send after a lost ack: duplicate = accepted
    assert again.outcome is Outcome.ACCEPTED
    copies = await stream_copies(server.url)
    assert copies.total == 5 and copies.distinct == 5
    assert [i for i, _, _ in copies.items] == [e.id for e in events]


async def test_missing_stream_holds_with_a_clear_message(server: NatsServer,
                                                         sink: NatsSink) -> None:
    delivery = await sink.deliver(outbound(2))
    assert delivery.outcome is Outcome.HOLD
    assert "no JetStream stream covers subject 'plantedge.s1.l1.m1.scrap.recorded'" \
        in delivery.detail
    await create_stream(server.url)  # the operator fixes it: the next probe delivers
    assert (await sink.deliver(outbound(2))).outcome is Outcome.ACCEPTED


async def test_a_foreign_event_with_a_dotted_machine_is_dead_lettered(
        server: NatsServer, sink: NatsSink) -> None:
    """A buffered event whose machine id holds '.' (the config refuses such ids for a NATS
    subject; an event replayed from elsewhere may still carry one) would land one token deeper
    ('plantedge.s1.l1.press.1...'): before, it was published there and accepted."""
    await create_stream(server.url)
    good = outbound(1)
    bad = OutboundEvent("bad-1", None, good[0].payload.replace(
        "/machines/m1", "/machines/press.1"))
    delivery = await sink.deliver([bad, good[0]])
    assert delivery.outcome is Outcome.REJECTED
    verdict = delivery.result_for("bad-1")
    assert verdict.outcome is Outcome.REJECTED and "machine 'press.1'" in verdict.detail
    assert delivery.result_for(good[0].id).outcome is Outcome.ACCEPTED
    copies = await stream_copies(server.url)
    assert [i for i, _, _ in copies.items] == [good[0].id]


async def test_subject_outside_the_stream_holds(server: NatsServer) -> None:
    await create_stream(server.url, subjects=("plantedge.s1.l1.m1.>",))
    s = NatsSink("stream", sink_config(server.url), agent_id="edge-t")
    try:
        delivery = await s.deliver(outbound(3))  # m1 covered, m2 and m3 not
        assert delivery.outcome is Outcome.HOLD
        assert "m2" in delivery.result_for(outbound(3)[1].id).detail
    finally:
        await s.aclose()


async def test_unreachable_server_is_a_retry() -> None:
    s = NatsSink("stream", sink_config(f"nats://127.0.0.1:{free_port()}"), agent_id="edge-t")
    delivery = await s.deliver(outbound(1))
    assert delivery.outcome is Outcome.RETRY and "cannot connect" in delivery.detail
    await s.aclose()


async def test_token_auth(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "auth", config_text='authorization { token: "s3cret" }\n')
    server.start()
    try:
        await asyncio.sleep(0)
        (tmp_path / "token").write_text("wrong")
        cfg = sink_config(server.url, token="${file:" + str(tmp_path / "token") + "}")
        s = NatsSink("stream", cfg, agent_id="edge-t")
        held = await s.deliver(outbound(1))
        assert held.outcome is Outcome.HOLD and "credentials" in held.detail
        (tmp_path / "token").write_text("s3cret")
        await s.reload_credentials()
        delivery = await s.deliver(outbound(1))
        assert delivery.outcome is Outcome.HOLD and "no JetStream stream" in delivery.detail
        await s.aclose()
    finally:
        server.kill()


@pytest.mark.slow
async def test_server_restart_mid_drain_loses_nothing(tmp_path: Path,
                                                      server: NatsServer) -> None:
    await create_stream(server.url)
    n = 3000
    fill_buffer(tmp_path / "buffer.db", ["stream"], make_events(n, machines=4))
    buffer = AsyncBuffer(SqliteBuffer(tmp_path / "buffer.db", max_size=2**31))
    await buffer.open(["stream"])
    s = NatsSink("stream", sink_config(server.url, batch_max_events=100), agent_id="edge-t")
    fw = Forwarder(s, buffer, RetryPolicy(initial_backoff="50ms", max_backoff="300ms"))
    task = asyncio.create_task(fw.run())
    try:
        await wait_until(lambda: fw.delivered_total > n // 4, timeout=30, what="a quarter")
        await asyncio.to_thread(server.kill)  # kill -9 of the server mid-drain
        await wait_until(lambda: fw.state == "retrying", what="the sink noticing")
        await asyncio.to_thread(server.start)
        await wait_until(lambda: fw.delivered_total >= n, timeout=60, interval=0.1,
                         what="everything settled")
    finally:
        await fw.stop(5)
        task.cancel()
        await s.aclose()
        stats = await buffer.stats()
        await buffer.aclose()
    assert stats.events == 0
    copies = await stream_copies(server.url)
    # JetStream's duplicate window dropped every re-send: exactly one copy of each event.
    assert copies.distinct == n and copies.total == n
    assert copies.order_violations() == []


async def test_stream_deleted_mid_drain_holds_and_resumes_when_recreated(
        tmp_path: Path, server: NatsServer) -> None:
    import nats

    await create_stream(server.url)
    n = 3000
    fill_buffer(tmp_path / "buffer.db", ["stream"], make_events(n, machines=4))
    buffer = AsyncBuffer(SqliteBuffer(tmp_path / "buffer.db", max_size=2**31))
    await buffer.open(["stream"])
    s = NatsSink("stream", sink_config(server.url, batch_max_events=100), agent_id="edge-t")
    fw = Forwarder(s, buffer, RetryPolicy(initial_backoff="50ms", max_backoff="200ms"))
    task = asyncio.create_task(fw.run())
    try:
        await wait_until(lambda: fw.delivered_total > n // 4, timeout=30, what="a quarter")
        nc = await nats.connect(server.url)
        await nc.jetstream().delete_stream("EVENTS")  # the operator deletes it mid-drain
        await nc.close()
        await wait_until(lambda: str(fw.state) == "held", what="the sink held")
        assert "no JetStream stream covers subject 'plantedge.s1.l1.m" in str(fw.held_reason)
        held_at = fw.delivered_total
        assert (await buffer.stats()).events >= n - fw.delivered_total > 0  # kept while held
        await create_stream(server.url)
        await wait_until(lambda: fw.delivered_total >= n, timeout=60, interval=0.1,
                         what="the rest delivered to the recreated stream")
    finally:
        await fw.stop(5)
        task.cancel()
        await s.aclose()
        stats = await buffer.stats()
        await buffer.aclose()
    assert stats.events == 0 and fw.dead_lettered_total == 0 and fw.delivered_total == n
    copies = await stream_copies(server.url)
    # The new stream has what was not acknowledged before the deletion (at most what was
    # unsettled when the sink held: attempts in flight then may still have settled), once
    # each, in order.
    assert 0 < copies.distinct <= n - held_at and copies.total == copies.distinct
    assert copies.order_violations() == []


async def test_other_stream_holds_and_oversized_message_is_rejected(server: NatsServer) -> None:
    import nats

    nc = await nats.connect(server.url)
    await nc.jetstream().add_stream(name="OTHER", subjects=["plantedge.>"], max_msg_size=2000)
    await nc.close()
    events = outbound(3)
    s = NatsSink("stream", sink_config(server.url, stream="EVENTS"), agent_id="edge-t")
    try:
        held = await s.deliver(events)
        assert held.outcome is Outcome.HOLD and "'OTHER' acknowledged" in held.detail
    finally:
        await s.aclose()
    doc = json.loads(events[1].payload)
    doc["data"]["note"] = "x" * 5000
    doc["id"] = "big-1"  # a new id: the first three are already in the stream (duplicates)
    big = OutboundEvent("big-1", events[1].source, json.dumps(doc))
    s = NatsSink("stream", sink_config(server.url), agent_id="edge-t")
    try:
        delivery = await s.deliver([events[0], big, events[2]])
    finally:
        await s.aclose()
    assert delivery.result_for(events[0].id).outcome is Outcome.ACCEPTED
    refused = delivery.result_for(big.id)
    assert refused.outcome is Outcome.REJECTED and "message size exceeds" in refused.detail
    assert delivery.result_for(events[2].id).outcome is Outcome.ACCEPTED


async def test_concurrent_attempts_share_one_connection(server: NatsServer,
                                                        sink: NatsSink) -> None:
    await create_stream(server.url)
    events = outbound(40)
    first, second = await asyncio.gather(sink.deliver(events[:20]), sink.deliver(events[20:]))
    assert first.outcome is Outcome.ACCEPTED and second.outcome is Outcome.ACCEPTED
    assert (await stream_copies(server.url)).distinct == 40


async def test_mutual_tls_and_user_password(tmp_path: Path) -> None:
    from support.mosquitto import make_certs

    certs = make_certs(tmp_path / "pki")
    server = NatsServer(tmp_path / "tls", config_text=(
        f'tls {{ cert_file: "{certs.server_cert}", key_file: "{certs.server_key}", '
        f'ca_file: "{certs.ca}", verify: true }}\n'
        'authorization { user: edge, password: right }\n'))
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    tls = {"ca_file": str(certs.ca), "client_cert": str(certs.client_cert),
           "client_key": str(certs.client_key)}
    try:
        (tmp_path / "pw").write_text("right")
        secret = "${file:" + str(tmp_path / "pw") + "}"
        no_cert = NatsSink("s", sink_config(url, tls={"ca_file": str(certs.ca)},
                                            username="edge", password=secret), agent_id="e")
        refused = await no_cert.deliver(outbound(1))
        await no_cert.aclose()
        assert refused.outcome in (Outcome.RETRY, Outcome.HOLD)  # the server wants a cert
        s = NatsSink("s", sink_config(url, tls=tls, username="edge", password=secret),
                     agent_id="e")
        delivery = await s.deliver(outbound(1))  # connected: now the missing stream speaks
        await s.aclose()
        assert delivery.outcome is Outcome.HOLD and "no JetStream stream" in delivery.detail
    finally:
        server.kill()
