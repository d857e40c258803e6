"""The reference receiver's reading of a request body: splitting a batch into its items (each
with its own JSON text) and telling whether a value can be stored as text.

Pure functions, no I/O; ``agent/receiver.py`` runs them in its worker thread.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_ATTRIBUTE", "TooMany", "compact", "is_text", "split_array"]

MAX_ATTRIBUTE = 1024  # characters of id, source, type and time

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


class TooMany(Exception):
    """A batch has more items than the limit (raised before the rest is parsed)."""


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
