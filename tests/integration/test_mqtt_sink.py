"""The MQTT sink against a real Mosquitto: topics, CloudEvents properties, PUBACK settling,
refusals (dead letters, holds), TLS with a client certificate, retained state, and a broker
restarted in the middle of a drain with a consumer that counts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support import wait_until
from support.brokers import MqttConsumer, fill_buffer, make_events
from support.mosquitto import BrokerTls, MosquittoBroker, make_certs, needs_mosquitto

from agent.runtime.forwarder import Forwarder
from agent.sinks.base import Delivery, OutboundEvent, Outcome
from agent.sinks.config import MqttSinkConfig, RetryPolicy
from agent.sinks.mqtt import MqttSink
from buffer.sqlite import SqliteBuffer
from buffer.writer import AsyncBuffer
from config.model import Event, EventType

pytestmark = needs_mosquitto


def sink_config(url: str, **extra: Any) -> MqttSinkConfig:
    return MqttSinkConfig.model_validate({"type": "mqtt", "url": url, "ack_timeout": "5s",
                                          "connect_timeout": "3s", **extra})


def outbound(n: int, **kw: Any) -> list[OutboundEvent]:
    return [OutboundEvent(e.id, json.loads(e.payload)["source"], e.payload)
            for e in make_events(n, **kw)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker", persistence=True, max_queued_messages=100_000)
    b.start()
    yield b
    b.kill()


@pytest.fixture
def consumer(broker: MosquittoBroker) -> Iterator[MqttConsumer]:
    c = MqttConsumer(broker.port)
    yield c
    c.close()


@pytest.fixture
async def sink(broker: MosquittoBroker) -> AsyncIterator[MqttSink]:
    s = MqttSink("uns", sink_config(broker.url), agent_id="edge-t")
    yield s
    await s.aclose()


async def test_events_arrive_on_uns_topics_with_cloudevents_properties(
        sink: MqttSink, consumer: MqttConsumer) -> None:
    events = outbound(6)
    delivery = await sink.deliver(events)
    assert delivery.outcome is Outcome.ACCEPTED, delivery
    await wait_until(lambda: consumer.distinct() == 6, what="6 events at the consumer")
    assert set(consumer.topics) == {f"s1/l1/m{i}/events/scrap.recorded" for i in (1, 2, 3)}
    props = consumer.properties[0]
    assert props.ContentType == "application/cloudevents+json"
    assert dict(props.UserProperty)["id"] == consumer.copies.items[0][0]
    assert [i for i, _, _ in consumer.copies.items] == [e.id for e in events]


async def test_a_foreign_event_with_a_wildcard_type_is_dead_lettered_not_retried(
        sink: MqttSink, consumer: MqttConsumer) -> None:
    """An event not from this configuration (replayed, another version) whose type holds a
    wildcard: before, paho raised on every attempt (RETRY forever, the sink stuck)."""
    good = outbound(2)
    bad_payload = good[0].payload.replace('"plantedge.scrap.recorded"', '"plantedge.x/#"')
    bad = OutboundEvent("bad-1", None, bad_payload)
    delivery = await sink.deliver([good[0], bad, good[1]])
    assert delivery.outcome is Outcome.REJECTED
    verdict = delivery.result_for("bad-1")
    assert verdict.outcome is Outcome.REJECTED and "type 'x/#'" in verdict.detail
    assert all(delivery.result_for(e.id).outcome is Outcome.ACCEPTED for e in good)
    await wait_until(lambda: consumer.distinct() == 2, what="the two good events")
    assert all("#" not in t for t in consumer.topics)


@pytest.mark.parametrize(("protocol", "session", "present"), [
    ("5", "persistent", True), ("3.1.1", "persistent", True),
    ("5", "clean", False), ("3.1.1", "clean", False)])
async def test_the_session_outlives_a_reconnect_only_when_persistent(
        broker: MosquittoBroker, protocol: str, session: str, present: bool) -> None:
    """The broker (persistence on, restarted in between) keeps a persistent session under
    the stable client id: the reconnect finds it (session present); a clean one never does."""
    s = MqttSink("uns", sink_config(broker.url, protocol=protocol, session=session),
                 agent_id="edge-t")
    try:
        assert (await s.deliver(outbound(2))).outcome is Outcome.ACCEPTED
        assert s._link is not None and not s._link.session_present  # the first connect
        await s.reload_credentials()  # drops the link, as a held sink's probe does
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(broker.start)
        assert (await s.deliver(outbound(2))).outcome is Outcome.ACCEPTED
        assert s._link is not None and s._link.session_present is present
    finally:
        await s.aclose()


async def test_mqtt_311_and_a_custom_topic(broker: MosquittoBroker) -> None:
    c = MqttConsumer(broker.port, topic="plant/#", client_id="c311")
    s = MqttSink("uns", sink_config(broker.url, protocol="3.1.1",
                                    topic="plant/{machine}/{type}"), agent_id="edge-t")
    try:
        assert (await s.deliver(outbound(3))).outcome is Outcome.ACCEPTED
        await wait_until(lambda: c.distinct() == 3, what="3 events")
        assert set(c.topics) == {f"plant/m{i}/scrap.recorded" for i in (1, 2, 3)}
        assert not hasattr(c.properties[0], "ContentType")  # 3.1.1 carries no properties
    finally:
        await s.aclose()
        c.close()


async def test_unreachable_broker_is_a_retry(tmp_path: Path) -> None:
    from support import free_port

    s = MqttSink("uns", sink_config(f"mqtt://127.0.0.1:{free_port()}"), agent_id="edge-t")
    delivery = await s.deliver(outbound(1))
    assert delivery.outcome is Outcome.RETRY
    assert "cannot connect" in delivery.detail


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    pw = tmp_path / "passwd"
    pw.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "edge", "right"], check=True)
    return pw


async def test_bad_password_holds(tmp_path: Path, password_file: Path) -> None:
    pw = password_file
    b = MosquittoBroker(tmp_path / "auth", password_file=pw)
    b.start()
    try:
        (tmp_path / "pw").write_text("wrong")
        s = MqttSink("uns", sink_config(b.url, username="edge",
                                        password="${file:" + str(tmp_path / "pw") + "}"),
                     agent_id="edge-t")
        delivery = await s.deliver(outbound(1))
        assert delivery.outcome is Outcome.HOLD
        assert "refused the connection" in delivery.detail
        (tmp_path / "pw").write_text("right")  # rotated: the held sink re-reads it
        await s.reload_credentials()
        assert (await s.deliver(outbound(1))).outcome is Outcome.ACCEPTED
        await s.aclose()
    finally:
        b.kill()


async def test_acl_refusals_dead_letter_one_and_hold_all(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite s1/l1/m1/#\ntopic readwrite s1/l1/m2/#\n")
    b = MosquittoBroker(tmp_path / "acl-broker", extra_config=f"acl_file {acl}")
    b.start()
    s = MqttSink("uns", sink_config(b.url), agent_id="edge-t")
    try:
        events = outbound(3)  # m1, m2, m3: m3 is not allowed
        delivery = await s.deliver(events)
        assert delivery.outcome is Outcome.REJECTED
        assert delivery.result_for(events[0].id).outcome is Outcome.ACCEPTED
        refused = delivery.result_for(events[2].id)
        assert refused.outcome is Outcome.REJECTED and refused.status == 0x87
        assert "Not authorized" in refused.detail
        only_m3 = [e for e in outbound(9) if "/m3" in e.source]
        held = await s.deliver(only_m3)
        assert held.outcome is Outcome.HOLD and "not authorized" in held.detail
    finally:
        await s.aclose()
        b.kill()


async def test_mutual_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    b = MosquittoBroker(tmp_path / "tls", tls=BrokerTls(certs.ca, certs.server_cert,
                                                         certs.server_key,
                                                         require_client_certificate=True))
    b.start()
    try:
        tls = {"ca_file": str(certs.ca)}
        s = MqttSink("uns", sink_config(b.url, tls=tls), agent_id="edge-t")
        no_cert = await s.deliver(outbound(1))
        assert no_cert.outcome is Outcome.RETRY  # the handshake fails without a certificate
        await s.aclose()
        tls.update(client_cert=str(certs.client_cert), client_key=str(certs.client_key))
        s = MqttSink("uns", sink_config(b.url, tls=tls), agent_id="edge-t")
        assert (await s.deliver(outbound(2))).outcome is Outcome.ACCEPTED
        await s.aclose()
    finally:
        b.kill()


async def test_retained_state_topic(broker: MosquittoBroker) -> None:
    source = "/sites/s1/lines/l1/machines/press"
    started = Event("e1", EventType.DOWNTIME_STARTED, source,
                    datetime(2026, 12, 1, tzinfo=UTC), "press", 1,
                    {"episode_id": "ep1", "category": "unplanned", "reason_code": "7",
                     "order_id": "ORD-9", "started_at": "2026-12-01T00:00:00Z"})
    s = MqttSink("uns", sink_config(broker.url, state_topic="{site}/{line}/{machine}/state"),
                 agent_id="edge-t")
    try:
        payload = started.to_json("edge-t")
        assert (await s.deliver([OutboundEvent("e1", source, payload)])).outcome \
            is Outcome.ACCEPTED
        late = MqttConsumer(broker.port, topic="s1/l1/press/state", client_id="late")
        try:
            await wait_until(lambda: late.others, what="the retained state")
            state = late.others["s1/l1/press/state"]
        finally:
            late.close()
    finally:
        await s.aclose()
    assert state["state"] == "down" and state["order_id"] == "ORD-9"
    assert state["downtime"]["episode_id"] == "ep1"


async def test_the_size_limit_strike_hits_the_poison_not_a_concurrent_attempt(
        tmp_path: Path) -> None:
    """Two attempts in flight on one link (max_in_flight > 1); the broker drops the link on
    the oversized event of the first. Before, each attempt struck its own first unacknowledged
    event, so after two breaks an innocent event of the other attempt was dead-lettered."""
    b = MosquittoBroker(tmp_path / "small", extra_config="message_size_limit 2000")
    b.start()
    events = outbound(6)
    big = json.loads(events[1].payload)
    big["data"]["note"] = "x" * 5000
    poison = OutboundEvent(events[1].id, None, json.dumps(big, separators=(",", ":"),
                                                           sort_keys=True))
    first, second = [events[0], poison], events[2:]
    s = MqttSink("uns", sink_config(b.url), agent_id="edge-t")
    try:
        for round_ in (1, 2):
            one, two = await asyncio.gather(s.deliver(first), s.deliver(second))
            assert one.result_for(events[0].id).outcome is Outcome.ACCEPTED
            assert all(two.result_for(e.id).outcome in (Outcome.ACCEPTED, Outcome.RETRY)
                       for e in second), (round_, two)
        assert one.result_for(poison.id).outcome is Outcome.REJECTED, one
        assert "broke the connection" in one.result_for(poison.id).detail
    finally:
        await s.aclose()
        b.kill()


async def test_a_message_over_the_brokers_size_limit_is_dead_lettered(tmp_path: Path) -> None:
    b = MosquittoBroker(tmp_path / "small", extra_config="message_size_limit 2000")
    b.start()
    events = make_events(5)
    big = json.loads(events[2].payload)
    big["data"]["note"] = "x" * 5000
    events[2] = events[2].__class__(events[2].id, events[2].key, events[2].type,
                                    events[2].time, json.dumps(big, separators=(",", ":"),
                                                                sort_keys=True))
    fill_buffer(tmp_path / "buffer.db", ["uns"], events)
    buffer = AsyncBuffer(SqliteBuffer(tmp_path / "buffer.db", max_size=2**31))
    await buffer.open(["uns"])
    consumer = MqttConsumer(b.port)
    s = MqttSink("uns", sink_config(b.url, batch_max_events=10), agent_id="edge-t")
    fw = Forwarder(s, buffer, RetryPolicy(initial_backoff="20ms", max_backoff="100ms"))
    task = asyncio.create_task(fw.run())
    try:
        await wait_until(lambda: consumer.distinct() == 4 and fw.dead_lettered_total == 1,
                         timeout=15, what="4 delivered and the big one dead-lettered")
        dead = await buffer.dead_letters("uns")
    finally:
        await fw.stop(5)
        task.cancel()
        await s.aclose()
        await buffer.aclose()
        consumer.close()
        b.kill()
    assert [d.id for d in dead] == [events[2].id]
    assert "broke the connection" in dead[0].detail
    assert consumer.copies.order_violations() == []


@pytest.mark.slow
class _FreezingSink(MqttSink):
    """Freezes the broker (SIGSTOP) as its ``at``-th attempt starts."""

    def __init__(self, pid: int, at: int, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pid, self.at, self.calls, self.frozen = pid, at, 0, False

    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        self.calls += 1
        if self.calls == self.at:
            os.kill(self.pid, signal.SIGSTOP)
            self.frozen = True
        return await super().deliver(events)


async def test_broker_restart_mid_drain_loses_nothing(tmp_path: Path, broker: MosquittoBroker,
                                                      consumer: MqttConsumer) -> None:
    n = 3000
    events = make_events(n, machines=4)
    path = tmp_path / "buffer.db"
    fill_buffer(path, ["uns"], events)
    buffer = AsyncBuffer(SqliteBuffer(path, max_size=2**31))
    await buffer.open(["uns"])
    pid = broker._proc.pid if broker._proc is not None else 0
    s = _FreezingSink(pid, 8, "uns", sink_config(broker.url, batch_max_events=100),
                      agent_id="edge-t")
    fw = Forwarder(s, buffer, RetryPolicy(initial_backoff="50ms", max_backoff="300ms"))
    task = asyncio.create_task(fw.run())
    try:
        # The broker is frozen as the 8th attempt starts (a quarter of the way: waiting for
        # the consumer's count raced the drain, two attempts in flight finished it first),
        # then stopped gracefully: the broker saves its queues.
        await wait_until(lambda: s.frozen, timeout=30, what="a quarter")
        for sig in (signal.SIGTERM, signal.SIGCONT):
            os.kill(pid, sig)
        await asyncio.to_thread(broker.stop)
        assert fw.delivered_total < n
        await wait_until(lambda: fw.state == "retrying", what="the sink noticing")
        await asyncio.to_thread(broker.start)
        await wait_until(lambda: consumer.distinct() == n, timeout=60, interval=0.1,
                         what="every event at the consumer")
        await wait_until(lambda: fw.delivered_total == n, timeout=10, what="all settled")
    finally:
        await fw.stop(5)
        task.cancel()
        await s.aclose()
        stats = await buffer.stats()
        await buffer.aclose()
    assert stats.sinks["uns"].pending == 0 and stats.events == 0
    assert consumer.copies.distinct == n
    assert consumer.copies.order_violations() == []


async def test_concurrent_attempts_share_one_connection(sink: MqttSink,
                                                        consumer: MqttConsumer) -> None:
    events = outbound(40)
    first, second = await asyncio.gather(sink.deliver(events[:20]), sink.deliver(events[20:]))
    assert first.outcome is Outcome.ACCEPTED and second.outcome is Outcome.ACCEPTED
    await wait_until(lambda: consumer.distinct() == 40, what="40 events")
    assert consumer.copies.total == 40  # one link: nothing was sent twice
