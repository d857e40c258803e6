"""Conventions every ``edge-agent`` command follows (documented in docs/views.md).

Exit codes (every command)::

    0  done (for status: the agent is ready)
    1  failed, or the agent is not ready
    2  bad input: usage, an invalid configuration, a refused operation
    3  unreachable: the agent's health endpoint or a device does not answer
    141  the reader of standard output went away (``| head``): output is incomplete

Global options (``--log-level``, ``--log-format``) are accepted before or after the command;
their defaults come from ``EDGE_AGENT_LOG_LEVEL`` and ``EDGE_AGENT_LOG_FORMAT``. Every
``--config`` defaults to ``EDGE_AGENT_CONFIG``, and ``--config -`` reads standard input. Every
command's help has a description and an example. Long commands print progress on stderr when
it is a terminal.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ENV_CONFIG", "EXIT_CLOSED_PIPE", "EXIT_FAILURE", "EXIT_INVALID", "EXIT_OK",
           "EXIT_UNREACHABLE", "GLOBAL_OPTIONS", "Progress", "add_config_option", "command",
           "global_defaults", "hoist_global_options", "printable"]

EXIT_OK, EXIT_FAILURE, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell shows for a writer killed by it
ENV_CONFIG = "EDGE_AGENT_CONFIG"
GLOBAL_OPTIONS = {"--log-level": ("EDGE_AGENT_LOG_LEVEL", "info",
                                  ("debug", "info", "warning", "error")),
                  "--log-format": ("EDGE_AGENT_LOG_FORMAT", "text", ("text", "json"))}


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def printable(value: Any) -> str:
    """``value`` as one line of plain text for a terminal table. What the agent reports comes
    partly from elsewhere (a peer's error body, a PLC's reason string): its line breaks would
    break the table and its escape sequences would drive the terminal, so every run of control
    characters becomes one space."""
    return _CONTROL.sub(" ", str(value))


def global_defaults() -> dict[str, str]:
    """Defaults of the global options from the environment; ValueError names a bad value."""
    out = {}
    for option, (env, default, choices) in GLOBAL_OPTIONS.items():
        value = os.environ.get(env, "").strip().lower() or default
        if value not in choices:
            raise ValueError(f"{env}={os.environ[env]!r} is not one of {', '.join(choices)}")
        out[option] = value
    return out


def hoist_global_options(argv: Sequence[str]) -> list[str]:
    """Move global options to the front, wherever they were given (``run --log-format json``
    works like ``--log-format json run``). Stops at ``--``."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        name = a.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if "=" in a:
                front.append(a)
            else:
                front += args[i:i + 2]
                i += 1
        else:
            rest.append(a)
        i += 1
    return front + rest


def command(sub: Any, name: str, help: str, description: str,
            examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand whose help has a description and examples (argparse keeps the layout)."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(
        f"  {e}" for e in examples)
    epilog += ("\n\nglobal options (--log-level, --log-format) may follow the command too.\n"
               "exit codes: 0 ok, 1 failed or not ready, 2 bad input, 3 unreachable")
    # Raw layout keeps the examples as written; the description is wrapped here instead.
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=textwrap.fill(description, 88), epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def add_config_option(parser: Any, *, required: bool = True, help: str | None = None) -> None:
    """``--config/-c FILE``: defaults to $EDGE_AGENT_CONFIG; ``-`` reads standard input."""
    default = os.environ.get(ENV_CONFIG) or None
    text = help or "the configuration file"
    parser.add_argument("--config", "-c", type=Path, default=None if default is None
                        else Path(default), required=required and default is None,
                        help=f"{text}; - reads standard input (default: ${ENV_CONFIG}"
                        + (f", now {default})" if default else ")"))


@dataclass(slots=True)
class Progress:
    """A line on stderr at most every half second while a long command runs, only when
    stderr is a terminal (logs and pipes stay clean)."""

    verb: str
    total: int | None = None
    done: int = 0
    stream: TextIO | None = None
    _last: float = 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        self.show()

    def show(self, extra: str = "") -> None:
        stream = self.stream or sys.stderr
        now = time.monotonic()
        if now - self._last < 0.5 or not stream.isatty():
            return
        self._last = now
        of = f" of {self.total}" if self.total is not None else ""
        stream.write(f"\r\x1b[K{self.verb} {self.done}{of}{extra}")
        stream.flush()

    def finish(self) -> None:
        stream = self.stream or sys.stderr
        if self._last and stream.isatty():
            stream.write("\r\x1b[K")
            stream.flush()
