"""The local health endpoint: /healthz, /readyz, /status (JSON) and /metrics (Prometheus).

- ``/healthz``: 200 while the event loop turns (the ticker ran recently); 503 otherwise. This is
  what a container HEALTHCHECK or a liveness probe asks: "restart me if this fails". A blocked
  loop cannot answer for itself: then a watchdog thread answers 503 on the same socket
  (``agent/stall_guard.py``).
- ``/readyz``: 200 when the agent does its job; else 503 with every reason as JSON
  (``{"status": "not ready", "reasons": [...]}``). Reasons (``readiness()``):

  ========================  ===========================================================
  buffer commits fail       ``runtime.storage_error`` (disk full, I/O error)
  a sink is held            401/403 from the endpoint: credentials or permissions
  a source is stale         no good sample for longer than its stale limit
  delivery falls behind     a sink's oldest pending event is older than
                            ``health.max_pending_age``
  disk headroom             free space of the data directory below ``health.min_disk_free``
  buffer near capacity      buffer file at ``health.buffer_full_ratio`` of ``max_size``
  ========================  ===========================================================

- ``/status``: the runtime's status document plus version, readiness, disk headroom and the
  last reload (never contains secrets: they serialise as their references).
- ``/metrics``: see ``agent/metrics.py``.
- ``/machines/{machine}/episodes[/{id}/reason]``: reason entry, off unless
  ``health.reason_entry`` is configured (``agent/reasons_api.py``).
- ``/``: the read-only status page for people (``agent/status_page.py``), HTML rendered from
  the ``/status`` document.

More pages hook in with ``HealthServer.route(path, handler)``; the built-in paths are answered
first.

Bound to 127.0.0.1 by default (config ``health.listen``): it is not meant for the plant network.
Limits (``agent/httpserver.py``): no request body on GET, 64 KiB on other methods, 32
connections (the longest-idle one makes room for a new one), 5 s to write an answer.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agent import __version__, reasons_api
from agent.httpserver import HttpServer, Request, Response
from agent.metrics import CONTENT_TYPE, Metrics
from agent.runtime import Runtime
from agent.stall_guard import StallGuard
from buffer.base import BufferStats
from config.model import age_seconds
from config.redaction import redact

__all__ = ["LOOP_STALL", "HealthServer", "disk_headroom", "loop_alive", "readiness",
           "status_document"]

LOOP_STALL = 5.0
_MAX_BODY = 64 * 1024
_MAX_CONNECTIONS = 32
_WRITE_TIMEOUT = 5.0
_ENDPOINTS = ["/", "/healthz", "/readyz", "/status", "/metrics"]
Route = Callable[[Request], Awaitable[Response]]


def loop_alive(runtime: Runtime, stall_after: float = LOOP_STALL) -> bool:
    return time.monotonic() - runtime.last_tick_mono <= stall_after


def disk_headroom(runtime: Runtime) -> dict[str, Any]:
    """Free/total bytes of the file system that holds the buffer."""
    path = runtime.config.buffer_path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return {"path": str(path), "free_bytes": None, "total_bytes": None,
                "error": exc.strerror or str(exc)}
    return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}


async def readiness(runtime: Runtime, stats: BufferStats | None = None,
                    disk: dict[str, Any] | None = None) -> list[str]:
    """Every reason the agent is not ready (empty when ready); see the module docstring."""
    reasons = list(runtime.readiness())
    limits = runtime.config.health
    now = time.monotonic()
    for name, info in runtime.sources.items():
        limit = info.source.stale_after
        last = info.last_good_mono
        # Before the first good sample, count from the start (the grace period is the limit).
        age = (now - last) if last is not None else time.time() - runtime.started_at
        if age > limit:
            seen = "never had a good sample" if last is None else \
                f"no good sample for {age:.0f}s"
            reasons.append(f"source {name} is stale: {seen} (limit {limit:g}s)")
    if stats is None:
        try:
            stats = await runtime.buffer.stats()
        except Exception as exc:  # a broken buffer is a reason, not a crash of the endpoint
            reasons.append(f"buffer: cannot read its statistics: {exc}")
    if stats is not None:
        for name, s in stats.sinks.items():
            age_s = age_seconds(s.oldest_pending_time)
            if age_s is not None and age_s > limits.max_pending_age:
                reasons.append(f"sink {name} falls behind: oldest pending event is {age_s:.0f}s "
                               f"old (limit {limits.max_pending_age:g}s)")
        if stats.max_size and stats.size_bytes >= limits.buffer_full_ratio * stats.max_size:
            reasons.append(f"buffer near capacity: {stats.size_bytes} of {stats.max_size} bytes "
                           f"(limit {limits.buffer_full_ratio:.0%})")
    disk = disk if disk is not None else disk_headroom(runtime)
    free = disk.get("free_bytes")
    if free is None:
        reasons.append(f"disk: cannot read free space of {disk['path']}: {disk.get('error')}")
    elif free < limits.min_disk_free:
        reasons.append(f"disk headroom low: {free} bytes free in {disk['path']} "
                       f"(limit {limits.min_disk_free})")
    return reasons


async def status_document(runtime: Runtime) -> dict[str, Any]:
    doc = await runtime.status()
    disk = disk_headroom(runtime)
    reasons = await readiness(runtime, disk=disk)
    doc["version"] = __version__
    doc["disk"] = disk
    doc["ready"] = not reasons
    doc["readiness_reasons"] = reasons
    doc["last_reload"] = runtime.last_reload
    return doc


class HealthServer:
    """The endpoints above on ``listen``; a StallGuard thread (``agent/stall_guard.py``) answers
    503 on the same socket when the event loop has not ticked for ``stall_after`` seconds."""

    def __init__(self, runtime: Runtime, listen: str, *,
                 stall_after: float = LOOP_STALL) -> None:
        host, _, port = listen.rpartition(":")
        self._runtime = runtime
        # Requests here are small GETs: a small body limit (GETs take none at all) and a
        # connection cap keep a flood from costing the agent memory or file descriptors.
        self._server = HttpServer(self._handle, host.strip("[]"), int(port),
                                  max_body_bytes=_MAX_BODY, max_connections=_MAX_CONNECTIONS,
                                  write_timeout=_WRITE_TIMEOUT)
        self._metrics: Metrics | None = None  # made at the first scrape
        self.port: int | None = None
        self.stall_after = stall_after
        self.guards: list[StallGuard] = []
        self._routes: dict[str, Route] = {"/": self._page}

    def route(self, path: str, handler: Route) -> None:
        """Serve ``path`` (GET/HEAD) with ``handler``."""
        self._routes[path] = handler

    async def _page(self, req: Request) -> Response:
        from agent.status_page import render_page

        html = render_page(await status_document(self._runtime))
        # Every value is escaped; the policy is the second line: no script runs, nothing is
        # fetched, the page cannot be framed (it has no script and only inline style).
        return Response(200, html.encode("utf-8"), {
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                       "frame-ancestors 'none'"}, "text/html; charset=utf-8")

    async def start(self) -> int:
        self.port = await self._server.start()
        rt = self._runtime
        for fd in self._server.listening_fds:
            guard = StallGuard(fd, lambda: rt.last_tick_mono, self.stall_after)
            guard.start()
            self.guards.append(guard)
        return self.port

    async def aclose(self) -> None:
        guards, self.guards = self.guards, []
        for guard in guards:
            guard.stop()
        await self._server.aclose()
        if self._metrics is not None:
            self._metrics.close()

    async def _handle(self, req: Request) -> Response:
        response = await self._answer(req)
        if response.content_type.startswith(("application/json", "text/html")):
            # Safety net: a peer may echo a secret into an error we report (held_reason).
            response.body = redact(response.body.decode("utf-8")).encode("utf-8")
        return response

    async def _answer(self, req: Request) -> Response:
        if req.path.startswith("/machines/"):
            return await reasons_api.answer(self._runtime, req)  # reason entry (own module)
        if req.method not in ("GET", "HEAD"):
            return Response.json({"error": "method not allowed"}, 405)
        rt = self._runtime
        if req.path == "/healthz":
            if not loop_alive(rt, self.stall_after):
                stalled = time.monotonic() - rt.last_tick_mono
                return Response.json({"status": "stalled", "tick_age_s": round(stalled, 1)}, 503)
            return Response.json({"status": "ok"})
        if req.path == "/readyz":
            reasons = await readiness(rt)
            if reasons:
                return Response.json({"status": "not ready", "reasons": reasons}, 503)
            return Response.json({"status": "ready"})
        if req.path == "/status":
            return Response.json(await status_document(rt))
        if req.path == "/metrics":
            stats: BufferStats | None
            try:
                stats = await rt.buffer.stats()
            except Exception:
                stats = None  # readiness() below says why; the other metrics still count
            disk = disk_headroom(rt)
            reasons = await readiness(rt, stats, disk)
            if self._metrics is None:
                self._metrics = Metrics(rt)
            body = self._metrics.render(stats, ready=not reasons, disk_free=disk.get("free_bytes"))
            return Response(200, body, {}, CONTENT_TYPE)
        route = self._routes.get(req.path)
        if route is not None:
            return await route(req)
        return Response.json({"error": "not found", "endpoints": _ENDPOINTS}, 404)
