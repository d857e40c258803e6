"""Machine state from a tag value: a value map or an analog threshold."""

from __future__ import annotations

from agent.detect.config import StateRule
from config.model import MachineState, Value

__all__ = ["derive_state", "reason_code", "value_key"]


def value_key(value: Value) -> str:
    """Text form of a tag value for map look-ups: 1, 1.0 and '1' are the same key."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def derive_state(rule: StateRule, value: Value) -> MachineState:
    """The state a good sample of the state tag means; UNKNOWN when the rule cannot say."""
    for limit, above in ((rule.running_above, True), (rule.running_below, False)):
        if limit is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            return MachineState.UNKNOWN
        running = value > limit if above else value < limit
        return MachineState.RUNNING if running else MachineState.DOWN
    assert rule.map is not None
    mapped = rule.map.get(value_key(value), rule.default)
    return MachineState.UNKNOWN if mapped is None else MachineState(mapped.value)


def reason_code(value: Value) -> str | None:
    """A reason code as text; 0, empty and missing mean "no reason"."""
    if value is None or isinstance(value, bool):
        return None
    text = value_key(value)
    return None if text in ("", "0") else text
