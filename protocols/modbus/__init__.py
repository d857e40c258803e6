"""Modbus source: Modbus TCP (``source.py``) and Modbus RTU lines, on a serial port or through
a serial gateway (``line.py``, ``transport.py``, ``streams.py``, ``rtu.py``).

Public surface: ``ModbusSource`` (``protocols.modbus.source``) and ``ModbusSimulator``
(``protocols.modbus.simulator``). They are loaded on first use so that importing the config
schema (``protocols.modbus.config``) does not import pymodbus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.modbus.simulator import ModbusSimulator
    from protocols.modbus.source import ModbusSource

__all__ = ["ModbusSimulator", "ModbusSource"]


def __getattr__(name: str) -> Any:
    if name == "ModbusSource":
        from protocols.modbus.source import ModbusSource

        return ModbusSource
    if name == "ModbusSimulator":
        from protocols.modbus.simulator import ModbusSimulator

        return ModbusSimulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
