"""OPC UA source (asyncua).

Public surface: ``OpcuaSource`` (``protocols.opcua.source``), ``OpcuaTestServer``
(``protocols.opcua.testserver``) and ``browse`` (``protocols.opcua.browse``). They are loaded on
first use so that importing the config schema (``protocols.opcua.config``) does not import
asyncua.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.opcua.source import OpcuaSource
    from protocols.opcua.testserver import OpcuaTestServer

__all__ = ["OpcuaSource", "OpcuaTestServer"]


def __getattr__(name: str) -> Any:
    if name == "OpcuaSource":
        from protocols.opcua.source import OpcuaSource

        return OpcuaSource
    if name == "OpcuaTestServer":
        from protocols.opcua.testserver import OpcuaTestServer

        return OpcuaTestServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
