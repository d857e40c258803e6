"""MqttSource against a real Mosquitto broker on loopback: JSON and raw tags, garbage payloads,
persistent sessions across broker restarts, TLS, probe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from support import stop_task, wait_until
from support.mosquitto import (
    BrokerTls,
    CertSet,
    MosquittoBroker,
    Publisher,
    make_certs,
    needs_mosquitto,
)

from config.errors import ConnectionLostError
from config.model import Quality, TagSample
from protocols.mqtt.config import MqttSourceConfig
from protocols.mqtt.source import MqttSource

pytestmark = needs_mosquitto


class Collector:
    def __init__(self) -> None:
        self.samples: list[TagSample] = []
        self.connects = 0

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.samples.extend(samples)

    def connected(self) -> None:
        self.connects += 1

    def good(self, tag: str) -> list[Any]:
        return [s.value for s in self.samples if s.tag == tag and s.good]

    def bad(self, tag: str) -> list[TagSample]:
        return [s for s in self.samples if s.tag == tag and not s.good]


def make_config(url: str, tags: dict[str, dict[str, Any]], **kw: Any) -> MqttSourceConfig:
    return MqttSourceConfig.model_validate({
        "type": "mqtt", "url": url, "client_id": kw.pop("client_id", "edge-test"),
        "connect_timeout": "3s", "tags": tags, **kw})


@contextlib.asynccontextmanager
async def session(source: MqttSource, out: Collector) -> AsyncIterator[asyncio.Task[None]]:
    """One running session; cancelled on exit (unless it already ended)."""
    task = asyncio.create_task(source.run(out))
    try:
        yield task
    finally:
        await stop_task(task, ConnectionLostError)


async def subscribed(source: MqttSource, out: Collector, pub: Publisher, topic: str,
                     tag: str, payload: str) -> None:
    """Wait until a marker message published on ``topic`` arrives: the subscription is live."""
    await wait_until(lambda: out.connects > 0, what="CONNACK")
    seen = len(out.good(tag))
    while True:
        pub.publish(topic, payload)
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: len(out.good(tag)) > seen, timeout=0.5,
                             what="marker message")
            return


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


@pytest.fixture
def publisher(broker: MosquittoBroker) -> Iterator[Publisher]:
    p = Publisher(broker.port)
    yield p
    p.close()


# --------------------------------------------------------------------------- JSON and raw


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_json_paths_raw_payloads_and_wildcards(broker: MosquittoBroker,
                                                      publisher: Publisher,
                                                      protocol: str) -> None:
    cfg = make_config(broker.url, {
        "state": {"topic": "plant/+/oven/status", "value": "$.state"},
        "speed": {"topic": "plant/l2/oven/status", "value": "$.data.items[0].v",
                  "value_type": "number", "timestamp": "$.ts"},
        "temp": {"topic": "plant/l2/oven/temp"},
        "any": {"topic": "plant/l2/#", "value": "$['odd.key']"},
    }, protocol=protocol)
    source, out = MqttSource("b", cfg), Collector()
    async with session(source, out):
        await subscribed(source, out, publisher, "plant/l2/oven/temp", "temp", "1")
        publisher.publish("plant/l2/oven/status", json.dumps({
            "state": "RUNNING", "data": {"items": [{"v": 12.5}]},
            "ts": "2026-01-02T03:04:05.250Z", "odd.key": True}))
        publisher.publish("plant/l9/oven/status", json.dumps({"state": "STOPPED"}))
        publisher.publish("plant/l2/oven/temp", b"  -7.25 ")
        publisher.publish("plant/l2/oven/temp", b"warm")
        await wait_until(lambda: out.good("temp")[-1:] == ["warm"]
                         and out.good("state") == ["RUNNING", "STOPPED"], what="all messages")
    assert out.good("speed") == [12.5]
    speed = next(s for s in out.samples if s.tag == "speed")
    assert speed.source_time is not None and speed.source_time.isoformat() \
        == "2026-01-02T03:04:05.250000+00:00"
    assert out.good("temp") == [1, -7.25, "warm"]
    assert out.good("any") == [True]
    # 'any' also matches the raw temperature messages, which are no JSON objects.
    details = [s.detail or "" for s in out.bad("any")]
    assert "plant/l2/oven/temp: value: $ is a number, not an object" in details
    assert any("plant/l2/oven/temp: payload is not JSON" in d for d in details)


async def test_garbage_payloads_make_bad_samples_and_good_ones_still_flow(
        broker: MosquittoBroker, publisher: Publisher,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(broker.url, {
        "state": {"topic": "oven/status", "value": "$.state", "value_type": "string"},
        "reject": {"topic": "oven/reject", "value": "$.qty", "value_type": "number"},
    }, max_payload="1KiB")
    source, out = MqttSource("b", cfg), Collector()
    garbage: list[bytes] = [
        b"not json at all",
        json.dumps({"state": 5}).encode(),                  # wrong type
        json.dumps({"state": "X" * 2000}).encode(),         # over max_payload
        b"\x00\xff\xfe\x80binary",                          # binary
        json.dumps({"state": None}).encode(),               # null
        json.dumps({"other": "RUNNING"}).encode(),          # missing key
        b'{"state": NaN}',                                  # not JSON
        json.dumps([1, 2, 3]).encode(),                     # not an object
    ]
    caplog.set_level(logging.WARNING, logger="protocols.mqtt")
    async with session(source, out) as task:
        await subscribed(source, out, publisher, "oven/reject", "reject", '{"qty": 1}')
        publisher.publish("oven/status", json.dumps({"state": "RUNNING"}))
        for g in garbage:
            publisher.publish("oven/status", g)
            publisher.publish("oven/reject", b'{"qty": "three"}')
        publisher.publish("oven/status", json.dumps({"state": "STOPPED"}))
        publisher.publish("oven/reject", json.dumps({"qty": 4}))
        await wait_until(lambda: out.good("reject")[-1:] == [4], what="last good message")
        assert not task.done()
    assert out.good("state") == ["RUNNING", "STOPPED"]
    assert out.good("reject") == [1, 4]
    bad = out.bad("state")
    assert len(bad) == len(garbage)
    details = [s.detail or "" for s in bad]
    assert "not JSON" in details[0]
    assert "is a number 5, expected a string" in details[1]
    assert "over max_payload (1024)" in details[2]
    assert "not JSON" in details[3]
    assert "$.state is null" in details[4]
    assert "$.state is missing" in details[5]
    assert "not JSON" in details[6]
    assert "is an array, not an object" in details[7]
    assert all(s.quality is Quality.BAD and s.value is None for s in bad)
    assert source.decode_errors == {"oven/status": len(garbage),
                                    "oven/reject": len(garbage)}
    warnings = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 2  # once per topic, with an excerpt
    assert "b'not json at all'" in warnings[0].getMessage()


# --------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_persistent_session_gets_qos1_messages_published_while_away_once(
        tmp_path: Path, protocol: str) -> None:
    broker = MosquittoBroker(tmp_path / "broker", persistence=True)
    broker.start()
    try:
        cfg = make_config(broker.url, {"n": {"topic": "line/counter", "value": "$.n"}},
                          protocol=protocol)
        source, out = MqttSource("b", cfg), Collector()
        pub = Publisher(broker.port)
        async with session(source, out) as task:
            await subscribed(source, out, pub, "line/counter", "n", '{"n": 0}')
            pub.close()
            broker.stop()  # graceful: the broker saves the session
            with pytest.raises(ConnectionLostError, match=r"lost|closed|ended"):
                await asyncio.wait_for(task, 10)
        broker.start()  # same port, same persistence file
        pub = Publisher(broker.port, client_id="test-publisher-2")
        try:
            for n in range(1, 6):  # the agent is away: the broker queues these
                pub.publish("line/counter", json.dumps({"n": n}), qos=1)
            async with session(source, out):
                await wait_until(lambda: out.good("n")[-1:] == [5], what="queued messages")
                pub.publish("line/counter", json.dumps({"n": 6}), qos=1)
                await wait_until(lambda: out.good("n")[-1:] == [6], what="a new message")
        finally:
            pub.close()
        assert out.good("n")[1:] == [1, 2, 3, 4, 5, 6]  # each exactly once, in order
        assert out.connects == 2
    finally:
        broker.kill()


async def test_clean_session_resubscribes_after_a_broker_that_forgot_everything(
        broker: MosquittoBroker) -> None:
    cfg = make_config(broker.url, {"n": {"topic": "line/counter", "value": "$.n"}})
    source, out = MqttSource("b", cfg), Collector()
    pub = Publisher(broker.port)
    async with session(source, out) as task:
        await subscribed(source, out, pub, "line/counter", "n", '{"n": 0}')
        pub.close()
        broker.kill()  # no persistence: the restarted broker knows no subscription
        with pytest.raises(ConnectionLostError):
            await asyncio.wait_for(task, 10)
    broker.start()
    pub = Publisher(broker.port)
    try:
        async with session(source, out):
            await subscribed(source, out, pub, "line/counter", "n", '{"n": 1}')
    finally:
        pub.close()
    assert out.good("n")[0] == 0 and 1 in out.good("n")


async def test_unreachable_broker_raises_connection_lost(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b")  # never started: nobody listens on its port
    source = MqttSource("b", make_config(broker.url, {"n": {"topic": "x"}}))
    with pytest.raises(ConnectionLostError, match=f"127.0.0.1:{broker.port}"):
        await source.run(Collector())


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("pki"))


def _client_ctx(certs: CertSet, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if with_cert:
        ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return ctx


async def test_tls_with_ca_and_client_certificate(tmp_path: Path, certs: CertSet) -> None:
    broker = MosquittoBroker(tmp_path / "broker", tls=BrokerTls(
        certs.ca, certs.server_cert, certs.server_key, require_client_certificate=True))
    broker.start()
    try:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        tls = {"ca_file": str(certs.ca), "certificate": str(certs.client_cert),
               "private_key": str(certs.client_key)}
        source, out = MqttSource("b", make_config(broker.url, {"t": {"topic": "a/t"}},
                                                  tls=tls)), Collector()
        pub = Publisher(broker.port, tls=_client_ctx(certs, with_cert=True))
        try:
            async with session(source, out):
                await subscribed(source, out, pub, "a/t", "t", "21.5")
        finally:
            pub.close()
        assert out.good("t")[0] == 21.5
        # Without the client certificate this broker does not let us in.
        no_cert = MqttSource("b", make_config(broker.url, {"t": {"topic": "a/t"}},
                                              tls={"ca_file": str(certs.ca)}))
        with pytest.raises(ConnectionLostError, match=r"cannot connect|closed|lost"):
            await asyncio.wait_for(no_cert.run(Collector()), 10)
    finally:
        broker.kill()


@pytest.mark.parametrize("case", ["wrong host", "unknown CA"])
async def test_tls_refuses_a_broker_it_cannot_verify(tmp_path: Path, certs: CertSet,
                                                     case: str) -> None:
    cert, key = (certs.wrong_host_cert, certs.wrong_host_key) if case == "wrong host" \
        else (certs.server_cert, certs.server_key)
    broker = MosquittoBroker(tmp_path / "broker", tls=BrokerTls(certs.ca, cert, key))
    broker.start()
    try:
        ca = certs.ca if case == "wrong host" else certs.other_ca
        source = MqttSource("b", make_config(broker.url, {"t": {"topic": "a/t"}},
                                             tls={"ca_file": str(ca)}))
        out = Collector()
        with pytest.raises(ConnectionLostError, match="TLS certificate check failed") as err:
            await asyncio.wait_for(source.run(out), 10)
        assert out.connects == 0
        expected = ("IP address mismatch",) if case == "wrong host" else (
            "self-signed certificate in certificate chain", "unable to get local issuer")
        assert any(e in str(err.value) for e in expected), err.value
    finally:
        broker.kill()


# --------------------------------------------------------------------------- probe


async def test_probe_reports_retained_values_and_silent_tags(broker: MosquittoBroker,
                                                             publisher: Publisher) -> None:
    publisher.publish("oven/status", json.dumps({"state": "RUNNING"}), retain=True)
    cfg = make_config(broker.url, {"state": {"topic": "oven/status", "value": "$.state"},
                                   "reject": {"topic": "oven/reject"}})
    source = MqttSource("b", cfg)
    source.probe_wait = 0.5
    samples = {s.tag: s for s in await source.probe()}
    assert samples["state"].value == "RUNNING" and samples["state"].good
    assert samples["reject"].quality is Quality.UNCERTAIN
    assert "no message" in (samples["reject"].detail or "")



async def test_cancelled_while_queued_messages_arrive_with_the_connack(tmp_path: Path) -> None:
    # Regression: queued messages come in the same read as CONNACK, while open() is still
    # waiting for it; a cancellation at that moment must end the session, not be swallowed.
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    try:
        cfg = make_config(broker.url, {"n": {"topic": "line/counter", "value": "$.n"}})
        source = MqttSource("b", cfg)
        pub = Publisher(broker.port)
        first = Collector()
        async with session(source, first):
            await subscribed(source, first, pub, "line/counter", "n", '{"n": 0}')
        for n in range(1, 50):
            pub.publish("line/counter", json.dumps({"n": n}))
        pub.close()

        batch = asyncio.Event()

        class SignalFirstBatch(Collector):
            def emit(self, samples: Sequence[TagSample]) -> None:
                super().emit(samples)
                batch.set()

        out = SignalFirstBatch()
        task = asyncio.create_task(source.run(out))
        await batch.wait()  # resumes while the session is still inside open()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert task in done and task.cancelled()
        assert out.good("n")[0] == 1
    finally:
        broker.kill()


@pytest.fixture
def passwords(tmp_path: Path) -> Path:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with mosquitto)")
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "edge", "s3cret"],
                   check=True, capture_output=True)
    return path


async def test_username_and_password(tmp_path: Path, passwords: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    broker = MosquittoBroker(tmp_path / "broker", password_file=passwords)
    broker.start()
    try:
        monkeypatch.setenv("TEST_MQTT_PASSWORD", "s3cret")
        good = make_config(broker.url, {"t": {"topic": "a/t"}}, username="edge",
                           password="${env:TEST_MQTT_PASSWORD}")
        out = Collector()
        async with session(MqttSource("b", good), out):
            await wait_until(lambda: out.connects == 1, what="login accepted")
        for protocol in ("3.1.1", "5"):
            wrong = make_config(broker.url, {"t": {"topic": "a/t"}}, username="edge",
                                password="guess", protocol=protocol)
            with pytest.raises(ConnectionLostError, match="refused the connection") as err:
                await asyncio.wait_for(MqttSource("b", wrong).run(Collector()), 10)
            assert "guess" not in str(err.value)
    finally:
        broker.kill()
