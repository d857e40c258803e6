"""``edge-agent receiver --listen HOST:PORT --db FILE [--print]``: run the reference receiver
until SIGINT/SIGTERM, optionally printing each new event as one line of JSON on stdout."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from agent.receiver.endpoint import Receiver

__all__ = ["run_receiver", "serve_receiver"]


def _print_event(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, separators=(",", ":")), flush=True)


async def serve_receiver(listen: str, db: Path, echo: bool,
                         stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"'{listen}' is not HOST:PORT (for example 127.0.0.1:8080)")
    stop = stop or asyncio.Event()
    receiver = Receiver(db, host.strip("[]"), int(port_text),
                        echo=_print_event if echo else None)
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread: the caller stops us through ``stop``
    try:
        port = await receiver.start()
        print(f"receiver listening on http://{host}:{port}/ (database {db})",
              file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await receiver.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_receiver(listen: str, db: Path, echo: bool) -> int:
    """Entry point for ``edge-agent receiver``: serve until SIGINT/SIGTERM; the exit code."""
    try:
        asyncio.run(serve_receiver(listen, db, echo))
    except ValueError as exc:
        print(f"edge-agent receiver: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-agent receiver: cannot serve on {listen} with {db}: {exc}",
              file=sys.stderr)
        return 1
    return 0
