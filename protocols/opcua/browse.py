"""``edge-agent browse``: list a server's nodes with browse names, node ids and data types.

Flags say what a node offers beyond its value: ``historizing`` (Historizing attribute) and
``history-read`` (HistoryRead bit of AccessLevel) on variables, whose history a source with
``history`` can backfill; ``event-notifier`` (SubscribeToEvents bit of EventNotifier) on objects
whose alarm events a ``kind: alarms`` tag can subscribe to.

Node ids are printed in the ``nsu=<namespace URI>;...`` form, which is what a configuration
should use: it survives a server that registers its namespaces in another order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asyncua import ua

from config.errors import ConnectionLostError, RetryableError
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.nodeids import NodeIdSyntaxError, UnknownNamespaceError, parse_node_id
from protocols.opcua.session import Session, chunks

__all__ = ["BrowseRow", "browse", "endpoint_config", "format_node_id"]

_MAX_ROWS = 20_000


@dataclass(frozen=True, slots=True)
class BrowseRow:
    depth: int
    browse_name: str
    node_id: str
    node_class: str
    data_type: str
    flags: tuple[str, ...] = ()


def endpoint_config(endpoint: str) -> OpcuaSourceConfig:
    """A source config for a bare endpoint: policy None, anonymous."""
    return OpcuaSourceConfig.model_validate(
        {"type": "opcua", "endpoint": endpoint, "tags": {"_": {"node": "i=2258"}}})


def format_node_id(node_id: Any, namespaces: list[str]) -> str:
    """``i=85`` in namespace 0, otherwise ``nsu=<uri>;<kind>=<id>``."""
    text = node_id.to_string()
    if node_id.NamespaceIndex == 0:
        return str(text)
    _, _, ident = text.partition(";")
    if node_id.NamespaceIndex < len(namespaces):
        return f"nsu={namespaces[node_id.NamespaceIndex]};{ident}"
    return str(text)


async def browse(config: OpcuaSourceConfig, start: str = "i=85", depth: int = 2,
                 name: str = "browse") -> list[BrowseRow]:
    """Rows of the tree below ``start`` (default: Objects), ``depth`` levels deep."""
    try:
        parsed = parse_node_id(start)
    except NodeIdSyntaxError as exc:
        raise ValueError(str(exc)) from None
    async with Session(name, config) as session:
        try:
            root = parsed.resolve(session.namespaces)
        except UnknownNamespaceError as exc:
            raise ConnectionLostError(f"{session.where}: {exc}") from None
        # Fetched level by level (one data type read per level), printed depth first: each
        # node directly followed by its own children, so the indentation is a true tree.
        children: dict[int, list[tuple[int, BrowseRow]]] = {}
        count = 0
        level: list[tuple[int, Any]] = [(0, root)]  # (key of the parent row, node id)
        for d in range(max(1, depth)):
            found: list[tuple[int, Any]] = []
            for key, node_id in level:
                found.extend((key, ref) for ref in await _children(session, node_id))
            types = await _data_types(session, [r.NodeId for _, r in found
                                                if r.NodeClass == ua.NodeClass.Variable])
            flags = await _flags(session, [r for _, r in found])
            level = []
            for parent, ref in found:
                count += 1
                row = BrowseRow(d, ref.BrowseName.Name,
                                format_node_id(ref.NodeId, session.namespaces),
                                ref.NodeClass.name, types.get(ref.NodeId.to_string(), ""),
                                flags.get(ref.NodeId.to_string(), ()))
                children.setdefault(parent, []).append((count, row))
                if ref.NodeClass in (ua.NodeClass.Object, ua.NodeClass.Variable):
                    level.append((count, ref.NodeId))
                if count >= _MAX_ROWS:
                    return _depth_first(children)
        return _depth_first(children)


def _depth_first(children: dict[int, list[tuple[int, BrowseRow]]]) -> list[BrowseRow]:
    rows: list[BrowseRow] = []
    stack = list(reversed(children.get(0, [])))
    while stack:
        key, row = stack.pop()
        rows.append(row)
        stack.extend(reversed(children.get(key, [])))
    return rows


async def _children(session: Session, node_id: Any) -> list[Any]:
    assert session.client is not None
    node = session.client.get_node(node_id)
    try:
        refs = await session._call("browsing", node.get_references(
            refs=ua.ObjectIds.HierarchicalReferences, direction=ua.BrowseDirection.Forward))
    except RetryableError:
        session.raise_if_lost()
        return []
    return list(refs)


async def _data_types(session: Session, node_ids: list[Any]) -> dict[str, str]:
    """node id text -> data type name for variables (one chunked read each)."""
    if not node_ids:
        return {}
    assert session.client is not None
    out: dict[str, str] = {}
    type_ids: list[Any] = []
    for part in chunks(node_ids, session.max_read):
        values = await session._call("reading data types", session.client.read_attributes(
            [session.client.get_node(n) for n in part], ua.AttributeIds.DataType))
        for n, dv in zip(part, values, strict=True):
            tid = dv.Value.Value if dv.StatusCode.is_good() and dv.Value is not None else None
            type_ids.append((n, tid))
    for n, tid in type_ids:
        if tid is None:
            out[n.to_string()] = "?"
        elif tid.NamespaceIndex == 0 and tid.Identifier in ua.ObjectIdNames:
            out[n.to_string()] = ua.ObjectIdNames[tid.Identifier]
        else:
            out[n.to_string()] = format_node_id(tid, session.namespaces)
    return out


_HISTORY_READ = 1 << 2
_SUBSCRIBE_TO_EVENTS = 1


async def _flags(session: Session, refs: list[Any]) -> dict[str, tuple[str, ...]]:
    """node id text -> flags (see the module docstring)."""
    variables = [r.NodeId for r in refs if r.NodeClass == ua.NodeClass.Variable]
    objects = [r.NodeId for r in refs if r.NodeClass == ua.NodeClass.Object]
    out: dict[str, tuple[str, ...]] = {}
    if variables:
        historizing = await session.read_attribute(variables, ua.AttributeIds.Historizing)
        access = await session.read_attribute(variables, ua.AttributeIds.AccessLevel)
        for n, h, a in zip(variables, historizing, access, strict=True):
            flags = []
            if _value(h) is True:
                flags.append("historizing")
            if isinstance(_value(a), int) and _value(a) & _HISTORY_READ:
                flags.append("history-read")
            out[n.to_string()] = tuple(flags)
    if objects:
        notifier = await session.read_attribute(objects, ua.AttributeIds.EventNotifier)
        for n, e in zip(objects, notifier, strict=True):
            value = _value(e)
            if isinstance(value, int) and value & _SUBSCRIBE_TO_EVENTS:
                out[n.to_string()] = ("event-notifier",)
    return out


def _value(dv: Any) -> Any:
    ok = dv is not None and dv.StatusCode is not None and dv.StatusCode.is_good()
    return dv.Value.Value if ok and dv.Value is not None else None
