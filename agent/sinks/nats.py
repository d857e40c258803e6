"""The NATS JetStream sink: each event one publish, settled on the stream's acknowledgement.

One ``deliver`` call publishes the batch in order on one connection, each message with the
header ``Nats-Msg-Id: <event id>`` and its own reply subject under one inbox, then waits for
every acknowledgement (up to ``ack_timeout``). Writing all publishes before awaiting any ack is
what ``js.publish`` in a loop cannot do (it waits a round trip per event); the
acknowledgements are the same JetStream PubAck answers. Answers, per event::

    {"stream": S, "seq": N}                      ACCEPTED
    {"stream": S, "seq": N, "duplicate": true}   ACCEPTED (the stream's duplicate window
                                                 recognised the Nats-Msg-Id: a re-send)
    status 503 "no responders"                   HOLD: no stream covers the subject (the
                                                 stream is missing or its subjects do not
                                                 match); never dropped
    ack from another stream than ``stream:``     HOLD (a second stream captures the subject)
    {"error": {...}} (e.g. message too large,    REJECTED -> dead letter with the JetStream
      wrong expected stream)                     error code as status
    {"error": ...} 503 (no quorum, storage)      RETRY
    connection lost / no ack within ack_timeout  RETRY (the next attempt reconnects; the
                                                 re-send is dropped by the duplicate window)

Connecting: TLS (``tls://`` URLs or ``tls:`` options), a token, user and password, or a
credentials file; an authorization violation, unreadable secrets or TLS files hold the sink;
an unreachable server is a retry. The client's own reconnect is off: the forwarder's backoff
decides when to try again, and a held sink re-reads its secrets before each probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from agent.sinks.addressing import Destinations
from agent.sinks.base import Delivery, ItemResult, OutboundEvent, Outcome, Sink
from agent.sinks.config import NatsSinkConfig
from agent.sinks.tls import TlsSetupError, client_context
from config.redaction import add_secret_values
from config.secrets import SecretResolutionError
from config.tasks import within

__all__ = ["NatsSink"]

log = logging.getLogger(__name__)

_PRIORITY = [Outcome.HOLD, Outcome.RETRY, Outcome.REJECTED, Outcome.ACCEPTED]
_NO_STREAM = "no JetStream stream covers subject"
_ACCEPTED = ItemResult(Outcome.ACCEPTED)


class NatsSink(Sink):
    """``deliver`` never raises: every failure is a classified ``Delivery``."""

    def __init__(self, name: str, config: NatsSinkConfig, *, agent_id: str) -> None:
        super().__init__(name)
        self.config = config
        self.agent_id = agent_id
        self._nc: NatsClient | None = None
        self._inbox = ""
        self._next = 0
        self._acks: dict[str, asyncio.Future[ItemResult]] = {}
        self._where = ", ".join(config.servers)
        self._auth_error: str | None = None
        self._last_error: str | None = None
        self._subjects = Destinations(config.subject, "nats", agent_id)
        self._connecting = asyncio.Lock()

    @property
    def max_batch(self) -> int:
        return self.config.batch_max_events

    @property
    def max_in_flight(self) -> int:
        return self.config.max_in_flight

    async def reload_credentials(self) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        nc, self._nc = self._nc, None
        self._lost("connection closed")
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    def _connect_options(self) -> dict[str, Any]:
        cfg = self.config
        opts: dict[str, Any] = {
            "servers": list(cfg.servers), "connect_timeout": max(1, round(cfg.connect_timeout)),
            "allow_reconnect": False, "name": f"edge-agent {self.agent_id} sink {self.name}",
            # 0 would retry the first connect forever; 1 tries each server twice, quickly.
            "max_reconnect_attempts": 1, "reconnect_time_wait": 0.1,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected, "closed_cb": self._on_disconnected}
        secrets = []
        if cfg.token is not None:
            opts["token"] = cfg.token.reveal()
            secrets.append(opts["token"])
        if cfg.username is not None and cfg.password is not None:
            opts["user"], opts["password"] = cfg.username, cfg.password.reveal()
            secrets.append(opts["password"])
        if cfg.credentials_file is not None:
            if not cfg.credentials_file.is_file():
                raise SecretResolutionError(f"credentials file {cfg.credentials_file} "
                                            "does not exist or is not a file")
            opts["user_credentials"] = str(cfg.credentials_file)
        add_secret_values(secrets)
        tls_wanted = any(s.startswith("tls://") for s in cfg.servers) \
            or cfg.tls.ca_file is not None or cfg.tls.client_cert is not None
        if tls_wanted:
            opts["tls"] = client_context(cfg.tls, f"sink {self.name}")
        return opts

    async def _connected(self) -> NatsClient | Delivery:
        """The live connection, or the Delivery that says why there is none. Attempts may run
        concurrently: one connects, the others wait for it and share the connection."""
        async with self._connecting:
            return await self._connect()

    async def _connect(self) -> NatsClient | Delivery:
        if self._nc is not None and self._nc.is_connected:
            return self._nc
        await self.aclose()
        try:
            opts = self._connect_options()
        except (SecretResolutionError, TlsSetupError) as exc:
            return Delivery(Outcome.HOLD, detail=str(exc))
        self._auth_error = self._last_error = None
        try:
            nc = await within(nats.connect(**opts), 3 * self.config.connect_timeout + 1)
        except (nats.errors.Error, OSError, ssl.SSLError, TimeoutError) as exc:
            why = _describe(exc)
            if self._last_error and isinstance(exc, nats.errors.NoServersError | TimeoutError):
                why = f"{why} ({self._last_error})"
            text = f"cannot connect to NATS {self._where}: {why}"
            if self._auth_error or "authorization" in text.lower():
                return Delivery(Outcome.HOLD, detail=f"NATS {self._where} refused the "
                                f"credentials: {self._auth_error or _describe(exc)}")
            return Delivery(Outcome.RETRY, detail=text)
        self._inbox = nc.new_inbox()
        await nc.subscribe(self._inbox + ".*", cb=self._on_ack)
        self._nc = nc
        return nc

    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        if not events:
            return Delivery(Outcome.ACCEPTED, detail="nothing to send")
        try:
            return await self._deliver(events)
        except Exception as exc:  # never raise out of deliver (Sink contract)
            if not isinstance(exc, nats.errors.Error | OSError):
                log.exception("sink %s: unexpected error while publishing", self.name)
            await self.aclose()
            return Delivery(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}"[:500])

    async def _deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        nc = await self._connected()
        if isinstance(nc, Delivery):
            return nc
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ItemResult]] = []
        subjects: list[str] = []
        for event in events:
            subject = self._subjects.of(event)
            fut: asyncio.Future[ItemResult] = loop.create_future()
            futures.append(fut)
            if isinstance(subject, ItemResult):
                subjects.append("")
                fut.set_result(subject)
                continue
            self._next += 1
            reply = f"{self._inbox}.{self._next}"
            self._acks[reply] = fut
            subjects.append(subject)
            await nc.publish(subject, event.payload.encode("utf-8"), reply=reply,
                             headers={"Nats-Msg-Id": event.id})
        _done, pending = await asyncio.wait(futures, timeout=self.config.ack_timeout)
        items: dict[str, ItemResult] = {}
        for event, subject, fut in zip(events, subjects, futures, strict=True):
            if fut.done() and not fut.cancelled():
                item = fut.result()
                if item.outcome is Outcome.HOLD and item.detail == _NO_STREAM:
                    item = ItemResult(Outcome.HOLD, 503, f"{_NO_STREAM} '{subject}' on NATS "
                                      f"{self._where}: create the stream or add the subject "
                                      f"to its subjects (events stay buffered)")
            else:
                fut.cancel()
                item = ItemResult(Outcome.RETRY, None, "no acknowledgement within "
                                  f"{self.config.ack_timeout:g}s")
            items[event.id] = item
        for reply in [r for r, f in self._acks.items() if f.done()]:
            del self._acks[reply]
        if pending:
            await self.aclose()
        present = {i.outcome for i in items.values()}
        if present == {Outcome.ACCEPTED}:
            return Delivery(Outcome.ACCEPTED)
        outcome = next(o for o in _PRIORITY if o in present)
        first = next(i for i in items.values() if i.outcome is outcome)
        if len(present) == 1 and outcome is not Outcome.REJECTED:
            # One verdict for all (a missing stream, a lost connection): nothing to settle.
            return Delivery(outcome, first.status, first.detail)
        return Delivery(outcome, detail="per-event results", items=items)

    # ------------------------------------------------------------------ callbacks

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._acks.pop(msg.subject, None)
        if fut is None or fut.done():
            return
        fut.set_result(self._classify(msg))

    def _classify(self, msg: Msg) -> ItemResult:
        status = (msg.headers or {}).get("Status")
        if status == "503" and not msg.data:
            return ItemResult(Outcome.HOLD, 503, _NO_STREAM)
        data = msg.data
        # The common answer, {"stream":"S","seq":N} (or with "duplicate":true), without
        # parsing it: a drain gets one per event.
        if data.startswith(b'{"stream":"') and b'"error"' not in data:
            stream = data[11:data.find(b'"', 11)].decode("utf-8", "replace")
            if self.config.stream is None or stream == self.config.stream:
                return _ACCEPTED
        try:
            doc = json.loads(msg.data)
        except ValueError:
            return ItemResult(Outcome.RETRY, None, f"unreadable acknowledgement: "
                              f"{msg.data[:200]!r}")
        if not isinstance(doc, dict):
            return ItemResult(Outcome.RETRY, None, "unreadable acknowledgement")
        error = doc.get("error")
        if isinstance(error, dict):
            code = error.get("code") if isinstance(error.get("code"), int) else None
            text = (f"JetStream refused the message: {error.get('description')} "
                    f"(err_code {error.get('err_code')})")
            if code in (None, 408, 500, 503):
                return ItemResult(Outcome.RETRY, code, text)
            return ItemResult(Outcome.REJECTED, code, text)
        acked_by = doc.get("stream")
        if self.config.stream is not None and acked_by != self.config.stream:
            return ItemResult(Outcome.HOLD, None, f"stream {acked_by!r} acknowledged a message "
                              f"meant for stream {self.config.stream!r}: check which stream "
                              "covers the subject")
        return ItemResult(Outcome.ACCEPTED)

    async def _on_error(self, exc: Exception) -> None:
        text = _describe(exc)
        self._last_error = text
        if "authorization" in text.lower() or "authentication" in text.lower():
            self._auth_error = text

    async def _on_disconnected(self) -> None:
        self._lost(f"connection to NATS {self._where} lost")

    def _lost(self, why: str) -> None:
        acks, self._acks = self._acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_result(ItemResult(Outcome.RETRY, None, why))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate check failed: {exc.verify_message or exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
