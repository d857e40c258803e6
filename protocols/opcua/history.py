"""History backfill: what happened while the agent was away, read from the server's history.

After every (re)connect, before any live value is emitted::

    tags with a resume time (Source.resume_from: detection lacks their values since then)
      └─> read AccessLevel, UserAccessLevel, Historizing
            └─> HistoryRead bit set, or Historizing ──> raw history of
                  [max(resume, now - max_span) - margin, now], page by page
                  (continuation points), at most max_values per node
                    └─> keep the last value at or before the resume time (the state at the
                        start of the gap) and every value after it
    all tags' values merged, sorted by source time, grouped by timestamp ──> emitted in that
    order, one batch per timestamp, with no await in between (no detector tick interleaves)

Invariants:

- A value at or before the resume time other than the last one is never fed: detection has
  seen that part (feeding it again would look like a transition back in time).
- The start bound is not trusted (servers differ): the margin and the filter above make the
  result the same whether or not the server honours it.
- A server that refuses history for a node (its capability flags were wrong), or does not
  answer a history request within ``timeout``, costs that node only; it is reported, and the
  live values carry on.
- Bounded: ``max_span`` and ``max_values`` cap the work. ``span_capped`` on /status: the read
  started ``max_span`` ago, later than detection's resume point (common after a restart when
  the machine has been in one state for long: nothing is lost unless the outage itself was
  longer). ``truncated``: ``max_values`` stopped the read, so the newest part of the gap is not
  replayed; logged as a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from asyncua import ua

from config.errors import PeerTimeoutError
from config.model import TagSample, format_time, utcnow
from protocols.opcua.config import OpcuaHistory, OpcuaValueType, TimestampChoice
from protocols.opcua.session import Session
from protocols.opcua.values import to_sample

__all__ = ["HISTORY_READ", "BackfillReport", "backfill"]

log = logging.getLogger(__name__)

HISTORY_READ = 1 << 2  # the HistoryRead bit of AccessLevel / UserAccessLevel


@dataclass
class BackfillReport:
    """What the last backfill did (for /status)."""

    at: str | None = None
    seconds: float = 0.0
    values: int = 0
    tags: dict[str, dict[str, Any]] = field(default_factory=dict)
    total_runs: int = 0
    total_values: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"last_at": self.at, "last_seconds": round(self.seconds, 3),
                "last_values": self.values, "last_tags": self.tags,
                "runs_total": self.total_runs, "values_total": self.total_values}


async def backfill(session: Session, settings: OpcuaHistory,
                   resolved: dict[str, tuple[Any, str]],
                   resume_from: Callable[[str], datetime | None],
                   types: dict[str, OpcuaValueType | None],
                   report: BackfillReport) -> list[list[TagSample]]:
    """Read the gap's history; returns batches (one per timestamp) in time order."""
    wanted = {t: r for t, r in resolved.items() if resume_from(t) is not None}
    if not wanted:
        return []
    began = time.monotonic()
    now = utcnow()
    tags = list(wanted)
    nodes = [wanted[t][0] for t in tags]
    access = await session.read_attribute(nodes, ua.AttributeIds.AccessLevel)
    user = await session.read_attribute(nodes, ua.AttributeIds.UserAccessLevel)
    historizing = await session.read_attribute(nodes, ua.AttributeIds.Historizing)
    out: list[TagSample] = []
    notes: dict[str, dict[str, Any]] = {}
    for tag, a, u, h in zip(tags, access, user, historizing, strict=True):
        node_id, node_text = wanted[tag]
        bits = _int(a) & _int(u) if _good(u) else _int(a)
        flag = bool(h.Value.Value) if _good(h) and h.Value is not None else False
        if not (bits & HISTORY_READ or flag):
            notes[tag] = {"skipped": "not historized (no HistoryRead access, Historizing "
                          "false)"}
            continue
        resume = resume_from(tag)
        assert resume is not None
        since = max(resume, now - timedelta(seconds=settings.max_span))
        note: dict[str, Any] = {"from": format_time(since), "historizing": flag,
                                "history_read_access": bool(bits & HISTORY_READ),
                                "span_capped": since > resume, "truncated": False}
        try:
            values, capped = await _read(session, settings, node_id,
                                         since - timedelta(seconds=settings.margin), now)
        except _Refused as exc:
            note["skipped"] = f"the server refused history: {exc}"
            notes[tag] = note
            continue
        except PeerTimeoutError as exc:
            # A server too slow for its own history must not keep the live values away (the
            # session would end, reconnect and time out again): this node is skipped.
            session.raise_if_lost()
            note["skipped"] = f"history read timed out: {exc}"
            notes[tag] = note
            log.warning("%s: history backfill of tag %s skipped: %s", session.where, tag, exc)
            continue
        note["truncated"] = capped
        samples = [to_sample(tag, node_text, dv, types.get(tag), TimestampChoice.SOURCE, now)
                   for dv in values]
        # The last value at or before the resume time is the state at the gap's start.
        before = [s for s in samples if s.time <= since]
        after = [s for s in samples if s.time > since]
        kept = ([before[-1]] if before else []) + after
        note["values"] = len(kept)
        notes[tag] = note
        out.extend(kept)
    out.sort(key=lambda s: s.time)
    batches: list[list[TagSample]] = []
    for s in out:
        if batches and batches[-1][0].time == s.time:
            batches[-1].append(s)
        else:
            batches.append([s])
    report.at = format_time(now)
    report.seconds = time.monotonic() - began
    report.values = len(out)
    report.tags = notes
    report.total_runs += 1
    report.total_values += len(out)
    if any(n.get("truncated") for n in notes.values()):
        log.warning("%s: history backfill stopped at max_values (%d per node): the newest part "
                    "of the gap is not replayed; raise history.max_values", session.where,
                    settings.max_values)
    return batches


class _Refused(Exception):
    pass


async def _read(session: Session, settings: OpcuaHistory, node_id: Any, start: datetime,
                end: datetime) -> tuple[list[Any], bool]:
    """Raw values of one node in [start, end], paging; (values, capped by max_values)."""
    values: list[Any] = []
    continuation: bytes | None = None
    while True:
        room = settings.max_values - len(values)
        result = await session.history_page(node_id, start, end,
                                            min(settings.page_size, room), continuation)
        if not result.StatusCode.is_good():
            raise _Refused(result.StatusCode.name)
        page = getattr(result.HistoryData, "DataValues", None) or []
        values.extend(page)
        continuation = result.ContinuationPoint or None
        # A server may hand out the same continuation point bytes for every page (node-opcua
        # does): progress is judged by the values, not by a changed token.
        if continuation is None:
            return values, False
        if not page:
            await session.history_page(node_id, start, end, 0, continuation, release=True)
            return values, False
        if len(values) >= settings.max_values:
            await session.history_page(node_id, start, end, 0, continuation, release=True)
            return values[:settings.max_values], True


def _good(dv: Any) -> bool:
    return dv is not None and dv.StatusCode is not None and dv.StatusCode.is_good()


def _int(dv: Any) -> int:
    if not _good(dv) or dv.Value is None or not isinstance(dv.Value.Value, int):
        return 0
    return int(dv.Value.Value)
