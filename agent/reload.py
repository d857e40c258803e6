"""Live reload: ``SIGHUP`` (or ``edge-agent reload``) re-reads the configuration file.

Rules (issue 7):

- An invalid new file is rejected with its located errors in the log; the running configuration
  keeps running untouched (``/status`` ``last_reload`` says ``ok: false`` and why).
- Components are compared by their configuration. A changed or new **source** gets a new session
  under a new supervisor; a removed one is stopped. An unchanged source keeps its supervisor task
  (not even reconnected).
- A changed **sink** (same id) gets a new sink and forwarder after the old one drains its
  in-flight attempt; its buffered events stay where they are (the buffer cursor is per sink id).
  Adding or removing sink ids changes the buffer's sink registrations: that needs a restart,
  said in the log, and the old sink set keeps running.
- A **machine** whose rule changed (or whose source changed) gets a new detector restored from
  the current detector's snapshot, so an open downtime episode and a scrap window continue;
  a new machine starts fresh; a removed machine's detector is dropped (its saved state stays in
  the buffer and is used again if it comes back).
- ``agent``, ``buffer`` and ``health.listen`` need a restart: the log says so and the old values
  keep running. Health thresholds and the ``fleet`` block apply at once.

Order of a reload: flush what was detected (so a detector's state and its events commit
together under the old rules), stop changed sources, swap detectors, swap sinks, start sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.detect.build import build_detectors
from agent.errors import ConfigError, EdgeAgentError
from agent.logs import register_config_secrets
from agent.model import format_time, utcnow
from agent.sinks.backoff import Backoff
from agent.sinks.forwarder import Forwarder
from agent.supervisor import Supervisor
from config.models import Config
from protocols.registry import build_source

if TYPE_CHECKING:
    from agent.runtime import Runtime

__all__ = ["ReloadRequests", "apply_config", "describe", "reload_from_file"]

log = logging.getLogger("edge_agent.reload")


class ReloadRequests:
    """Serialises reload requests (a burst of SIGHUPs is one or two reloads, never parallel)."""

    def __init__(self, runtime: Runtime, path: Path) -> None:
        self._runtime = runtime
        self._path = path
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._wanted.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="reload")

    async def _worker(self) -> None:
        while self._wanted.is_set():
            self._wanted.clear()
            try:
                await reload_from_file(self._runtime, self._path)
            except Exception:  # a bug here must not end the agent; the old config runs on
                log.exception("reload failed unexpectedly; the previous configuration keeps "
                              "running")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def reload_from_file(runtime: Runtime, path: Path) -> bool:
    """Load ``path`` and apply it; False (and the old config keeps running) when invalid."""
    from config.loader import config_hash, load_config

    log.info("reloading the configuration from %s", path)
    try:
        new = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        issues = [str(i) for i in exc.issues]
        log.error("the new configuration is invalid; keeping the running one. %d problem(s):"
                  "\n  %s", len(issues), "\n  ".join(issues), extra={"issues": issues})
        runtime.last_reload = {"at": format_time(utcnow()), "ok": False, "issues": issues,
                               "config_hash": runtime.config_hash}
        return False
    register_config_secrets(new)
    new_hash = config_hash(new)
    if new_hash == runtime.config_hash:
        log.info("the configuration is unchanged (%s)", new_hash[:12])
        changes: list[str] = []
    else:
        changes = await apply_config(runtime, new, new_hash)
    runtime.last_reload = {"at": format_time(utcnow()), "ok": True, "changes": changes,
                           "config_hash": runtime.config_hash}
    return True


def _needs_restart(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The part of ``new`` that can apply live, and what was kept because it cannot."""
    kept: list[str] = []
    effective = new
    if new.agent != old.agent:
        kept.append("agent")
        effective = effective.model_copy(update={"agent": old.agent})
    if new.buffer != old.buffer:
        kept.append("buffer")
        effective = effective.model_copy(update={"buffer": old.buffer})
    if new.health.listen != old.health.listen:
        kept.append("health.listen")
        effective = effective.model_copy(
            update={"health": new.health.model_copy(update={"listen": old.health.listen})})
    if set(new.sinks) != set(old.sinks):
        kept.append("the set of sink ids")
        sinks = {n: new.sinks.get(n, c) for n, c in old.sinks.items()}
        effective = effective.model_copy(update={"sinks": sinks})
    return effective, kept


