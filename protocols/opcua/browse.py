"""``edge-agent browse``: list a server's nodes with browse names, node ids and data types.

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
        rows: list[BrowseRow] = []
        level = [root]
        for d in range(max(1, depth)):
            found: list[Any] = []
            for node_id in level:
                found.extend(await _children(session, node_id))
            types = await _data_types(session, [r.NodeId for r in found
                                                if r.NodeClass == ua.NodeClass.Variable])
            for ref in found:
                rows.append(BrowseRow(
                    d, ref.BrowseName.Name, format_node_id(ref.NodeId, session.namespaces),
                    ref.NodeClass.name, types.get(ref.NodeId.to_string(), "")))
                if len(rows) >= _MAX_ROWS:
                    return rows
            level = [r.NodeId for r in found if r.NodeClass in (ua.NodeClass.Object,
                                                                ua.NodeClass.Variable)]
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
