"""Real peers for the broker sinks: a nats-server with JetStream, counting consumers, and
buffers pre-filled with realistic events.

``needs_nats`` skips only when the binary is missing (CI installs it with apt). The consumers
count what the receiving side really got: every copy, every distinct event id, and whether
first deliveries kept per-machine order (each source's ``sequence`` increasing).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer
from config.model import Event, EventType, event_id

__all__ = ["Copies", "MqttConsumer", "NatsServer", "fill_buffer", "find_nats_server",
           "make_events", "needs_nats", "stream_copies"]


def find_nats_server() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


needs_nats = pytest.mark.skipif(
    find_nats_server() is None,
    reason="nats-server is not installed (apt-get install nats-server; .ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """``nats-server -js -sd DIR`` on a loopback port; stop/kill/start keep port and store."""

    def __init__(self, workdir: Path, *, port: int | None = None,
                 config_text: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.config_text = config_text
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        binary = find_nats_server()
        if binary is None:
            raise RuntimeError("nats-server is not installed")
        args = [binary, "-js", "-sd", str(self.workdir / "store"), "-a", "127.0.0.1",
                "-p", str(self.port)]
        if self.config_text is not None:
            conf = self.workdir / "nats.conf"
            conf.write_text(self.config_text, encoding="utf-8")
            args += ["-c", str(conf)]
        log = (self.workdir / "nats.log").open("ab")
        self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}: "
                                   + (self.workdir / "nats.log").read_text()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("nats-server did not listen in time")
            time.sleep(0.02)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def create_stream(url: str, name: str = "EVENTS",
                        subjects: tuple[str, ...] = ("plantedge.>",)) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=name, subjects=list(subjects),
                                        duplicate_window=600.0)
    finally:
        await nc.close()


# --------------------------------------------------------------------------- events


def make_events(n: int, machines: int = 3, site: str = "s1", line: str = "l1",
                agent: str = "edge-t", start_seq: int = 1) -> list[NewEvent]:
    """``n`` scrap events round-robin over ``machines``, each machine's sequence 1, 2, ..."""
    t0 = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    per: Counter[str] = Counter()
    out = []
    for i in range(n):
        m = f"m{i % machines + 1}"
        per[m] += 1
        seq = start_seq + per[m] - 1
        source = f"/sites/{site}/lines/{line}/machines/{m}"
        t = t0 + timedelta(seconds=i)
        ev = Event(id=event_id(source, "plantedge.scrap.recorded", seq), source=source,
                   type=EventType.SCRAP_RECORDED, time=t, key=m, sequence=seq,
                   data={"machine": m, "line": line, "site": site, "quantity": 1 + i % 7,
                         "window_start": t.isoformat(), "window_end": t.isoformat(),
                         "order_id": f"ORD-{i // 100}"})
        out.append(NewEvent(id=ev.id, key=m, type=ev.type.value, time=ev.time.isoformat(),
                            payload=ev.to_json(agent)))
    return out


def fill_buffer(path: Path, sinks: list[str], events: list[NewEvent],
                max_size: int = 2**31) -> None:
    buf = SqliteBuffer(path, max_size=max_size, synchronous="OFF")
    buf.open(sinks)
    try:
        for i in range(0, len(events), 5000):
            buf.append(events[i:i + 5000], {})
    finally:
        buf.close()


# --------------------------------------------------------------------------- counting


class Copies:
    """What a consumer received: (event id, source, sequence) in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, int]] = []

    def add_payload(self, payload: bytes) -> None:
        doc = json.loads(payload)
        self.items.append((doc["id"], doc["source"], int(doc["sequence"])))

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def distinct(self) -> int:
        return len({i for i, _, _ in self.items})

    def order_violations(self) -> list[str]:
        """Per source, the first delivery of each event must come in sequence order."""
        seen: set[str] = set()
        last: dict[str, int] = defaultdict(int)
        bad = []
        for event, source, seq in self.items:
            if event in seen:
                continue
            seen.add(event)
            if seq <= last[source]:
                bad.append(f"{source}: {seq} after {last[source]}")
            last[source] = seq
        return bad


class MqttConsumer:
    """A paho subscriber in its own thread, persistent session, QoS 1: counts every copy."""

    def __init__(self, port: int, topic: str = "+/+/+/events/#",
                 client_id: str = "counting-consumer") -> None:
        self.copies = Copies()
        self.topics: Counter[str] = Counter()
        self.properties: list[Any] = []
        self.others: dict[str, Any] = {}  # topic -> last non-CloudEvent JSON (state topics)
        self.raw: list[bytes] = []
        self._lock = threading.Lock()
        self._topic = topic
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, keepalive=30, clean_start=False,
                            properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("consumer did not subscribe")

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe(self._topic, qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.topics[msg.topic] += 1
            doc = json.loads(msg.payload)
            if "specversion" not in doc:
                self.others[msg.topic] = doc
                return
            self.copies.add_payload(msg.payload)
            self.raw.append(msg.payload)
            if len(self.properties) < 5:
                self.properties.append(msg.properties)

    def distinct(self) -> int:
        with self._lock:
            return self.copies.distinct

    def raw_of_type(self, type_: str) -> list[bytes]:
        """Payloads of the first copy of each event of this CloudEvents type."""
        seen: set[str] = set()
        out = []
        with self._lock:
            for payload in self.raw:
                doc = json.loads(payload)
                if doc["type"] == type_ and doc["id"] not in seen:
                    seen.add(doc["id"])
                    out.append(payload)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


async def stream_copies(url: str, stream: str = "EVENTS") -> Copies:
    """Every message the stream stored, in stream order."""
    import nats

    copies = Copies()
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        total = info.state.messages
        if total:
            sub = await js.pull_subscribe(">", stream=stream)
            while copies.total < total:
                try:
                    batch = await sub.fetch(min(1000, total - copies.total), timeout=5)
                except TimeoutError:
                    break
                for msg in batch:
                    copies.add_payload(msg.data)
                    await msg.ack()
    finally:
        await nc.close()
    return copies
