"""An embedded OPC UA server (asyncua) for tests, the benchmark and the demo plant.

Variables live in the namespace ``namespace`` under ``Objects/Plant`` with string node ids, so
``nsu=<namespace>;s=<name>`` names them whatever index the namespace gets. ``restart()`` brings
the server back on the same port, optionally with the namespaces registered in another order
(indexes change, as after a real PLC firmware update or server restart).

Optional: security (certificate, key, policies), user names and passwords, operation limits
(MaxNodesPerRead / MaxMonitoredItemsPerCall, published *and enforced*, so a client that
ignores them fails), status codes and source timestamps per write.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

__all__ = ["PLANT_NAMESPACE", "OpcuaTestServer", "ServerSecurity"]

PLANT_NAMESPACE = "urn:plant-edge-agent:test-plant"
# asyncua annotates with NewTypes (Int16, UInt32, DateTime...); plain values are what it takes.
_NodeId: Any = ua.NodeId
_StatusCode: Any = ua.StatusCode
_DataValue: Any = ua.DataValue
_POLICY_TYPES = {
    "None": [ua.SecurityPolicyType.NoSecurity],
    "Basic256Sha256": [ua.SecurityPolicyType.Basic256Sha256_Sign,
                       ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt],
    "Aes128_Sha256_RsaOaep": [ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
                              ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt],
    "Aes256_Sha256_RsaPss": [ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
                             ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt],
}


@dataclass(frozen=True)
class ServerSecurity:
    certificate: Path
    private_key: Path
    application_uri: str
    policies: tuple[str, ...] = ("Basic256Sha256",)


class _Users(UserManager):
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OpcuaTestServer:
    """``await start()``, ``await set(name, value)``, ``await restart()``, ``await stop()``.

    ``variables``: name -> initial value; the OPC UA type follows the Python type (bool ->
    Boolean, int -> Int32, float -> Double, str -> String) unless ``types`` names one.
    """

    variables: dict[str, Any]
    types: dict[str, ua.VariantType] = field(default_factory=dict)
    namespace: str = PLANT_NAMESPACE
    other_namespaces: list[str] = field(default_factory=lambda: ["urn:plant-edge-agent:other"])
    port: int = 0
    security: ServerSecurity | None = None
    users: dict[str, str] | None = None
    max_nodes_per_read: int = 0
    max_monitored_items_per_call: int = 0
    largest_read: int = 0
    largest_create: int = 0
    _server: Server | None = None
    _nodes: dict[str, ua.NodeId] = field(default_factory=dict)
    _values: dict[str, ua.DataValue] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def node(self, name: str) -> str:
        """The ``nsu=`` node id of a variable (independent of namespace order)."""
        return f"nsu={self.namespace};s={name}"

    async def start(self, namespace_first: bool = False) -> int:
        """Start listening; returns the port. ``namespace_first`` registers the plant namespace
        before the others (so its index differs from the default order)."""
        lib_logger = logging.getLogger("asyncua")
        if lib_logger.level == logging.NOTSET:  # its tracebacks on client drops are noise here
            lib_logger.setLevel(logging.CRITICAL)
        if not self.port:
            self.port = _free_port()
        server = Server(user_manager=_Users(self.users) if self.users is not None else None)
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}")
        server.set_server_name("plant-edge-agent test server")
        if self.security is not None:
            await server.set_application_uri(self.security.application_uri)
            await server.load_certificate(str(self.security.certificate))
            await server.load_private_key(str(self.security.private_key))
            server.set_security_policy([t for p in self.security.policies
                                        for t in _POLICY_TYPES[p]])
        else:
            server.set_security_policy(_POLICY_TYPES["None"])
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        order = [self.namespace, *self.other_namespaces] if namespace_first \
            else [*self.other_namespaces, self.namespace]
        indexes = {uri: await server.register_namespace(uri) for uri in order}
        idx = indexes[self.namespace]
        folder = await server.nodes.objects.add_folder(_NodeId("Plant", idx), "Plant")
        self._nodes = {}
        for name, initial in self.variables.items():
            value = self._values.get(name)
            nodeid = _NodeId(name, idx)
            var = await folder.add_variable(nodeid, name, ua.Variant(initial, self._type(name)))
            self._nodes[name] = var.nodeid
            if value is not None:  # restarted: keep the last value written
                await server.write_attribute_value(var.nodeid, value)
        await self._limits(server)
        await server.start()
        self._server = server
        return self.port

    def _type(self, name: str) -> ua.VariantType:
        if name in self.types:
            return self.types[name]
        v = self.variables[name]
        if isinstance(v, bool):
            return ua.VariantType.Boolean
        if isinstance(v, int):
            return ua.VariantType.Int32
        if isinstance(v, float):
            return ua.VariantType.Double
        return ua.VariantType.String

    async def _limits(self, server: Server) -> None:
        ids = ua.ObjectIds
        for node, limit in ((ids.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
                             self.max_nodes_per_read),
                            (ids.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
                             self.max_monitored_items_per_call)):
            await server.write_attribute_value(_NodeId(node), _DataValue(
                ua.Variant(limit, ua.VariantType.UInt32)))
        iserver = server.iserver
        read = iserver.attribute_service.read
        create = iserver.subscription_service.create_monitored_items

        def limited_read(params: ua.ReadParameters) -> list[ua.DataValue]:
            n = len(params.NodesToRead)
            self.largest_read = max(self.largest_read, n)
            if self.max_nodes_per_read and n > self.max_nodes_per_read:
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)
            return read(params)

        async def limited_create(params: ua.CreateMonitoredItemsParameters) -> Any:
            n = len(params.ItemsToCreate)
            self.largest_create = max(self.largest_create, n)
            if self.max_monitored_items_per_call and n > self.max_monitored_items_per_call:
                raise ServiceError(ua.StatusCodes.BadTooManyOperations)
            return await create(params)

        iserver.attribute_service.read = limited_read  # type: ignore[method-assign]
        iserver.subscription_service.create_monitored_items = limited_create  # type: ignore[method-assign]

    async def set(self, name: str, value: Any, status: int = ua.StatusCodes.Good,
                  source_time: datetime | None = None) -> None:
        """Write a value with a status code and a source timestamp (default: now)."""
        assert self._server is not None, "server not started"
        now = datetime.now(UTC)
        dv = _DataValue(ua.Variant(value, self._type(name)), StatusCode=_StatusCode(status),
                          SourceTimestamp=source_time or now, ServerTimestamp=now)
        self._values[name] = dv
        await self._server.write_attribute_value(self._nodes[name], dv)

    async def add(self, name: str, value: Any, vtype: ua.VariantType | None = None) -> None:
        """Add a variable while running (as a PLC program download does)."""
        assert self._server is not None, "server not started"
        self.variables[name] = value
        if vtype is not None:
            self.types[name] = vtype
        idx = (await self._server.get_namespace_array()).index(self.namespace)
        folder = self._server.get_node(_NodeId("Plant", idx))
        var = await folder.add_variable(_NodeId(name, idx), name,
                                        ua.Variant(value, self._type(name)))
        self._nodes[name] = var.nodeid

    async def freeze_subscriptions(self) -> None:
        """Stop publishing on every existing subscription (no data, no keep-alives) while
        sessions, reads and the socket keep working: a server that looks alive but is not."""
        assert self._server is not None, "server not started"
        for sub in list(self._server.iserver.subscription_service.subscriptions.values()):
            await sub.stop()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()

    async def restart(self, namespace_first: bool | None = None) -> None:
        """Stop and start again on the same port; values written so far are kept."""
        await self.stop()
        await self.start(namespace_first=bool(namespace_first))
