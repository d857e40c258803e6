"""Modbus RTU framing for read requests: build a request, find its answer in received bytes.

Pure functions, no I/O; ``protocols/modbus/transport.py`` drives them over a serial port or a
TCP socket to a serial gateway.

An RTU frame is ``unit, function, data..., CRC-16 (low byte first)``. It has no length prefix
and no transaction id: a frame is recognised by what the master expects (the unit it asked,
the function it sent, the byte count that request implies) and by its CRC. ``find_answer``
therefore scans every offset of the receive buffer instead of assuming the answer starts at
byte 0, which is what makes the line resynchronise after noise:

- garbage before the frame: skipped; the frame is still found (and the garbage is reported);
- a frame with a bad CRC: never accepted; the scan goes on past it (a later good frame wins);
- a frame that stops short: the scan reports it as incomplete so the caller keeps waiting
  until its timeout, then reports a truncated frame;
- an answer for another unit, another function or another length: not ours, skipped.

Invariant: a value is only ever taken from a frame whose unit, function and byte count match
the request and whose CRC is right.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Answer", "FrameFault", "Scan", "crc16", "expected_data_bytes", "find_answer",
           "read_request", "unpack_bits", "unpack_registers"]

READ_COILS = 1
READ_DISCRETE = 2
READ_HOLDING = 3
READ_INPUT = 4


class FrameFault(StrEnum):
    """What went wrong with one request on an RTU line (per-device counters use these)."""

    NO_ANSWER = "no_answer"          # nothing at all came back within the timeout
    CRC = "crc_error"                # a frame of the right shape with a wrong CRC
    GARBAGE = "garbage"              # bytes that are no frame of ours (before a frame or alone)
    TRUNCATED = "truncated"          # the start of our frame, then silence


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """Modbus CRC-16 (poly 0xA001 reflected, initial 0xFFFF). Sent low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ b) & 0xFF]
    return crc


def _with_crc(body: bytes) -> bytes:
    return body + crc16(body).to_bytes(2, "little")


def read_request(unit: int, function: int, start: int, count: int) -> bytes:
    """The RTU frame of a read request (functions 1-4)."""
    if function not in (READ_COILS, READ_DISCRETE, READ_HOLDING, READ_INPUT):
        raise ValueError(f"not a read function: {function}")
    return _with_crc(bytes([unit, function]) + start.to_bytes(2, "big")
                     + count.to_bytes(2, "big"))


def expected_data_bytes(function: int, count: int) -> int:
    """Byte count a correct answer carries: 2 per register, 1 per 8 bits."""
    return (count + 7) // 8 if function in (READ_COILS, READ_DISCRETE) else 2 * count


@dataclass(frozen=True, slots=True)
class Answer:
    """A well-formed answer: ``data`` (normal) or ``exception_code`` (Modbus exception)."""

    data: bytes
    exception_code: int | None
    skipped: int  # bytes before the frame that were not part of it


@dataclass(frozen=True, slots=True)
class Scan:
    """Result of scanning a receive buffer for the answer to one request.

    ``answer`` is set when a good frame was found. Otherwise ``fault`` says what the bytes so
    far look like, and ``waiting`` is True while a frame of ours has started but not ended
    (keep reading until the timeout).
    """

    answer: Answer | None
    fault: FrameFault | None
    waiting: bool


def find_answer(buf: bytes | bytearray, unit: int, function: int, count: int) -> Scan:
    """Scan ``buf`` for the answer to ``read_request(unit, function, _, count)``."""
    want = expected_data_bytes(function, count)
    size = len(buf)
    crc_seen = False
    waiting = False
    for i in range(size):
        if buf[i] != unit or i + 1 >= size:
            if buf[i] == unit:
                waiting = True  # our unit byte is the last byte so far
            continue
        fc = buf[i + 1]
        if fc == function | 0x80:
            length = 5
        elif fc == function:
            if i + 2 >= size:
                waiting = True
                continue
            if buf[i + 2] != want:
                continue  # another request's answer, or noise that looks like a header
            length = 5 + want
        else:
            continue
        if i + length > size:
            waiting = True
            continue
        frame = bytes(buf[i:i + length])
        if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            crc_seen = True
            continue
        if fc & 0x80:
            return Scan(Answer(b"", frame[2], i), None, False)
        return Scan(Answer(frame[3:-2], None, i), None, False)
    if size == 0:
        fault = FrameFault.NO_ANSWER
    elif crc_seen:
        fault = FrameFault.CRC
    elif waiting:
        fault = FrameFault.TRUNCATED
    else:
        fault = FrameFault.GARBAGE
    return Scan(None, fault, waiting)


def unpack_registers(data: bytes, count: int) -> list[int]:
    return [int.from_bytes(data[2 * k:2 * k + 2], "big") for k in range(count)]


def unpack_bits(data: bytes, count: int) -> list[int]:
    """Bits least significant first in each byte; the padding bits of the last byte dropped."""
    return [(data[k // 8] >> (k % 8)) & 1 for k in range(count)]
