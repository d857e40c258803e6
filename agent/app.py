"""Run the agent until a signal: runtime plus health endpoint, with orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.fleet import run_fleet
from agent.health import HealthServer, loop_alive
from agent.notify import Notifier, run_watchdog
from agent.pidfile import remove_pidfile, write_pidfile
from agent.runtime import Runtime
from agent.runtime.reload import ReloadRequests
from agent.wiring.schema import Config, LoopImpl
from config.redaction import register_config_secrets
from config.tasks import cancel_all

__all__ = ["run_agent", "run_async"]

log = logging.getLogger(__name__)


async def serve(config: Config, config_hash: str | None, stop: asyncio.Event,
                on_ready: Callable[[Runtime, int], Awaitable[None] | None] | None = None,
                *, config_path: Path | None = None) -> None:
    """Start the runtime and the health endpoint, wait for ``stop``, shut down in order.

    Around them (issue 7): systemd notify (READY, WATCHDOG while healthy, STATUS, STOPPING),
    the optional fleet heartbeat, and SIGHUP re-reading ``config_path`` (live reload).
    """
    register_config_secrets(config)  # never shown in logs, /status or heartbeats
    runtime = Runtime(config, config_hash=config_hash)
    health = HealthServer(runtime, config.health.listen)
    notifier = Notifier()
    helpers: list[asyncio.Task[None]] = []
    reloads = ReloadRequests(runtime, config_path) if config_path is not None else None
    loop = asyncio.get_running_loop()
    pidfile: Path | None = None
    try:
        await runtime.start()
        port = await health.start()
        log.info("health endpoint on http://%s:%d/status",
                 config.health.listen.rpartition(":")[0], port)
        notifier.ready(_summary(runtime))
        helpers.append(asyncio.create_task(run_watchdog(
            notifier, lambda: _healthy(runtime), lambda: _summary(runtime)), name="watchdog"))
        helpers.append(asyncio.create_task(run_fleet(runtime), name="fleet"))
        if sys.platform != "win32":
            # SIGHUP's default action ends the process: an agent without a file to re-read
            # (configuration from stdin, the demo) logs it and runs on.
            loop.add_signal_handler(signal.SIGHUP, reloads.request if reloads is not None
                                    else _no_reload)
        if reloads is not None:
            # The local channel for `edge-agent reload` (never a pid read over HTTP), written
            # only once SIGHUP reloads. Without it the agent still runs; SIGHUP and
            # `systemctl reload` still work.
            try:
                pidfile = write_pidfile(config.agent.data_dir, config.agent.id)
            except OSError as exc:
                log.warning("cannot write the pid file in %s (%s): `edge-agent reload` will "
                            "not find this agent; SIGHUP still reloads", config.agent.data_dir,
                            exc.strerror or exc)
        if on_ready is not None:
            maybe = on_ready(runtime, port)
            if maybe is not None:
                await maybe
        await stop.wait()
        log.info("stopping (draining for up to %.0fs)", runtime.config.agent.stop_timeout)
    finally:
        notifier.stopping()
        if pidfile is not None:
            remove_pidfile(pidfile)
        if sys.platform != "win32":
            loop.remove_signal_handler(signal.SIGHUP)
        if reloads is not None:
            await reloads.aclose()
        await cancel_all(helpers)
        await health.aclose()
        await runtime.stop()
        notifier.close()


def _no_reload() -> None:
    log.warning("SIGHUP: this agent has no configuration file to re-read (it was given on "
                "standard input or built in); nothing reloaded")


def _healthy(runtime: Runtime) -> bool:
    """What the systemd watchdog guards: the loop turns and the buffer works.

    A full disk does not stop the pings: it is a state the agent handles (detections wait in
    memory and are committed when space returns, /readyz reports it), and a restart would lose
    what waits in memory without freeing any space. Any other commit failure does stop them,
    so systemd restarts the agent (which salvages a damaged buffer on open)."""
    return loop_alive(runtime) and (runtime.storage_error is None or runtime.storage_full)


def _summary(runtime: Runtime) -> str:
    up = sum(1 for i in runtime.sources.values() if i.supervisor.state == "up")
    sinks = ", ".join(f"{n} {fw.state}" for n, fw in runtime.forwarders.items()) or "none"
    if runtime.storage_error is None:
        buffer = "buffer ok"
    elif runtime.storage_full:
        buffer = f"buffer FULL, detections held in memory: {runtime.storage_error}"
    else:
        buffer = f"buffer FAILING: {runtime.storage_error}"
    return f"{up}/{len(runtime.sources)} sources up; sinks: {sinks}; {buffer}"


def run_async(main: Callable[[], Coroutine[Any, Any, int]],
              loop_impl: LoopImpl = LoopImpl.AUTO) -> int:
    """Run a coroutine on uvloop when asked/available (no incompatibility with our libraries:
    docs/library-notes.md)."""
    if loop_impl is not LoopImpl.ASYNCIO and sys.platform != "win32":
        try:
            import uvloop

            return uvloop.run(main())
        except ImportError:
            if loop_impl is LoopImpl.UVLOOP:
                log.warning("uvloop is not installed; using the asyncio loop")
    return asyncio.run(main())


def run_agent(config: Config, config_hash: str | None, config_path: Path | None = None) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, config_hash, stop, config_path=config_path)
        return 0

    return run_async(main, config.agent.event_loop)
