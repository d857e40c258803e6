"""The MQTT sink: each event a QoS 1 publish to a Unified Namespace topic, settled on PUBACK.

One ``deliver`` call publishes the batch in order on one connection and waits for every PUBACK
(up to ``ack_timeout``). The message is the buffered CloudEvent JSON text unchanged
(structured mode); with MQTT 5 it also carries the content type
``application/cloudevents+json`` and the event id as the user property ``id``, so a consumer
can deduplicate without parsing. Answers, per event::

    PUBACK, reason < 0x80 (0x10 "no matching subscribers" too)  ACCEPTED
    PUBACK, reason >= 0x80 (MQTT 5: not authorized, payload      REJECTED -> dead letter with
      format invalid, quota exceeded, ...)                         the reason code as status
    every event of the attempt refused "not authorized" (0x87),  HOLD (an ACL or a wrong
      and nothing accepted on this connection yet, or more          user, not a bad event)
      than one event in the attempt
    connection lost, no PUBACK within ack_timeout                RETRY (the link is dropped,
                                                                   the next attempt reconnects)
    the link breaks on an answer paho cannot read (Mosquitto     RETRY; the second time the
      refusing a message over its size limit) twice with the     same event is the first
      same event first without a PUBACK                          unacknowledged one: REJECTED

Connecting: a refused CONNECT (bad user name or password, not authorized, client id refused,
unsupported protocol version), TLS files that cannot be loaded or a password that cannot be read
hold the sink; a broker that cannot be reached, is busy or unavailable is a retry. So the
forwarder's backoff is also the reconnect backoff, and a held sink re-reads its password and
TLS files before each probe (``reload_credentials``).

Sessions: ``session: persistent`` (default) connects with a stable client id and clean start
off (3.1.1: clean session off), so the broker keeps the session across reconnects. Events whose
PUBACK was lost with a connection are sent again by the forwarder: consumers deduplicate by the
event id (it is also inside the JSON).

The optional retained ``state_topic`` per machine is derived from the events this sink got
accepted, in order (see ``agent/sinks/mqtt_state.py``); it is published after the events, QoS
1, retained, and its acknowledgement does not decide the events' outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.sinks.addressing import Destinations, address_of, render, unfit
from agent.sinks.base import Delivery, ItemResult, OutboundEvent, Outcome, Sink
from agent.sinks.config import MqttSinkConfig
from agent.sinks.mqtt_link import LinkDown, LinkRefused, MqttLink, reason_text
from agent.sinks.mqtt_state import MachineStates
from agent.sinks.tls import TlsSetupError, client_context
from config.redaction import add_secret_values
from config.secrets import SecretResolutionError

__all__ = ["CE_CONTENT_TYPE", "MqttSink"]

log = logging.getLogger(__name__)

CE_CONTENT_TYPE = "application/cloudevents+json"
_NOT_AUTHORIZED = 0x87
_PROTOCOL_ERROR = 0x82
# CONNACK refusals that a retry can cure (server busy/unavailable, rate or quota limits).
_TRANSIENT_REFUSALS = {0x88, 0x89, 0x97, 0x9F}
_PRIORITY = [Outcome.HOLD, Outcome.RETRY, Outcome.REJECTED, Outcome.ACCEPTED]


class MqttSink(Sink):
    """``deliver`` never raises: every failure is a classified ``Delivery``."""

    def __init__(self, name: str, config: MqttSinkConfig, *, agent_id: str) -> None:
        super().__init__(name)
        self.config = config
        self.agent_id = agent_id
        self.client_id = config.client_id or f"{agent_id}-{name}"
        self._link: MqttLink | None = None
        self._accepted_on_link = 0
        self._states = MachineStates() if config.state_topic else None
        self._topics = Destinations(config.topic, "mqtt", agent_id)
        self._connecting = asyncio.Lock()
        self._strikes: dict[str, int] = {}  # event id -> protocol errors it was first for

    @property
    def max_batch(self) -> int:
        return self.config.batch_max_events

    @property
    def max_in_flight(self) -> int:
        return self.config.max_in_flight

    async def reload_credentials(self) -> None:
        self._drop_link()  # the next attempt re-reads the password and the TLS files

    async def aclose(self) -> None:
        self._drop_link()

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()

    async def _connected(self) -> MqttLink | Delivery:
        """The live link, or the Delivery that says why there is none. Attempts may run
        concurrently: one connects, the others wait for it and share the link."""
        async with self._connecting:
            return await self._connect()

    async def _connect(self) -> MqttLink | Delivery:
        if self._link is not None and self._link.connected:
            return self._link
        self._drop_link()
        cfg = self.config
        try:
            password = cfg.password.reveal() if cfg.password is not None else None
            if password:
                add_secret_values([password])
            tls = client_context(cfg.tls, f"sink {self.name}") if cfg.use_tls else None
        except (SecretResolutionError, TlsSetupError) as exc:
            return Delivery(Outcome.HOLD, detail=str(exc))
        link = MqttLink(host=cfg.host, port=cfg.port, client_id=self.client_id,
                        v5=cfg.protocol == "5", persistent=cfg.session == "persistent",
                        session_expiry=cfg.session_expiry, keep_alive=cfg.keep_alive,
                        connect_timeout=cfg.connect_timeout, username=cfg.username,
                        password=password, tls=tls,
                        max_inflight=max(cfg.batch_max_events, 20))
        try:
            await link.connect()
        except LinkRefused as exc:
            link.close()
            code = exc.code
            if code in _TRANSIENT_REFUSALS and not exc.not_authorized:
                return Delivery(Outcome.RETRY, detail=str(exc))
            return Delivery(Outcome.HOLD, detail=str(exc))
        except LinkDown as exc:
            link.close()
            return Delivery(Outcome.RETRY, detail=str(exc))
        self._link, self._accepted_on_link = link, 0
        log.debug("sink %s connected to %s (session present: %s)", self.name, link.where,
                  link.session_present)
        return link

    def _properties(self, event_id: str) -> Properties | None:
        return _EventProperties(event_id) if self.config.protocol == "5" else None

    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        if not events:
            return Delivery(Outcome.ACCEPTED, detail="nothing to send")
        try:
            return await self._deliver(events)
        except Exception as exc:  # never raise out of deliver (Sink contract)
            log.exception("sink %s: unexpected error while publishing", self.name)
            self._drop_link()
            return Delivery(Outcome.RETRY, detail=f"unexpected {type(exc).__name__}: {exc}"
                            [:500])

    async def _deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        link = await self._connected()
        if isinstance(link, Delivery):
            return link
        template = self.config.topic
        futures: list[asyncio.Future[ReasonCode | None] | ItemResult] = []
        sent = 0
        for e in events:
            topic = self._topics.of(e)
            if isinstance(topic, ItemResult):
                futures.append(topic)
                continue
            futures.append(link.publish(topic, e.payload.encode("utf-8"),
                                        properties=self._properties(e.id)))
            sent += 1
            if sent == link.window:
                # The first window goes on the wire now, while the rest is queued in paho
                # (it follows as PUBACKs come back).
                link.flush()
        waiting = [f for f in futures if not isinstance(f, ItemResult)]
        pending = (await asyncio.wait(waiting, timeout=self.config.ack_timeout))[1] \
            if waiting else set()
        if pending:
            # PUBACKs overdue on a link that looks alive: start afresh on the next attempt.
            self._drop_link()
        items: dict[str, ItemResult] = {}
        accepted: list[OutboundEvent] = []
        refused_auth = 0
        for event, fut in zip(events, futures, strict=True):
            item = fut if isinstance(fut, ItemResult) else _item(fut, self.config.ack_timeout)
            items[event.id] = item
            if item.outcome is Outcome.ACCEPTED:
                accepted.append(event)
            elif item.status == _NOT_AUTHORIZED:
                refused_auth += 1
        self._accepted_on_link += len(accepted)
        if link.protocol_error:
            self._strike(events, futures, link, items)
        if refused_auth == len(events) and (len(events) > 1 or not self._accepted_on_link):
            topic = render(template, address_of(events[0], self.agent_id))
            return Delivery(Outcome.HOLD, _NOT_AUTHORIZED,
                            f"MQTT broker {link.where} refused every publish as not authorized "
                            f"(topic {topic}, client id {self.client_id}): check the user and "
                            "the ACL")
        if accepted and self._states is not None:
            self._publish_states(link, accepted)
        if len(accepted) == len(events):
            return Delivery(Outcome.ACCEPTED)
        present = {i.outcome for i in items.values()}
        outcome = next(o for o in _PRIORITY if o in present)
        if not accepted and present == {Outcome.RETRY}:
            return Delivery(Outcome.RETRY, detail=next(iter(items.values())).detail)
        return Delivery(outcome, detail="per-event results", items=items)

    def _strike(self, events: Sequence[OutboundEvent],
                futures: Sequence[asyncio.Future[ReasonCode | None] | ItemResult],
                link: MqttLink, items: dict[str, ItemResult]) -> None:
        """The link broke on a broker answer paho cannot read. The oldest publish on the link
        without a PUBACK is the likely cause; the second time an event is, it goes to the dead
        letters instead of blocking the sink forever (the events after it are only retried).
        With several attempts in flight that event may be another attempt's: this one's
        events are then only retried (striking this attempt's first would dead-letter an
        innocent event once the poison broke the link twice)."""
        first = next((e for e, f in zip(events, futures, strict=True)
                      if f is link.first_unacked and items[e.id].outcome is Outcome.RETRY),
                     None)
        if first is None:
            return
        strikes = self._strikes.get(first.id, 0) + 1
        if len(self._strikes) > 1000:
            self._strikes.clear()
        self._strikes[first.id] = strikes
        if strikes >= 2:
            del self._strikes[first.id]
            items[first.id] = ItemResult(
                Outcome.REJECTED, _PROTOCOL_ERROR,
                "the MQTT broker broke the connection each time this event was published "
                "(an answer paho cannot read, e.g. the broker's message size limit)")

    def _publish_states(self, link: MqttLink, accepted: Sequence[OutboundEvent]) -> None:
        assert self._states is not None and self.config.state_topic is not None
        for address, body in self._states.apply(accepted, self.agent_id):
            if unfit(self.config.state_topic, address, "mqtt") is not None:
                continue  # a foreign event's machine: no state topic rather than a wrong one
            fut = link.publish(render(self.config.state_topic, address), body, retain=True)
            # Not awaited: the state is a convenience; a lost one is replaced by the next.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())


_CONTENT_TYPE_PROPERTY = b"\x03" + len(CE_CONTENT_TYPE).to_bytes(2, "big") + \
    CE_CONTENT_TYPE.encode()
_USER_PROPERTY_ID = b"\x26\x00\x02id"


class _EventProperties(Properties):
    """The PUBLISH properties of one event, packed directly: content type and the user
    property ``id``. paho's generic ``Properties`` cost more per message than the rest of a
    publish together (attribute name lookups on every set and pack)."""

    def __init__(self, event_id: str) -> None:
        raw = event_id.encode("utf-8")
        body = _CONTENT_TYPE_PROPERTY + _USER_PROPERTY_ID + len(raw).to_bytes(2, "big") + raw
        # Properties.__setattr__ only accepts MQTT property names.
        object.__setattr__(self, "_packed", _varint(len(body)) + body)
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)

    def pack(self) -> bytes:
        packed: bytes = object.__getattribute__(self, "_packed")
        return packed


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _item(fut: asyncio.Future[ReasonCode | None], timeout: float) -> ItemResult:
    if not fut.done():
        fut.cancel()
        return ItemResult(Outcome.RETRY, None, f"no PUBACK within {timeout:g}s")
    exc = fut.exception()
    if exc is not None:
        return ItemResult(Outcome.RETRY, None, str(exc))
    rc = fut.result()
    if rc is None or not rc.is_failure:
        return ItemResult(Outcome.ACCEPTED)
    return ItemResult(Outcome.REJECTED, rc.value,
                      f"MQTT broker refused the publish: {reason_text(rc)}")
