"""The HTTP sink: one POST per ``deliver`` call, classified per docs/delivery.md.

Request shapes:

- ``mode: single``: the event's buffered JSON text as the body, ``Content-Type:
  application/cloudevents+json``, ``Idempotency-Key: <event id>``.
- ``mode: batch``: a JSON array of the buffered JSON texts, ``Content-Type:
  application/cloudevents-batch+json``, ``Idempotency-Key`` = lower-case hex SHA-256 of the event
  ids (in batch order) joined with ``"\\n"`` and UTF-8 encoded. The same rows re-sent after a
  timeout carry the same key; a split or bisected batch gets a new key (it is a different
  request), which is fine because the receiver deduplicates by event id as well.

Answer classes (also applied per item of a ``207``)::

    2xx, 409                    ACCEPTED   (409: the receiver already has it)
    408, 429, 5xx, no answer    RETRY      (Retry-After parsed into seconds)
    401, 403                    HOLD       (the forwarder calls reload_credentials())
    413                         TOO_LARGE
    other 4xx                   REJECTED   (status and up to 500 characters of the body)
    404/405 for the request     HOLD       (wrong URL, not a poison event: bisecting would
                                            dead-letter everything; per item they are REJECTED)
    1xx/3xx (not followed)      HOLD       (misconfigured URL: keep everything, a person acts)

The bearer token is read once and cached; ``reload_credentials()`` re-reads it (the forwarder
calls it when the sink is held), so a rotated ``${file:...}`` token works without a restart.
A token that cannot be read (missing, not UTF-8, too large) or is not a valid header value
(a line break, a space, non-ASCII) holds the sink with the reason, naming the reference and
never the value: a request never leaves without the authentication it is configured with.

Every detail a delivery reports (stored with dead letters, shown in ``/status``) passes through
``redact``: a receiver that echoes our headers in its error body gives ``***``.

With ``auth.oauth2`` the token comes from ``agent/sinks/oauth.py`` (cached, refreshed before
expiry). A 401 answer triggers exactly one token refresh and one resend of the same request
(same Idempotency-Key, so harmless); a second 401 holds the sink. A token endpoint that refuses
the client credentials holds the sink; one that cannot be reached is a retry.

Every request carries a W3C ``traceparent`` (``agent/sinks/tracecontext.py``: one trace per
request, shared by its retries); the returned ``Delivery`` carries its trace id, and the
per-event DEBUG lines ("event ... delivered", "refused") name it with the event and episode.

TLS (``tls:``, ``agent/sinks/tls.py``): verification on by default, a private CA, a client
certificate for mutual TLS. TLS files that cannot be loaded hold the sink with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from agent.sinks.base import Delivery, ItemResult, OutboundEvent, Outcome, Sink, is_header_token
from agent.sinks.bounded import AnswerTooLarge, post_bounded
from agent.sinks.config import HttpSinkConfig, SinkMode
from agent.sinks.oauth import OAuth2RejectedError, OAuth2Token, OAuth2UnavailableError
from agent.sinks.tls import TlsSetupError, client_context
from agent.sinks.tracecontext import traceparent
from config.redaction import add_secret_values, redact
from config.secrets import SecretResolutionError

__all__ = ["CE_BATCH", "CE_SINGLE", "HttpSink", "batch_idempotency_key", "parse_retry_after"]

log = logging.getLogger(__name__)

CE_SINGLE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
_EXCERPT = 500
_OWN_HEADERS = ("content-type", "idempotency-key", "traceparent")


def batch_idempotency_key(ids: Sequence[str]) -> str:
    """SHA-256 hex over the ids joined with newlines (see the module docstring)."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date.

    Invalid -> None; negative or a date in the past -> 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(seconds) or math.isinf(seconds):
            return None
        return max(seconds, 0.0)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max((when - now).total_seconds(), 0.0)


