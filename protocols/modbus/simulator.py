"""An embedded Modbus TCP device for the tests and ``edge-agent demo``.

It wraps pymodbus's ``ModbusTcpServer`` with a ``SimDevice`` (the old datastore classes are
deprecated, see docs/library-notes.md). The device has four separate tables (holding, input, coil,
discrete), each with addresses ``0 .. size-1``, all zero at first.

Failures a test can ask for:

- an address at or beyond ``size`` answers ILLEGAL DATA ADDRESS, as on a real device;
- ``fail(table, address, count, code)`` makes every read that touches that range answer with
  the given Modbus exception code until ``clear_failures()``;
- ``stop()`` closes the listener and every connection; ``start()`` again binds the same port
  (the bound port is kept when the first start used port 0) and restores the register values.

``requests`` logs every read request received as ``(table, address, count)``, so tests can
check how reads were coalesced.

::

    sim = ModbusSimulator(size=200)
    port = await sim.start()
    await sim.set_value(ModbusTag(address=10, type="float32"), 12.5)
    ...
    await sim.stop()
"""

from __future__ import annotations

from collections.abc import Sequence

from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from config.tasks import within
from protocols.modbus.codec import encode
from protocols.modbus.config import ModbusTable, ModbusTag

__all__ = ["ModbusSimulator"]

# Function codes used to reach each table through the datastore.
_READ_FC = {ModbusTable.COIL: 1, ModbusTable.DISCRETE: 2,
            ModbusTable.HOLDING: 3, ModbusTable.INPUT: 4}
_TABLE_OF_FC = {1: ModbusTable.COIL, 2: ModbusTable.DISCRETE, 3: ModbusTable.HOLDING,
                4: ModbusTable.INPUT}
_BIT_TABLES = (ModbusTable.COIL, ModbusTable.DISCRETE)


class ModbusSimulator:
    """A Modbus TCP device on ``host:port`` answering as ``unit_id`` (see module docstring)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, unit_id: int = 1,
                 size: int = 1000) -> None:
        if not 1 <= size <= 65536:
            raise ValueError(f"size must be 1..65536, got {size}")
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.size = size
        self.requests: list[tuple[ModbusTable, int, int]] = []
        self._failures: list[tuple[ModbusTable, int, int, ExcCodes]] = []
        self._server: ModbusTcpServer | None = None
        self._snapshot: dict[ModbusTable, list[int]] | None = None
        self._internal = False  # our own datastore access bypasses failure injection
        # The datastore tells the action hook how many 16-bit words a bit read touches, not how
        # many bits; the request seen last on each bit table gives the exact range.
        self._last_bit_read: dict[ModbusTable, tuple[int, int]] = {}

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> int:
        """Listen and return the bound port. Restores the values held at the last ``stop()``."""
        if self._server is not None:
            return self.port
        device = SimDevice(
            id=self.unit_id,
            simdata=(
                [SimData(0, values=[False] * self.size, datatype=DataType.BITS)],
                [SimData(0, values=[False] * self.size, datatype=DataType.BITS)],
                [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.host, self.port), trace_pdu=self._trace)
        await server.serve_forever(background=True)
        sockets = getattr(server.transport, "sockets", None) or ()
        if not sockets:
            await server.shutdown()
            raise OSError(f"Modbus simulator could not listen on {self.host}:{self.port}")
        self.port = int(sockets[0].getsockname()[1])
        self._server = server
        if self._snapshot is not None:
            for table, values in self._snapshot.items():
                await self.set_registers(table, 0, values)
            self._snapshot = None
        return self.port

    async def stop(self) -> None:
        """Close the listener and all connections; idempotent. The port is free afterwards."""
        server, self._server = self._server, None
        if server is None:
            return
        self._server = server  # still readable for the snapshot
        try:
            self._snapshot = {t: await self.get_registers(t, 0, self.size) for t in ModbusTable}
        finally:
            self._server = None
            listener = server.transport
            await server.shutdown()
            if listener is not None and hasattr(listener, "wait_closed"):
                await within(listener.wait_closed(), 5)

    def fail(self, table: ModbusTable, address: int, count: int = 1,
             code: int = ExcCodes.ILLEGAL_ADDRESS) -> None:
        """Answer reads touching ``address .. address+count-1`` of ``table`` with ``code``."""
        self._failures.append((table, address, count, ExcCodes(code)))

    def clear_failures(self) -> None:
        self._failures.clear()

    async def set_registers(self, table: ModbusTable, address: int,
                            values: Sequence[int | bool]) -> None:
        """Write raw registers (or bits, for coil/discrete) starting at ``address``."""
        server = self._require()
        if address < 0 or address + len(values) > self.size:
            raise ValueError(f"{table.value} {address}+{len(values)} is outside 0..{self.size - 1}")
        data: list[int] | list[bool] = (
            [bool(v) for v in values] if table in _BIT_TABLES else [int(v) for v in values])
        self._internal = True
        try:
            await server.async_setValues(self.unit_id, _READ_FC[table], address, data)
        finally:
            self._internal = False

    async def get_registers(self, table: ModbusTable, address: int, count: int) -> list[int]:
        """Read raw registers (bits come back as 0/1)."""
        server = self._require()
        if address < 0 or count < 1 or address + count > self.size:
            raise ValueError(f"{table.value} {address}+{count} is outside 0..{self.size - 1}")
        self._internal = True
        try:
            values = await server.async_getValues(self.unit_id, _READ_FC[table], address, count)
        finally:
            self._internal = False
        return [int(v) for v in values]

    async def set_value(self, tag: ModbusTag, value: object) -> None:
        """Encode ``value`` as ``tag`` says (type, byte order, scale) and write it."""
        await self.set_registers(tag.table, tag.address, encode(tag, value))

    def _require(self) -> ModbusTcpServer:
        if self._server is None:
            raise RuntimeError("the Modbus simulator is not running; call start() first")
        return self._server

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        table = _TABLE_OF_FC.get(pdu.function_code)
        if not sending and table is not None:
            self.requests.append((table, pdu.address, pdu.count))
            if table in _BIT_TABLES:
                self._last_bit_read[table] = (pdu.address, pdu.count)
        return pdu

    async def _action(self, function_code: int, _start: int, address: int, count: int,
                      _registers: list[int], values: list[int] | list[bool] | None
                      ) -> ExcCodes | None:
        table = _TABLE_OF_FC.get(function_code)
        if self._internal or values is not None or table is None:
            return None
        if table in _BIT_TABLES:
            last = self._last_bit_read.get(table)
            count = last[1] if last and last[0] == address else count * 16
        for f_table, f_address, f_count, code in self._failures:
            if f_table is table and f_address < address + count and address < f_address + f_count:
                return code
        return None
