"""Secret redaction: the safety net behind "secrets are never formatted into messages".

Secret values (every ``Secret`` of the configuration, OAuth2 tokens, bearer tokens as read) are
registered with ``add_secret_values`` / ``register_config_secrets``; ``redact`` replaces each
with ``***``, in every escaped form too (``shown_forms``: each line, ``repr`` of the text and of
its UTF-8 bytes, JSON-escaped, percent-encoded). Values substituted from ``${env:}`` and
``${file:}`` into ordinary strings (a URL, a header) are registered by the loader as well.
Every formatted log line passes through it (``agent/logs.py``), and so do the health endpoint,
the fleet heartbeat, configuration error messages and every delivery detail a sink reports
(stored with dead letters): a peer that echoes our token in an error body, or a library
exception that quotes it, still shows ``***``.

Part of the contract layer so that sinks, the runtime and operations can all register and
redact without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

from pydantic import BaseModel

from config.secrets import Secret, SecretResolutionError

__all__ = ["add_secret_values", "redact", "register_config_secrets", "shown_forms"]

log = logging.getLogger(__name__)

_MASK = "***"
_MIN_SECRET = 6  # shorter values would mask ordinary words
_secrets: frozenset[str] = frozenset()
_known: set[str] = set()  # values registered (their forms are in _secrets)
_lock = threading.Lock()


def shown_forms(value: str) -> set[str]:
    """The ways a value can appear in text: as is, each of its lines, escaped by ``repr`` (of
    the text or of its UTF-8 bytes, as an HTTP library quotes a header), JSON-escaped (ASCII or
    not) and percent-encoded (as in a URL or a form)."""
    forms = {value, *value.splitlines()}
    for v in list(forms):
        forms |= {repr(v)[1:-1], repr(v.encode("utf-8", "surrogatepass"))[2:-1],
                  json.dumps(v)[1:-1], json.dumps(v, ensure_ascii=False)[1:-1],
                  quote(v, safe=""), quote(v), quote_plus(v)}
    return {f for f in forms if len(f) >= _MIN_SECRET}


def add_secret_values(values: Iterable[str | None]) -> None:
    """Remember values that must never be shown, in every form (``shown_forms``);
    idempotent, thread-safe."""
    global _secrets
    fresh = {v for v in values if v and v not in _known}
    if not fresh:
        return
    new: set[str] = set()
    for v in fresh:
        new |= shown_forms(v)
    with _lock:
        _known.update(fresh)
        _secrets = _secrets | new


def register_config_secrets(config: Any) -> None:
    """Register the current value of every ``Secret`` in a configuration object tree."""
    found: list[str | None] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, Secret):
            with contextlib.suppress(SecretResolutionError):  # unreadable: nothing to hide
                value = obj.reveal()
                found.append(value)
                if 0 < len(value.strip()) < _MIN_SECRET:
                    # Said, not refused: a short PLC or broker password may not be ours to
                    # change, but whoever reads the logs must know it is not hidden there.
                    log.warning("the secret at %s (%s) is shorter than %d characters: it "
                                "cannot be masked in logs and status texts; use a longer one",
                                path or "the top", obj.reference, _MIN_SECRET)
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name), f"{path}.{name}" if path else name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(obj, list | tuple):
            for n, v in enumerate(obj):
                walk(v, f"{path}[{n}]")

    walk(config, "")
    add_secret_values(found)


def redact(text: str) -> str:
    secrets = _secrets
    if not secrets:
        return text
    for value in sorted(secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, _MASK)
    return text
