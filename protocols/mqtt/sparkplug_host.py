"""Sparkplug B host-side tracking: births, aliases, sequence numbers, deaths.

One ``SparkplugTracker`` per MQTT session (a new session starts knowing nothing: whatever was
learnt before may be stale after an outage, and the first data message asks for a rebirth).

Per edge node (``group/node``)::

    unknown ──NBIRTH──> alive ──NDEATH (matching bdSeq)──> dead ──NBIRTH──> alive
       │                  │ ^
       │                  │ └─ NDATA / DBIRTH / DDATA / DDEATH with seq = last + 1 (mod 256)
       │                  └─ seq gap, undecodable payload, unknown alias: rebirth request
       └─ any data before a birth: rebirth request (names are used if present, aliases are not)

Rules:
- NBIRTH replaces everything known about the node and its devices (aliases, datatypes, seq);
  a DBIRTH does the same for one device. Births carry current values: they become samples.
- Data messages may carry only an alias and no datatype; both are resolved from the birth.
- NDEATH makes every tag of the node (and its devices) bad, DDEATH those of one device: the
  signal is lost, which the detector reports as signal lost, not downtime. An NDEATH whose
  ``bdSeq`` differs from the current birth's is a late will of an older connection: ignored.
- Rebirth requests for a node are rate-limited to one per ``REBIRTH_HOLDOFF`` seconds until its
  NBIRTH arrives. Historical metrics (``is_historical``) are not fed to detection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from config.errors import DecodeError
from config.model import Quality, TagSample
from protocols.mqtt.config import SparkplugTag
from protocols.mqtt.sparkplug import (
    NAMESPACE,
    Metric,
    Payload,
    SparkplugTopic,
    decode_payload,
    metric_value,
)

__all__ = ["REBIRTH_HOLDOFF", "SparkplugResult", "SparkplugTracker"]

REBIRTH_HOLDOFF = 5.0

NodeKey = tuple[str, str]  # (group, node)
MetricKey = tuple[str, str, str | None, str]  # (group, node, device, metric name)


@dataclass(slots=True)
class _Scope:
    """What a birth told us about the node itself (device None) or one device."""

    aliases: dict[int, str] = field(default_factory=dict)
    datatypes: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Node:
    alive: bool = False
    seq: int | None = None
    bd_seq: int | None = None
    scopes: dict[str | None, _Scope] = field(default_factory=dict)
    rebirth_at: float | None = None  # monotonic time of the last request, until NBIRTH


@dataclass(slots=True)
class SparkplugResult:
    samples: list[TagSample] = field(default_factory=list)
    rebirth: NodeKey | None = None  # publish a rebirth request to this node
    problem: str | None = None  # why the message was (partly) unusable, for counting/logging


class SparkplugTracker:
    def __init__(self, tags: dict[str, SparkplugTag]) -> None:
        self._by_metric: dict[MetricKey, list[str]] = {}
        self._by_scope: dict[tuple[str, str, str | None], list[str]] = {}
        for tag_id, t in tags.items():
            self._by_metric.setdefault((t.group, t.node, t.device, t.metric), []).append(tag_id)
            self._by_scope.setdefault((t.group, t.node, t.device), []).append(tag_id)
        self._nodes: dict[NodeKey, _Node] = {}

    def subscriptions(self, qos_of: Mapping[str, int]) -> dict[str, int]:
        """Topic filter -> QoS: one ``spBv1.0/<group>/+/<node>/#`` per watched edge node."""
        subs: dict[str, int] = {}
        for (group, node, _device), tag_ids in self._by_scope.items():
            topic = f"{NAMESPACE}/{group}/+/{node}/#"
            subs[topic] = max([subs.get(topic, 0), *(qos_of[t] for t in tag_ids)])
        return subs

    def watches(self, topic: SparkplugTopic) -> bool:
        return any(g == topic.group and n == topic.node for g, n, _ in self._by_scope)

    def on_message(self, topic: SparkplugTopic, data: bytes | bytearray, now: datetime,
                   mono: float) -> SparkplugResult:
        key = (topic.group, topic.node)
        node = self._nodes.setdefault(key, _Node())
        kind = topic.message_type
        result = SparkplugResult()
        if kind in ("NCMD", "DCMD"):
            return result
        try:
            payload = decode_payload(data)
        except DecodeError as exc:
            result.problem = f"undecodable Sparkplug payload: {exc}"
            detail = f"Sparkplug {kind} from {topic.group}/{topic.node}: {result.problem}"
            result.samples = self._scope_samples(topic, kind == "NDATA" or kind == "NBIRTH",
                                                 detail, now)
            self._want_rebirth(key, node, mono, result)
            return result
        if kind == "NDEATH":
            self._on_ndeath(topic, node, payload, now, result)
            return result
        if kind == "NBIRTH":
            node.alive, node.rebirth_at = True, None
            node.scopes = {None: _Scope()}
            node.seq = payload.seq
            for m in payload.metrics:
                if m.name == "bdSeq":
                    node.bd_seq = _int_or_none(m)
        else:
            self._check_seq(key, node, payload, mono, result)
            if not node.alive:
                result.problem = result.problem or f"{kind} before NBIRTH"
                self._want_rebirth(key, node, mono, result)
        if kind == "DBIRTH":
            node.scopes[topic.device] = _Scope()
        elif kind == "DDEATH":
            node.scopes.pop(topic.device, None)
            detail = (f"Sparkplug DDEATH: device {topic.group}/{topic.node}/{topic.device} "
                      "is offline")
            result.samples = self._bad(self._by_scope.get((topic.group, topic.node,
                                                           topic.device), []), detail, now)
            return result
        birth = kind in ("NBIRTH", "DBIRTH")
        scope = node.scopes.get(topic.device)
        if scope is None:
            scope = _Scope()
            if node.alive and kind == "DDATA":
                result.problem = result.problem or f"DDATA from {topic.device} before its DBIRTH"
                self._want_rebirth(key, node, mono, result)
        unresolved = self._metric_samples(topic, scope, payload, birth, now, result.samples)
        if unresolved:
            result.problem = result.problem or f"{unresolved} metric alias(es) not in a birth"
            self._want_rebirth(key, node, mono, result)
        return result

    # ------------------------------------------------------------------ helpers

    def _metric_samples(self, topic: SparkplugTopic, scope: _Scope, payload: Payload,
                        birth: bool, now: datetime, out: list[TagSample]) -> int:
        unresolved = 0
        for m in payload.metrics:
            name = m.name
            if birth:
                if name is None:
                    continue
                if m.alias is not None:
                    scope.aliases[m.alias] = name
                if m.datatype is not None:
                    scope.datatypes[name] = m.datatype
            elif name is None and m.alias is not None:
                name = scope.aliases.get(m.alias)
                if name is None:
                    unresolved += 1
                    continue
            if name is None or m.is_historical:
                continue
            tag_ids = self._by_metric.get((topic.group, topic.node, topic.device, name))
            if not tag_ids:
                continue
            if m.datatype is None:
                m.datatype = scope.datatypes.get(name)
            out.extend(_sample(t, name, m, payload, now) for t in tag_ids)
        return unresolved

    def _check_seq(self, key: NodeKey, node: _Node, payload: Payload, mono: float,
                   result: SparkplugResult) -> None:
        seq = payload.seq
        if seq is None:
            return
        if node.seq is not None and seq != (node.seq + 1) % 256:
            result.problem = f"sequence gap: expected {(node.seq + 1) % 256}, got {seq}"
            self._want_rebirth(key, node, mono, result)
        node.seq = seq

    def _on_ndeath(self, topic: SparkplugTopic, node: _Node, payload: Payload, now: datetime,
                   result: SparkplugResult) -> None:
        bd_seq = next((_int_or_none(m) for m in payload.metrics if m.name == "bdSeq"), None)
        if node.alive and None not in (bd_seq, node.bd_seq) and bd_seq != node.bd_seq:
            return  # the will of an older connection, delivered late
        node.alive, node.seq, node.scopes = False, None, {}
        detail = f"Sparkplug NDEATH: edge node {topic.group}/{topic.node} is offline"
        tags = [t for (g, n, _d), ids in self._by_scope.items()
                if g == topic.group and n == topic.node for t in ids]
        result.samples = self._bad(tags, detail, now)

    def _want_rebirth(self, key: NodeKey, node: _Node, mono: float,
                      result: SparkplugResult) -> None:
        if node.rebirth_at is not None and mono - node.rebirth_at < REBIRTH_HOLDOFF:
            return
        node.rebirth_at = mono
        result.rebirth = key

    def _scope_samples(self, topic: SparkplugTopic, whole_node: bool, detail: str,
                       now: datetime) -> list[TagSample]:
        if whole_node:
            tags = [t for (g, n, d), ids in self._by_scope.items()
                    if g == topic.group and n == topic.node and d is None for t in ids]
        else:
            tags = self._by_scope.get((topic.group, topic.node, topic.device), [])
        return self._bad(tags, detail, now)

    @staticmethod
    def _bad(tags: Iterable[str], detail: str, now: datetime) -> list[TagSample]:
        return [TagSample(tag=t, value=None, quality=Quality.BAD, agent_time=now, detail=detail)
                for t in tags]


def _int_or_none(m: Metric) -> int | None:
    v = m.long_value if m.long_value is not None else m.int_value
    return v


def _sample(tag: str, name: str, m: Metric, payload: Payload, now: datetime) -> TagSample:
    ms = m.timestamp if m.timestamp is not None else payload.timestamp
    source_time = None
    if ms is not None:
        try:
            source_time = datetime.fromtimestamp(ms / 1000.0, UTC)
        except (OverflowError, OSError, ValueError):
            source_time = None
    try:
        value = metric_value(m)
    except DecodeError as exc:
        return TagSample(tag=tag, value=None, quality=Quality.BAD, agent_time=now,
                         source_time=source_time, detail=f"tag {tag}: {exc}")
    if value is None:
        return TagSample(tag=tag, value=None, quality=Quality.BAD, agent_time=now,
                         source_time=source_time, detail=f"tag {tag}: metric {name} is null")
    return TagSample(tag=tag, value=value, quality=Quality.GOOD, agent_time=now,
                     source_time=source_time)
