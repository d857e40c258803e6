"""One Modbus RTU line: a byte stream (serial port or TCP socket to a gateway) shared by the
devices on it, one request at a time.

::

    RtuLine.read(unit, table, start, count)
        wait for the line to be quiet (request_gap, 3.5 characters on serial)
        discard stale input ──> send request ──> collect bytes until find_answer() succeeds
                                                      │ or the timeout passes
                                   good frame ◄───────┤
                                   fault ─────────────┴──> count it, flush, retry (attempts)
                                   all attempts failed ──> UnitSilentError (that unit only)

Invariants:

- One request in flight per line, ever: the lock serialises every caller (a probe and a
  poll, or two units), and nothing is sent until the previous answer has been collected or
  its timeout has passed. RTU has no transaction ids; parallel requests on one bus collide.
- A value is only taken from a frame ``protocols.modbus.rtu.find_answer`` accepts (unit,
  function, byte count and CRC all match). After any fault the line is flushed: input is
  discarded until it has been quiet for ``_FLUSH_QUIET`` seconds, so a late or broken answer
  cannot be read as the answer to the next request.
- A unit that does not answer (or answers only garbage) raises ``UnitSilentError``: the caller
  marks that unit's tags bad and goes on with the other units. Only a broken stream (socket
  closed, serial port gone) raises ``ConnectionLostError`` and ends the session.
- Faults are counted per unit in ``LineStats`` (which outlives sessions) and logged once per
  unit and fault kind until that unit answers cleanly again, which is logged once too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from config.errors import ConnectionLostError, PeerTimeoutError
from protocols.modbus.config import ModbusSourceConfig, ModbusTable, ModbusTransport
from protocols.modbus.rtu import (
    READ_COILS,
    READ_DISCRETE,
    READ_HOLDING,
    READ_INPUT,
    FrameFault,
    find_answer,
    read_request,
    unpack_bits,
    unpack_registers,
)
from protocols.modbus.streams import SerialStream, Stream, TcpStream

__all__ = ["LineStats", "RtuLine", "UnitSilentError", "UnitStats"]

log = logging.getLogger(__name__)

_FUNCTIONS = {ModbusTable.HOLDING: READ_HOLDING, ModbusTable.INPUT: READ_INPUT,
              ModbusTable.COIL: READ_COILS, ModbusTable.DISCRETE: READ_DISCRETE}
_WORDS = {ModbusTable.HOLDING: "holding register(s)", ModbusTable.INPUT: "input register(s)",
          ModbusTable.COIL: "coil(s)", ModbusTable.DISCRETE: "discrete input(s)"}
_FLUSH_QUIET = 0.02
_FAULT_WORDS = {FrameFault.NO_ANSWER: "no answer", FrameFault.CRC: "a frame with a bad CRC",
                FrameFault.GARBAGE: "bytes that are no Modbus frame",
                FrameFault.TRUNCATED: "a truncated frame"}


class UnitSilentError(PeerTimeoutError):
    """One unit on the line gave no usable answer; the line itself is fine."""


@dataclass
class UnitStats:
    """Counters of one unit (device) on a line."""

    requests: int = 0
    answers: int = 0
    exceptions: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {f.value: 0 for f in FrameFault})
    last_fault: str | None = None
    silent: bool = False
    _logged: set[FrameFault] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "answers": self.answers,
                "exceptions": self.exceptions, "faults": dict(self.faults),
                "last_fault": self.last_fault, "silent": self.silent}


class LineStats:
    """Per-unit counters of one line, kept by the source across sessions."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.units: dict[int, UnitStats] = {}

    def unit(self, unit: int) -> UnitStats:
        st = self.units.get(unit)
        if st is None:
            st = self.units[unit] = UnitStats()
        return st

    def fault(self, unit: int, fault: FrameFault, detail: str) -> None:
        st = self.unit(unit)
        st.faults[fault.value] += 1
        st.last_fault = detail
        if fault not in st._logged:
            st._logged.add(fault)
            log.warning("Modbus RTU line %s, unit %d: %s (counted per unit; logged once until "
                        "the unit answers cleanly)", self.where, unit, detail,
                        extra={"line": self.where, "unit": unit, "fault": fault.value})

    def answered(self, unit: int, *, clean: bool) -> None:
        """A good frame came back; ``clean`` if nothing had to be skipped to find it."""
        st = self.unit(unit)
        st.answers += 1
        st.silent = False
        if clean and st._logged:
            log.info("Modbus RTU line %s, unit %d answers cleanly again", self.where, unit,
                     extra={"line": self.where, "unit": unit})
            st._logged.clear()

    def as_dict(self) -> dict[str, Any]:
        return {str(u): st.as_dict() for u, st in sorted(self.units.items())}


