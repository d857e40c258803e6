"""Turn Modbus registers (or bits) into tag values and back.

pymodbus's ``convert_from_registers`` knows word order but not byte order
(docs/library-notes.md), so the agent has its own small codec. It is pure: no I/O, no clock.

Byte order over any number of registers
---------------------------------------

A value of ``n`` registers has ``2n`` bytes. Write them most significant first as
``A B C D E F G H`` (``A B`` for one register, ``A B C D`` for two, all eight for four). The
four orders say how those bytes sit in the registers as they arrive (register 0 first, each
register shown high byte first)::

    order  meaning                         16-bit   32-bit     64-bit
    ABCD   big-endian words and bytes      AB       AB CD      AB CD EF GH
    CDAB   word order reversed             AB       CD AB      GH EF CD AB
    BADC   bytes swapped within each word  BA       BA DC      BA DC FE HG
    DCBA   fully little-endian             BA       DC BA      HG FE DC BA

So ``CDAB`` never changes a 16-bit value and ``BADC``/``DCBA`` byte-swap it.

Strings are a sequence, not a number: the word order never changes for them. Characters go
two per register, the first character in the high byte for ``ABCD``/``CDAB`` and in the low
byte for ``BADC``/``DCBA``. A string ends at its first NUL (bytes after it are ignored, as PLCs
often leave old text behind a shorter one); trailing spaces are stripped; anything but printable
ASCII before the end is a ``DecodeError``.

Numbers: integers come out as ``int``; ``scale`` and/or ``offset`` make the result
``raw * scale + offset`` as a ``float``. ``float32`` values are reported as the shortest decimal
that denotes the same float32 (``1.1``, not ``1.100000023841858``). NaN and infinity are a
``DecodeError``: bad quality, never a guess.

Booleans: from a coil or discrete input the single bit; from a holding or input register,
non-zero is ``True``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from config.errors import DecodeError
from protocols.modbus.config import ByteOrder, ModbusTable, ModbusTag, ModbusType

__all__ = ["decode", "encode", "float32_shortest"]

_BIT_TABLES = (ModbusTable.COIL, ModbusTable.DISCRETE)
_SWAP_BYTES = (ByteOrder.BADC, ByteOrder.DCBA)
_REVERSE_WORDS = (ByteOrder.CDAB, ByteOrder.DCBA)

# struct format (big-endian) per numeric type
_FORMATS: dict[ModbusType, str] = {
    ModbusType.INT16: ">h", ModbusType.UINT16: ">H",
    ModbusType.INT32: ">i", ModbusType.UINT32: ">I",
    ModbusType.INT64: ">q", ModbusType.UINT64: ">Q",
    ModbusType.FLOAT32: ">f", ModbusType.FLOAT64: ">d",
}
_FLOATS = (ModbusType.FLOAT32, ModbusType.FLOAT64)


def _registers_to_bytes(registers: Sequence[int], order: ByteOrder, *, words: bool) -> bytes:
    """Bytes in canonical order (A first). ``words=False`` keeps the word order (strings)."""
    regs = list(registers)
    if words and order in _REVERSE_WORDS:
        regs.reverse()
    out = bytearray()
    for r in regs:
        hi, lo = r >> 8, r & 0xFF
        out += bytes((lo, hi)) if order in _SWAP_BYTES else bytes((hi, lo))
    return bytes(out)


def _bytes_to_registers(data: bytes, order: ByteOrder, *, words: bool) -> list[int]:
    regs = []
    for i in range(0, len(data), 2):
        hi, lo = data[i], data[i + 1]
        regs.append((lo << 8 | hi) if order in _SWAP_BYTES else (hi << 8 | lo))
    if words and order in _REVERSE_WORDS:
        regs.reverse()
    return regs


def float32_shortest(x: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``x`` (finite ``x``)."""
    packed = struct.pack(">f", x)
    for digits in range(6, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return struct.unpack(">f", packed)[0]  # 9 significant digits always suffice


def _check_registers(tag: ModbusTag, registers: Sequence[int]) -> None:
    want = tag.register_count
    if len(registers) != want:
        raise DecodeError(f"expected {want} register(s) for {tag.type.value}, "
                          f"got {len(registers)}")
    for r in registers:
        if isinstance(r, bool):
            continue
        if not isinstance(r, int) or not 0 <= r <= 0xFFFF:
            raise DecodeError(f"register value {r!r} is not a 16-bit unsigned integer")


def _decode_string(tag: ModbusTag, registers: Sequence[int]) -> str:
    assert tag.length is not None
    raw = _registers_to_bytes(registers, tag.byte_order, words=False)[: tag.length]
    raw = raw.split(b"\x00", 1)[0].rstrip(b" ")
    bad = [b for b in raw if not 0x20 <= b <= 0x7E]
    if bad:
        raise DecodeError(f"string contains a byte that is not printable ASCII: 0x{bad[0]:02x}")
    return raw.decode("ascii")


def _apply_scale(tag: ModbusTag, raw: int | float) -> int | float:
    if tag.scale is None and tag.offset is None:
        return raw
    value = raw * (1.0 if tag.scale is None else tag.scale) + (tag.offset or 0.0)
    if not math.isfinite(value):
        raise DecodeError(f"scaled value of {raw!r} is not finite")
    return float(value)


def decode(tag: ModbusTag, registers: Sequence[int]) -> bool | int | float | str:
    """Decode exactly ``tag.register_count`` registers (or bits) into the tag's value.

    Raises ``DecodeError`` for a wrong count, an out-of-range register, NaN/infinity or a string
    that is not printable ASCII.
    """
    _check_registers(tag, registers)
    kind = tag.type
    if kind is ModbusType.UINT16 or kind is ModbusType.INT16:
        # The common case, without building bytes (one register: only a byte swap matters).
        r = int(registers[0])
        if tag.byte_order in _SWAP_BYTES:
            r = (r & 0xFF) << 8 | r >> 8
        if kind is ModbusType.INT16 and r >= 0x8000:
            r -= 0x10000
        return _apply_scale(tag, r)
    if kind is ModbusType.BOOL:
        return bool(registers[0])
    if tag.type is ModbusType.STRING:
        return _decode_string(tag, registers)
    data = _registers_to_bytes(registers, tag.byte_order, words=True)
    raw: int | float = struct.unpack(_FORMATS[tag.type], data)[0]
    if tag.type in _FLOATS:
        if not math.isfinite(raw):
            raise DecodeError(f"{tag.type.value} is {raw!r}, not a number")
        if tag.type is ModbusType.FLOAT32:
            raw = float32_shortest(raw)
    return _apply_scale(tag, raw)


def _unscale(tag: ModbusTag, value: float) -> float:
    if tag.scale is None and tag.offset is None:
        return value
    if tag.scale == 0:
        raise ValueError("cannot encode through scale 0")
    return (value - (tag.offset or 0.0)) / (1.0 if tag.scale is None else tag.scale)


def _encode_string(tag: ModbusTag, value: object) -> list[int]:
    assert tag.length is not None
    if not isinstance(value, str):
        raise ValueError(f"string tag needs a str, got {value!r}")
    if len(value) > tag.length or any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"{value!r} is not printable ASCII of at most {tag.length} characters")
    data = value.encode("ascii").ljust(2 * tag.register_count, b"\x00")
    return _bytes_to_registers(data, tag.byte_order, words=False)


def encode(tag: ModbusTag, value: object) -> list[int]:
    """Registers (or ``[0]``/``[1]`` for a bit) that ``decode`` turns back into ``value``.

    Used by the simulator and the tests. Scale/offset are undone first; integer types round to
    the nearest integer. Raises ``ValueError`` when the value does not fit the tag.
    """
    if tag.type is ModbusType.BOOL:
        if not isinstance(value, bool | int):
            raise ValueError(f"bool tag needs a bool, got {value!r}")
        return [1 if value else 0]
    if tag.type is ModbusType.STRING:
        return _encode_string(tag, value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{tag.type.value} tag needs a number, got {value!r}")
    raw: float = _unscale(tag, value)
    fmt = _FORMATS[tag.type]
    if tag.type not in _FLOATS:
        if not math.isfinite(raw):
            raise ValueError(f"{value!r} is not finite")
        raw = round(raw)
    try:
        data = struct.pack(fmt, raw)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"{value!r} does not fit {tag.type.value}") from exc
    return _bytes_to_registers(data, tag.byte_order, words=True)
