"""Which Source class serves which ``type:`` of source configuration."""

from __future__ import annotations

from typing import Any

from protocols.base import Source

__all__ = ["build_source", "counter_bits"]

_MODBUS_BITS = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64,
                "uint64": 64}


def build_source(name: str, config: Any) -> Source:
    """A Source for one validated source config (no I/O: connecting happens in ``run``)."""
    if config.type == "modbus":
        if config.is_rtu:
            from protocols.modbus.line import ModbusLineSource

            return ModbusLineSource(name, config)
        from protocols.modbus.source import ModbusSource

        return ModbusSource(name, config)
    if config.type == "opcua":
        from protocols.opcua.source import OpcuaSource

        return OpcuaSource(name, config)
    if config.type == "mqtt":
        from protocols.mqtt.source import MqttSource

        return MqttSource(name, config)
    raise ValueError(f"source {name}: no implementation for type {config.type!r}")


def counter_bits(config: Any, tag: str) -> int:
    """Width of a counter tag for rollover arithmetic (32 when the protocol does not say)."""
    if config.type == "modbus":
        return _MODBUS_BITS.get(config.tags[tag].type.value, 32)
    return 32
