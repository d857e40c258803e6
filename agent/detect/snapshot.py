"""A detector's persistent state: what ``snapshot()`` saves and ``restore()`` reads back.

The runtime commits this text in the same transaction as the events the detector produced, so
after a crash the detector continues exactly where its last committed events left it (same
sequence, same open episode, same scrap window): re-detection gives the same ids.

The layout is versioned (``STATE_VERSION``); a state of another version is refused with
ValueError and the machine starts fresh (the runtime logs it) rather than guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.detect.episode import Episode
from config.model import MachineState, format_time

if TYPE_CHECKING:
    from agent.detect.machine import MachineDetector

__all__ = ["STATE_VERSION", "apply_state", "dump_state", "parse_state", "status_view"]

STATE_VERSION = 1

# A saved state is padded with spaces (insignificant to JSON) to a multiple of this many
# characters. The state is rewritten with each event: a row that keeps its size is overwritten
# in place, while one that grows or shrinks makes SQLite rebalance its page with the siblings
# (and free or allocate pages), about 4 more pages of 4 KiB written per commit.
_SIZE_STEP = 1024


def dump_state(det: MachineDetector) -> str:
    """The detector's persistent state as JSON text (committed with its events)."""
    inputs, stall, ctx, downtime = det.inputs, det.stall, det.context, det.downtime
    ep = asdict(downtime.episode) if downtime.episode else None
    if ep:
        ep["started_at"] = ep["started_at"].isoformat()
    text = json.dumps({
        "v": STATE_VERSION, "sequence": det.outbox.sequence, "state": det.state.value,
        "state_since": _iso(det.state_since), "base_state": inputs.base_state.value,
        "running_since": _iso(inputs.running_since),
        "signal": inputs.signal, "signal_detail": inputs.signal_detail,
        "lost_at": _iso(inputs.lost_at), "episode": ep, "order": ctx.order,
        "reason": ctx.reason, "reason_since": _iso(ctx.reason_since),
        "prod_last": stall.last,
        "prod_moved_at": _iso(stall.moved_at), "prod_blind": stall.blind,
        "bad_inputs": inputs.bad_inputs,
        "scrap": det.scrap.to_json() if det.scrap else None,
        "microstops": downtime.microstops, "microstop_seconds": downtime.microstop_seconds,
        "clock_jumps": det.clock_jumps,
        "classify": det.classifier.to_json(),
        "alarms": ctx.alarms.to_json() if ctx.alarms else None,
    }, sort_keys=True)
    return text.ljust(-(-len(text) // _SIZE_STEP) * _SIZE_STEP)


def parse_state(text: str) -> dict[str, Any]:
    """Read a saved state; ValueError when it is not one this version can continue from."""
    d = json.loads(text)
    if not isinstance(d, dict) or d.get("v") != STATE_VERSION:
        version = d.get("v") if isinstance(d, dict) else None
        raise ValueError(f"unknown detector state version {version!r}")
    return d


def apply_state(det: MachineDetector, d: dict[str, Any]) -> None:
    """Put a parsed state into a freshly reset detector."""
    inputs, stall, ctx, downtime = det.inputs, det.stall, det.context, det.downtime
    det.outbox.sequence = int(d["sequence"])
    det.state = MachineState(d["state"])
    det.state_since = _dt(d.get("state_since"))
    inputs.base_state = MachineState(d.get("base_state", d["state"]))
    inputs.running_since = _dt(d.get("running_since"))
    inputs.signal, inputs.signal_detail = d["signal"], d.get("signal_detail")
    inputs.lost_at = _dt(d.get("lost_at"))
    if d.get("episode"):
        ep = dict(d["episode"])
        ep["started_at"] = datetime.fromisoformat(ep["started_at"])
        downtime.episode = Episode(**ep)
    ctx.order, ctx.reason = d.get("order"), d.get("reason")
    ctx.reason_since = _dt(d.get("reason_since"))
    stall.last = d.get("prod_last")
    stall.moved_at = _dt(d.get("prod_moved_at"))
    stall.blind = bool(d.get("prod_blind", False))
    inputs.bad_inputs = dict(d.get("bad_inputs", {}))
    if det.scrap is not None and d.get("scrap"):
        det.scrap.restore(d["scrap"])
    downtime.microstops = int(d.get("microstops", 0))
    downtime.microstop_seconds = float(d.get("microstop_seconds", 0.0))
    det.clock_jumps = int(d.get("clock_jumps", 0))
    det.classifier.restore(d.get("classify"))
    if ctx.alarms is not None and d.get("alarms"):
        ctx.alarms.restore(d["alarms"])


def status_view(det: MachineDetector) -> dict[str, Any]:
    """What /status shows of one machine."""
    ep, inputs = det.downtime.episode, det.inputs
    return {
        "state": det.state.value, "since": _fmt(det.state_since),
        "signal": inputs.signal, "signal_detail": inputs.signal_detail,
        "order_id": det.context.order,
        "open_downtime": None if ep is None else {
            "episode_id": ep.episode_id, "category": ep.category,
            "started_at": format_time(ep.started_at), "reason_code": ep.reason_code,
            "reason": det.classifier.open_reason_text(ep), "reported": ep.announced},
        "counter_anomalies": det.scrap.anomalies if det.scrap else 0,
        "clock_jumps": det.clock_jumps,
        "unattributed_reasons": det.classifier.unattributed_total,
        "last_unattributed_reason": det.classifier.last_unattributed,
    }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _fmt(t: datetime | None) -> str | None:
    return format_time(t) if t else None


def _dt(v: object) -> datetime | None:
    return datetime.fromisoformat(v) if isinstance(v, str) else None
