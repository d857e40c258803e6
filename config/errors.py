"""The error tree. Errors are named after the decision they drive (docs/architecture.md).

Leaf module: imports nothing from the project. Library exceptions (asyncua, pymodbus, paho,
httpx, sqlite3) are translated into these at the boundary with ``raise ... from``; they never
reach the runtime.

::

    EdgeAgentError
    ├── FatalError               stop start-up / the process; a person must act
    │   ├── ConfigError          bad configuration (carries located issues)
    │   └── SchemaTooNewError    buffer written by a newer agent
    ├── RetryableError           try again later with backoff; nothing is lost
    │   ├── ConnectionLostError  a peer is unreachable or the session died
    │   ├── PeerTimeoutError     a call did not answer in time
    │   └── StorageFullError     the disk (or the buffer's max_size) is full
    └── PermanentError           this input will never work; report it, keep running the rest
        └── DecodeError          a value cannot be decoded as its configured type
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "ConnectionLostError",
    "DecodeError",
    "EdgeAgentError",
    "FatalError",
    "PeerTimeoutError",
    "PermanentError",
    "RetryableError",
    "SchemaTooNewError",
    "StorageFullError",
]


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class FatalError(EdgeAgentError):
    """Cannot continue: start-up stops with this message and a non-zero exit."""


class RetryableError(EdgeAgentError):
    """Transient: the supervisor retries with backoff."""


class PermanentError(EdgeAgentError):
    """Will not succeed on retry: report it and carry on with everything else."""


class ConnectionLostError(RetryableError):
    """A peer could not be reached or dropped the session."""


class PeerTimeoutError(RetryableError):
    """A peer did not answer within the configured timeout."""


class StorageFullError(RetryableError):
    """No room to commit: the disk is full or the buffer reached max_size with reject_new."""


class DecodeError(PermanentError):
    """Raw protocol data cannot be decoded as the tag's configured type."""


class SchemaTooNewError(FatalError):
    """The buffer file was written by a newer schema than this code knows."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One configuration problem, located in the file where possible."""

    path: str  # dotted key path, e.g. "sources.press.tags.speed.type"
    message: str
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}:{self.column or 1}"
            where += ": "
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class ConfigError(FatalError):
    """The configuration is invalid; ``issues`` lists every problem found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))