def _classify(status: int) -> Outcome:
    if 200 <= status < 300 or status == 409:
        return Outcome.ACCEPTED
    if status in (408, 429) or 500 <= status < 600:
        return Outcome.RETRY
    if status in (401, 403):
        return Outcome.HOLD
    if status == 413:
        return Outcome.TOO_LARGE
    if 400 <= status < 500:
        return Outcome.REJECTED
    return Outcome.HOLD


# The longest answer read from the API: a 207 verdict list for the largest batch is far
# smaller; anything longer is not a verdict (and must not fill our memory).
_MAX_ANSWER = 8 * 2**20


def _excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return text[:_EXCERPT]


# Request-level answers that mean "wrong URL" rather than "bad event" (per item they are verdicts).
_ENDPOINT_MISSING = (404, 405)

# When a 207 mixes outcomes, the request-level outcome says the most urgent thing to do next.
_PRIORITY = [Outcome.HOLD, Outcome.RETRY, Outcome.TOO_LARGE, Outcome.REJECTED, Outcome.ACCEPTED]


class HttpSink(Sink):
    """``deliver`` never raises: every failure is a classified ``Delivery``."""

    def __init__(self, name: str, config: HttpSinkConfig) -> None:
        super().__init__(name)
        self.config = config
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_error: str | None = None
        self._token_loaded = False
        self._oauth = OAuth2Token(config.auth.oauth2) if config.auth.oauth2 else None
        # Static headers never duplicate one the agent sets per request: two Idempotency-Key
        # or traceparent lines (names differ only in case) reach a receiver as one joined,
        # malformed value.
        own = set(_OWN_HEADERS)
        if config.auth.bearer_token is not None or self._oauth is not None:
            own.add("authorization")
        self._static_headers = {k: v for k, v in config.headers.items() if k.lower() not in own}
        # What every request of this sink carries, computed once (a request copies it).
        self._base_headers = {**self._static_headers, "Content-Type":
                              CE_BATCH if config.mode is SinkMode.BATCH else CE_SINGLE}
        self._url: httpx.URL | None = None  # parsed once, with the client
        for k in sorted(set(config.headers) - set(self._static_headers)):
            log.warning("sink %s: static header %r is ignored: the agent sets it per request",
                        name, k)

    @property
    def max_batch(self) -> int:
        return self.config.batch_max_events if self.config.mode is SinkMode.BATCH else 1

    @property
    def max_in_flight(self) -> int:
        return self.config.max_in_flight

    async def reload_credentials(self) -> None:
        self._load_token()
        if self._oauth is not None:
            self._oauth.invalidate()
        if self._client is None:
            return
        # TLS files may have been fixed or rotated too: build the client again on next use.
        await self.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _load_token(self) -> None:
        secret = self.config.auth.bearer_token
        self._token, self._token_error = None, None
        if secret is not None:
            try:
                token = secret.reveal()
            except SecretResolutionError as exc:
                self._token_error = str(exc)
            except Exception as exc:  # whatever it is, the sink holds rather than go bare
                self._token_error = f"{secret.reference}: {type(exc).__name__}"
            else:
                add_secret_values([token])
                if is_header_token(token):
                    self._token = token
                else:
                    self._token_error = (f"{secret.reference} is not a valid HTTP header value "
                                         "(a line break, space, control or non-ASCII "
                                         "character)")
        self._token_loaded = True

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify = client_context(self.config.tls, f"sink {self.name}")
            # Connection errors are retried by the forwarder with backoff, not by httpx.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout),
                transport=httpx.AsyncHTTPTransport(retries=0, verify=verify),
                follow_redirects=False,
            )
            self._url = httpx.URL(self.config.url)
        return self._client

    def _request_parts(self, events: Sequence[OutboundEvent]) -> tuple[bytes, dict[str, str]]:
        headers = dict(self._base_headers)
        if self.config.mode is SinkMode.BATCH:
            body = ("[" + ",".join(e.payload for e in events) + "]").encode("utf-8")
            headers["Idempotency-Key"] = batch_idempotency_key([e.id for e in events])
        else:
            body = events[0].payload.encode("utf-8")
            headers["Idempotency-Key"] = events[0].id
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        return body, headers

    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        d = await self._deliver(events)
        detail = redact(d.detail) if d.detail else d.detail
        if not d.items and detail == d.detail:
            return d
        redacted: dict[ItemResult, ItemResult] = {}  # verdicts repeat: redact each once
        items = {}
        for event_id, r in d.items.items():
            if r.detail:
                if r not in redacted:
                    redacted[r] = ItemResult(r.outcome, r.status, redact(r.detail))
                r = redacted[r]
            items[event_id] = r
        return replace(d, detail=detail, items=items)

    async def _deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        if not events:
            return Delivery(Outcome.ACCEPTED, detail="nothing to send")
        if self.config.mode is SinkMode.SINGLE and len(events) > 1:
            # A caller bug, not a network problem: refuse without sending anything.
            return Delivery(Outcome.TOO_LARGE, detail="single mode sends one event per request")
        if not self._token_loaded:
            self._load_token()
        if self._token_error is not None or (
                self.config.auth.bearer_token is not None and self._token is None):
            return Delivery(Outcome.HOLD, detail=f"bearer token unavailable: {self._token_error}")
        body, headers = self._request_parts(events)
        headers["traceparent"], trace_id = traceparent(headers["Idempotency-Key"])
        delivery = replace(await self._post(body, headers, events), trace_id=trace_id)
        if log.isEnabledFor(logging.DEBUG):
            _trail(self.name, events, delivery)
        return delivery

    async def _post(self, body: bytes, headers: dict[str, str],
                    events: Sequence[OutboundEvent]) -> Delivery:
        try:
            http = self._http()
            url = self._url or self.config.url
            if self._oauth is not None:
                headers["Authorization"] = f"Bearer {await self._oauth.get(http)}"
            response = await post_bounded(http, url, _MAX_ANSWER, self.config.timeout,
                                          content=body, headers=headers)
            if response.status_code == 401 and self._oauth is not None:
                self._oauth.invalidate()  # one refresh, one resend; a second 401 holds
                headers["Authorization"] = f"Bearer {await self._oauth.get(http)}"
                response = await post_bounded(http, url, _MAX_ANSWER, self.config.timeout,
                                              content=body, headers=headers)
        except TlsSetupError as exc:
            return Delivery(Outcome.HOLD, detail=str(exc))
        except OAuth2RejectedError as exc:
            return Delivery(Outcome.HOLD, detail=str(exc))
        except OAuth2UnavailableError as exc:
            return Delivery(Outcome.RETRY, detail=str(exc))
        except AnswerTooLarge as exc:
            return Delivery(Outcome.RETRY, exc.status, str(exc))
        except httpx.TimeoutException as exc:
            return Delivery(Outcome.RETRY, detail=f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return Delivery(Outcome.RETRY, detail=f"{type(exc).__name__}: {exc}"[:_EXCERPT])
        except Exception as exc:  # never raise out of deliver (Sink contract)
            log.exception("sink %s: unexpected error while posting", self.name)
            return Delivery(Outcome.RETRY, detail=f"unexpected {type(exc).__name__}: {exc}"
                            [:_EXCERPT])
        return self._classify_response(response, events)

    def _classify_response(self, response: httpx.Response,
                           events: Sequence[OutboundEvent]) -> Delivery:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 207:
            return self._classify_multi(response.content, events, retry_after)
        outcome = _classify(status)
        if status in _ENDPOINT_MISSING:
            # The URL is wrong, not the events: bisecting would dead-letter every one of them.
            return Delivery(Outcome.HOLD, status, f"HTTP {status} from {self.config.url}: the "
                            f"endpoint does not take POSTs here; check the sink url")
        detail = "" if outcome is Outcome.ACCEPTED else _excerpt(response.content)
        if outcome is Outcome.HOLD and not detail:
            detail = f"HTTP {status}"
        return Delivery(outcome, status, detail,
                        retry_after if outcome is Outcome.RETRY else None)

    def _classify_multi(self, content: bytes, events: Sequence[OutboundEvent],
                        retry_after: float | None) -> Delivery:
        if _all_accepted(content, events):
            return Delivery(Outcome.ACCEPTED, 207, "", retry_after)
        results = _parse_multi(content)
        if results is None:
            return Delivery(Outcome.RETRY, 207,
                            f"receiver answered nonsense: {_excerpt(content)}", retry_after)
        wanted = {e.id for e in events}
        items: dict[str, ItemResult] = {}
        # Verdicts repeat (a drain answers 201 for nearly every item): one frozen ItemResult
        # per distinct (status, detail) instead of one per event.
        verdicts: dict[tuple[int, str], ItemResult] = {}
        for event_id, status, detail in results:
            if event_id in wanted:
                verdict = verdicts.get((status, detail))
                if verdict is None:
                    verdict = verdicts[(status, detail)] = ItemResult(_classify(status), status,
                                                                      detail)
                items[event_id] = verdict
        for e in events:
            if e.id not in items:
                items[e.id] = ItemResult(Outcome.RETRY, None, "missing in 207 answer")
        present = {r.outcome for r in items.values()}
        outcome = next(o for o in _PRIORITY if o in present)
        return Delivery(outcome, 207, "" if outcome is Outcome.ACCEPTED else "per-item results",
                        retry_after, items)


_ACCEPTED_ITEM = frozenset({200, 201, 202, 204, 409})


def _all_accepted(content: bytes, events: Sequence[OutboundEvent]) -> bool:
    """The common answer of a drain, checked in bulk: every one of our ids has an item, and
    every item's status is one that accepts. Anything else (or anything odd) is False and
    goes through the per-item reading below."""
    try:
        results = json.loads(content)["results"]
        statuses = {item["status"] for item in results}
        seen = {item["id"] for item in results}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        return False  # the per-item reading says what is wrong with it
    return statuses <= _ACCEPTED_ITEM and all(  # bools are ints: True == 1 is not in the set
        type(st) is int for st in statuses) and seen.issuperset(e.id for e in events)


def _trail(sink: str, events: Sequence[OutboundEvent], delivery: Delivery) -> None:
    """DEBUG: each event's verdict with its id, episode and the request's trace id (parsing
    the payloads only when DEBUG is on: a drain sends thousands per second)."""
    log.debug("sink %s: %d event(s) -> HTTP %s %s (trace %s)", sink, len(events),
              delivery.status, delivery.outcome.value, delivery.trace_id,
              extra={"sink": sink, "trace_id": delivery.trace_id})
    for e in events:
        item = delivery.result_for(e.id)
        try:
            episode = json.loads(e.payload).get("data", {}).get("episode_id")
        except (ValueError, AttributeError):
            episode = None
        stage = "delivered" if item.outcome is Outcome.ACCEPTED else item.outcome.value
        log.debug("event %s %s to sink %s (HTTP %s, trace %s)", e.id, stage, sink,
                  item.status, delivery.trace_id,
                  extra={"stage": stage, "event_id": e.id, "episode_id": episode,
                         "sink": sink, "trace_id": delivery.trace_id})


def _parse_multi(content: bytes) -> list[tuple[str, int, str]] | None:
    """``{"results": [{"id", "status", "detail"?}]}`` -> [(id, status, detail)], else None."""
    try:
        doc: Any = json.loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        return None
    out = []
    for item in doc["results"]:
        if not isinstance(item, dict):
            return None
        event_id, status = item.get("id"), item.get("status")
        if not isinstance(event_id, str):
            continue  # a verdict on something without an id: it cannot be one of ours
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            return None
        detail = item.get("detail")
        out.append((event_id, status, _excerpt(str(detail)) if detail else ""))
    return out
