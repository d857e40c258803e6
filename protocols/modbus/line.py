"""The Modbus RTU source: polls every device (unit id) on one RTU line, one request at a time.

``run()`` is one session (``protocols/base.py``)::

    open line (serial port or gateway socket) ──fail──> ConnectionLostError
       │
       v
    for each unit, in unit order:  poll it (coalesced reads, as on Modbus TCP)
         unit silent ──> that unit's tags are bad for this poll; next unit
    out.connected() (first poll only) ──> out.emit(batch) ──> idle to next tick ──┐
       ^                                                                          │
       └──────────────────────────────────────────────────────────────────────────┘
    stream broken (socket closed, serial port gone) -> ConnectionLostError

Each unit is planned, split on refusals and decoded by its own ``ModbusSource`` (the same code
as Modbus TCP, so read coalescing, refusal handling and the codec are identical); only the
link differs: requests go through ``RtuLine``, which serialises them, applies the gap, the
timeout and the retries, and counts frame faults per unit (``status()``).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from config.model import Quality, TagSample, utcnow
from protocols.base import SampleSink, Source, next_poll_time
from protocols.modbus.config import ModbusSourceConfig, ModbusTable
from protocols.modbus.link import EXCEPTION_WORDS, Refusal
from protocols.modbus.source import ModbusSource
from protocols.modbus.transport import LineStats, RtuLine, UnitSilentError

__all__ = ["ModbusLineSource"]


class _UnitLink:
    """What a per-unit ``ModbusSource`` poller needs of a link (``read``), bound to one unit."""

    def __init__(self, line: RtuLine, unit: int) -> None:
        self._line, self._unit = line, unit

    async def read(self, table: ModbusTable, start: int, count: int) -> list[int] | Refusal:
        result = await self._line.read(self._unit, table, start, count)
        if isinstance(result, int):
            words = EXCEPTION_WORDS.get(result, "an unknown exception")
            return Refusal(f"device answered {words} (Modbus exception {result})", result)
        return result


class ModbusLineSource(Source):
    """All devices of one RTU line (``transport: serial | rtu-over-tcp``).

    ``ModbusLineSource(name, config)`` does no I/O. ``await run(out)`` is one session;
    ``await probe()`` reads every tag once on its own connection.
    """

    def __init__(self, name: str, config: ModbusSourceConfig) -> None:
        super().__init__(name)
        self.config = config
        self.stats = LineStats(config.where)
        self._probe_stats: LineStats | None = None
        by_unit: dict[int, dict[str, Any]] = {}
        for tag_id, tag in config.tags.items():
            by_unit.setdefault(config.unit_of(tag), {})[tag_id] = tag
        self._units = {unit: ModbusSource(name, config.model_copy(
            update={"unit_id": unit, "tags": tags})) for unit, tags in sorted(by_unit.items())}

    @property
    def tag_ids(self) -> list[str]:
        return list(self.config.tags)

    @property
    def stale_after(self) -> float:
        return self.config.effective_stale_after

    @property
    def units(self) -> list[int]:
        return list(self._units)

    def status(self) -> dict[str, Any]:
        """Per-unit request, answer and frame-fault counters (for /status)."""
        return {"transport": self.config.transport.value, "line": self.config.where,
                "units": self.stats.as_dict()}

    async def run(self, out: SampleSink) -> None:
        line = RtuLine(self.config, self.stats)
        try:
            await line.open()
            loop = asyncio.get_running_loop()
            next_tick = loop.time()
            first = True
            while True:
                samples = await self.poll(line)
                if first:
                    out.connected()
                    first = False
                out.emit(samples)
                now = loop.time()
                next_tick = next_poll_time(next_tick, now, self.config.poll_interval)
                await line.idle(max(0.0, next_tick - now))
        finally:
            line.close()

    async def poll(self, line: RtuLine) -> list[TagSample]:
        """One pass over every unit; a silent unit's tags come back bad."""
        samples: list[TagSample] = []
        for unit, device in self._units.items():
            samples.extend(await self._poll_unit(line, unit, device))
        return samples

    async def probe(self) -> list[TagSample]:
        # A fresh instance: a probe neither uses nor changes the running session's knowledge.
        prober = ModbusLineSource(self.name, self.config)
        self._probe_stats = prober.stats
        line = RtuLine(self.config, prober.stats)
        try:
            await line.open()
            return await prober.poll(line)
        finally:
            line.close()

    def probe_report(self) -> list[str]:
        """One line per unit of the last ``probe()``: answers and frame errors."""
        stats = self._probe_stats
        if stats is None:
            return []
        lines = []
        for unit in self._units:
            st = stats.unit(unit)
            faults = ", ".join(f"{kind} x{n}" for kind, n in st.faults.items() if n)
            state = "SILENT" if st.silent else "answers"
            lines.append(f"unit {unit}: {state}; {st.requests} request(s), {st.answers} "
                         f"answer(s), {st.exceptions} exception(s); frame errors: "
                         f"{faults or 'none'}" + (f"; last: {st.last_fault}"
                                                  if st.last_fault else ""))
        return lines

    @staticmethod
    async def _poll_unit(line: RtuLine, unit: int, device: ModbusSource) -> list[TagSample]:
        try:
            # The per-unit poller only calls ``read`` on its link.
            return await device._poll(cast(Any, _UnitLink(line, unit)))
        except UnitSilentError as exc:
            now = utcnow()
            return [TagSample(tag=t, value=None, quality=Quality.BAD, agent_time=now,
                              detail=str(exc)) for t in device.tag_ids]
