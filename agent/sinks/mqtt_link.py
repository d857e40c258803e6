"""One publishing MQTT connection, driven by the asyncio event loop (no paho thread).

The MQTT sink's transport. paho-mqtt does the protocol; this module only moves its socket work
onto the loop (``add_reader`` -> ``loop_read``, ``add_writer`` while output is queued ->
``loop_write``, a one-second timer -> ``loop_misc`` for keep-alive), so PUBACKs resolve futures
on the loop thread without a thread hand-off. The source side drives paho the same way for
subscribing; the two stay separate because sinks may not import protocols (layer rule).

Lifecycle (one broker connection; a lost connection is never revived, a new link is made)::

    connect() -- TCP + TLS + CONNECT in a worker thread --> registered with the loop
        |          CONNACK ok ------------------------------> connected
        |          CONNACK refused --------------------------> LinkRefused (auth or other)
        |          no CONNACK / socket error ----------------> LinkDown
    publish(...) -> future resolved with the PUBACK reason code (None on MQTT 3.1.1)
    connection lost -> every unresolved future fails with LinkDown; ``down`` holds the reason
    close()   DISCONNECT if connected, unregister, close; idempotent, safe after a failure

Invariant: a publish's future is registered before paho can read its PUBACK (paho writes on
the loop thread and reads only in ``_readable``), so no acknowledgement is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["LinkDown", "LinkRefused", "MqttLink", "reason_text"]

log = logging.getLogger(__name__)

_MISC_INTERVAL = 1.0
_MAX_PACKETS_PER_READ = 1000
# CONNACK codes that mean "who you are is not accepted" (paho maps 3.1.1 codes 4 and 5 to
# 0x86 and 0x87).
_AUTH_CODES = {0x86, 0x87, 0x8C}
_PROTOCOL_ERROR = 0x82


class LinkDown(Exception):
    """The connection could not be made or was lost (retry later)."""


class LinkRefused(Exception):
    """The broker answered CONNECT with a refusal."""

    def __init__(self, message: str, *, code: int, not_authorized: bool) -> None:
        super().__init__(message)
        self.code = code
        self.not_authorized = not_authorized


def reason_text(rc: ReasonCode | int | None) -> str:
    if rc is None:
        return "no reason given"
    if isinstance(rc, ReasonCode):
        return f"{rc.getName()} (0x{rc.value:02x})"
    return str(mqtt.connack_string(rc))


class MqttLink:
    """See the module docstring."""

    def __init__(self, *, host: str, port: int, client_id: str, v5: bool, persistent: bool,
                 session_expiry: float, keep_alive: float, connect_timeout: float,
                 username: str | None, password: str | None,
                 tls: ssl.SSLContext | None, max_inflight: int) -> None:
        self.where = f"{host}:{port}"
        self._host, self._port = host, port
        self._v5, self._persistent = v5, persistent
        self._expiry, self._keep_alive = session_expiry, keep_alive
        self._connect_timeout = connect_timeout
        self._tls = tls
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": not persistent}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **kwargs)
        client.connect_timeout = connect_timeout
        # paho walks every queued message on each PUBACK while an inflight limit is set
        # (quadratic in what is queued), so the limit is off unless the broker's CONNACK
        # asks for a smaller receive maximum (Mosquitto: 20). Then up to max_in_flight
        # batches queue behind that window: one reason the sink's default is 2 attempts,
        # measured faster than 4 against Mosquitto.
        self._window = self.window = max_inflight
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_close = self._on_socket_close
        # With a write callback set, paho queues output instead of writing inside publish():
        # one loop_write after a burst of publishes instead of one per message.
        client.on_socket_register_write = lambda *_: self._want_write()
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._sock: _Batched | None = None
        self._writer = False
        self._write_soon = False
        self._misc: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[ReasonCode | None]] = {}
        self.down: str | None = None
        self.protocol_error = False
        self.first_unacked: asyncio.Future[ReasonCode | None] | None = None
        self.session_present = False

    @property
    def connected(self) -> bool:
        return self.down is None and self._sock is not None and self._connack.done()

    async def connect(self) -> None:
        kwargs: dict[str, Any] = {"keepalive": max(1, round(self._keep_alive))}
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = round(self._expiry) if self._persistent else 0
            kwargs.update(clean_start=not self._persistent, properties=props)
        client = self._client

        def blocking_connect() -> None:
            if self._tls is not None:
                client.tls_set_context(self._tls)
            client.connect(self._host, self._port, **kwargs)

        connecting = self._loop.run_in_executor(None, blocking_connect)
        try:
            await asyncio.shield(connecting)
        except (OSError, ValueError, ssl.SSLError, ssl.CertificateError) as exc:
            self.down = f"cannot connect to MQTT broker {self.where}: {_describe(exc)}"
            raise LinkDown(self.down) from exc
        except asyncio.CancelledError:
            connecting.add_done_callback(self._abandoned)
            raise
        raw = client.socket()
        if raw is None:
            raise LinkDown(f"MQTT broker {self.where} closed the connection")
        # Publishes go out as PUBACKs free the window: without TCP_NODELAY, Nagle holds each
        # small write back until the previous one is acknowledged.
        with contextlib.suppress(OSError):
            cast(Any, raw).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = _Batched(raw)
        client._sock = self._sock  # paho reads and writes through it from now on
        self._loop.add_reader(self._sock, self._readable)
        self._flush()
        self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)
        done, _ = await asyncio.wait([self._connack], timeout=self._connect_timeout)
        if not done:
            self.close()
            raise LinkDown(f"MQTT broker {self.where} did not answer CONNECT within "
                           f"{self._connect_timeout:g}s")
        self._connack.result()

    def _abandoned(self, connecting: asyncio.Future[None]) -> None:
        if not connecting.cancelled():
            connecting.exception()  # retrieved: nobody waits for this connect any more
        self.close()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                properties: Properties | None = None) -> asyncio.Future[ReasonCode | None]:
        """Queue one QoS 1 publish; the future resolves on its PUBACK."""
        fut: asyncio.Future[ReasonCode | None] = self._loop.create_future()
        if not self.connected:
            fut.set_exception(LinkDown(self.down or "not connected"))
            return fut
        info = self._client.publish(topic, payload, qos=1, retain=retain,
                                    properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            fut.set_exception(LinkDown(f"publish failed: {mqtt.error_string(info.rc)}"))
        else:
            self._acks[info.mid] = fut
        return fut

    def flush(self) -> None:
        """Write what is queued now instead of at the end of this loop iteration."""
        self._flush()

    def close(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._sock is not None and self.down is None:
            with contextlib.suppress(Exception):
                self._client.disconnect()
                self._client.loop_write()
        self._lost("closed")
        sock, self._sock = self._sock, None
        # paho would close its socket again when the client is garbage-collected, maybe
        # after the loop is gone: it has nothing left to close or report.
        self._client.on_socket_close = None
        self._client._sock = None
        if sock is not None:
            self._unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode,
                    _p: Any) -> None:
        if rc.is_failure:
            code = rc.value
            auth = code in _AUTH_CODES
            err = LinkRefused(f"MQTT broker {self.where} refused the connection: "
                              f"{reason_text(rc)}", code=code, not_authorized=auth)
            self.down = str(err)
            if not self._connack.done():
                self._connack.set_exception(err)
            return
        self.session_present = bool(getattr(flags, "session_present", False))
        receive_max = getattr(_p, "ReceiveMaximum", None) if self._v5 else None
        if isinstance(receive_max, int) and 0 < receive_max < self._window:
            # paho refuses max_inflight_messages_set once connected and does not apply the
            # broker's Receive Maximum itself; the attribute behind that setter does.
            self._client._max_inflight_messages = receive_max
            self.window = receive_max
        if not self._connack.done():
            self._connack.set_result(None)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(rc if self._v5 else None)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, flags: Any, rc: ReasonCode,
                       _p: Any) -> None:
        if getattr(flags, "is_disconnect_packet_from_server", False):
            self._lost(f"MQTT broker {self.where} ended the session: {reason_text(rc)}")
        elif rc.is_failure and rc.value == _PROTOCOL_ERROR:
            # paho could not read the broker's answer: seen when a broker refuses a publish
            # with a reason code paho does not know for PUBACK (Mosquitto, message too large).
            self.protocol_error = True
            self._lost(f"connection to MQTT broker {self.where} lost: paho could not read "
                       "the broker's answer (protocol error)")
        else:
            self._lost(f"connection to MQTT broker {self.where} lost")

    def _on_socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        if self._loop.is_closed():
            return
        self._unregister(sock)
        if sock is self._sock:
            self._sock = None
        self._loop.call_soon(self._lost, f"MQTT broker {self.where} closed the connection")

    def _lost(self, why: str) -> None:
        self.down = self.down or why
        err = LinkDown(self.down)
        if not self._connack.done():
            self._connack.set_exception(err)
            self._connack.exception()
        acks, self._acks = self._acks, {}
        if self.first_unacked is None:
            # The broker handles one connection's publishes in order: the oldest publish
            # without a PUBACK is the one it was reading when the link broke.
            self.first_unacked = next(iter(acks.values()), None)
        for fut in acks.values():
            if not fut.done():
                fut.set_exception(err)

    # ------------------------------------------------------------------ loop driving

    def _readable(self) -> None:
        try:
            rc = self._client.loop_read(_MAX_PACKETS_PER_READ)
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                self._lost(f"connection to MQTT broker {self.where} lost "
                           f"({mqtt.error_string(rc)})")
            self._flush()
        except Exception as exc:  # a paho bug must end this link, not the event loop
            log.exception("MQTT link to %s failed while reading", self.where)
            self._lost(f"MQTT link to {self.where} failed: {type(exc).__name__}: {exc}")
            self.close()

    def _want_write(self) -> None:
        # Also called from the connect thread (CONNECT is queued there): thread-safe call.
        if not self._write_soon:
            self._write_soon = True
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._write_soon = False
        if self._sock is None:
            return
        if self._client.want_write():
            self._client.loop_write()  # into the batch buffer
        sock = self._sock
        if sock is None:
            return
        try:
            pending = not sock.flush()
        except OSError as exc:
            self._lost(f"connection to MQTT broker {self.where} lost ({exc})")
            self.close()
            return
        if pending and not self._writer:
            self._loop.add_writer(sock, self._flush)
            self._writer = True
        elif not pending and self._writer:
            self._loop.remove_writer(sock)
            self._writer = False

    def _tick(self) -> None:
        self._misc = None
        if self._sock is None:
            return
        self._client.loop_misc()
        self._flush()
        if self._sock is not None:
            self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    def _unregister(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)
        self._writer = False


class _Batched:
    """Stands in for paho's socket so a burst costs one system call each way: paho reads a
    PUBACK in three pieces and writes each PUBLISH on its own; here reads come from one large
    ``recv`` and writes collect until ``flush``. (The MQTT source does the same in
    ``protocols/mqtt/batched_socket.py``; sinks may not import protocols.)"""

    __slots__ = ("_in", "_out", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock, self._in, self._pos, self._out = sock, b"", 0, bytearray()

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._in):
            data = self._sock.recv(max(size, 65536))  # BlockingIOError passes through
            if len(data) <= size:
                self._in, self._pos = b"", 0
                return bytes(data)
            self._in, self._pos = data, 0
        pos, end = self._pos, min(self._pos + size, len(self._in))
        self._pos = end
        return self._in[pos:end]

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self._out += data
        return len(data)

    def flush(self) -> bool:
        """Write what paho queued; False when the socket would block (wait to write)."""
        out = self._out
        while out:
            try:
                sent = self._sock.send(out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            del out[:sent]
        return True

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._in) - self._pos + (inner() if inner is not None else 0)

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.flush()  # a DISCONNECT paho just wrote
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate check failed: {exc.verify_message or exc}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
