"""One OPC UA client session: connect, resolve, read and subscribe in chunks, detect death.

A ``Session`` wraps exactly one ``asyncua.Client`` for one ``Source.run()``; it is never
reconnected. asyncua's ``auto_reconnect`` is off on purpose: when anything goes wrong the whole
client (channel, session, subscription, monitored items) is torn down and the supervisor builds
a new one with backoff, which also re-resolves ``nsu=`` namespaces and re-reads every value.

Death is noticed by any of:

- the transport closing, or the keep-alive read of the server state (every
  ``keepalive_interval``, asyncua's connection supervisor) failing: ``lost`` is set;
- the subscription going silent for longer than its keep-alive period allows
  (``Session.check_alive``);
- a request not answering within ``timeout`` (every request has one; connect and close too);
- the notification queue overflowing (it is sized not to): values would be missing, so the
  session ends and the next one re-reads everything.

Every asyncua / OS exception is translated here into ``config.errors`` types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from asyncua import Client, ua
from asyncua.common.subscription import OverflowPolicy, Subscription

from config.errors import ConnectionLostError, FatalError, PeerTimeoutError, RetryableError
from config.secrets import SecretResolutionError
from config.tasks import wait_event
from protocols.opcua.alarms import alarm_filter, condition_refresh_request, refresh_marker_filter
from protocols.opcua.config import DeadbandType, OpcuaSourceConfig, OpcuaTag, TagKind
from protocols.opcua.security import TrustDirectory, UntrustedServerError, apply_security

__all__ = ["DEFAULT_MAX_PER_CALL", "Session", "chunks", "quiet_asyncua"]

log = logging.getLogger(__name__)

# Upper bound per request even when the server states no limit (keeps messages small).
DEFAULT_MAX_PER_CALL = 1000
_LIMIT_NODES = (ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
                ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall)
# A subscription silent for this many keep-alive periods is dead (asyncua's own stale
# watchdog, which would re-create it inside the session, is switched off in open()).
_SILENCE_MARGIN = 1.25
_NodeId: Any = ua.NodeId  # asyncua's NewType-typed constructor
_AUTH_CODES = {ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadIdentityTokenRejected,
               ua.StatusCodes.BadIdentityTokenInvalid}


def quiet_asyncua() -> None:
    # asyncua logs every failed request and every lost connection with a traceback (at ERROR);
    # the supervisor logs session transitions once, with the translated reason. Only a
    # verbose level (INFO/DEBUG, as `--log-level debug` sets) keeps asyncua's own records.
    lib_logger = logging.getLogger("asyncua")
    if lib_logger.level == logging.NOTSET or lib_logger.level > logging.INFO:
        lib_logger.setLevel(logging.CRITICAL)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive slices of at most ``size`` (at least one element each)."""
    size = max(1, size)
    return [items[i:i + size] for i in range(0, len(items), size)]


