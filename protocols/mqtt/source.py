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
- Each message gives one sample per matching tag (so each reject message is one scrap
  quantity). Messages are read and emitted on the event loop thread, in broker order.
- A message that does not decode (not JSON, wrong type, over ``max_payload``, binary) gives the
  tags it was for a bad sample; it is counted per topic (``decode_errors``) and logged once per
  topic with an excerpt. Other messages keep flowing.
- Sparkplug B topics go to a ``SparkplugTracker`` (births, aliases, seq, deaths, rebirth
  requests), a new one per session.
- QoS 1 messages are acknowledged only after the commit that holds their effect (events and
  detector states): each read burst's acknowledgements go to ``out.when_committed``. A kill
  before that commit leaves them unacknowledged, and the broker redelivers them to the next
  session of the persistent session. While more than ``_MAX_OUTSTANDING`` wait for a commit
  (commits fail: disk full), the connection stops reading rather than pile them up in memory.
- A redelivery (DUP flag, same packet id, topic and payload as a message this process already
  applied in the previous connection) is not applied twice; it is acknowledged after the next
  commit. This memory belongs to the broker and client id, not the instance, so a new instance
  after a reload recognises what the old one applied; a skipped redelivery stays remembered
  until a later connection has acknowledged it. Only the last ``_DEDUP_WINDOW`` messages of a
  connection are remembered: the broker's window of unacknowledged messages is far smaller,
  and packet ids are reused only after 65535 others. A message committed but killed before
  its PUBACK left is counted again after the restart (at least once: the window is the write
  of one packet).
- Staleness: MQTT samples come only when something is published, so ``stale_after`` is off
  unless configured; ``stale_after`` is then ``inf`` for the runtime (no watchdog).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from config.errors import DecodeError, PeerTimeoutError
from config.model import Quality, TagSample, utcnow
from protocols.base import SampleSink, Source
from protocols.mqtt.bridge import PahoConnection
from protocols.mqtt.config import (
    MqttProtocol,
    MqttSourceConfig,
    SessionMode,
    SparkplugTag,
    TopicTag,
)
from protocols.mqtt.payload import Message, TopicReader, excerpt
from protocols.mqtt.sparkplug import NAMESPACE, parse_topic, rebirth_request
from protocols.mqtt.sparkplug_host import SparkplugTracker

__all__ = ["MqttSource", "topic_matches"]

log = logging.getLogger(__name__)

