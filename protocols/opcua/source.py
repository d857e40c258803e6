"""The OPC UA source: one supervised session per endpoint, subscribe or poll mode.

``run()`` is one session (``protocols/base.py``)::

    open client ──> resolve node ids (nsu= against this server's NamespaceArray)
        │             unknown namespace / bad syntax -> that tag bad, the rest go on
        v
    read every tag once ──> out.connected(), emit          (also after every reconnect: the
        │                                                   values that changed while we were
        v                                                   away are seen at once)
    subscribe: monitored items in chunks; a refused node -> that tag bad (and tried again
               every RETRY_REFUSED_AFTER seconds: a node added by a PLC download appears)
               consume notifications (one task, no awaits on I/O), emit in batches;
               re-emit the last values every refresh period while keep-alives arrive
    poll:      read in chunks every poll_interval (drift-free ticks)
        │
    lost / silent subscription / timeout ──> ConnectionLostError / PeerTimeoutError
                                             (the supervisor rebuilds everything with backoff)

Samples: the server's status code maps to quality (Bad -> bad, Uncertain -> uncertain), the
server's source timestamp (or server timestamp, or none: ``timestamp``) becomes
``source_time``. A value of the wrong type (tag ``type``) or a non-scalar is bad, with a
detail naming the tag and the node.

Why re-emit in subscribe mode: a subscription reports changes only, while detection counts a
tag as stale when no good sample arrived for ``stale_after``. As long as the session proves
alive (keep-alives, server state reads), an unchanged value is still the current value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from asyncua.common.subscription import DataChangeEvent, OpcEvent, StatusChangeEvent

from config.model import Quality, TagSample, utcnow
from protocols.base import SampleSink, Source, next_poll_time
from protocols.opcua.alarms import AlarmFeeds
from protocols.opcua.config import (
    OpcuaMode,
    OpcuaSourceConfig,
    OpcuaValueType,
    TagKind,
)
from protocols.opcua.events import alarm_feeds, condition_refresh, not_notifiers_of
from protocols.opcua.history import BackfillReport, backfill
from protocols.opcua.nodeids import UnknownNamespaceError, parse_node_id
from protocols.opcua.session import Session, quiet_asyncua
from protocols.opcua.values import to_sample

__all__ = ["RETRY_REFUSED_AFTER", "OpcuaSource", "to_sample"]

# Subscribe mode: tags whose node was refused (or whose namespace was unknown) are tried again
# this often within a session. Poll mode reads them every poll anyway.
RETRY_REFUSED_AFTER = 60.0

log = logging.getLogger(__name__)

# Batches handed to detection at most this large (keeps one emit short under bursts).
_MAX_BATCH = 5000


# client handle -> (tag id, node text, expected type)
_Handles = dict[int, tuple[str, str, OpcuaValueType | None]]
class OpcuaSource(Source):
    """Reads the tags of one OPC UA server; see the module docstring.

    ``OpcuaSource(name, config)`` does no I/O; ``await run(out)`` is one session;
    ``await probe()`` reads every tag once on its own session.
    """

    def __init__(self, name: str, config: OpcuaSourceConfig) -> None:
        super().__init__(name)
        self.config = config
        self._parsed = {t: parse_node_id(tag.node) for t, tag in config.tags.items()}
        self._last: dict[str, TagSample] = {}
        self.history = BackfillReport()
        quiet_asyncua()
        if config.security is None or config.security.policy.value == "None":
            log.info("source %s connects to %s with security policy None (no signing, no "
                     "encryption); add a 'security' block to use Basic256Sha256 or stronger",
                     name, config.endpoint, extra={"component": name})
            if config.username is not None:
                log.warning("source %s sends the password of user '%s' over policy None; "
                            "unless the server encrypts user tokens itself, use a security "
                            "policy", name, config.username, extra={"component": name})

    @property
    def tag_ids(self) -> list[str]:
        return list(self.config.tags)

    @property
    def stale_after(self) -> float:
        return self.config.effective_stale_after

    # ------------------------------------------------------------------ sessions

    async def run(self, out: SampleSink) -> None:
        session = Session(self.name, self.config)
        try:
            await session.open()
            resolved, bad = self._resolve(session)
            values = self._values_only(resolved)
            # What was active is unknown until this session's ConditionRefresh: a stale set
            # must not explain the stops the backfill is about to replay.
            self._emit(out, [TagSample(t, None, Quality.BAD, utcnow(), None,
                                       f"tag {t}: active alarms unknown until the "
                                       "ConditionRefresh of this session")
                             for t, tag in self.config.tags.items()
                             if tag.kind is TagKind.ALARMS])
            await self._backfill(session, values, out)
            first = self._read_samples(values, bad, await session.read(
                [n for n, _ in values.values()]))
            out.connected()
            self._emit(out, first)
            if self.config.mode is OpcuaMode.POLL:
                await self._poll(session, resolved, bad, out)
            else:
                await self._subscribe(session, resolved, [s.tag for s in bad], out)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(session.close())

    async def probe(self) -> list[TagSample]:
        session = Session(self.name, self.config)
        try:
            await session.open()
            resolved, bad = self._resolve(session)
            values = self._values_only(resolved)
            now = utcnow()
            # Alarm tags deliver events, which only a subscription sees.
            notes = [TagSample(t, None, Quality.UNCERTAIN, now, None,
                               f"tag {t} (notifier {node}): alarm events are only seen in a "
                               "subscription") for t, (_, node) in resolved.items()
                     if t not in values]
            return [*self._read_samples(values, bad, await session.read(
                [n for n, _ in values.values()])), *notes]
        finally:
            await session.close()

    def status(self) -> dict[str, Any]:
        """History backfill figures (for /status), when backfill is configured."""
        h = self.config.history
        if h is None:
            return {}
        return {"history": {"max_span_s": h.max_span, "max_values": h.max_values,
                            **self.history.as_dict()}}

    async def _backfill(self, session: Session, values: dict[str, tuple[Any, str]],
                        out: SampleSink) -> None:
        """Emit the history of the gap, in time order, before any live value."""
        hint = self.resume_from
        if self.config.history is None or hint is None:
            return
        tags = self.config.tags
        last = self._last

        def resume(tag: str) -> datetime | None:
            # Detection's own need, narrowed by what this process already received (after a
            # network loss only the gap itself is read, not everything since the last change).
            need = hint(tag)
            seen = last[tag].source_time if tag in last else None
            return max(need, seen) if need is not None and seen is not None else need

        batches = await backfill(session, self.config.history, values, resume,
                                 {t: tags[t].type for t in values}, self.history)
        # No await from here to the last batch: detection sees the gap in one go, in order.
        for batch in batches:
            self._emit(out, batch)

    def _values_only(self, resolved: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
        return {t: r for t, r in resolved.items()
                if self.config.tags[t].kind is TagKind.VALUE}

    def _resolve(self, session: Session, only: list[str] | None = None
                 ) -> tuple[dict[str, tuple[Any, str]], list[TagSample]]:
        """tag id -> (NodeId, node text) for the tags this server can have; bad samples for
        the others (a namespace URI the server does not know)."""
        resolved: dict[str, tuple[Any, str]] = {}
        bad: list[TagSample] = []
        now = utcnow()
        for tag_id in only if only is not None else list(self.config.tags):
            tag = self.config.tags[tag_id]
            try:
                resolved[tag_id] = (self._parsed[tag_id].resolve(session.namespaces), tag.node)
            except UnknownNamespaceError as exc:
                bad.append(TagSample(tag_id, None, Quality.BAD, now, None,
                                     f"tag {tag_id} (node {tag.node}): {exc}"))
        return resolved, bad

    def _read_samples(self, resolved: dict[str, tuple[Any, str]], bad: list[TagSample],
                      values: Sequence[Any]) -> list[TagSample]:
        now = utcnow()
        cfg = self.config
        samples = list(bad)
        for (tag_id, (_, node)), dv in zip(resolved.items(), values, strict=True):
            samples.append(to_sample(tag_id, node, dv, cfg.tags[tag_id].type, cfg.timestamp,
                                     now))
        return samples

    def _emit(self, out: SampleSink, samples: list[TagSample]) -> None:
        if not samples:
            return
        for s in samples:
            self._last[s.tag] = s
        out.emit(samples)

    # ------------------------------------------------------------------ poll mode

    async def _poll(self, session: Session, resolved: dict[str, tuple[Any, str]],
                    bad: list[TagSample], out: SampleSink) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.poll_interval
        next_tick = loop.time()
        node_ids = [n for n, _ in resolved.values()]
        while True:
            now = loop.time()
            next_tick = next_poll_time(next_tick, now, interval)
            await session.wait_lost(next_tick - now)
            self._emit(out, self._read_samples(resolved, bad, await session.read(node_ids)))

    # ------------------------------------------------------------------ subscribe mode

    async def _subscribe(self, session: Session, resolved: dict[str, tuple[Any, str]],
                         unresolved: list[str], out: SampleSink) -> None:
        cfg = self.config
        not_notifiers = await not_notifiers_of(session, self.config, resolved)
        self._emit(out, not_notifiers)
        tags = [t for t in resolved if t not in {s.tag for s in not_notifiers}]
        handles = await session.subscribe([(resolved[t][0], cfg.tags[t]) for t in tags])
        by_handle: _Handles = {}
        pending = list(unresolved)  # not monitored: tried again later
        self._emit(out, self._sort_handles(tags, handles, resolved, by_handle, pending))
        feeds = await alarm_feeds(session, self.config, tags, handles)
        if feeds:
            await self._condition_refresh(session, feeds, out)
        next_retry = time.monotonic() + RETRY_REFUSED_AFTER
        sub = session.subscription
        assert sub is not None
        # Draining the iterator's queue directly: one wait per burst instead of one per value.
        queue = sub._event_queue
        assert queue is not None
        refresh = max(0.5, min(10.0, self.stale_after / 3))
        next_refresh = time.monotonic() + refresh
        # How often silence and loss are checked when no notification arrives.
        check = min(0.25, cfg.publishing_interval)
        while True:
            session.check_alive()
            # Not sub.next_event(timeout=...): its asyncio.wait_for loses a cancel that
            # arrives with a notification on Python 3.11, and a stop would then wait for ever.
            try:
                async with asyncio.timeout(check):
                    event = await queue.get()
            except TimeoutError:
                event = None
            else:
                if event is None:  # the end-of-subscription marker
                    session.lose(f"{session.where}: the subscription was closed")
                    session.raise_if_lost()
                    return
            batch: list[TagSample] = []
            now = utcnow()  # one receive time per burst
            while event is not None:
                if isinstance(event, OpcEvent):
                    batch.extend(feeds.take(event.event.server_handle, event.event, now,
                                            time.monotonic()))
                else:
                    self._take(event, by_handle, batch, session, now)
                if len(batch) >= _MAX_BATCH:
                    break
                try:
                    event = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if event is None:  # the end-of-subscription marker
                    session.lose(f"{session.where}: the subscription was closed")
            session.raise_if_lost()
            self._emit(out, batch)
            if feeds:
                self._emit(out, feeds.expire(time.monotonic(), utcnow()))
                if feeds.overflowed:
                    # The server dropped events: ask for the current conditions again.
                    await self._condition_refresh(session, feeds, out)
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + refresh
                self._refresh(out)
            if pending and time.monotonic() >= next_retry:
                next_retry = time.monotonic() + RETRY_REFUSED_AFTER
                pending = await self._retry(session, pending, by_handle, out, feeds)

    async def _condition_refresh(self, session: Session, feeds: AlarmFeeds,
                                 out: SampleSink) -> None:
        self._emit(out, await condition_refresh(session, feeds))

    def _sort_handles(self, tags: list[str], handles: list[int | str],
                      resolved: dict[str, tuple[Any, str]],
                      by_handle: _Handles,
                      pending: list[str]) -> list[TagSample]:
        """Record accepted items in ``by_handle``; refused tags go to ``pending`` and come
        back as bad samples."""
        refused: list[TagSample] = []
        now = utcnow()
        for tag_id, handle in zip(tags, handles, strict=True):
            node = resolved[tag_id][1]
            if isinstance(handle, str):
                pending.append(tag_id)
                refused.append(TagSample(tag_id, None, Quality.BAD, now, None,
                                         f"tag {tag_id} (node {node}): the server refused to "
                                         f"monitor it: {handle}"))
            else:
                by_handle[handle] = (tag_id, node, self.config.tags[tag_id].type)
        return refused

    async def _retry(self, session: Session, pending: list[str],
                     by_handle: _Handles, out: SampleSink, feeds: AlarmFeeds) -> list[str]:
        """Try to monitor the pending tags again; returns those still pending. An accepted
        item's first notification carries its current value; an accepted alarm tag gets its
        active alarms from a ConditionRefresh."""
        await session.refresh_namespaces()
        resolved, still = self._resolve(session, pending)
        if not resolved:
            self._emit(out, still)
            return [s.tag for s in still]
        tags = list(resolved)
        handles = await session.monitor([(resolved[t][0], self.config.tags[t]) for t in tags])
        again: list[str] = [s.tag for s in still]
        refused = self._sort_handles(tags, handles, resolved, by_handle, again)
        self._emit(out, [*still, *refused])
        added = await alarm_feeds(session, self.config, tags, handles, feeds.marker)
        if added:
            feeds.tags.update(added.tags)
            feeds.marker = added.marker
            feeds.namespaces = added.namespaces
            await self._condition_refresh(session, feeds, out)
        return again

    def _take(self, event: Any, by_handle: _Handles,
              batch: list[TagSample], session: Session, now: datetime) -> None:
        if isinstance(event, DataChangeEvent):
            handle = event.data.subscription_data.client_handle
            known = by_handle.get(handle) if handle is not None else None
            if known is None:
                return
            tag_id, node, expected = known
            batch.append(to_sample(tag_id, node, event.data.monitored_item.Value, expected,
                                   self.config.timestamp, now))
        elif isinstance(event, StatusChangeEvent):
            status = event.notification.Status
            if status is not None and not status.is_good():
                session.lose(f"{session.where}: the subscription ended ({status.name})")

    def _refresh(self, out: SampleSink) -> None:
        """Re-emit the last value of every tag with a new agent time (see module docstring)."""
        now = utcnow()
        again = [TagSample(s.tag, s.value, s.quality, now, s.source_time, s.detail)
                 for s in self._last.values()]
        if again:
            out.emit(again)
