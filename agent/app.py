"""Run the agent until a signal: runtime plus health endpoint, with orderly shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from agent.health import HealthServer
from agent.runtime import Runtime
from config.models import Config, LoopImpl

__all__ = ["run_agent", "run_async"]

log = logging.getLogger("edge_agent")


async def serve(config: Config, config_hash: str | None, stop: asyncio.Event,
                on_ready: Callable[[Runtime, int], Awaitable[None] | None] | None = None) -> None:
    """Start the runtime and the health endpoint, wait for ``stop``, shut down in order."""
    runtime = Runtime(config, config_hash=config_hash)
    health = HealthServer(runtime, config.health.listen)
    try:
        await runtime.start()
        port = await health.start()
        log.info("health endpoint on http://%s:%d/status",
                 config.health.listen.rpartition(":")[0], port)
        if on_ready is not None:
            maybe = on_ready(runtime, port)
            if maybe is not None:
                await maybe
        await stop.wait()
        log.info("stopping (draining for up to %.0fs)", config.agent.stop_timeout)
    finally:
        await health.aclose()
        await runtime.stop()


def run_async(main: Callable[[], Coroutine[Any, Any, int]],
              loop_impl: LoopImpl = LoopImpl.AUTO) -> int:
    """Run a coroutine on uvloop when asked/available (LIBRARIES.md: no incompatibility)."""
    if loop_impl is not LoopImpl.ASYNCIO and sys.platform != "win32":
        try:
            import uvloop

            return uvloop.run(main())
        except ImportError:
            if loop_impl is LoopImpl.UVLOOP:
                log.warning("uvloop is not installed; using the asyncio loop")
    return asyncio.run(main())


def run_agent(config: Config, config_hash: str | None) -> int:
    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, config_hash, stop)
        return 0

    return run_async(main, config.agent.event_loop)
