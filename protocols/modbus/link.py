"""One Modbus TCP connection for ``ModbusSource`` (``source.py``), and a device's refusal.

``ModbusLink`` is exactly one pymodbus client session, never reconnected (pymodbus's own
reconnect and retries are off). A read or the wait between polls is a plain await in the
source's task: no task or future of ours per read. When pymodbus reports the connection
down, the waiting task is cancelled and the await becomes ``ConnectionLostError``; no answer
within ``timeout`` (plus a grace for pymodbus to report its own timeout first) is
``PeerTimeoutError``; a Modbus exception answer or a short answer is a ``Refusal`` (returned,
not raised: the source decides what it means for its read plan).

Answers are decoded into ``_QUIET_RESPONSES`` (registered on each client): pymodbus formats
every decoded answer for a debug line, building ``str(pdu)`` before the level is checked;
these classes describe themselves in full only when that line will be written.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsResponse, ReadDiscreteInputsResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersResponse,
    ReadInputRegistersResponse,
)

from config.errors import ConnectionLostError, PeerTimeoutError
from protocols.modbus.config import ModbusSourceConfig, ModbusTable

__all__ = ["EXCEPTION_WORDS", "ModbusLink", "Refusal"]

# Extra time our own guard gives pymodbus to report its own timeout first.
_TIMEOUT_GRACE = 0.5

_MAP_EXCEPTIONS = frozenset({1, 2, 3})
# Modbus exception codes in the words of the Modbus application protocol specification.
EXCEPTION_WORDS = {
    1: "illegal function", 2: "illegal data address", 3: "illegal data value",
    4: "server device failure", 5: "acknowledge", 6: "server device busy",
    8: "memory parity error", 10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class Refusal:
    """The device answered a read with a Modbus exception (or an unusable answer)."""

    __slots__ = ("code", "text")

    def __init__(self, text: str, code: int | None = None) -> None:
        self.code = code
        self.text = text

    def __str__(self) -> str:
        return self.text

    @property
    def about_addresses(self) -> bool:
        """True when the answer says something about the address map, so splitting the block
        finds the culprit: illegal function/address/value, or a short answer. Busy, device
        failure and gateway codes are transient: the block is just bad for this poll."""
        return self.code is None or self.code in _MAP_EXCEPTIONS


class ModbusLink:
    """One pymodbus client connection: exactly one session, never reconnected.

    A read or the wait between polls is a plain await in the source's own task, with no task
    or future of ours per read: when pymodbus reports the connection down, that task is
    cancelled (``_on_connection``) and the await turns into ``ConnectionLostError``."""

    def __init__(self, config: ModbusSourceConfig) -> None:
        assert config.host is not None  # the config requires it for transport tcp
        self._where = f"{config.host}:{config.port}"
        self._unit = config.unit_id
        self._timeout = config.timeout
        self._lost = False
        self._waiting: asyncio.Task[Any] | None = None  # the task in read() or idle()
        self._cancelled_for_loss = False
        c = self._client = AsyncModbusTcpClient(
            config.host, port=config.port, timeout=config.timeout, retries=0,
            reconnect_delay=0, reconnect_delay_max=0, trace_connect=self._on_connection)
        for quiet in _QUIET_RESPONSES:
            c.register(quiet)
        self._calls = {ModbusTable.HOLDING: c.read_holding_registers,
                       ModbusTable.INPUT: c.read_input_registers,
                       ModbusTable.COIL: c.read_coils,
                       ModbusTable.DISCRETE: c.read_discrete_inputs}

    def _on_connection(self, up: bool) -> None:
        if up:
            return
        self._lost = True
        task = self._waiting
        if task is not None and not task.done() and not self._cancelled_for_loss:
            self._cancelled_for_loss = True
            task.cancel()

    def _closed(self) -> ConnectionLostError:
        return ConnectionLostError(f"Modbus device {self._where} closed the connection")

    def _check_lost(self) -> None:
        """After a CancelledError: ours (the link dropped) becomes ConnectionLostError, unless
        someone else cancelled the task too (a stop, racing with the drop it causes): that
        cancel must win, or the stop would wait for a session that never ends."""
        if self._cancelled_for_loss:
            self._cancelled_for_loss = False
            task = asyncio.current_task()
            if task is not None and task.uncancel() > 0:
                return  # the caller re-raises the CancelledError
            raise self._closed() from None

    async def open(self) -> None:
        try:
            ok = await self._client.connect()
        except (ModbusException, OSError) as exc:
            raise ConnectionLostError(f"cannot connect to Modbus device {self._where}: "
                                      f"{exc}") from exc
        if not ok:
            raise ConnectionLostError(f"cannot connect to Modbus device {self._where}")

    def close(self) -> None:
        self._waiting = None
        self._client.close()

    async def idle(self, seconds: float) -> None:
        """Wait between polls; a drop meanwhile ends the session now, not at the next poll."""
        if self._lost:
            raise self._closed()
        self._waiting = asyncio.current_task()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self._check_lost()
            raise
        finally:
            self._waiting = None

    async def read(self, table: ModbusTable, start: int, count: int) -> list[int] | Refusal:
        """Registers (bits as 0/1) or the device's refusal; raises RetryableError otherwise."""
        if self._lost or not self._client.connected:
            raise self._closed()
        self._waiting = asyncio.current_task()
        try:
            # pymodbus times out by itself; this guard only catches a request it lost track of.
            async with asyncio.timeout(self._timeout + _TIMEOUT_GRACE):
                response = await self._calls[table](start, count=count, device_id=self._unit)
        except asyncio.CancelledError:
            self._check_lost()
            raise
        except TimeoutError:
            raise PeerTimeoutError(f"Modbus device {self._where} did not answer within "
                                   f"{self._timeout:g}s") from None
        except ConnectionException as exc:
            raise ConnectionLostError(f"Modbus device {self._where}: {exc}") from exc
        except ModbusIOException as exc:
            if self._lost:
                raise self._closed() from exc
            raise PeerTimeoutError(f"Modbus device {self._where} did not answer within "
                                   f"{self._timeout:g}s") from exc
        except (ModbusException, OSError) as exc:
            raise ConnectionLostError(f"Modbus device {self._where}: {exc}") from exc
        finally:
            self._waiting = None
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            words = EXCEPTION_WORDS.get(code, "an unknown exception")
            return Refusal(f"device answered {words} (Modbus exception {code})", code)
        values = response.bits if table in (ModbusTable.COIL, ModbusTable.DISCRETE) \
            else response.registers
        if len(values) < count:
            return Refusal(f"device answered {len(values)} values instead of {count}")
        return [int(v) for v in values[:count]]


def _quiet(base: type[ModbusPDU]) -> type[ModbusPDU]:
    """``base`` with a ``str()`` that costs nothing while pymodbus debug logging is off.

    pymodbus formats every decoded answer for a debug line (``str(pdu)`` is an argument, so
    it is built before the level is checked); registered on our client, these classes take
    the place of the standard answers and describe themselves in full only when that line
    will be written."""

    def __str__(self: ModbusPDU) -> str:
        if _PYMODBUS_LOG.isEnabledFor(logging.DEBUG):
            return base.__str__(self)
        return base.__name__

    return type(f"Quiet{base.__name__}", (base,), {"__str__": __str__})


_PYMODBUS_LOG = logging.getLogger("pymodbus")
_QUIET_RESPONSES = tuple(_quiet(b) for b in (
    ReadHoldingRegistersResponse, ReadInputRegistersResponse, ReadCoilsResponse,
    ReadDiscreteInputsResponse))
