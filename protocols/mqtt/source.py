"""The MQTT source: subscribes to a broker and turns messages into samples.

``run()`` is one session (``protocols/base.py``)::

    PahoConnection.open() ── CONNACK ok, subscriptions sent ──> out.connected()
        │                                                          │
        │ refused / unreachable / TLS check failed                 v
        └──> ConnectionLostError          messages ──> samples ──> out.emit(batch per read burst)
                                                   │
                             broker gone, keep-alive expired ──> ConnectionLostError

Session rules:
- A persistent session (default) keeps the broker queueing QoS 1 messages while the agent is
  away; they arrive right after the next CONNACK, before anything new. Subscriptions are sent
  again on every CONNACK anyway (the broker may have lost the session).
- Each read burst's samples are emitted, then its QoS 1 acknowledgements are handed to
  ``out.when_committed``; a QoS 1 redelivery already applied is skipped before anything else
  (``protocols/mqtt/acks.py``: ack after commit, reading backpressure, redelivery memory).
- Messages become samples in ``protocols/mqtt/messages.py`` (topic tags, Sparkplug B, decode
  errors); which filters are subscribed and which tags a message is for, in
  ``protocols/mqtt/topics.py``. A Sparkplug rebirth request is published here, on the
  session's connection, when ``sparkplug_rebirth`` is ``request``.
- Staleness: MQTT samples come only when something is published, so ``stale_after`` is off
  unless configured; ``stale_after`` is then ``inf`` for the runtime (no watchdog).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import paho.mqtt.client as mqtt

from config.errors import PeerTimeoutError
from config.model import Quality, TagSample, utcnow
from config.tasks import cancel_and_wait
from protocols.base import SampleSink, Source
from protocols.mqtt.acks import Acks
from protocols.mqtt.bridge import PahoConnection
from protocols.mqtt.config import MqttSourceConfig, SessionMode, TopicTag
from protocols.mqtt.messages import MessageHandler
from protocols.mqtt.sparkplug import NAMESPACE, rebirth_request
from protocols.mqtt.topics import Router, Subscriptions, topic_matches

__all__ = ["MqttSource", "topic_matches"]

log = logging.getLogger(__name__)

_PROBE_WAIT = 2.0


class MqttSource(Source):
    """Subscribes to the tags of one broker; see the module docstring.

    ``MqttSource(name, config)`` does no I/O. ``await run(out)`` is one session;
    ``await probe()`` collects what arrives (retained values, births) for a moment.
    """

    def __init__(self, name: str, config: MqttSourceConfig) -> None:
        super().__init__(name)
        self.config = config
        router = Router({t: c for t, c in config.tags.items() if isinstance(c, TopicTag)})
        subscriptions = Subscriptions(config, router)
        self._subscriptions = subscriptions.qos
        self._messages = MessageHandler(name, config, router, subscriptions,
                                        self._request_rebirth)
        self._acks = Acks(name, (config.host, config.port, config.client_id))
        self.messages_total = 0
        self.rebirth_requests = 0
        self._conn: PahoConnection | None = None
        self.probe_wait = _PROBE_WAIT

    @property
    def tag_ids(self) -> list[str]:
        return list(self.config.tags)

    @property
    def stale_after(self) -> float:
        return self.config.stale_after if self.config.stale_after is not None else math.inf

    @property
    def subscriptions(self) -> dict[str, int]:
        """Topic filter -> QoS, as sent to the broker on every CONNACK."""
        return dict(self._subscriptions)

    @property
    def decode_errors(self) -> dict[str, int]:
        """Topic -> messages that did not decode."""
        return self._messages.decode_errors

    @property
    def outstanding(self) -> int:
        """QoS 1 messages applied, acknowledgement waiting for a commit."""
        return self._acks.outstanding

    @property
    def redeliveries_skipped(self) -> int:
        return self._acks.redeliveries_skipped

    async def run(self, out: SampleSink) -> None:
        messages, acks = self._messages, self._acks
        messages.reset()
        when_committed = getattr(out, "when_committed", None)

        def emit() -> None:
            batch = messages.take()
            if batch:
                out.emit(batch)
            acks.flush(conn, when_committed)

        def refused(topics: dict[str, str]) -> None:
            messages.refused(topics)
            emit()

        conn = PahoConnection(self.config, self._subscriptions, self._on_message, emit,
                              refused)
        acks.begin(conn)
        self._conn = conn
        try:
            await conn.open()
            out.connected()
            emit()
            await conn.closed()
        finally:
            emit()
            self._conn = None
            acks.end()
            conn.close()

    async def probe(self) -> list[TagSample]:
        """Connect with a clean session under a separate client id, collect retained values
        and births for ``probe_wait`` seconds (less once every tag has one), disconnect.
        Tags without a message are reported uncertain."""
        config = self.config.model_copy(update={
            "client_id": f"{self.config.client_id}-probe", "session": SessionMode.CLEAN})
        prober = MqttSource(self.name, config)
        seen: dict[str, TagSample] = {}
        up = asyncio.Event()
        complete = asyncio.Event()
        wanted = len(self.config.tags)

        class _Collect:
            def emit(self, samples: Sequence[TagSample]) -> None:
                for s in samples:
                    seen[s.tag] = s
                if len(seen) == wanted:
                    complete.set()

            def connected(self) -> None:
                up.set()

        task = asyncio.ensure_future(prober.run(_Collect()))
        try:
            for event, within in ((up, self.config.connect_timeout),
                                  (complete, self.probe_wait)):
                waiter = asyncio.ensure_future(event.wait())
                done, _ = await asyncio.wait([task, waiter], timeout=within,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if task in done:
                    task.result()  # raises the session's RetryableError
                if waiter not in done:
                    break
        finally:
            await cancel_and_wait(task)
        if not up.is_set():
            raise PeerTimeoutError(f"MQTT broker {self.config.host}:{self.config.port} did "
                                   f"not accept the connection within "
                                   f"{self.config.connect_timeout:g}s")
        now = utcnow()
        return [seen.get(t) or TagSample(tag=t, value=None, quality=Quality.UNCERTAIN,
                                         agent_time=now, detail="no message within "
                                         f"{self.probe_wait:g}s (not retained?)")
                for t in self.config.tags]

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        self.messages_total += 1
        if msg.qos == 1 and self._acks.redelivered(msg):
            return
        self._messages.handle(msg)

    def _request_rebirth(self, group: str, node: str) -> None:
        if self.config.sparkplug_rebirth != "request" or self._conn is None:
            return
        self.rebirth_requests += 1
        log.info("source %s: asking Sparkplug edge node %s/%s to rebirth", self.name, group,
                 node)
        self._conn.publish(f"{NAMESPACE}/{group}/NCMD/{node}",
                           rebirth_request(int(time.time() * 1000)), qos=0)