# Bounds on per-topic bookkeeping: wildcard subscriptions can see unbounded topic names.
_MAX_TRACKED_TOPICS = 1000
_MAX_CACHED_ROUTES = 10000
_PROBE_WAIT = 2.0
# QoS 1 messages applied but not yet acknowledged (their commit is pending): past this the
# connection stops reading until commits catch up.
_MAX_OUTSTANDING = 2000
# Ask for a commit without waiting out the group commit interval once this many wait: the
# broker's in-flight window (Mosquitto's default is 20) would otherwise run dry.
_ACK_SOON = 16
_DEDUP_WINDOW = 4096


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: '+' one level, '#' the rest (and the parent); '$...' topics are not
    matched by a leading wildcard."""
    return _match(topic_filter.split("/"), topic.split("/"))


def _match(flt: Sequence[str], levels: Sequence[str]) -> bool:
    if levels and levels[0].startswith("$") and flt and flt[0] in ("+", "#"):
        return False
    for i, f in enumerate(flt):
        if f == "#":
            return True
        if i >= len(levels):
            return False
        if f != "+" and f != levels[i]:
            return False
    return len(flt) == len(levels)


class _Applied:
    """QoS 1 messages one client id applied in this process: the current connection's (packet
    id -> digest of topic and payload) and the previous one's, which the broker may redeliver
    (DUP) to the next connection."""

    __slots__ = ("recent", "redelivery")

    def __init__(self) -> None:
        self.recent: OrderedDict[int, int] = OrderedDict()
        self.redelivery: dict[int, int] = {}


_APPLIED: dict[tuple[str, int, str], _Applied] = {}


class _Router:
    """Topic -> the readers of the ``topic`` tags whose filter matches it."""

    def __init__(self, tags: dict[str, TopicTag]) -> None:
        self.exact: dict[str, list[TopicReader]] = {}
        self.wild: list[tuple[list[str], list[TopicReader]]] = []
        by_filter: dict[str, list[TopicReader]] = {}
        for tag_id, tag in tags.items():
            by_filter.setdefault(tag.topic, []).append(TopicReader.of(tag_id, tag))
        self.by_filter = by_filter
        for flt, readers in by_filter.items():
            if "+" in flt or "#" in flt:
                self.wild.append((flt.split("/"), readers))
            else:
                self.exact[flt] = readers
        self._cache: dict[str, list[TopicReader]] = {}

    def readers_of(self, filters: Sequence[str]) -> list[TopicReader]:
        """The readers of the subscriptions a message came through (MQTT 5 identifiers)."""
        if len(filters) == 1:
            return self.by_filter.get(filters[0], [])
        seen: dict[str, TopicReader] = {}
        for f in filters:
            for r in self.by_filter.get(f, []):
                seen.setdefault(r.tag, r)
        return list(seen.values())

    def readers(self, topic: str) -> list[TopicReader]:
        """The readers of every filter matching ``topic`` (when the broker does not say)."""
        if not self.wild:
            return self.exact.get(topic, [])
        found = self._cache.get(topic)
        if found is None:
            found = list(self.exact.get(topic, []))
            levels = topic.split("/")
            for flt, readers in self.wild:
                if _match(flt, levels):
                    found.extend(readers)
            if len(self._cache) >= _MAX_CACHED_ROUTES:
                self._cache.clear()
            self._cache[topic] = found
        return found


class MqttSource(Source):
    """Subscribes to the tags of one broker; see the module docstring.

    ``MqttSource(name, config)`` does no I/O. ``await run(out)`` is one session;
    ``await probe()`` collects what arrives (retained values, births) for a moment.
    """

    def __init__(self, name: str, config: MqttSourceConfig) -> None:
        super().__init__(name)
        self.config = config
        topic_tags = {t: c for t, c in config.tags.items() if isinstance(c, TopicTag)}
        self._spb_tags = {t: c for t, c in config.tags.items() if isinstance(c, SparkplugTag)}
        self._router = _Router(topic_tags)
        self._subscriptions: dict[str, int] = {}
        for tag in topic_tags.values():
            self._subscriptions[tag.topic] = max(tag.qos, self._subscriptions.get(tag.topic, 0))
        qos_of = {t: c.qos for t, c in self._spb_tags.items()}
        for flt, qos in SparkplugTracker(self._spb_tags).subscriptions(qos_of).items():
            self._subscriptions[flt] = max(qos, self._subscriptions.get(flt, 0))
        self._spb_filters = frozenset(self._subscriptions) - set(self._router.by_filter)
        # MQTT 5: subscription identifier n is the n-th filter (see PahoConnection).
        self._filter_of_id: dict[int, str] | None = None
        if config.protocol is MqttProtocol.V5:
            self._filter_of_id = dict(enumerate(self._subscriptions, start=1))
        self._tags_of_filter: dict[str, list[str]] = {}
        for tag_id, c in config.tags.items():
            flt = c.topic if isinstance(c, TopicTag) else f"{NAMESPACE}/{c.group}/+/{c.node}/#"
            self._tags_of_filter.setdefault(flt, []).append(tag_id)
        self.decode_errors: dict[str, int] = {}  # topic -> messages that did not decode
        self.messages_total = 0
        self.rebirth_requests = 0
        self._logged_topics: set[str] = set()
        self._pending: list[TagSample] = []
        self._tracker = SparkplugTracker(self._spb_tags)
        self._conn: PahoConnection | None = None
        self.probe_wait = _PROBE_WAIT
        self._max_payload = config.max_payload
        self._now = utcnow()
        self._now_mono = -1.0
        self._burst_acks: list[int] = []
        # Shared by every instance for this broker and client id in this process: a reload
        # that changes the source builds a new instance, and the broker redelivers to it.
        self._applied = _APPLIED.setdefault((config.host, config.port, config.client_id),
                                            _Applied())
        self.outstanding = 0  # QoS 1 messages applied, acknowledgement waiting for a commit
        self.redeliveries_skipped = 0

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

    async def run(self, out: SampleSink) -> None:
        self._tracker = SparkplugTracker(self._spb_tags)
        self._pending = []
        applied = self._applied
        applied.redelivery.update(applied.recent)
        applied.recent = OrderedDict()
        self._burst_acks = []
        when_committed = getattr(out, "when_committed", None)

        def emit() -> None:
            if self._pending:
                batch, self._pending = self._pending, []
                out.emit(batch)
            if self._burst_acks:
                mids, self._burst_acks = self._burst_acks, []
                if when_committed is None:  # nothing durable behind this sink
                    conn.ack(mids)
                else:
                    self._defer_ack(conn, mids, when_committed)

        def refused(topics: dict[str, str]) -> None:
            for flt, why in topics.items():
                detail = f"broker refused the subscription to {flt}: {why}"
                log.warning("source %s: %s", self.name, detail)
                self._bad(self._tags_of_filter.get(flt, []), detail)
            emit()

        conn = PahoConnection(self.config, self._subscriptions, self._on_message, emit,
                              refused)
        self._conn = conn
        try:
            await conn.open()
            out.connected()
            emit()
            await conn.closed()
        finally:
            emit()
            self._conn = None
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
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not up.is_set():
            raise PeerTimeoutError(f"MQTT broker {self.config.host}:{self.config.port} did "
                                   f"not accept the connection within "
                                   f"{self.config.connect_timeout:g}s")
        now = utcnow()
        return [seen.get(t) or TagSample(tag=t, value=None, quality=Quality.UNCERTAIN,
                                         agent_time=now, detail="no message within "
                                         f"{self.probe_wait:g}s (not retained?)")
                for t in self.config.tags]

    # ------------------------------------------------------------------ acknowledgements

    def _defer_ack(self, conn: PahoConnection, mids: list[int],
                   when_committed: Callable[..., None]) -> None:
        count = len(mids)
        self.outstanding += count

        def committed() -> None:
            self.outstanding -= count
            conn.ack(mids)  # nothing if that connection has ended: the broker redelivers
            current = self._conn
            if current is not None and current.paused \
                    and self.outstanding <= _MAX_OUTSTANDING // 2:
                current.resume_reading()

        when_committed(committed, soon=self.outstanding >= _ACK_SOON)

    def _redelivered(self, msg: mqtt.MQTTMessage) -> bool:
        """Remember an applied QoS 1 message; True for a redelivery already applied."""
        mid = msg.mid
        digest = hash((msg.topic, bytes(msg.payload)))
        self._burst_acks.append(mid)
        conn = self._conn
        if self.outstanding + len(self._burst_acks) >= _MAX_OUTSTANDING and conn is not None \
                and not conn.paused:
            log.warning("source %s: %d messages wait for a commit; reading paused until the "
                        "buffer commits again", self.name,
                        self.outstanding + len(self._burst_acks))
            conn.pause_reading()
        applied = self._applied
        if applied.redelivery:
            if msg.dup and applied.redelivery.get(mid) == digest:
                del applied.redelivery[mid]
                self.redeliveries_skipped += 1
                # Until its PUBACK is out it stays a candidate for the next connection.
                applied.recent[mid] = digest
                return True
            if not msg.dup:  # the broker resends before anything new: redelivery is over
                applied.redelivery.clear()
        recent = applied.recent
        recent[mid] = digest
        recent.move_to_end(mid)
        if len(recent) > _DEDUP_WINDOW:
            recent.popitem(last=False)
        return False

    # ------------------------------------------------------------------ messages

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        self.messages_total += 1
        if msg.qos == 1 and self._redelivered(msg):
            return
        topic = msg.topic
        data = msg.payload
        # One clock read per millisecond, not per message: a burst carries hundreds.
        mono = time.monotonic()
        if mono - self._now_mono > 0.001:
            self._now, self._now_mono = utcnow(), mono
        now = self._now
        filters = self._filters(msg)
        if self._spb_tags and topic.startswith(NAMESPACE) and (
                filters is None or not self._spb_filters.isdisjoint(filters)):
            spb = parse_topic(topic)
            if spb is not None and self._tracker.watches(spb):
                if len(data) > self.config.max_payload:
                    self._rejected(topic, data, f"payload of {len(data)} bytes is over "
                                   f"max_payload ({self.config.max_payload})")
                    return
                result = self._tracker.on_message(spb, data, now, mono)
                self._pending.extend(result.samples)
                if result.problem:
                    self._note_problem(topic, data, result.problem)
                if result.rebirth is not None:
                    self._request_rebirth(*result.rebirth)
                return
        readers = self._router.readers(topic) if filters is None \
            else self._router.readers_of(filters)
        if not readers:
            return
        if len(data) > self._max_payload:
            detail = (f"payload of {len(data)} bytes is over max_payload "
                      f"({self.config.max_payload})")
            self._note_problem(topic, data, detail)
            self._bad([r.tag for r in readers], f"{topic}: {detail}")
            return
        message = Message(data)
        pending = self._pending
        for r in readers:
            try:
                value, source_time = r.read(message)
            except DecodeError as exc:
                self._note_problem(topic, data, str(exc))
                pending.append(TagSample(tag=r.tag, value=None, quality=Quality.BAD,
                                         agent_time=now, detail=f"{topic}: {exc}"))
                continue
            pending.append(TagSample(r.tag, value, Quality.GOOD, now, source_time))

    def _filters(self, msg: mqtt.MQTTMessage) -> list[str] | None:
        """The filters a message was delivered for, when the broker tells (MQTT 5)."""
        if self._filter_of_id is None:
            return None
        ids = getattr(msg.properties, "SubscriptionIdentifier", None)
        if not ids:
            return None
        found = [self._filter_of_id[i] for i in ids if i in self._filter_of_id]
        return found or None

    def _rejected(self, topic: str, data: bytes | bytearray, detail: str) -> None:
        self._note_problem(topic, data, detail)
        spb = parse_topic(topic)
        if spb is not None:
            tags = [t for t, c in self._spb_tags.items() if c.group == spb.group
                    and c.node == spb.node and c.device == spb.device]
            self._bad(tags, f"{topic}: {detail}")

    def _note_problem(self, topic: str, data: bytes | bytearray, detail: str) -> None:
        if topic in self.decode_errors or len(self.decode_errors) < _MAX_TRACKED_TOPICS:
            key = topic
        else:
            key = "(other topics)"
        self.decode_errors[key] = self.decode_errors.get(key, 0) + 1
        if key not in self._logged_topics:
            self._logged_topics.add(key)
            log.warning("source %s: a message on %s cannot be used: %s; payload %s (further "
                        "problems on this topic are counted, not logged)", self.name, topic,
                        detail, excerpt(data), extra={"component": self.name, "topic": topic})

    def _request_rebirth(self, group: str, node: str) -> None:
        if self.config.sparkplug_rebirth != "request" or self._conn is None:
            return
        self.rebirth_requests += 1
        log.info("source %s: asking Sparkplug edge node %s/%s to rebirth", self.name, group,
                 node)
        self._conn.publish(f"{NAMESPACE}/{group}/NCMD/{node}",
                           rebirth_request(int(time.time() * 1000)), qos=0)

    def _bad(self, tags: Sequence[str], detail: str) -> None:
        now = utcnow()
        self._pending.extend(TagSample(tag=tag, value=None, quality=Quality.BAD,
                                       agent_time=now, detail=detail) for tag in tags)
