"""Sparkplug B through a real Mosquitto broker: births, aliases, a seq gap (the rebirth request
is observed on the broker), a death certificate, and garbage on a Sparkplug topic."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import stop_task, wait_until
from support.mosquitto import MosquittoBroker, Publisher, needs_mosquitto

from config.errors import ConnectionLostError
from config.model import TagSample
from protocols.mqtt.config import MqttSourceConfig
from protocols.mqtt.source import MqttSource
from protocols.mqtt.sparkplug import DataType, Metric, Payload, decode_payload, encode_payload

pytestmark = needs_mosquitto

G, N, D = "plant-a", "line2", "press"


class Collector:
    def __init__(self) -> None:
        self.samples: list[TagSample] = []
        self.connects = 0

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.samples.extend(samples)

    def connected(self) -> None:
        self.connects += 1

    def last(self, tag: str) -> TagSample | None:
        found = [s for s in self.samples if s.tag == tag]
        return found[-1] if found else None

    def good(self, tag: str) -> list[Any]:
        return [s.value for s in self.samples if s.tag == tag and s.good]


class EdgeNode:
    """A Sparkplug B edge node played by the test through a plain paho client."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.seq = 0

    def send(self, kind: str, metrics: list[Metric], device: str | None = None,
             seq: int | None = None) -> None:
        if kind == "NBIRTH":
            self.seq = 0
        use = self.seq if seq is None else seq
        self.seq = (use + 1) % 256
        topic = f"spBv1.0/{G}/{kind}/{N}" + (f"/{device}" if device else "")
        payload = Payload(timestamp=int(time.time() * 1000), metrics=metrics,
                          seq=None if kind == "NDEATH" else use)
        self.pub.publish(topic, encode_payload(payload), qos=0)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


def config(url: str) -> MqttSourceConfig:
    return MqttSourceConfig.model_validate({
        "type": "mqtt", "url": url, "client_id": "edge-spb", "protocol": "5", "tags": {
            "line.state": {"type": "sparkplug", "group": G, "node": N, "metric": "Status/State"},
            "press.speed": {"type": "sparkplug", "group": G, "node": N, "device": D,
                            "metric": "Speed"},
            "press.temp": {"type": "sparkplug", "group": G, "node": N, "device": D,
                           "metric": "Temp"},
        }})


