"""Logging set-up: readable lines by default, JSON lines for collectors.

Every formatted line (message, structured fields, tracebacks) passes through
``config.redaction.redact``, so registered secret values show as ``***``.

Logger names are module paths (``logging.getLogger(__name__)`` everywhere): ``agent.runtime``,
``protocols.modbus.source``, ``buffer.sqlite``; configure a part of the agent by prefix.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from config.redaction import redact

__all__ = ["setup_logging"]


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
