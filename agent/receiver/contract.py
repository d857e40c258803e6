"""What the reference receiver accepts: media types, limits, the per-item verdict, faults.

Pure functions and data, no I/O, so the endpoint and the store agree on one definition.

- An item is acceptable when it is a JSON object with ``specversion`` "1.0" and non-empty
  ``id``, ``source`` and ``type`` strings; each of those (and ``time`` when present) must be
  text SQLite can store (valid Unicode, no lone surrogate) of at most ``MAX_ATTRIBUTE``
  characters. An unacceptable item gets a 400 with a detail saying which attribute; an id in
  ``Faults.reject_ids`` gets 422.
- A batch body is split into its items without re-encoding them (``split_array``): each item
  keeps its own JSON text, which is what gets stored. More than ``MAX_BATCH_EVENTS`` items
  stops the split early (``TooMany``, answered 413).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CE_BATCH", "CE_SINGLE", "MAX_ATTRIBUTE", "MAX_BATCH_EVENTS", "Faults", "TooMany",
           "compact", "is_text", "split_array", "verdict"]

MAX_BATCH_EVENTS = 10_000
MAX_ATTRIBUTE = 1024  # characters of id, source, type and time

CE_SINGLE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class Faults:
    """Misbehaviour on demand; every field is safe to change while the receiver runs."""

    status: int | None = None  # answer the next ``count`` POSTs with this status
    count: int = 0
    retry_after: str | None = None  # Retry-After header sent with the injected status
    body: str = '{"error":"injected fault"}'
    delay_after_commit: float = 0.0  # commit, then wait this long before answering ...
    delay_count: int = 0  # ... for this many POSTs
    reject_ids: set[str] = field(default_factory=set)  # these event ids get 422
    require_token: str | None = None  # 401 unless "Authorization: Bearer <token>"
    max_batch_events: int | None = None  # a bigger batch gets 413
    max_event_bytes: int | None = None  # a single event bigger than this gets 413
    atomic_batches: bool = False  # any bad item refuses the whole batch (422/400), stores none


class TooMany(Exception):
    """A batch with more than the allowed number of items (raised before parsing the rest)."""


def verdict(doc: Any, reject_ids: set[str]) -> tuple[int, str]:
    """(201, "") for an acceptable CloudEvent, else (4xx, why)."""
    if not isinstance(doc, dict):
        return 400, "not a JSON object"
    if doc.get("specversion") != "1.0":
        return 400, "specversion must be \"1.0\""
    for attr in ("id", "source", "type"):
        if not isinstance(doc.get(attr), str) or not doc[attr]:
            return 400, f"missing or empty '{attr}'"
        if not is_text(doc[attr]):
            return 400, f"'{attr}' is not valid Unicode text of at most {MAX_ATTRIBUTE} " \
                "characters"
    t = doc.get("time")
    if t is not None and not is_text(t):
        return 400, f"'time' must be an RFC 3339 string of at most {MAX_ATTRIBUTE} " \
            "characters"
    if doc["id"] in reject_ids:
        return 422, f"event {doc['id']} refused by the receiver (reject_ids)"
    return 201, ""


def is_text(value: Any) -> bool:
    """A string SQLite can store as text: valid Unicode (no lone surrogate), not too long."""
    if not isinstance(value, str) or not value or len(value) > MAX_ATTRIBUTE:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def split_array(body: bytes, limit: int) -> list[tuple[Any, str]] | None:
    """The items of a JSON array body, each with its own JSON text; None when the body is not
    a well-formed non-empty array (the caller then parses it whole, for the error message).
    More than ``limit`` items raises ``TooMany`` (before parsing the rest).

    Storing each item's text as sent saves re-encoding every event: the payload is JSON all
    the same, and ``events()`` parses it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pos = _SPACE.match(text).end()  # type: ignore[union-attr]  # matches the empty string
    if not text.startswith("[", pos):
        return None
    items: list[tuple[Any, str]] = []
    pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    try:
        while True:
            doc, end = _DECODER.raw_decode(text, pos)
            items.append((doc, text[pos:end]))
            if len(items) > limit:
                raise TooMany()
            pos = _SPACE.match(text, end).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            elif text.startswith("]", pos):
                break
            else:
                return None
    except (ValueError, RecursionError):
        return None
    if _SPACE.match(text, pos + 1).end() != len(text):  # type: ignore[union-attr]
        return None
    return items