class Session:
    """One connected client; see the module docstring. Use ``async with Session(...)``."""

    def __init__(self, name: str, config: OpcuaSourceConfig) -> None:
        quiet_asyncua()
        self.name = name
        self.config = config
        self.where = f"OPC UA server {config.endpoint}"
        self.client: Client | None = None
        self.namespaces: list[str] = []
        self.max_read = DEFAULT_MAX_PER_CALL
        self.max_items = DEFAULT_MAX_PER_CALL
        self.subscription: Subscription | None = None
        self._lost = asyncio.Event()
        self._lost_reason = "the connection was lost"
        self._trust: TrustDirectory | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        cfg = self.config
        client = Client(cfg.endpoint, timeout=cfg.timeout,
                        watchdog_intervall=cfg.keepalive_interval)
        client.name = client.description = f"plant-edge-agent ({self.name})"
        client.application_uri = "urn:plant-edge-agent:client"
        client.product_uri = "urn:plant-edge-agent"
        client.session_timeout = int(cfg.session_timeout * 1000)
        client.connection_lost_callback = self._on_connection_lost
        if hasattr(client, "_stale_check_margin"):
            # asyncua's own stale-subscription watchdog would quietly re-create a silent
            # subscription inside this session; ours (check_alive) ends the session instead,
            # so the whole client is rebuilt and every value re-read.
            client._stale_check_margin = math.inf
        self.client = client
        if cfg.username is not None:
            client.set_user(cfg.username)
            if cfg.password is not None:
                try:
                    client.set_password(cfg.password.reveal())
                except SecretResolutionError as exc:
                    raise FatalError(f"{self.where}: password: {exc}") from exc
        # Connect: endpoint discovery (secured policies), channel, session, activation.
        budget = 4 * cfg.timeout
        try:
            async with asyncio.timeout(budget):
                if cfg.security is not None and cfg.security.policy.value != "None":
                    self._trust = await apply_security(client, cfg.security, self.where)
                await client.connect()
                self.namespaces = list(await client.get_namespace_array())
                self.max_read, self.max_items = await self._limits()
        except TimeoutError as exc:
            await self.close()
            raise PeerTimeoutError(f"{self.where} did not complete the connection within "
                                   f"{budget:g}s") from exc
        except (FatalError, RetryableError):
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise self._translate(exc, "connecting") from exc

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.config.timeout):
                await client.disconnect()
        # A failed connect can leave the socket open without a session.
        with contextlib.suppress(Exception):
            client.disconnect_socket()

    async def _on_connection_lost(self, exc: Exception) -> None:
        self.lose(f"{self.where} stopped answering ({_describe(exc)})")

    def lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def raise_if_lost(self) -> None:
        if self._lost.is_set():
            raise ConnectionLostError(self._lost_reason)

    async def wait_lost(self, seconds: float) -> None:
        """Sleep up to ``seconds``; raise ConnectionLostError at once if the session dies."""
        await wait_event(self._lost, seconds)
        self.raise_if_lost()

    # ------------------------------------------------------------------ errors

    def _translate(self, exc: BaseException, doing: str) -> RetryableError:
        if isinstance(exc, RetryableError):
            return exc
        if self._trust is not None and self._trust.refusal:
            return UntrustedServerError(f"{self.where}: {self._trust.refusal}")
        if isinstance(exc, ua.UaStatusCodeError) and exc.code in _AUTH_CODES:
            who = f"user '{self.config.username}'" if self.config.username else "anonymous login"
            return ConnectionLostError(
                f"{self.where} refused {who}: wrong user name or password, or the user is "
                f"not allowed ({ua.StatusCode(exc.code).name})")
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            return PeerTimeoutError(f"{self.where} did not answer within "
                                    f"{self.config.timeout:g}s while {doing}")
        return ConnectionLostError(f"{self.where}: {doing} failed: {_describe(exc)}")

    # ------------------------------------------------------------------ requests

    def _client(self) -> Client:
        self.raise_if_lost()
        if self.client is None:
            raise ConnectionLostError(f"{self.where}: the session is closed")
        return self.client

    async def _call(self, doing: str, coro: Any) -> Any:
        """Await one request with our own deadline (a little over the request timeout)."""
        try:
            async with asyncio.timeout(self.config.timeout + 1.0):
                return await coro
        except (FatalError, RetryableError):
            raise
        except Exception as exc:
            raise self._translate(exc, doing) from exc

    async def _limits(self) -> tuple[int, int]:
        cap = self.config.max_nodes_per_call or DEFAULT_MAX_PER_CALL
        values = await self._read_raw([_NodeId(n) for n in _LIMIT_NODES])
        limits = []
        for dv in values:
            limit = dv.Value.Value if dv.StatusCode.is_good() and dv.Value is not None else 0
            limits.append(min(cap, int(limit)) if isinstance(limit, int) and limit > 0 else cap)
        return limits[0], limits[1]

    async def _read_raw(self, node_ids: Sequence[Any]) -> list[Any]:
        client = self._client()
        params = ua.ReadParameters()
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        params.NodesToRead = [ua.ReadValueId(NodeId=n, AttributeId=ua.AttributeIds.Value)
                              for n in node_ids]
        return list(await client.uaclient.read(params))

    async def read(self, node_ids: Sequence[Any]) -> list[Any]:
        """DataValues for ``node_ids`` in order, in chunks of the server's MaxNodesPerRead.

        Per-node problems come back as a status code in the DataValue, never as an exception.
        """
        out: list[Any] = []
        for part in chunks(node_ids, self.max_read):
            out.extend(await self._call("reading values", self._read_raw(part)))
        return out

    # ------------------------------------------------------------------ subscription

    async def subscribe(self, items: Sequence[tuple[Any, OpcuaTag]]) -> list[int | str]:
        """One subscription with a monitored item per ``(node id, tag)``, created in chunks
        of the server's MaxMonitoredItemsPerCall. Returns per item the client handle, or the
        server's refusal as text."""
        client = self._client()
        cfg = self.config
        interval_ms = cfg.publishing_interval * 1000
        # Keep-alives at least every keepalive_interval, so silence is noticed in seconds.
        keepalive = max(1, math.ceil(cfg.keepalive_interval / cfg.publishing_interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval_ms, RequestedMaxKeepAliveCount=keepalive,
            RequestedLifetimeCount=keepalive * 10, MaxNotificationsPerPublish=0,
            PublishingEnabled=True, Priority=0)
        queue = max(10_000, 4 * sum(max(1, tag.queue_size) for _, tag in items))
        sub = await self._call("creating the subscription", client.create_subscription(
            params, None, queue_maxsize=queue, overflow=OverflowPolicy.DISCONNECT))
        sub.set_overflow_disconnect_handler(lambda: self.lose(
            f"{self.where}: the agent fell behind the notifications; re-reading everything"))
        self.subscription = sub
        return await self.monitor(items)

    async def monitor(self, items: Sequence[tuple[Any, OpcuaTag]]) -> list[int | str]:
        """Add monitored items to the subscription (chunked); per item the client handle or
        the server's refusal as text."""
        sub = self.subscription
        assert sub is not None, "subscribe() first"
        self._client()
        requests = [self._item_request(sub, node_id, tag) for node_id, tag in items]
        results: list[int | str] = []
        for part in chunks(requests, self.max_items):
            answers = await self._call("creating monitored items",
                                       sub.create_monitored_items(list(part)))
            for request, answer in zip(part, answers, strict=True):
                if isinstance(answer, ua.StatusCode):
                    results.append(f"{answer.name}: {answer.doc}" if answer.doc else answer.name)
                else:
                    results.append(request.RequestedParameters.ClientHandle)
        return results

    async def monitor_refresh_markers(self) -> int | None:
        """An event item on the Server object that lets only RefreshStart/RefreshEnd through
        (servers that send the markers only there); its server handle, or None if refused."""
        sub = self.subscription
        assert sub is not None, "subscribe() first"
        make: Any = sub._make_monitored_item_request
        request = make(_NodeRef(_NodeId(ua.ObjectIds.Server)), ua.AttributeIds.EventNotifier,
                       refresh_marker_filter(), 10, ua.MonitoringMode.Reporting, 0)
        answers = await self._call("creating the refresh marker item",
                                   sub.create_monitored_items([request]))
        if isinstance(answers[0], ua.StatusCode):
            return None
        return self.server_handle(request.RequestedParameters.ClientHandle)

    def server_handle(self, client_handle: int) -> int | None:
        """The server's id of a monitored item (event notifications carry only that)."""
        sub = self.subscription
        data = sub._monitored_items.get(client_handle) if sub is not None else None
        return None if data is None else data.server_handle

    async def condition_refresh(self) -> str | None:
        """Ask the server to resend every retained condition (Alarms & Conditions); the
        answers arrive as events between RefreshStart and RefreshEnd. Returns why the server
        refused (a server without Alarms & Conditions), or None."""
        client = self._client()
        sub = self.subscription
        assert sub is not None and sub.subscription_id is not None, "subscribe() first"
        results = await self._call("refreshing conditions", client.uaclient.call(
            [condition_refresh_request(sub.subscription_id)]))
        status = results[0].StatusCode
        return None if status.is_good() else f"{self.where}: ConditionRefresh: {status.name}"

    async def read_attribute(self, node_ids: Sequence[Any], attribute: Any) -> list[Any]:
        """DataValues of one attribute of ``node_ids`` (chunked; per-node status, no raise)."""
        client = self._client()
        out: list[Any] = []
        for part in chunks(node_ids, self.max_read):
            out.extend(await self._call("reading attributes", client.uaclient.read_attributes(
                list(part), attribute)))
        return out

    async def history_page(self, node_id: Any, start: Any, end: Any, count: int,
                           continuation: bytes | None, release: bool = False) -> Any:
        """One HistoryRead (raw values, source timestamps) of one node: its HistoryReadResult.
        ``release`` frees a continuation point the caller will not follow."""
        client = self._client()
        details = ua.ReadRawModifiedDetails()
        details.IsReadModified = False
        details.StartTime, details.EndTime = start, end
        details.NumValuesPerNode = count
        details.ReturnBounds = False
        params = ua.HistoryReadParameters()
        params.HistoryReadDetails = details
        params.TimestampsToReturn = ua.TimestampsToReturn.Both
        params.ReleaseContinuationPoints = release
        item = ua.HistoryReadValueId()
        item.NodeId = node_id
        item.ContinuationPoint = continuation
        params.NodesToRead = [item]
        results = await self._call("reading history", client.uaclient.history_read(params))
        return results[0]

    async def refresh_namespaces(self) -> None:
        """Read the NamespaceArray again (a namespace may have been added since connecting)."""
        client = self._client()
        self.namespaces = list(await self._call("reading the namespace array",
                                                client.get_namespace_array()))

    def _item_request(self, sub: Subscription, node_id: Any, tag: OpcuaTag) -> Any:
        cfg = self.config
        sampling = tag.sampling_interval if tag.sampling_interval is not None \
            else cfg.publishing_interval
        mfilter = None
        if tag.deadband is not None:
            mfilter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=(ua.DeadbandType.Percent if tag.deadband.type is DeadbandType.PERCENT
                              else ua.DeadbandType.Absolute),
                DeadbandValue=tag.deadband.value)
        node: Any = _NodeRef(node_id)
        make: Any = sub._make_monitored_item_request  # public helpers hide queue size + filter
        if tag.kind is TagKind.ALARMS:
            return make(node, ua.AttributeIds.EventNotifier, alarm_filter(),
                        tag.effective_queue_size, ua.MonitoringMode.Reporting, 0)
        return make(
            node, ua.AttributeIds.Value, mfilter, tag.queue_size, ua.MonitoringMode.Reporting,
            sampling * 1000)

    def check_alive(self) -> None:
        """Raise ConnectionLostError when the session is lost or the subscription went silent
        past its keep-alive period (a server that keeps the socket but stopped publishing)."""
        self.raise_if_lost()
        sub = self.subscription
        if sub is None or sub.last_publish_at is None:
            return
        p = sub.parameters
        period = p.RequestedPublishingInterval / 1000 * max(1, p.RequestedMaxKeepAliveCount)
        silent = time.monotonic() - sub.last_publish_at
        if silent > period * _SILENCE_MARGIN:
            self.lose(f"{self.where}: the subscription has been silent for {silent:.1f}s "
                      f"(keep-alive expected every {period:g}s)")
            self.raise_if_lost()


class _NodeRef:
    """The one attribute ``_make_monitored_item_request`` reads from a node."""

    __slots__ = ("nodeid",)

    def __init__(self, nodeid: Any) -> None:
        self.nodeid = nodeid


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ua.UaStatusCodeError):
        status = ua.StatusCode(exc.code)
        return f"{status.name}" + (f" ({status.doc})" if status.doc else "")
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
