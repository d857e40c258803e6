"""The session side of alarm tags: which nodes are notifiers, handles, ConditionRefresh.

Kept apart from ``alarms.py`` (pure: filter, event -> sample), which ``session.py`` imports.
"""

from __future__ import annotations

import math
import time
from typing import Any

from asyncua import ua

from config.model import Quality, TagSample, utcnow
from protocols.opcua.alarms import AlarmFeeds
from protocols.opcua.config import OpcuaSourceConfig, TagKind
from protocols.opcua.nodeids import parse_node_id
from protocols.opcua.session import Session

__all__ = ["alarm_feeds", "condition_refresh", "not_notifiers_of"]

_SUBSCRIBE_TO_EVENTS = 1
_NodeId: Any = ua.NodeId
_SERVER = _NodeId(ua.ObjectIds.Server)


async def not_notifiers_of(session: Session, config: OpcuaSourceConfig,
                           resolved: dict[str, tuple[Any, str]]) -> list[TagSample]:
    """Bad samples for alarm tags whose node is no event notifier (servers may accept the
    monitored item anyway and then never send anything)."""
    alarms = [t for t in resolved if config.tags[t].kind is TagKind.ALARMS]
    if not alarms:
        return []
    values = await session.read_attribute([resolved[t][0] for t in alarms],
                                          ua.AttributeIds.EventNotifier)
    now = utcnow()
    bad = []
    for tag, dv in zip(alarms, values, strict=True):
        bits = dv.Value.Value if dv.StatusCode.is_good() and dv.Value is not None else None
        if not isinstance(bits, int) or not bits & _SUBSCRIBE_TO_EVENTS:
            why = dv.StatusCode.name if not dv.StatusCode.is_good() else \
                "SubscribeToEvents is not set"
            bad.append(TagSample(tag, None, Quality.BAD, now, None,
                                 f"tag {tag} (node {resolved[tag][1]}): not an event "
                                 f"notifier ({why}); edge-agent browse marks notifiers"))
    return bad


async def alarm_feeds(session: Session, config: OpcuaSourceConfig, tags: list[str],
                      handles: list[int | str], marker: int | None = None) -> AlarmFeeds:
    """The accepted alarm tags by server handle (event notifications carry only that). When
    no alarm tag watches the Server object, a marker item there receives the refresh markers
    (a server may send them only to Server-object items)."""
    by_server: dict[int, str] = {}
    on_server = False
    for tag_id, handle in zip(tags, handles, strict=True):
        if config.tags[tag_id].kind is TagKind.ALARMS and isinstance(handle, int):
            server_handle = session.server_handle(handle)
            if server_handle is not None:
                by_server[server_handle] = tag_id
                on_server = on_server or parse_node_id(config.tags[tag_id].node).resolve(
                    session.namespaces) == _SERVER
    if by_server and not on_server and marker is None:
        marker = await session.monitor_refresh_markers()
    return AlarmFeeds(by_server, marker)


async def condition_refresh(session: Session, feeds: AlarmFeeds) -> list[TagSample]:
    """Start a refresh; bad samples for the alarm tags if the server refuses it."""
    feeds.begin_refresh(time.monotonic())
    refused = await session.condition_refresh()
    if refused is None:
        return []
    now = utcnow()
    feeds.expire(math.inf, now)
    return [TagSample(t, None, Quality.BAD, now, None,
                      f"tag {t}: active alarms unknown: {refused}")
            for t in feeds.tags.values()]
