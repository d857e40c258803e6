"""Coalesce Modbus tags into as few read requests as possible.

A Modbus request costs a round trip; reading 40 registers costs about the same as reading 4.
``plan()`` groups the tags of each table into ``ReadBlock``s:

- tags are sorted by address and a block grows while the next tag starts at most ``max_gap``
  unused registers after the block's end (overlapping and adjacent tags always qualify:
  a ``uint32`` and a ``uint16`` on its low word share one read);
- a block never spans more than ``max_registers`` registers (the protocol allows 125);
- for coil and discrete tables every limit is counted in bits, 16 bits per register, so the
  defaults give 2000 bits per read (the protocol maximum for bit reads) and 128-bit gaps. A
  device with a small register limit usually has the same byte limit for bits;
- a block never bridges a gap that touches a ``barrier``: a range the caller knows a device
  refuses (the registers of a tag that failed, or the unused registers of a block that failed
  although each of its tags reads fine). See ``protocols/modbus/source.py``.

The result is deterministic: blocks ordered by table then address, tags within a block by
address then id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from protocols.modbus.config import ModbusTable, ModbusTag

__all__ = ["MAX_BITS_PER_READ", "MAX_REGISTERS_PER_READ", "Barrier", "ReadBlock", "plan"]

MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
_BITS_PER_REGISTER = 16
_TABLE_ORDER = (ModbusTable.HOLDING, ModbusTable.INPUT, ModbusTable.COIL, ModbusTable.DISCRETE)

Barrier = tuple[ModbusTable, int, int]
"""``(table, start, count)``: addresses a block must not span as a gap."""


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers (or bits) of ``table`` from ``start``.

    ``tags`` holds ``(tag_id, tag, offset)`` where ``offset`` is the tag's first register
    relative to ``start``; its values are ``data[offset : offset + tag.register_count]``.
    """

    table: ModbusTable
    start: int
    count: int
    tags: tuple[tuple[str, ModbusTag, int], ...]

    @property
    def end(self) -> int:
        """One past the last address read."""
        return self.start + self.count


def _is_bits(table: ModbusTable) -> bool:
    return table in (ModbusTable.COIL, ModbusTable.DISCRETE)


def _gap_blocked(table_barriers: list[tuple[int, int]], gap_start: int, gap_end: int) -> bool:
    return any(start < gap_end and gap_start < start + count
               for start, count in table_barriers)


def plan(tags: Mapping[str, ModbusTag], *, max_registers: int = MAX_REGISTERS_PER_READ,
         max_gap: int = 8, barriers: Iterable[Barrier] = ()) -> list[ReadBlock]:
    """Group ``tags`` (by id) into read blocks; see the module docstring for the rules.

    Raises ``ValueError`` if a register tag is wider than ``max_registers`` (the config
    validator refuses that earlier) or the limits are out of range.
    """
    if not 1 <= max_registers <= MAX_REGISTERS_PER_READ:
        raise ValueError(f"max_registers must be 1..{MAX_REGISTERS_PER_READ}, got {max_registers}")
    if max_gap < 0:
        raise ValueError(f"max_gap cannot be negative, got {max_gap}")
    by_table: dict[ModbusTable, list[tuple[str, ModbusTag]]] = {}
    for tag_id, tag in tags.items():
        by_table.setdefault(tag.table, []).append((tag_id, tag))
    walls: dict[ModbusTable, list[tuple[int, int]]] = {}
    for table, start, count in barriers:
        walls.setdefault(table, []).append((start, count))

    blocks: list[ReadBlock] = []
    for table in _TABLE_ORDER:
        entries = sorted(by_table.get(table, []), key=lambda e: (e[1].address, e[0]))
        if not entries:
            continue
        bits = _is_bits(table)
        cap = min(MAX_BITS_PER_READ, max_registers * _BITS_PER_REGISTER) if bits else max_registers
        gap = max_gap * _BITS_PER_REGISTER if bits else max_gap
        blocks.extend(_plan_table(table, entries, cap, gap, walls.get(table, [])))
    return blocks


def _plan_table(table: ModbusTable, entries: list[tuple[str, ModbusTag]], cap: int, gap: int,
                table_barriers: list[tuple[int, int]]) -> list[ReadBlock]:
    blocks: list[ReadBlock] = []
    members: list[tuple[str, ModbusTag]] = []
    start = end = 0

    def close() -> None:
        blocks.append(ReadBlock(table, start, end - start, tuple(
            (tag_id, tag, tag.address - start) for tag_id, tag in members)))

    for tag_id, tag in entries:
        width = tag.register_count
        if width > cap:
            raise ValueError(f"tag {tag_id} needs {width} registers, more than the "
                             f"{cap} one read may return")
        t_start, t_end = tag.address, tag.address + width
        if members:
            new_end = max(end, t_end)
            fits = t_start - end <= gap and new_end - start <= cap
            if fits and t_start > end and _gap_blocked(table_barriers, end, t_start):
                fits = False
            if fits:
                members.append((tag_id, tag))
                end = new_end
                continue
            close()
        members = [(tag_id, tag)]
        start, end = t_start, t_end
    if members:
        close()
    return blocks
