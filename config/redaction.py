"""Secret redaction: the safety net behind "secrets are never formatted into messages".

Secret values (every ``Secret`` of the configuration, OAuth2 tokens, bearer tokens as read) are
registered with ``add_secret_values`` / ``register_config_secrets``; ``redact`` replaces each
with ``***``. Every formatted log line passes through it (``agent/logs.py``), and so do the
health endpoint and the fleet heartbeat: a peer that echoes our token in an error body, or a
library exception that quotes it, still shows ``***``.

Part of the contract layer so that sinks, the runtime and operations can all register and
redact without importing each other.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from config.secrets import Secret, SecretResolutionError

__all__ = ["add_secret_values", "redact", "register_config_secrets"]

_MASK = "***"
_MIN_SECRET = 6  # shorter values would mask ordinary words
_secrets: frozenset[str] = frozenset()
_lock = threading.Lock()


def add_secret_values(values: Iterable[str | None]) -> None:
    """Remember values that must never be shown (idempotent; thread-safe)."""
    global _secrets
    new = {v for v in values if v and len(v) >= _MIN_SECRET}
    if new - _secrets:
        with _lock:
            _secrets = _secrets | new


def register_config_secrets(config: Any) -> None:
    """Register the current value of every ``Secret`` in a configuration object tree."""
    found: list[str | None] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, Secret):
            with contextlib.suppress(SecretResolutionError):  # unreadable: nothing to hide
                found.append(obj.reveal())
        elif isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name))
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    walk(config)
    add_secret_values(found)


def redact(text: str) -> str:
    secrets = _secrets
    if not secrets:
        return text
    for value in sorted(secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, _MASK)
    return text