class RtuLine:
    """One session on an RTU line; see the module docstring."""

    def __init__(self, config: ModbusSourceConfig, stats: LineStats,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self.stats = stats
        self._lock = asyncio.Lock()
        self._stream: Stream
        if config.transport is ModbusTransport.SERIAL:
            assert config.serial is not None
            self._stream = SerialStream(config)
            # 3.5 character times between frames; the spec fixes 1.75 ms above 19200 baud.
            spec_gap = 0.00175 if config.serial.baudrate > 19200 \
                else 3.5 * config.serial.char_time
            self._gap = max(config.request_gap, spec_gap)
        else:
            assert config.host is not None
            self._stream = TcpStream(config.host, config.port, config.timeout)
            self._gap = config.request_gap
        self._quiet_since = 0.0
        # How long the line must stay silent before a frame counts as finished.
        self._quiet = max(_FLUSH_QUIET, self._gap)

    async def open(self) -> None:
        await self._stream.open()

    def close(self) -> None:
        self._stream.close()

    async def idle(self, seconds: float) -> None:
        """Wait between polls; a broken stream meanwhile ends the session now."""
        s = self._stream
        deadline = asyncio.get_running_loop().time() + seconds
        while s.lost is None:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            s.arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await s.arrived.wait()
            except TimeoutError:
                return
        raise ConnectionLostError(f"Modbus RTU line {self.stats.where}: {s.lost}")

    async def read(self, unit: int, table: ModbusTable, start: int,
                   count: int) -> list[int] | int:
        """Registers (bits as 0/1) or a Modbus exception code (int).

        Raises ``UnitSilentError`` when no attempt got a good answer, ``ConnectionLostError``
        when the stream broke.
        """
        function = _FUNCTIONS[table]
        st = self.stats.unit(unit)
        attempts = 1 if st.silent else 1 + self._config.retries
        request = read_request(unit, function, start, count)
        last = ""
        async with self._lock:
            for _ in range(attempts):
                st.requests += 1
                outcome = await self._exchange(request, unit, function, count)
                if isinstance(outcome, FrameFault):
                    last = _FAULT_WORDS[outcome]
                    self.stats.fault(unit, outcome, f"reading {count} {_WORDS[table]} at "
                                     f"address {start}: {last}")
                    await self._flush()
                    continue
                data, code, skipped = outcome
                if skipped:
                    self.stats.fault(unit, FrameFault.GARBAGE, f"{skipped} byte(s) of garbage "
                                     "before a good frame (skipped)")
                self.stats.answered(unit, clean=not skipped)
                if code is not None:
                    st.exceptions += 1
                    return code
                if function in (READ_COILS, READ_DISCRETE):
                    return unpack_bits(data, count)
                return unpack_registers(data, count)
        st.silent = True
        raise UnitSilentError(f"Modbus RTU unit {unit} on {self.stats.where}: {last} within "
                              f"{self._config.timeout:g}s ({attempts} attempt(s))")

    async def _exchange(self, request: bytes, unit: int, function: int,
                        count: int) -> tuple[bytes, int | None, int] | FrameFault:
        s = self._stream
        loop = asyncio.get_running_loop()
        wait = self._quiet_since + self._gap - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._check_lost()
        s.rx.clear()
        s.write(request)
        deadline = loop.time() + self._config.timeout
        echo: bytes | None = request
        try:
            while True:
                if echo is not None:
                    echo = self._drop_echo(echo)
                scan = find_answer(s.rx, unit, function, count)
                if scan.answer is not None:
                    a = scan.answer
                    return a.data, a.exception_code, a.skipped
                self._check_lost()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    assert scan.fault is not None
                    return scan.fault
                # A whole frame with a bad CRC and then a quiet line: that was the answer,
                # no need to wait out the timeout.
                settled = scan.fault is FrameFault.CRC and not scan.waiting
                s.arrived.clear()
                try:
                    async with asyncio.timeout(min(remaining, self._quiet) if settled
                                               else remaining):
                        await s.arrived.wait()
                except TimeoutError:
                    if settled:
                        return FrameFault.CRC
        finally:
            self._quiet_since = time.monotonic()

    def _drop_echo(self, request: bytes) -> bytes | None:
        """Some RS-485 adapters hear their own transmission: a copy of the request at the
        start of the input is not an answer (nor garbage). Returns the request while the
        input so far could still be its echo, None once decided."""
        rx = self._stream.rx
        n = min(len(rx), len(request))
        if rx[:n] != request[:n]:
            return None
        if n < len(request):
            return request
        del rx[:n]
        return None

    async def _flush(self) -> None:
        """Discard input until the line has been quiet for ``_FLUSH_QUIET`` seconds."""
        s = self._stream
        quiet = self._quiet
        for _ in range(50):  # a line that never goes quiet is noise: give up after 1 s
            s.rx.clear()
            s.arrived.clear()
            try:
                async with asyncio.timeout(quiet):
                    await s.arrived.wait()
            except TimeoutError:
                break
            self._check_lost()
        s.rx.clear()
        self._quiet_since = time.monotonic()

    def _check_lost(self) -> None:
        if self._stream.lost is not None:
            raise ConnectionLostError(f"Modbus RTU line {self.stats.where}: {self._stream.lost}")