async def apply_config(runtime: Runtime, new: Config, new_hash: str | None) -> list[str]:
    """Apply ``new`` to a running runtime; returns the changes made (for the log and /status)."""
    old = runtime.config
    effective, kept = _needs_restart(old, new)
    if kept:
        log.warning("reload: changes to %s need a restart (systemctl restart edge-agent); "
                    "the running values stay until then", ", ".join(kept))
    with contextlib.suppress(EdgeAgentError):
        await runtime.flush()  # commit under the old rules; a failure keeps them queued

    changed_sources = {n for n in set(old.sources) | set(effective.sources)
                       if old.sources.get(n) != effective.sources.get(n)}
    changes = [f"source {n}" for n in sorted(changed_sources)]
    if effective.health != old.health:
        changes.append("health thresholds")
    if effective.fleet != old.fleet:
        changes.append("fleet")
    for name in sorted(changed_sources & set(old.sources)):
        await _stop_source(runtime, name)

    runtime.config = effective
    runtime.config_hash = new_hash
    changes += _swap_detectors(runtime, old, effective, changed_sources)
    changes += await _swap_sinks(runtime, old, effective)
    for name in sorted(changed_sources & set(effective.sources)):
        _start_source(runtime, name)
    log.info("reload applied (%s): %s", (new_hash or "")[:12],
             ", ".join(changes) if changes else "no component changed")
    return changes


async def _stop_source(runtime: Runtime, name: str) -> None:
    info = runtime.sources.pop(name, None)
    wanted = f"source:{name}"
    for task in [t for t in runtime._tasks if t.get_name() == wanted]:
        runtime._tasks.remove(task)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if info is not None:
        log.info("source %s stopped for the new configuration", name)


def _start_source(runtime: Runtime, name: str) -> None:
    from agent.runtime import _SourceInfo

    cfg = runtime.config.sources[name]
    source = build_source(name, cfg)
    watchdog = None if source.stale_after == float("inf") else max(10.0, 4 * source.stale_after)
    sup = Supervisor("source", name, runtime._session(name),
                     backoff=Backoff(cfg.backoff.initial, cfg.backoff.max), watchdog=watchdog)
    runtime.sources[name] = _SourceInfo(source, sup)
    runtime._tasks.append(asyncio.create_task(sup.run(), name=f"source:{name}"))


def _swap_detectors(runtime: Runtime, old: Config, new: Config,
                    changed_sources: set[str]) -> list[str]:
    fresh = build_detectors(new)
    old_index, new_index = old.tag_index(), new.tag_index()
    changes = []
    for mid, det in fresh.items():
        current = runtime.detectors.get(mid)
        touched = {old_index.get(t) for _, t in new.machines[mid].tag_refs()} | \
            {new_index.get(t) for _, t in new.machines[mid].tag_refs()}
        if current is not None and old.machines.get(mid) == new.machines[mid] \
                and not touched & changed_sources:
            fresh[mid] = current  # unchanged: the very same detector object
            continue
        changes.append(f"machine {mid}")
        if current is not None:
            try:
                det.restore(current.snapshot())
            except (ValueError, KeyError, TypeError) as exc:
                log.error("machine %s: its state does not fit the new rules (%s); it starts "
                          "fresh", mid, exc)
            det.dirty = True  # commit the state under the new rules at the next commit
    for mid in set(runtime.detectors) - set(fresh):
        changes.append(f"machine {mid} removed")
        runtime._dirty.discard(mid)
    runtime.detectors = fresh
    runtime._by_tag = {}
    for det in fresh.values():
        for tag in det.tags:
            runtime._by_tag.setdefault(tag, []).append(det)
        if det.dirty:
            runtime._dirty.add(det.machine_id)
    return changes


async def _swap_sinks(runtime: Runtime, old: Config, new: Config) -> list[str]:
    from agent.runtime import build_sink  # the runtime imports this module lazily too

    changes = []
    timeout = new.agent.stop_timeout / 2
    for name, cfg in new.sinks.items():
        if old.sinks.get(name) == cfg or name not in runtime.forwarders:
            continue
        changes.append(f"sink {name}")
        fw = runtime.forwarders[name]
        await fw.stop(timeout)
        for task in [t for t in runtime._fw_tasks if f"sink={name!r}," in t.get_name()]:
            runtime._fw_tasks.remove(task)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sink in [s for s in runtime._sinks if s.name == name]:
            runtime._sinks.remove(sink)
            with contextlib.suppress(Exception):
                await sink.aclose()
        sink = build_sink(name, cfg, new.agent.id)
        runtime._sinks.append(sink)
        new_fw = Forwarder(runtime.metrics.instrument(sink), runtime.buffer, cfg.retry)
        runtime.forwarders[name] = new_fw
        runtime._fw_tasks.append(asyncio.create_task(new_fw.run(), name=f"forwarder:{new_fw}"))
        new_fw.wake()
    return changes


def describe(last_reload: dict[str, Any] | None) -> str:
    """One line about the last reload, for ``edge-agent reload``."""
    if not last_reload:
        return "no reload yet"
    if last_reload.get("ok"):
        what = ", ".join(last_reload.get("changes") or []) or "no component changed"
        return f"applied at {last_reload.get('at')}: {what}"
    return f"REJECTED at {last_reload.get('at')}: " + "; ".join(last_reload.get("issues") or [])
