"""A stop that races with the connection drop it causes must still stop the session.

``ModbusLink`` turns its own cancel (pymodbus reported the link down) into
``ConnectionLostError``. When the runtime cancels the same task at the same moment (a stop),
that cancel must win: swallowing it left the supervisor running a new session for ever, and
``Runtime.stop()`` waiting on it (seen as a rare hang of the capacity test).
"""

from __future__ import annotations

import asyncio

import pytest

from config.errors import ConnectionLostError
from protocols.modbus.config import ModbusSourceConfig
from protocols.modbus.link import ModbusLink


def _link() -> ModbusLink:
    # No I/O: the client is only constructed; idle() never touches the socket.
    return ModbusLink(ModbusSourceConfig.model_validate({
        "type": "modbus", "host": "127.0.0.1", "port": 1502,
        "tags": {"t": {"table": "holding", "address": 0, "type": "uint16"}}}))


async def _idling(link: ModbusLink, started: asyncio.Event) -> None:
    started.set()
    await link.idle(30)


async def test_a_drop_alone_ends_the_session_as_a_lost_connection() -> None:
    link, started = _link(), asyncio.Event()
    task = asyncio.create_task(_idling(link, started))
    await started.wait()
    await asyncio.sleep(0)  # into the sleep
    link._on_connection(False)
    with pytest.raises(ConnectionLostError):
        await task


@pytest.mark.parametrize("order", ["stop-then-drop", "drop-then-stop"])
async def test_a_stop_racing_with_the_drop_still_cancels(order: str) -> None:
    link, started = _link(), asyncio.Event()
    task = asyncio.create_task(_idling(link, started))
    await started.wait()
    await asyncio.sleep(0)
    if order == "stop-then-drop":
        task.cancel()
        link._on_connection(False)
    else:
        link._on_connection(False)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
