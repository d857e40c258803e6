"""OPC UA node ids as plant engineers write them, and their resolution against a server.

Accepted forms (OPC UA Part 6, 5.3.1.10): ``i=2258``, ``ns=2;s=Filler.State``,
``nsu=urn:acme:plant;s=Filler.State``, ``ns=1;g=<guid>``, ``ns=1;b=<base64>``; without
``ns``/``nsu`` the namespace is 0.

A namespace given by URI is resolved to an index against the server's NamespaceArray on every
connect, because a restarted server may register its namespaces in another order. Parsing is
pure (config validation uses it); ``resolve`` needs the array and imports asyncua lazily so the
config schema does not.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["NodeIdSyntaxError", "ParsedNodeId", "UnknownNamespaceError", "parse_node_id"]

_KINDS = ("i", "s", "g", "b")


class NodeIdSyntaxError(ValueError):
    """The text is not a node id."""


class UnknownNamespaceError(LookupError):
    """A ``nsu=`` namespace URI is not in the server's NamespaceArray."""


@dataclass(frozen=True, slots=True)
class ParsedNodeId:
    """A node id with its namespace still symbolic (an index or a URI)."""

    namespace: int | str
    kind: str  # one of i s g b
    identifier: str

    def resolve(self, namespaces: list[str]) -> Any:
        """The ``asyncua.ua.NodeId`` for a server whose NamespaceArray is ``namespaces``."""
        from asyncua import ua

        node_id: Any = ua.NodeId  # asyncua's NewType-typed constructor; values checked above

        if isinstance(self.namespace, str):
            try:
                index = namespaces.index(self.namespace)
            except ValueError:
                raise UnknownNamespaceError(
                    f"the server has no namespace '{self.namespace}' (it has: "
                    f"{', '.join(namespaces) or 'none'})") from None
        else:
            index = self.namespace
        if self.kind == "i":
            return node_id(int(self.identifier), index, ua.NodeIdType.Numeric)
        if self.kind == "s":
            return node_id(self.identifier, index, ua.NodeIdType.String)
        if self.kind == "g":
            return node_id(uuid.UUID(self.identifier), index, ua.NodeIdType.Guid)
        return node_id(base64.b64decode(self.identifier), index, ua.NodeIdType.ByteString)


def parse_node_id(text: str) -> ParsedNodeId:
    """Parse one node id; raises NodeIdSyntaxError with a message naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise NodeIdSyntaxError("a node id cannot be empty")
    rest = text.strip()
    namespace: int | str = 0
    if rest.startswith(("ns=", "nsu=")):
        head, sep, rest = rest.partition(";")
        if not sep:
            raise NodeIdSyntaxError(f"'{text}': expected ';' after the namespace, as in "
                                    "'ns=2;s=Name' or 'nsu=urn:x;s=Name'")
        key, _, value = head.partition("=")
        if key == "ns":
            if not (value.isascii() and value.isdigit()) or int(value) > 65535:
                raise NodeIdSyntaxError(f"'{text}': namespace index '{value}' is not a number "
                                        "from 0 to 65535")
            namespace = int(value)
        else:
            if not value:
                raise NodeIdSyntaxError(f"'{text}': 'nsu=' needs a namespace URI")
            namespace = value
    kind, sep, identifier = rest.partition("=")
    if not sep or kind not in _KINDS:
        raise NodeIdSyntaxError(f"'{text}': the identifier must start with i=, s=, g= or b= "
                                "(numeric, string, GUID, opaque)")
    if kind == "i":
        if not (identifier.isascii() and identifier.isdigit()) or int(identifier) > 0xFFFFFFFF:
            raise NodeIdSyntaxError(f"'{text}': numeric identifier '{identifier}' is not a "
                                    "number from 0 to 4294967295")
    elif kind == "s":
        if not identifier:
            raise NodeIdSyntaxError(f"'{text}': string identifier is empty")
    elif kind == "g":
        try:
            uuid.UUID(identifier)
        except ValueError:
            raise NodeIdSyntaxError(f"'{text}': '{identifier}' is not a GUID") from None
    else:
        try:
            base64.b64decode(identifier, validate=True)
        except (binascii.Error, ValueError):
            raise NodeIdSyntaxError(f"'{text}': '{identifier}' is not base64") from None
    return ParsedNodeId(namespace, kind, identifier)
