"""Shared fixtures for integration tests (real peers on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from protocols.modbus.simulator import ModbusSimulator

# --- Modbus ---------------------------------------------------------------------------------

@pytest.fixture
async def modbus_sim() -> AsyncIterator[ModbusSimulator]:
    """A running Modbus TCP device on a free loopback port: addresses 0..299 in every table."""
    sim = ModbusSimulator(host="127.0.0.1", port=0, unit_id=1, size=300)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()
