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

A reload is a ``ReloadPlan`` computed from the old and the new configuration alone (pure, so it
is tested without a running agent), then applied through the runtime's public operations and
``Components`` (start, stop, replace by name). Order of ``apply``: flush what was detected (so a
detector's state and its events commit together under the old rules), stop changed sources,
adopt the configuration, swap detectors, replace changed sinks, start sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.wiring.build import build_detectors
from agent.wiring.load import config_hash, load_config
from agent.wiring.schema import Config
from config.errors import ConfigError, EdgeAgentError
from config.model import format_time, utcnow
from config.redaction import register_config_secrets
from config.tasks import cancel_and_wait

if TYPE_CHECKING:
    from agent.runtime.core import Runtime

__all__ = ["ReloadPlan", "ReloadRequests", "apply_config", "plan_reload", "reload_from_file"]

log = logging.getLogger(__name__)


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
        await cancel_and_wait(task)


async def reload_from_file(runtime: Runtime, path: Path) -> bool:
    """Load ``path`` and apply it; False (and the old config keeps running) when invalid."""
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


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes, computed from the two configurations alone."""

    effective: Config               # the new config less what needs a restart
    kept: tuple[str, ...]           # parts whose change needs a restart (old values stay)
    sources: tuple[str, ...]        # changed, added or removed source ids
    machines: tuple[str, ...]       # machines to rebuild (rule or one of its sources changed)
    removed_machines: tuple[str, ...]
    sinks: tuple[str, ...]          # sinks whose config changed (same id)
    health: bool
    fleet: bool

    @property
    def changes(self) -> list[str]:
        out = [f"source {n}" for n in self.sources]
        if self.health:
            out.append("health thresholds")
        if self.fleet:
            out.append("fleet")
        out += [f"machine {m}" for m in self.machines]
        out += [f"machine {m} removed" for m in self.removed_machines]
        out += [f"sink {n}" for n in self.sinks]
        return out


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    effective, kept = _needs_restart(old, new)
    changed_sources = {n for n in set(old.sources) | set(effective.sources)
                       if old.sources.get(n) != effective.sources.get(n)}
    old_index, new_index = old.tag_index(), effective.tag_index()
    machines = []
    for mid, mcfg in effective.machines.items():
        tags = [t for _, t in mcfg.tag_refs()]
        touched = {old_index.get(t) for t in tags} | {new_index.get(t) for t in tags}
        if old.machines.get(mid) != mcfg or touched & changed_sources:
            machines.append(mid)
    sinks = [n for n, c in effective.sinks.items() if n in old.sinks and old.sinks[n] != c]
    return ReloadPlan(
        effective=effective, kept=tuple(kept), sources=tuple(sorted(changed_sources)),
        machines=tuple(machines),
        removed_machines=tuple(sorted(set(old.machines) - set(effective.machines))),
        sinks=tuple(sorted(sinks)), health=effective.health != old.health,
        fleet=effective.fleet != old.fleet)


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
    plan = plan_reload(runtime.config, new)
    if plan.kept:
        log.warning("reload: changes to %s need a restart (systemctl restart edge-agent); "
                    "the running values stay until then", ", ".join(plan.kept))
    with contextlib.suppress(EdgeAgentError):
        await runtime.flush()  # commit under the old rules; a failure keeps them queued
    parts = runtime.components
    new_cfg = plan.effective
    for name in plan.sources:
        if await parts.stop_source(name):
            log.info("source %s stopped for the new configuration", name)
    runtime.adopt(new_cfg, new_hash)
    _swap_detectors(runtime, plan)
    timeout = new_cfg.agent.stop_timeout / 2
    for name in plan.sinks:
        await parts.replace_sink(name, new_cfg.sinks[name], timeout)
    for name in plan.sources:
        if name in new_cfg.sources:
            parts.start_source(name, new_cfg.sources[name])
    changes = plan.changes
    log.info("reload applied (%s): %s", (new_hash or "")[:12],
             ", ".join(changes) if changes else "no component changed")
    return changes


def _swap_detectors(runtime: Runtime, plan: ReloadPlan) -> None:
    """Unchanged machines keep their very detector object; a rebuilt one continues from the
    current detector's snapshot (an open episode or scrap window carries over)."""
    current = runtime.components.detectors
    fresh = build_detectors(plan.effective)
    rebuilt = set(plan.machines)
    for mid, det in fresh.items():
        old_det = current.get(mid)
        if mid not in rebuilt and old_det is not None:
            fresh[mid] = old_det
            continue
        if old_det is not None:
            try:
                det.restore(old_det.snapshot())
            except (ValueError, KeyError, TypeError) as exc:
                log.error("machine %s: its state does not fit the new rules (%s); it starts "
                          "fresh", mid, exc)
            det.dirty = True  # commit the state under the new rules at the next commit
    for mid in plan.removed_machines:
        runtime.committer.forget(mid)
    runtime.components.set_detectors(fresh)
    for det in fresh.values():
        if det.dirty:
            runtime.committer.take(det, [])
