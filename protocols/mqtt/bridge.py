"""One paho-mqtt connection driven by the asyncio event loop (no paho thread).

Why this bridge: paho does its socket work in ``loop_read`` / ``loop_write`` / ``loop_misc``
and lets an application call them from its own event loop. Registering the socket with
``loop.add_reader`` and calling them there delivers every message on the loop thread, in order,
straight into detection: no thread hand-off per message, no locks, no queue to size. Measured
here (docs/library-notes.md): 29-42k msg/s this way versus 7-18k with paho's ``loop_start``
thread and ``call_soon_threadsafe``. The price is that paho's own reconnect loop does not
run, which is what we want anyway: ``Source.run()`` is one session and the supervisor owns
reconnecting.

Lifecycle of a ``PahoConnection`` (exactly one broker connection, never reconnected)::

    open() ── TCP + TLS + CONNECT in a worker thread (paho's connect blocks) ──> registered
      │        with the loop ── CONNACK ok ──> on_connect subscribes ──> open() returns
      │                         CONNACK refused ──> ConnectionLostError
      │                         no CONNACK within connect_timeout ──> PeerTimeoutError
    closed() waits until the broker, the network or the keep-alive check ends the session
             and raises ConnectionLostError with the reason
    close()  sends DISCONNECT if still connected, unregisters and closes the socket;
             idempotent, safe after a failed open()

Loop integration details:
- paho's socket is wrapped (``BatchedSocket``): paho reads each packet in pieces and writes a
  PUBACK per QoS 1 message; through the wrapper that is one ``recv`` per 64 KiB and one ``send``
  per read burst instead of several system calls per message.
- Reading: on readability, ``loop_read`` (one packet per call) runs while bytes are buffered in
  the wrapper or in TLS, which the selector cannot see; then the burst's samples are emitted and
  queued output (PUBACKs, SUBSCRIBE) is written in one go.
- Writing: whatever cannot be written at once waits for ``add_writer``, registered only while
  output is pending.
- ``on_socket_close`` unregisters the socket before paho closes it, so a reused file descriptor
  never inherits a stale registration.
- ``loop_misc`` runs every second for keep-alive pings and the broker-silence check.
- Acknowledgements are manual (paho's ``manual_ack``): the source calls ``ack(mids)`` once the
  effect of those QoS 1 messages is committed; an ack for a connection that has ended does
  nothing (the broker redelivers those messages to the next session). ``pause_reading`` stops
  taking bytes off the socket (TCP then holds the broker back) until ``resume_reading``; a
  pause longer than the keep-alive ends the session, which is then reopened and the
  unacknowledged messages redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from config.errors import ConnectionLostError, PeerTimeoutError
from protocols.mqtt.batched_socket import BatchedSocket
from protocols.mqtt.config import MqttProtocol, MqttSourceConfig, SessionMode

__all__ = ["PahoConnection", "build_client", "tls_context"]

log = logging.getLogger(__name__)

_MISC_INTERVAL = 1.0
_MAX_PACKETS_PER_BURST = 1000

OnMessage = Callable[[mqtt.MQTTMessage], None]


def tls_context(config: MqttSourceConfig) -> ssl.SSLContext:
    """Certificate and host name verification always on; optional client certificate."""
    tls = config.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
    if tls is not None and tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx


def build_client(config: MqttSourceConfig, client_id: str | None = None, *,
                 manual_ack: bool = False) -> mqtt.Client:
    """A paho client configured from ``config`` (no I/O; TLS files are read at connect)."""
    v5 = config.protocol is MqttProtocol.V5
    persistent = config.session is SessionMode.PERSISTENT
    kwargs: dict[str, Any] = {}
    if not v5:
        kwargs["clean_session"] = not persistent
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or config.client_id,
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                         manual_ack=manual_ack, **kwargs)
    client.connect_timeout = config.connect_timeout
    if config.username is not None:
        password = config.password.reveal() if config.password is not None else None
        client.username_pw_set(config.username, password)
    return client


def _reason(rc: ReasonCode | int | None) -> str:
    if rc is None:
        return "no reason given"
    return str(rc.getName() if isinstance(rc, ReasonCode) else mqtt.error_string(rc))


class PahoConnection:
    """One broker connection on the running loop; see the module docstring."""

    def __init__(self, config: MqttSourceConfig, subscriptions: dict[str, int],
                 on_message: OnMessage, on_burst_end: Callable[[], None],
                 on_suback: Callable[[dict[str, str]], None] | None = None) -> None:
        self._config = config
        self._where = f"{config.host}:{config.port}"
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_burst_end = on_burst_end
        self._on_suback = on_suback
        self._loop = asyncio.get_running_loop()
        self._client: mqtt.Client | None = None
        self._sock: BatchedSocket | None = None
        self._writing = False
        self._reading = False
        self._paused = False
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._misc: asyncio.TimerHandle | None = None
        self._pending_subs: dict[int, list[str]] = {}
        self.session_present = False

    # ------------------------------------------------------------------ public

    async def open(self) -> None:
        try:
            client = build_client(self._config, manual_ack=True)
        except ValueError as exc:  # an unresolvable password reference
            raise ConnectionLostError(f"MQTT broker {self._where}: {exc}") from exc
        self._client = client
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = lambda _client, _userdata, msg: self._on_message(msg)
        client.on_subscribe = self._handle_subscribe
        client.on_socket_close = self._handle_socket_close
        # paho's connect (DNS, TCP, TLS handshake, CONNECT) blocks: run it in a worker thread.
        # Nothing is registered with the loop yet, so the thread is the client's only user.
        connecting = self._loop.run_in_executor(None, self._connect_args())
        try:
            await asyncio.shield(connecting)
        except (OSError, ValueError, ssl.CertificateError) as exc:
            raise ConnectionLostError(f"cannot connect to MQTT broker {self._where}: "
                                      f"{_describe(exc)}") from exc
        except asyncio.CancelledError:
            # The thread may still finish the connect: close whatever it opens, when it does.
            connecting.add_done_callback(self._abandoned)
            raise
        raw = client.socket()
        if raw is None:
            raise ConnectionLostError(f"MQTT broker {self._where} closed the connection")
        sock = BatchedSocket(raw)
        client._sock = sock  # paho writes through it from now on
        self._sock = sock
        self._loop.add_reader(sock, self._readable)
        self._flush()
        self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)
        # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as the future completes, and the session would then never end.
        done, _ = await asyncio.wait([self._connack], timeout=self._config.connect_timeout)
        if not done:
            raise PeerTimeoutError(f"MQTT broker {self._where} did not answer CONNECT within "
                                   f"{self._config.connect_timeout:g}s")
        self._connack.result()  # raises ConnectionLostError when the broker refused us

    async def closed(self) -> None:
        """Wait for the end of the session; raises ConnectionLostError saying why."""
        await asyncio.shield(self._lost)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        if self._client is None or self._sock is None:
            return
        self._client.publish(topic, payload, qos=qos)
        if not self._reading:  # a read burst flushes when it ends
            self._flush()

    def ack(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages of this connection; nothing once it has ended."""
        client = self._client
        if client is None or self._sock is None:
            return
        for mid in mids:
            client.ack(mid, 1)
        if not self._reading:  # a read burst flushes when it ends
            self._flush()

    def pause_reading(self) -> None:
        sock = self._sock
        if not self._paused and sock is not None:
            self._paused = True
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        sock = self._sock
        if self._paused and sock is not None:
            self._paused = False
            self._loop.add_reader(sock, self._readable)
            self._loop.call_soon(self._readable)  # bytes may wait in the wrapper already

    @property
    def paused(self) -> bool:
        return self._paused

    def close(self) -> None:
        client = self._client
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if client is not None and self._sock is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()
        self._close_socket_now()
        for fut in (self._connack, self._lost):
            if not fut.done():
                fut.set_exception(ConnectionLostError("closed"))
            fut.exception()  # retrieved: nobody may wait for it any more

    # ------------------------------------------------------------------ connect

    def _connect_args(self) -> Callable[[], None]:
        cfg = self._config
        client = self._client
        assert client is not None
        kwargs: dict[str, Any] = {"keepalive": max(1, round(cfg.keep_alive))}
        if cfg.protocol is MqttProtocol.V5:
            persistent = cfg.session is SessionMode.PERSISTENT
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = round(cfg.session_expiry) if persistent else 0
            kwargs.update(clean_start=not persistent, properties=props)

        def connect() -> None:
            if cfg.use_tls:
                client.tls_set_context(tls_context(cfg))
            client.connect(cfg.host, cfg.port, **kwargs)

        return connect

    def _abandoned(self, connecting: asyncio.Future[None]) -> None:
        if not connecting.cancelled():
            connecting.exception()  # retrieved: the session is already over
        self._close_socket_now()

    def _close_socket_now(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None and self._client is not None:
            sock = self._client.socket()  # type: ignore[assignment]
        if sock is not None:
            self._unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()

    # ------------------------------------------------------------------ paho callbacks

    def _handle_connect(self, client: mqtt.Client, _userdata: Any, flags: Any,
                        rc: ReasonCode, _props: Any) -> None:
        if rc.is_failure:
            self._fail(f"MQTT broker {self._where} refused the connection: {_reason(rc)}",
                       self._connack)
            return
        self.session_present = bool(getattr(flags, "session_present", False))
        # Subscribing here, on every CONNACK, is what brings subscriptions back after a
        # reconnect, whatever the broker kept of the session.
        if self._config.protocol is MqttProtocol.V5:
            # One SUBSCRIBE per filter, each with its own subscription identifier: a broker
            # that sends one copy per matching subscription (Mosquitto does) tags each copy,
            # so overlapping filters never count one message twice.
            for number, (topic, qos) in enumerate(self._subscriptions.items(), start=1):
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = number
                _result, mid = client.subscribe(topic, qos, properties=props)
                if mid is not None:
                    self._pending_subs[mid] = [topic]
        elif self._subscriptions:
            topics = list(self._subscriptions.items())
            _result, mid = client.subscribe(topics)
            if mid is not None:
                self._pending_subs[mid] = [t for t, _ in topics]
        if not self._connack.done():
            self._connack.set_result(None)

    def _handle_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int,
                          codes: list[ReasonCode], _props: Any) -> None:
        topics = self._pending_subs.pop(mid, [])
        refused = {t: _reason(rc) for t, rc in zip(topics, codes, strict=False) if rc.is_failure}
        if self._on_suback is not None:
            self._on_suback(refused)

    def _handle_disconnect(self, _client: mqtt.Client, _userdata: Any, flags: Any,
                           rc: ReasonCode, _props: Any) -> None:
        if getattr(flags, "is_disconnect_packet_from_server", False):
            why = f"MQTT broker {self._where} ended the session: {_reason(rc)}"
        elif self._connack.done():
            why = f"connection to MQTT broker {self._where} lost"
        else:
            why = f"MQTT broker {self._where} closed the connection before CONNACK"
        self._fail(why, self._lost)

    def _handle_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._unregister(sock)
        if sock is self._sock:
            self._sock = None
        # paho reports the reason (on_disconnect) right after closing: let that text win.
        self._loop.call_soon(self._fail, f"MQTT broker {self._where} closed the connection",
                             self._lost)

    # ------------------------------------------------------------------ loop driving

    def _readable(self) -> None:
        client = self._client
        if client is None or self._paused:
            return
        self._reading = True
        try:
            # paho reads one packet per loop_read; go on while bytes are buffered (here or
            # in TLS), which the selector cannot see. New bytes wake us up again.
            for _ in range(_MAX_PACKETS_PER_BURST):
                rc = client.loop_read()
                sock = self._sock
                if rc != mqtt.MQTT_ERR_SUCCESS or sock is None or sock.pending() == 0 \
                        or self._paused:
                    break
            else:
                self._loop.call_soon(self._readable)  # a long burst: let other tasks run
            self._on_burst_end()
            self._flush()
        except Exception as exc:  # a bug in a handler must end the session, not the loop
            log.exception("MQTT session with %s failed while reading", self._where)
            self._fail(f"MQTT session with {self._where} failed: {type(exc).__name__}: {exc}",
                       self._lost)
            self._close_socket_now()
        finally:
            self._reading = False

    def _writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        client = self._client
        if client is None or self._sock is None:
            return
        if client.want_write():
            client.loop_write()  # paho's queue into our buffer (its send never blocks now)
        sock = self._sock
        if sock is None:  # paho closed it (after DISCONNECT or an error)
            return
        try:
            everything = sock.flush()
        except OSError as exc:
            self._fail(f"connection to MQTT broker {self._where} lost ({exc})", self._lost)
            self._close_socket_now()
            return
        if not everything:
            if not self._writing:
                self._loop.add_writer(sock, self._writable)
                self._writing = True
        elif self._writing:
            self._loop.remove_writer(sock)
            self._writing = False

    def _tick(self) -> None:
        self._misc = None
        client = self._client
        if client is None or self._sock is None:
            return
        client.loop_misc()
        self._flush()
        if self._sock is not None:
            self._misc = self._loop.call_later(_MISC_INTERVAL, self._tick)

    def _unregister(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)
        self._writing = False

    def _fail(self, why: str, first: asyncio.Future[None]) -> None:
        err = ConnectionLostError(why)
        for fut in (first, self._connack, self._lost):
            if not fut.done():
                fut.set_exception(err)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate check failed: {exc.verify_message or exc}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
