"""Logging set-up: readable lines by default, JSON lines for collectors.

Redaction: secret values (every ``Secret`` of the configuration, OAuth2 tokens, bearer tokens as
read) are registered with ``add_secret_values`` / ``register_config_secrets``; every formatted
log line (message, structured fields, tracebacks) passes through ``redact`` which replaces them
with ``***``, in every escaped form too (``shown_forms``). Values substituted from ``${env:}``
and ``${file:}`` into ordinary strings (a URL, a header) are registered by the loader as well.
The health endpoint, the fleet heartbeat, stored dead-letter reasons and CLI output use
``redact`` too. This is the safety
net behind the first rule (secrets are never formatted into messages): a peer that echoes our
token in an error body, or a library exception that quotes it, still shows ``***``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["add_secret_values", "redact", "register_config_secrets", "setup_logging",
           "shown_forms"]

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
    from pydantic import BaseModel

    from config.secrets import Secret, SecretResolutionError

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


class _Redacting(logging.Formatter):
    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record))

_STD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
    formatter.converter = __import__("time").gmtime
    handler.setFormatter(_Redacting(formatter))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries log tracebacks on every reconnect attempt; we log transitions ourselves.
    for noisy in ("asyncua", "pymodbus", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.ERROR if level != "debug" else logging.INFO)
