"""The sink interface and the outcome classes of one delivery attempt (docs/delivery.md).

A sink makes **one** attempt to deliver a batch of events and classifies the answer, per item
where the receiver answers per item. It never sleeps, retries, bisects or dead-letters: the
forwarder (``agent/runtime/forwarder.py``) decides what to do with each outcome::

    Outcome            forwarder does
    ---------------    --------------------------------------------------------------
    ACCEPTED           settle (delete); 2xx and 409 (the receiver already has it)
    RETRY              keep the rows, back off (exponential, full jitter, Retry-After)
    HOLD               keep the rows, mark the sink held (401/403), re-probe, re-read creds
    TOO_LARGE          split the batch (413)
    REJECTED           batch: bisect to find the poison; single event: dead-letter it

Sinks translate httpx exceptions at the boundary; none escape ``deliver``.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Delivery", "ItemResult", "OutboundEvent", "Outcome", "Sink", "is_header_token",
           "source_of"]

# A credential sent in a header: visible ASCII, no space, no control character (RFC 6750's
# b64token is stricter; this is what any HTTP stack carries intact).
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]+")


def is_header_token(text: str) -> bool:
    return _HEADER_TOKEN.fullmatch(text) is not None


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    HOLD = "hold"
    TOO_LARGE = "too_large"
    REJECTED = "rejected"


class OutboundEvent:
    """One event to deliver: its id and the CloudEvent JSON text as buffered.

    ``source`` is read from the payload only when a sink asks for it (None at construction):
    no sink of ours needs it per event, and reading it was a per-event cost of every drain."""

    __slots__ = ("_source", "id", "payload")

    def __init__(self, id: str, source: str | None, payload: str) -> None:
        self.id = id
        self.payload = payload
        self._source = source

    @property
    def source(self) -> str:
        if self._source is None:
            self._source = source_of(self.payload)
        return self._source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutboundEvent) and (self.id, self.source, self.payload) == (
            other.id, other.source, other.payload)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OutboundEvent(id={self.id!r}, source={self.source!r})"


_SOURCE_KEY = '"source":"'
_NEXT_KEY = ',"specversion":"'


def source_of(payload: str) -> str:
    """The top-level ``source`` of a CloudEvent's JSON text.

    The agent's own serialisation (compact, sorted keys: ``source`` is followed by
    ``specversion`` at the top level) is read without parsing; anything else falls back to
    ``json.loads``."""
    i = payload.rfind(_SOURCE_KEY)
    if i >= 0:
        start = i + len(_SOURCE_KEY)
        end = payload.find('"', start)
        value = payload[start:end]
        if end > 0 and "\\" not in value and payload.startswith(_NEXT_KEY, end + 1):
            return value
    try:
        source = json.loads(payload).get("source", "")
    except (ValueError, AttributeError):
        source = ""
    return source if isinstance(source, str) else ""


@dataclass(frozen=True, slots=True)
class ItemResult:
    outcome: Outcome
    status: int | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Delivery:
    """Result of one attempt.

    ``outcome`` applies to the whole request. When the receiver answered per item (207),
    ``items`` maps event id -> ItemResult and ``outcome`` is ACCEPTED only if every item was; an
    id missing from a 207 answer is RETRY (we cannot know it arrived).
    ``retry_after`` is the receiver's Retry-After in seconds (already parsed), if any.
    ``trace_id`` is the W3C trace id the request carried (for log lines), if any.
    """

    outcome: Outcome
    status: int | None = None
    detail: str = ""
    retry_after: float | None = None
    items: dict[str, ItemResult] = field(default_factory=dict)
    trace_id: str | None = None  # of the request's traceparent, for the log

    def result_for(self, event_id: str) -> ItemResult:
        if self.items:
            return self.items.get(event_id, ItemResult(Outcome.RETRY, None, "missing in 207"))
        return ItemResult(self.outcome, self.status, self.detail)


class Sink(ABC):
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    @abstractmethod
    def max_batch(self) -> int:
        """Most events per ``deliver`` call (1 in single mode)."""

    @property
    def max_in_flight(self) -> int:
        """Requests the forwarder may have in flight at once (never two carrying events of
        the same machine)."""
        return 1

    @abstractmethod
    async def deliver(self, events: Sequence[OutboundEvent]) -> Delivery:
        """One attempt; never raises for network or protocol problems."""

    async def reload_credentials(self) -> None:  # noqa: B027 - optional hook
        """Called when held (401/403): re-read secrets so a rotated token works without restart."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Idempotent."""
