"""Fleet heartbeat: an optional ``fleet:`` block makes the agent POST a small JSON document to a
central URL every ``interval``, so an OT team sees which agent runs which version and
configuration where, and whether it is healthy.

The document (``heartbeat_document``)::

    {"kind": "plantedge.agent.heartbeat", "agent": ..., "site": ..., "version": ...,
     "config_hash": ..., "uptime_s": ..., "sent_at": ..., "ready": bool, "reasons": [...],
     "buffer": {"events", "size_bytes", "max_size", "storage_error", "schema_version",
                "sinks": {id: {"pending", "dead_letters", "oldest_pending_age_s"}}},
     "last_upgrade": {"from_schema", "to_schema", "at", "outcome"} | null,
     "sources": {id: state}, "sinks": {id: state}, "disk_free_bytes": ...}

``last_upgrade`` is the buffer's upgrade record as the agent found it at start: ``outcome``
``migrated`` (this version migrated the buffer after a snapshot), ``migrating`` (a migration
was interrupted), or ``rolled back`` (``edge-agent rollback`` restored a snapshot); null when
the buffer was never migrated.

Isolation: the heartbeat has its own HTTP client and its own task; a failure (refused,
timeout, 5xx, TLS) is logged once when it starts and once when it ends and never touches the
buffer or the forwarders. The loop reads ``runtime.config.fleet`` each round, so a live reload
that adds, changes or removes the block takes effect at the next beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import httpx

from agent.sinks.oauth import OAuth2Error, OAuth2Token
from agent.sinks.tls import client_context
from agent.wiring.schema import FleetConfig
from config.errors import EdgeAgentError
from config.model import format_time, utcnow
from config.redaction import redact
from config.secrets import SecretResolutionError

if TYPE_CHECKING:
    from agent.runtime import Runtime

__all__ = ["heartbeat_document", "run_fleet"]

log = logging.getLogger(__name__)
_IDLE_CHECK = 5.0  # how often a runtime without a fleet block looks again (after a reload)


async def heartbeat_document(runtime: Runtime) -> dict[str, Any]:
    from agent.health import status_document

    st = await status_document(runtime)
    buf = st["buffer"]
    raw = getattr(runtime.buffer, "buffer", None)  # the SqliteBuffer (not the memory buffer)
    upgrade = getattr(raw, "last_upgrade", None)
    return {
        "kind": "plantedge.agent.heartbeat",
        "agent": st["agent_id"], "site": st["site"], "version": st["version"],
        "config_hash": st["config_hash"], "uptime_s": st["uptime_s"],
        "sent_at": format_time(utcnow()),
        "ready": st["ready"], "reasons": st["readiness_reasons"],
        "buffer": {"events": buf["events"], "size_bytes": buf["size_bytes"],
                   "max_size": buf["max_size"], "storage_error": buf["storage_error"],
                "schema_version": getattr(raw, "schema_version", None),
                   "sinks": {n: {"pending": s["pending"], "dead_letters": s["dead_letters"],
                                 "oldest_pending_age_s": s["oldest_pending_age_s"]}
                             for n, s in buf["sinks"].items()}},
        "last_upgrade": None if not upgrade else {
            k: upgrade.get(k) for k in ("from_schema", "to_schema", "at", "outcome")},
        "sources": {n: s["state"] for n, s in st["sources"].items()},
        "sinks": {n: s["state"] for n, s in st["sinks"].items()},
        "disk_free_bytes": st["disk"].get("free_bytes"),
    }


class _Beat:
    """One fleet configuration's client; rebuilt when the block changes."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout), follow_redirects=False,
            transport=httpx.AsyncHTTPTransport(retries=0,
                                               verify=client_context(cfg.tls, "fleet")))
        self.oauth = OAuth2Token(cfg.auth.oauth2) if cfg.auth.oauth2 else None

    async def send(self, doc: dict[str, Any]) -> None:
        headers = {**self.cfg.headers, "Content-Type": "application/json"}
        if self.cfg.auth.bearer_token is not None:
            headers["Authorization"] = f"Bearer {self.cfg.auth.bearer_token.reveal()}"
        elif self.oauth is not None:
            headers["Authorization"] = f"Bearer {await self.oauth.get(self.http)}"
        body = redact(json.dumps(doc, separators=(",", ":"), default=str)).encode("utf-8")
        r = await self.http.post(self.cfg.url, content=body, headers=headers)
        if r.status_code == 401 and self.oauth is not None:
            self.oauth.invalidate()
        if not 200 <= r.status_code < 300:
            raise _Refused(f"HTTP {r.status_code}")


class _Refused(Exception):
    pass


async def run_fleet(runtime: Runtime) -> None:
    """Send heartbeats until cancelled; never raises anything but CancelledError."""
    beat: _Beat | None = None
    failing: str | None = None
    try:
        while True:
            cfg = runtime.config.fleet
            if cfg is None:
                await asyncio.sleep(_IDLE_CHECK)
                continue
            if beat is None or beat.cfg != cfg:
                if beat is not None:
                    await beat.http.aclose()
                beat = None
            try:
                beat = beat or _Beat(cfg)
                await beat.send(await heartbeat_document(runtime))
            except (httpx.HTTPError, _Refused, OAuth2Error, EdgeAgentError,
                    SecretResolutionError) as exc:
                error = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.HTTPError) \
                    else str(exc)
                if failing is None:
                    log.warning("fleet heartbeat to %s fails (%s); event delivery is not "
                                "affected, retrying every %gs", cfg.url, error, cfg.interval)
                failing = error
            except Exception:  # a bug here must never reach event delivery
                if failing is None:
                    log.exception("fleet heartbeat failed unexpectedly")
                failing = "unexpected error"
            else:
                if failing is not None:
                    log.info("fleet heartbeat to %s works again", cfg.url)
                failing = None
            await asyncio.sleep(cfg.interval)
    finally:
        if beat is not None:
            with contextlib.suppress(Exception):
                await beat.http.aclose()