async def test_births_aliases_seq_gap_rebirth_and_death(broker: MosquittoBroker) -> None:
    source, out = MqttSource("spb", config(broker.url)), Collector()
    host = Publisher(broker.port, client_id="observer", subscribe=[f"spBv1.0/{G}/NCMD/{N}"])
    node = EdgeNode(Publisher(broker.port, client_id="edge-node"))
    task = asyncio.create_task(source.run(out))
    try:
        await wait_until(lambda: out.connects == 1, what="connected")
        # A birth is retried until the (asynchronous) subscription is in place.
        while out.last("line.state") is None:
            node.send("NBIRTH", [
                Metric(name="bdSeq", datatype=DataType.INT64, long_value=7),
                Metric(name="Status/State", alias=1, datatype=DataType.STRING,
                       string_value="RUNNING")])
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: out.last("line.state") is not None, timeout=0.3)
        assert source.rebirth_requests == 0
        node.send("DBIRTH", [
            Metric(name="Speed", alias=10, datatype=DataType.DOUBLE, double_value=55.0),
            Metric(name="Temp", alias=11, datatype=DataType.INT16, int_value=-5 & 0xFFFFFFFF)],
            device=D)
        await wait_until(lambda: out.good("press.speed") == [55.0], what="DBIRTH values")
        assert out.good("press.temp") == [-5]
        # Data by alias only, without datatypes: both come from the births.
        node.send("DDATA", [Metric(alias=10, double_value=12.5),
                            Metric(alias=11, int_value=-7 & 0xFFFFFFFF)], device=D)
        node.send("NDATA", [Metric(alias=1, string_value="STOPPED")])
        await wait_until(lambda: out.good("line.state")[-1:] == ["STOPPED"], what="NDATA")
        assert out.good("press.speed") == [55.0, 12.5]
        assert out.good("press.temp") == [-5, -7]
        assert host.messages(f"spBv1.0/{G}/NCMD/{N}") == []
        # A lost message: seq jumps by two. The values still count; a rebirth is requested.
        node.send("DDATA", [Metric(alias=10, double_value=13.0)], device=D, seq=node.seq + 1)
        await wait_until(lambda: host.messages(f"spBv1.0/{G}/NCMD/{N}"), what="rebirth request")
        request = decode_payload(host.messages(f"spBv1.0/{G}/NCMD/{N}")[0])
        assert [(m.name, m.boolean_value) for m in request.metrics] \
            == [("Node Control/Rebirth", True)]
        assert out.good("press.speed")[-1] == 13.0
        assert source.decode_errors == {f"spBv1.0/{G}/DDATA/{N}/{D}": 1}  # the gap, counted
        # The node answers with a new birth; then it dies.
        node.send("NBIRTH", [Metric(name="bdSeq", datatype=DataType.INT64, long_value=8),
                             Metric(name="Status/State", alias=1, datatype=DataType.STRING,
                                    string_value="RUNNING")])
        await wait_until(lambda: out.good("line.state")[-1:] == ["RUNNING"], what="rebirth")
        node.send("NDEATH", [Metric(name="bdSeq", datatype=DataType.INT64, long_value=7)])
        node.send("NDATA", [Metric(alias=1, string_value="IDLE")])
        await wait_until(lambda: out.good("line.state")[-1:] == ["IDLE"], what="NDATA")
        # An NDEATH with the old bdSeq was a stale will: ignored.
        assert all(s.good for s in out.samples if "NDEATH" in (s.detail or ""))
        node.send("NDEATH", [Metric(name="bdSeq", datatype=DataType.INT64, long_value=8)])
        await wait_until(lambda: all(not out.last(t).good for t in  # type: ignore[union-attr]
                                     ("line.state", "press.speed", "press.temp")),
                         what="death certificate")
        assert "NDEATH" in (out.last("press.speed").detail or "")  # type: ignore[union-attr]
        assert not task.done()
    finally:
        await stop_task(task, ConnectionLostError)
        host.close()
        node.pub.close()


async def test_data_before_birth_and_garbage_ask_for_a_rebirth(broker: MosquittoBroker) -> None:
    source, out = MqttSource("spb", config(broker.url)), Collector()
    host = Publisher(broker.port, client_id="observer", subscribe=[f"spBv1.0/{G}/NCMD/{N}"])
    pub = Publisher(broker.port, client_id="edge-node")
    task = asyncio.create_task(source.run(out))
    try:
        await wait_until(lambda: out.connects == 1, what="connected")
        # The agent joined after the births: the first data message triggers a rebirth.
        while not host.messages(f"spBv1.0/{G}/NCMD/{N}"):
            pub.publish(f"spBv1.0/{G}/DDATA/{N}/{D}", encode_payload(Payload(
                seq=5, metrics=[Metric(alias=10, double_value=1.0)])), qos=0)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: host.messages(f"spBv1.0/{G}/NCMD/{N}"), timeout=0.3)
        assert out.good("press.speed") == []  # an alias nobody explained is not guessed
        pub.publish(f"spBv1.0/{G}/DDATA/{N}/{D}", b"\xff\xff\xff not protobuf", qos=0)
        await wait_until(lambda: out.last("press.temp") is not None, what="bad samples")
        assert "undecodable Sparkplug payload" in (out.last("press.temp").detail or "")  # type: ignore[union-attr]
        assert not task.done()
    finally:
        await stop_task(task, ConnectionLostError)
        host.close()
        pub.close()
