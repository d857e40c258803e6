"""A downtime episode's bookkeeping and the data its events carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from config.model import format_time

__all__ = ["Episode", "episode_data"]


@dataclass(slots=True)
class Episode:
    episode_id: str
    started_at: datetime
    category: str
    reason_code: str | None
    last_reason_code: str | None
    order_id: str | None
    later_order_ids: list[str] = field(default_factory=list)
    had_signal_gap: bool = False
    announced: bool = False
    continued_from: str | None = None
    clock_adjusted: bool = False
    # Text that came with the reason (an alarm's message) when downtime.reasons has none.
    reason_text: str | None = None


def episode_data(ep: Episode, reasons: dict[str, str]) -> dict[str, Any]:
    """The ``data`` fields shared by an episode's started and ended events."""
    data: dict[str, Any] = {
        "episode_id": ep.episode_id, "category": ep.category,
        "reason_code": ep.reason_code, "started_at": format_time(ep.started_at),
        "order_id": ep.order_id, "had_signal_gap": ep.had_signal_gap,
    }
    text = reasons.get(ep.reason_code or "") or ep.reason_text
    if text:
        data["reason"] = text
    if ep.later_order_ids:
        data["later_order_ids"] = list(ep.later_order_ids)
    if ep.continued_from:
        data["continued_from"] = ep.continued_from
    if ep.clock_adjusted:
        data["clock_adjusted"] = True
    return data
