"""kill -9 of the agent in the middle of a drain to a real broker, then a restart: the
receiving side's count must show every event at least once, distinct counts exact, and
per-machine order on first delivery. MQTT consumers may see a copy twice (they deduplicate by
the event id); JetStream's duplicate window must leave exactly one copy of each."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import AgentProcess, wait_until
from support.brokers import (
    MqttConsumer,
    NatsServer,
    create_stream,
    fill_buffer,
    make_events,
    needs_nats,
    stream_copies,
)
from support.mosquitto import MosquittoBroker, needs_mosquitto

pytestmark = pytest.mark.slow

N = 20_000


def write_config(path: Path, data_dir: Path, sink: str) -> None:
    path.write_text("\n".join([
        f'agent: {{id: edge-t, site: s1, data_dir: "{data_dir}", stop_timeout: 3s}}',
        'health: {listen: "127.0.0.1:0"}',
        "sinks:", f"  out: {sink}",
        "buffer: {commit_interval: 5ms}", ""]))


def prefill(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    fill_buffer(data_dir / "buffer.db", ["out"], make_events(N, machines=5))


@needs_mosquitto
async def test_mqtt_agent_killed_mid_publish(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker", max_queued_messages=1_000_000)
    broker.start()
    consumer = MqttConsumer(broker.port)
    prefill(tmp_path / "data")
    write_config(tmp_path / "agent.yaml", tmp_path / "data",
                 f'{{type: mqtt, url: "{broker.url}", batch_max_events: 200, '
                 'retry: {initial_backoff: 20ms, max_backoff: 200ms}}')
    agent = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent.log")
    try:
        agent.start()
        await wait_until(lambda: consumer.distinct() > N // 5, timeout=60, interval=0.005,
                         what="a fifth delivered")
        agent.kill()  # SIGKILL mid-drain: PUBACKs in flight, settles not yet written
        at_kill = consumer.distinct()
        assert at_kill < N, "the drain finished before the kill; make N larger"
        agent.start()
        await wait_until(lambda: consumer.distinct() == N, timeout=120, interval=0.1,
                         what="every event at the consumer")
        assert agent.terminate() == 0
    finally:
        agent.kill()
        consumer.close()
        broker.kill()
    copies = consumer.copies
    assert copies.distinct == N and copies.total >= N
    assert copies.order_violations() == []


@needs_nats
async def test_nats_agent_killed_mid_publish(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    await create_stream(server.url)
    prefill(tmp_path / "data")
    write_config(tmp_path / "agent.yaml", tmp_path / "data",
                 f'{{type: nats, servers: ["{server.url}"], batch_max_events: 200, '
                 'retry: {initial_backoff: 20ms, max_backoff: 200ms}}')
    agent = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent.log")

    async def stored() -> int:
        import nats

        nc = await nats.connect(server.url)
        try:
            return int((await nc.jetstream().stream_info("EVENTS")).state.messages)
        finally:
            await nc.close()

    async def more_than(n: int) -> bool:
        return await stored() > n

    async def exactly(n: int) -> bool:
        return await stored() == n

    try:
        agent.start()
        await wait_until(lambda: more_than(N // 5), timeout=60, interval=0.01,
                         what="a fifth stored")
        agent.kill()
        assert await stored() < N, "the drain finished before the kill; make N larger"
        agent.start()
        await wait_until(lambda: exactly(N), timeout=120, interval=0.1,
                         what="every event in the stream")
        assert agent.terminate() == 0
        copies = await stream_copies(server.url)
    finally:
        agent.kill()
        server.kill()
    # The re-sent copies carried the same Nats-Msg-Id: the stream kept exactly one of each.
    assert copies.total == N and copies.distinct == N
    assert copies.order_violations() == []

