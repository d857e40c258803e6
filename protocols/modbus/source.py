"""The Modbus TCP source: polls one device and turns its registers into samples.

``run()`` is one session (``protocols/base.py``)::

    connect ──fail──> ConnectionLostError
       │
       v
    poll ──> out.connected() (first poll only) ──> out.emit(batch) ──> sleep to next tick ──┐
       ^                                                                                    │
       └────────────────────────────────────────────────────────────────────────────────────┘
    any read: no answer within ``timeout`` -> PeerTimeoutError; link dropped -> ConnectionLostError

Session rules:

- One pymodbus client per session, created by ``run()`` and closed when it ends. pymodbus's own
  reconnect is switched off (``reconnect_delay=0``) and its retries too (``retries=0``), so a
  silent device costs exactly ``timeout`` per session end and the supervisor alone decides when
  to reconnect. A drop noticed while a request is in flight or between polls ends the session
  at once instead of waiting for the timeout or the next poll.
- Ticks are drift-free (``start + k * poll_interval``); a poll that overruns skips the missed
  ticks instead of bursting to catch up. Every poll emits one batch with every tag.
- Modbus has no source time: samples carry ``agent_time`` only.

What happens when the device refuses a read (a Modbus exception response):

- A coalesced block that is refused is split: each of its tags is read on its own, so only the
  tags the device refuses become bad (detail: tag, table, address, exception in words); the
  others keep flowing in the same poll.
- Refused tags are remembered and left out of the read plan, their address ranges become
  barriers that no coalesced read spans; if every tag of a refused block reads fine alone, the
  block's unused registers become barriers instead. So a device with holes in its map is split
  once, not on every poll. Remembered tags are re-tried on their own every
  ``RETRY_REFUSED_EVERY`` polls (they are reported bad with the last refusal in between) and
  rejoin the plan when the device accepts them again.
- Only answers about the address map (illegal function, address or value; a short answer) are
  handled that way. Device busy, device failure and the gateway codes are transient: the
  block's tags are bad for that poll, nothing is split or remembered.
- A value that cannot be decoded (NaN, non-ASCII text) is bad for that poll only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from config.errors import DecodeError
from config.model import Quality, TagSample, utcnow
from protocols.base import SampleSink, Source, next_poll_time
from protocols.modbus.codec import decode
from protocols.modbus.config import (
    ByteOrder,
    ModbusSourceConfig,
    ModbusTable,
    ModbusTag,
    ModbusType,
)
from protocols.modbus.link import EXCEPTION_WORDS, ModbusLink, Refusal
from protocols.modbus.plan import Barrier, ReadBlock, plan

__all__ = ["EXCEPTION_WORDS", "RETRY_REFUSED_EVERY", "ModbusSource", "Refusal"]

RETRY_REFUSED_EVERY = 10

_UNIT_NAMES = {ModbusTable.HOLDING: "holding register", ModbusTable.INPUT: "input register",
               ModbusTable.COIL: "coil", ModbusTable.DISCRETE: "discrete input"}


def _quiet_pymodbus() -> None:
    # pymodbus logs every failed connect and timeout (some at ERROR, with hex dumps); the
    # supervisor logs session transitions once. Leave alone a level an operator has set.
    lib_logger = logging.getLogger("pymodbus")
    if lib_logger.level == logging.NOTSET:
        lib_logger.setLevel(logging.CRITICAL)


def _where(tag: ModbusTag) -> str:
    n = tag.register_count
    unit = _UNIT_NAMES[tag.table]
    return f"{unit} {tag.address}" + (f" ({n} registers)" if n > 1 else "")


class ModbusSource(Source):
    """Polls the tags of one Modbus TCP device; see the module docstring.

    ``ModbusSource(name, config)`` does no I/O. ``await run(out)`` is one session;
    ``await probe()`` reads every tag once on its own connection.
    """

    def __init__(self, name: str, config: ModbusSourceConfig) -> None:
        super().__init__(name)
        self.config = config
        # Knowledge about the device's address map outlives a session: a reconnect does not
        # re-split blocks that were refused before.
        self._refused: dict[str, str] = {}  # tag id -> detail of the last refusal
        self._barriers: set[Barrier] = set()
        self._polls = 0
        self._slices: list[list[tuple[str, ModbusTag, int, int, bool]]] = []  # per block
        self._blocks = self._plan()
        _quiet_pymodbus()

    @property
    def tag_ids(self) -> list[str]:
        return list(self.config.tags)

    @property
    def stale_after(self) -> float:
        return self.config.effective_stale_after

    @property
    def read_plan(self) -> list[ReadBlock]:
        """The read requests one poll makes now (without the periodic re-tries)."""
        return list(self._blocks)

    async def run(self, out: SampleSink) -> None:
        link = ModbusLink(self.config)
        try:
            await link.open()
            loop = asyncio.get_running_loop()
            interval = self.config.poll_interval
            next_tick = loop.time()
            first = True
            while True:
                samples = await self._poll(link)
                if first:
                    out.connected()
                    first = False
                out.emit(samples)
                now = loop.time()
                next_tick = next_poll_time(next_tick, now, interval)
                await link.idle(max(0.0, next_tick - now))
        finally:
            link.close()

    async def probe(self) -> list[TagSample]:
        # A fresh instance: a probe neither uses nor changes the running session's knowledge.
        prober = ModbusSource(self.name, self.config)
        link = ModbusLink(self.config)
        try:
            await link.open()
            return await prober._poll(link)
        finally:
            link.close()

    def _plan(self) -> list[ReadBlock]:
        good = {t: tag for t, tag in self.config.tags.items() if t not in self._refused}
        walls = set(self._barriers)
        for tag_id in self._refused:
            tag = self.config.tags[tag_id]
            walls.add((tag.table, tag.address, tag.register_count))
        blocks = plan(good, max_registers=self.config.max_registers_per_read,
                      max_gap=self.config.max_gap, barriers=sorted(walls))
        # Where each tag's values sit in its block's answer, worked out once per plan rather
        # than on every read.
        self._slices = [[(tag_id, tag, offset, offset + tag.register_count, _is_plain(tag))
                         for tag_id, tag, offset in b.tags] for b in blocks]
        return blocks

    async def _poll(self, link: ModbusLink) -> list[TagSample]:
        self._polls += 1
        samples: dict[str, TagSample] = {}
        changed = False
        if self._refused and self._polls % RETRY_REFUSED_EVERY == 0:
            for tag_id in list(self._refused):
                if await self._read_alone(link, tag_id, self.config.tags[tag_id], samples):
                    changed = True
        for block, slices in zip(self._blocks, self._slices, strict=True):
            data = await link.read(block.table, block.start, block.count)
            if isinstance(data, Refusal):
                if not data.about_addresses:
                    # Busy, failing or behind a dead gateway: nothing learnt about the map.
                    self._refuse_for_now(block, data, samples)
                    continue
                changed = True
                await self._split(link, block, data, samples)
                continue
            now = utcnow()
            for tag_id, tag, offset, end, plain in slices:
                samples[tag_id] = TagSample(tag=tag_id, value=data[offset], quality=_GOOD,
                                            agent_time=now) if plain else \
                    self._decode(tag_id, tag, data[offset:end], now)
        for tag_id, detail in self._refused.items():
            if tag_id not in samples:
                samples[tag_id] = self._bad(tag_id, detail, utcnow())
        if changed:
            self._blocks = self._plan()
        return [samples[t] for t in self.config.tags if t in samples]

    async def _split(self, link: ModbusLink, block: ReadBlock, refusal: Refusal,
                     samples: dict[str, TagSample]) -> None:
        if len(block.tags) == 1:
            tag_id, tag, _ = block.tags[0]
            self._refuse(tag_id, tag, refusal, samples)
            return
        any_refused = False
        for tag_id, tag, _ in block.tags:
            if not await self._read_alone(link, tag_id, tag, samples):
                any_refused = True
        if not any_refused:
            # Each tag reads fine alone: the device refuses the unused registers in between.
            self._barriers.update(_gaps(block))

    async def _read_alone(self, link: ModbusLink, tag_id: str, tag: ModbusTag,
                          samples: dict[str, TagSample]) -> bool:
        """Read one tag on its own; True if the device answered (even if it won't decode)."""
        data = await link.read(tag.table, tag.address, tag.register_count)
        if isinstance(data, Refusal):
            if data.about_addresses:
                self._refuse(tag_id, tag, data, samples)
            else:
                self._refuse_for_now(ReadBlock(tag.table, tag.address, tag.register_count,
                                               ((tag_id, tag, 0),)), data, samples)
            return False
        self._refused.pop(tag_id, None)
        samples[tag_id] = self._decode(tag_id, tag, data, utcnow())
        return True

    def _refuse_for_now(self, block: ReadBlock, refusal: Refusal,
                        samples: dict[str, TagSample]) -> None:
        now = utcnow()
        for tag_id, tag, _ in block.tags:
            samples[tag_id] = self._bad(tag_id, f"tag {tag_id}: reading {_where(tag)}: "
                                        f"{refusal}", now)

    def _refuse(self, tag_id: str, tag: ModbusTag, refusal: Refusal,
                samples: dict[str, TagSample]) -> None:
        detail = f"tag {tag_id}: reading {_where(tag)}: {refusal}"
        self._refused[tag_id] = detail
        samples[tag_id] = self._bad(tag_id, detail, utcnow())

    def _decode(self, tag_id: str, tag: ModbusTag, data: Sequence[int],
                now: datetime) -> TagSample:
        try:
            value = decode(tag, data)
        except DecodeError as exc:
            return self._bad(tag_id, f"tag {tag_id}: {_where(tag)} as {tag.type.value}: {exc}",
                             now)
        return TagSample(tag=tag_id, value=value, quality=Quality.GOOD, agent_time=now)

    @staticmethod
    def _bad(tag_id: str, detail: str, now: datetime) -> TagSample:
        return TagSample(tag=tag_id, value=None, quality=Quality.BAD, agent_time=now,
                         detail=detail)


_GOOD = Quality.GOOD


def _is_plain(tag: ModbusTag) -> bool:
    """A tag whose value is its one register as it came (most tags of most PLCs): read
    without the codec."""
    return tag.type is ModbusType.UINT16 and tag.scale is None and tag.offset is None \
        and tag.byte_order in (ByteOrder.ABCD, ByteOrder.CDAB) \
        and tag.table in (ModbusTable.HOLDING, ModbusTable.INPUT)


def _gaps(block: ReadBlock) -> list[Barrier]:
    """The addresses of ``block`` that none of its tags covers."""
    covered = [False] * block.count
    for _, tag, offset in block.tags:
        for i in range(offset, offset + tag.register_count):
            covered[i] = True
    gaps: list[Barrier] = []
    i = 0
    while i < block.count:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < block.count and not covered[j]:
            j += 1
        gaps.append((block.table, block.start + i, j - i))
        i = j
    return gaps

