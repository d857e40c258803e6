"""Messages to samples: the topic tags' payloads, Sparkplug B, and what does not decode.

- Each message gives one sample per matching tag (so each reject message is one scrap
  quantity), collected until the session hands the read burst on (``take``). Messages are
  handled on the event loop thread, in broker order.
- A message that does not decode (not JSON, wrong type, over ``max_payload``, binary) gives the
  tags it was for a bad sample; it is counted per topic (``decode_errors``, at most
  ``_MAX_TRACKED_TOPICS`` topics, the rest under "(other topics)") and logged once per topic
  with an excerpt. Other messages keep flowing.
- Sparkplug B topics go to a ``SparkplugTracker`` (births, aliases, seq, deaths, rebirth
  requests), a new one per session (``reset``); a rebirth it asks for goes to the ``rebirth``
  callback, which owns the connection.
- A subscription the broker refuses gives its tags a bad sample saying so (``refused``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

from config.errors import DecodeError
from config.model import Quality, TagSample, utcnow
from protocols.mqtt.config import MqttSourceConfig, SparkplugTag
from protocols.mqtt.payload import Message, excerpt
from protocols.mqtt.sparkplug import NAMESPACE, parse_topic
from protocols.mqtt.sparkplug_host import SparkplugTracker
from protocols.mqtt.topics import Router, Subscriptions

__all__ = ["MessageHandler"]

log = logging.getLogger(__name__)

# Bounds on per-topic bookkeeping: wildcard subscriptions can see unbounded topic names.
_MAX_TRACKED_TOPICS = 1000


class MessageHandler:
    """Turns the messages of one source into samples; see the module docstring."""

    def __init__(self, name: str, config: MqttSourceConfig, router: Router,
                 subscriptions: Subscriptions, rebirth: Callable[[str, str], None]) -> None:
        self._name = name
        self._config = config
        self._spb_tags = {t: c for t, c in config.tags.items() if isinstance(c, SparkplugTag)}
        self._router = router
        self._subs = subscriptions
        self._rebirth = rebirth
        self.decode_errors: dict[str, int] = {}  # topic -> messages that did not decode
        self._logged_topics: set[str] = set()
        self._pending: list[TagSample] = []
        self._tracker = SparkplugTracker(self._spb_tags)
        self._max_payload = config.max_payload
        self._now = utcnow()
        self._now_mono = -1.0

    def reset(self) -> None:
        """A new session: Sparkplug state starts over, nothing is pending."""
        self._tracker = SparkplugTracker(self._spb_tags)
        self._pending = []

    def take(self) -> list[TagSample]:
        """The samples collected since the last call."""
        batch, self._pending = self._pending, []
        return batch

    def refused(self, topics: dict[str, str]) -> None:
        for flt, why in topics.items():
            detail = f"broker refused the subscription to {flt}: {why}"
            log.warning("source %s: %s", self._name, detail)
            self._bad(self._subs.tags_of_filter.get(flt, []), detail)

    def handle(self, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        data = msg.payload
        # One clock read per millisecond, not per message: a burst carries hundreds.
        mono = time.monotonic()
        if mono - self._now_mono > 0.001:
            self._now, self._now_mono = utcnow(), mono
        now = self._now
        filters = self._subs.filters(msg)
        if self._spb_tags and topic.startswith(NAMESPACE) and (
                filters is None or not self._subs.spb_filters.isdisjoint(filters)):
            spb = parse_topic(topic)
            if spb is not None and self._tracker.watches(spb):
                if len(data) > self._config.max_payload:
                    self._rejected(topic, data, f"payload of {len(data)} bytes is over "
                                   f"max_payload ({self._config.max_payload})")
                    return
                result = self._tracker.on_message(spb, data, now, mono)
                self._pending.extend(result.samples)
                if result.problem:
                    self._note_problem(topic, data, result.problem)
                if result.rebirth is not None:
                    self._rebirth(*result.rebirth)
                return
        readers = self._router.readers(topic) if filters is None \
            else self._router.readers_of(filters)
        if not readers:
            return
        if len(data) > self._max_payload:
            detail = (f"payload of {len(data)} bytes is over max_payload "
                      f"({self._config.max_payload})")
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
                        "problems on this topic are counted, not logged)", self._name, topic,
                        detail, excerpt(data), extra={"component": self._name, "topic": topic})

    def _bad(self, tags: Sequence[str], detail: str) -> None:
        now = utcnow()
        self._pending.extend(TagSample(tag=tag, value=None, quality=Quality.BAD,
                                       agent_time=now, detail=detail) for tag in tags)
