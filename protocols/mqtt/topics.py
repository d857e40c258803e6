"""MQTT topic filters: matching a topic, and routing a message to the tags that want it.

- ``topic_matches``: '+' matches one level, '#' the rest (and the parent); a topic starting
  with '$' is not matched by a leading wildcard (MQTT 3.1.1 and 5).
- ``Router``: topic -> the readers of the ``topic`` tags whose filter matches it. Exact filters
  are one dict lookup; wildcard matches are cached per topic, the cache bounded (wildcard
  subscriptions can see unbounded topic names). With MQTT 5 subscription identifiers the broker
  names the filters, and ``readers_of`` skips matching altogether.
- ``Subscriptions``: the filters to subscribe to (``topic`` tags' filters and the Sparkplug
  ones the tracker asks for) with their QoS, and the way back from a filter to its tags.
"""

from __future__ import annotations

from collections.abc import Sequence

import paho.mqtt.client as mqtt

from protocols.mqtt.config import MqttProtocol, MqttSourceConfig, SparkplugTag, TopicTag
from protocols.mqtt.payload import TopicReader
from protocols.mqtt.sparkplug import NAMESPACE
from protocols.mqtt.sparkplug_host import SparkplugTracker

__all__ = ["Router", "Subscriptions", "topic_matches"]

_MAX_CACHED_ROUTES = 10000


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


class Router:
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


class Subscriptions:
    """What one source subscribes to, and how a message's filters map back to its tags.

    ``qos``: filter -> QoS, the ``topic`` tags' filters then the Sparkplug ones, as sent to the
    broker on every CONNACK (the order numbers the MQTT 5 subscription identifiers: the n-th
    filter is identifier n, see ``PahoConnection``)."""

    def __init__(self, config: MqttSourceConfig, router: Router) -> None:
        topic_tags = [c for c in config.tags.values() if isinstance(c, TopicTag)]
        spb_tags = {t: c for t, c in config.tags.items() if isinstance(c, SparkplugTag)}
        self.qos: dict[str, int] = {}
        for tag in topic_tags:
            self.qos[tag.topic] = max(tag.qos, self.qos.get(tag.topic, 0))
        qos_of = {t: c.qos for t, c in spb_tags.items()}
        for flt, qos in SparkplugTracker(spb_tags).subscriptions(qos_of).items():
            self.qos[flt] = max(qos, self.qos.get(flt, 0))
        self.spb_filters = frozenset(self.qos) - set(router.by_filter)
        self.filter_of_id: dict[int, str] | None = None
        if config.protocol is MqttProtocol.V5:
            self.filter_of_id = dict(enumerate(self.qos, start=1))
        self.tags_of_filter: dict[str, list[str]] = {}
        for tag_id, c in config.tags.items():
            flt = c.topic if isinstance(c, TopicTag) else f"{NAMESPACE}/{c.group}/+/{c.node}/#"
            self.tags_of_filter.setdefault(flt, []).append(tag_id)

    def filters(self, msg: mqtt.MQTTMessage) -> list[str] | None:
        """The filters a message was delivered for, when the broker tells (MQTT 5)."""
        if self.filter_of_id is None:
            return None
        ids = getattr(msg.properties, "SubscriptionIdentifier", None)
        if not ids:
            return None
        found = [self.filter_of_id[i] for i in ids if i in self.filter_of_id]
        return found or None
