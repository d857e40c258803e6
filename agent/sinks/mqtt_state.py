"""The retained per-machine state a Unified Namespace consumer reads first.

Derived only from the events the MQTT sink got accepted, in delivery order, so it never runs
ahead of what the broker has seen. States::

    downtime.started  -> down / planned / idle (by category), the open episode recorded
    downtime.ended    -> running, no open episode
    signal.lost       -> unknown (the open episode, if any, is kept)
    signal.restored   -> the state before the loss
    any event with an order_id -> the current order

After an agent restart the state starts from the next event (the broker keeps the last
retained message meanwhile). Agent events (data gaps) have no machine state.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent.sinks.addressing import Address, address_of
from agent.sinks.base import OutboundEvent

__all__ = ["MachineStates"]

_BY_CATEGORY = {"unplanned": "down", "planned": "planned", "idle": "idle"}


class MachineStates:
    def __init__(self) -> None:
        self._states: dict[tuple[str, str, str], dict[str, Any]] = {}

    def apply(self, events: Sequence[OutboundEvent], agent: str) -> list[tuple[Address, bytes]]:
        """Fold ``events`` in; the (address, retained payload) of every machine touched."""
        touched: dict[tuple[str, str, str], Address] = {}
        for event in events:
            address = address_of(event, agent)
            if not address.is_machine:
                continue
            try:
                doc = json.loads(event.payload)
                data = doc.get("data") or {}
            except (ValueError, AttributeError):
                continue
            key = (address.site, address.line, address.machine)
            state = self._states.setdefault(key, {
                "site": address.site, "line": address.line, "machine": address.machine,
                "state": "unknown", "downtime": None, "order_id": None})
            _fold(state, address.type, data)
            state["updated_at"] = doc.get("time")
            state["event_id"] = event.id
            touched[key] = address
        return [(address, json.dumps({k: v for k, v in self._states[key].items()
                                      if not k.startswith("_")},
                                     separators=(",", ":"), sort_keys=True).encode("utf-8"))
                for key, address in touched.items()]


def _fold(state: dict[str, Any], type_: str, data: dict[str, Any]) -> None:
    if data.get("order_id") is not None:
        state["order_id"] = data["order_id"]
    if type_ == "downtime.started":
        state["state"] = _BY_CATEGORY.get(str(data.get("category")), "down")
        state["downtime"] = {k: data.get(k) for k in (
            "episode_id", "category", "reason_code", "reason", "started_at")
            if data.get(k) is not None}
    elif type_ == "downtime.ended":
        state["state"], state["downtime"] = "running", None
    elif type_ == "signal.lost":
        if state["state"] != "unknown":
            state["_before_loss"] = state["state"]
        state["state"] = "unknown"
    elif type_ == "signal.restored":
        state["state"] = state.pop("_before_loss", "unknown")
