"""Machine state from a tag value: a value map or an analog threshold."""

from __future__ import annotations

from agent.model import MachineState, Value
from config.models import StateRule

__all__ = ["derive_state", "value_key"]


def value_key(value: Value) -> str:
    """Text form of a tag value for map look-ups: 1, 1.0 and '1' are the same key."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def derive_state(rule: StateRule, value: Value) -> MachineState:
    """The state a good sample of the state tag means; UNKNOWN when the rule cannot say."""
    if rule.running_above is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return MachineState.UNKNOWN
        return MachineState.RUNNING if value > rule.running_above else MachineState.DOWN
    assert rule.map is not None
    mapped = rule.map.get(value_key(value), rule.default)
    return MachineState.UNKNOWN if mapped is None else MachineState(mapped.value)
