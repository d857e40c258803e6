"""MQTT QoS 1 messages whose commit is still pending when their session ends are redelivered by
the broker; the next session in the same process (a reconnect, or a new source instance after a
reload) must not apply them twice, and acknowledges them after the next commit (issue 11, #1).
Real Mosquitto, persistent session."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from support import stop_task, wait_until
from support.mosquitto import MosquittoBroker, Publisher, needs_mosquitto

from config.errors import ConnectionLostError
from config.model import TagSample
from protocols.mqtt.config import MqttSourceConfig
from protocols.mqtt.source import MqttSource

pytestmark = needs_mosquitto

REJECT = "p/m1/reject"


class Durable:
    """A sink like the runtime's: acknowledgements wait until ``commit()``."""

    def __init__(self) -> None:
        self.samples: list[TagSample] = []
        self.connects = 0
        self.acks: list[Callable[[], None]] = []

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.samples.extend(samples)

    def connected(self) -> None:
        self.connects += 1

    def when_committed(self, ack: Callable[[], None], *, soon: bool = False) -> None:
        self.acks.append(ack)

    def commit(self) -> None:
        acks, self.acks = self.acks, []
        for ack in acks:
            ack()

    def rejects(self) -> int:
        return sum(1 for s in self.samples if s.tag == "m1.reject" and s.good)


def source(url: str) -> MqttSource:
    return MqttSource("broker", MqttSourceConfig.model_validate({
        "type": "mqtt", "url": url, "client_id": "edge-redelivery", "connect_timeout": "3s",
        "tags": {"m1.reject": {"topic": REJECT, "value": "$.qty", "qos": 1}}}))


async def run_until(src: MqttSource, out: Durable, done: Callable[[], bool]) -> None:
    task = asyncio.create_task(src.run(out))
    try:
        await wait_until(done, timeout=10, what="the session's messages")
    finally:
        await stop_task(task, ConnectionLostError)


async def test_a_new_instance_does_not_apply_a_redelivery_twice(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    pub = Publisher(broker.port)
    try:
        # Create the persistent session and its subscription, then go away.
        first = Durable()
        await run_until(source(broker.url), first, lambda: first.connects > 0)
        for _ in range(5):
            pub.publish(REJECT, json.dumps({"qty": 1}))
        # Session 1 takes the five; their commit is still pending when it ends (a reload).
        one = Durable()
        await run_until(source(broker.url), one, lambda: one.rejects() == 5)
        assert one.acks  # never committed, so never acknowledged
        # A reconnect that ends before the commit too: still not applied.
        again = Durable()
        src = source(broker.url)
        await run_until(src, again, lambda: src.redeliveries_skipped == 5)
        assert again.rejects() == 0
        # Session 2 (a new instance, as after a reload) gets them again, flagged DUP: they
        # are not applied twice, and their acknowledgement waits for the next commit.
        two = Durable()
        src2 = source(broker.url)
        task = asyncio.create_task(src2.run(two))
        try:
            await wait_until(lambda: src2.redeliveries_skipped == 5 and two.acks,
                             what="the redeliveries")
            assert two.rejects() == 0
            two.commit()
            pub.publish(REJECT, json.dumps({"qty": 2}))
            await wait_until(lambda: two.rejects() == 1, what="the next message")
            two.commit()
        finally:
            await stop_task(task, ConnectionLostError)
        # Nothing is left to redeliver.
        three = Durable()
        src3 = source(broker.url)
        marker = asyncio.create_task(src3.run(three))
        try:
            await wait_until(lambda: three.connects > 0, what="session 3")
            pub.publish(REJECT, json.dumps({"qty": 3}))
            await wait_until(lambda: three.rejects() == 1, what="a fresh message")
            assert src3.redeliveries_skipped == 0
            assert [s.value for s in three.samples if s.tag == "m1.reject"] == [3]
        finally:
            await stop_task(marker, ConnectionLostError)
    finally:
        pub.close()
        broker.kill()
