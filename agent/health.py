"""The local health endpoint: /healthz, /readyz, /status (JSON).

- ``/healthz``: 200 while the event loop turns (the ticker ran recently); 503 otherwise.
- ``/readyz``: 200 when the buffer commits and no sink is held; else 503 with the reasons.
- ``/status``: the runtime's status document (never contains secrets).

Bound to 127.0.0.1 by default (config ``health.listen``): it is not meant for the plant network.
"""

from __future__ import annotations

import time

from agent.httpserver import HttpServer, Request, Response
from agent.runtime import Runtime

__all__ = ["HealthServer"]

_LOOP_STALL = 5.0


class HealthServer:
    def __init__(self, runtime: Runtime, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self._runtime = runtime
        self._server = HttpServer(self._handle, host.strip("[]"), int(port))
        self.port: int | None = None

    async def start(self) -> int:
        self.port = await self._server.start()
        return self.port

    async def aclose(self) -> None:
        await self._server.aclose()

    async def _handle(self, req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return Response.json({"error": "method not allowed"}, 405)
        rt = self._runtime
        if req.path == "/healthz":
            stalled = time.monotonic() - rt.last_tick_mono
            if stalled > _LOOP_STALL:
                return Response.json({"status": "stalled", "tick_age_s": round(stalled, 1)}, 503)
            return Response.json({"status": "ok"})
        if req.path == "/readyz":
            reasons = rt.readiness()
            if reasons:
                return Response.json({"status": "not ready", "reasons": reasons}, 503)
            return Response.json({"status": "ready"})
        if req.path == "/status":
            return Response.json(await rt.status())
        return Response.json({"error": "not found",
                              "endpoints": ["/healthz", "/readyz", "/status"]}, 404)
