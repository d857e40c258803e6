"""RTU framing: request bytes, CRC, and finding the answer in noisy received bytes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from protocols.modbus.config import ModbusSourceConfig
from protocols.modbus.rtu import (
    READ_COILS,
    READ_HOLDING,
    FrameFault,
    crc16,
    find_answer,
    read_request,
    unpack_bits,
    unpack_registers,
)


def frame(body: bytes) -> bytes:
    return body + crc16(body).to_bytes(2, "little")


GOOD = frame(bytes([1, 3, 4, 0, 7, 0, 9]))  # unit 1 answers two registers: 7, 9


def test_request_matches_the_specification_example() -> None:
    # Read holding registers 0x006B..0x006D of unit 0x11: CRC 0x8776, sent 76 87.
    assert read_request(0x11, READ_HOLDING, 0x6B, 3) == bytes.fromhex("1103006b00037687")


@pytest.mark.parametrize(("received", "expected"), [
    (GOOD, [7, 9]),
    (b"\x00\x01\x03\x7f\xfe" + GOOD, [7, 9]),             # noise that looks like a header
    (b"\xff" + GOOD[:-1] + b"\x00" + GOOD, [7, 9]),       # a bad frame, then a good one
    (frame(bytes([2, 3, 4, 0, 1, 0, 2])) + GOOD, [7, 9]),  # another unit's answer first
])
def test_answer_is_found_after_noise(received: bytes, expected: list[int]) -> None:
    scan = find_answer(received, 1, READ_HOLDING, 2)
    assert scan.answer is not None
    assert unpack_registers(scan.answer.data, 2) == expected
    assert scan.answer.skipped == len(received) - len(GOOD)


@pytest.mark.parametrize(("received", "fault", "waiting"), [
    (b"", FrameFault.NO_ANSWER, False),
    (GOOD[:-1] + bytes([GOOD[-1] ^ 1]), FrameFault.CRC, False),
    (GOOD[:3] + b"\x01" + GOOD[4:], FrameFault.CRC, False),          # data changed on the wire
    (GOOD[:-3], FrameFault.TRUNCATED, True),
    (b"\x42\x17\x00", FrameFault.GARBAGE, False),
    (frame(bytes([1, 3, 6, 0, 7, 0, 9, 0, 1])), FrameFault.GARBAGE, False),  # wrong length
    (frame(bytes([1, 4, 4, 0, 7, 0, 9])), FrameFault.GARBAGE, False),        # wrong function
])
def test_no_value_from_a_bad_frame(received: bytes, fault: FrameFault, waiting: bool) -> None:
    scan = find_answer(received, 1, READ_HOLDING, 2)
    assert scan.answer is None
    assert (scan.fault, scan.waiting) == (fault, waiting)


def test_exception_answer() -> None:
    scan = find_answer(frame(bytes([1, 0x83, 2])), 1, READ_HOLDING, 2)
    assert scan.answer is not None and scan.answer.exception_code == 2


def test_bits_unpack_least_significant_first() -> None:
    scan = find_answer(frame(bytes([5, 1, 2, 0b1010_0101, 0b1])), 5, READ_COILS, 9)
    assert scan.answer is not None
    assert unpack_bits(scan.answer.data, 9) == [1, 0, 1, 0, 0, 1, 0, 1, 1]


BASE: dict[str, Any] = {"type": "modbus", "tags": {"a": {"address": 0}}}


@pytest.mark.parametrize(("extra", "message"), [
    ({"transport": "serial"}, "needs 'serial'"),
    ({"transport": "rtu-over-tcp"}, "needs 'host'"),
    ({"transport": "serial", "host": "h", "serial": {"device": "/dev/ttyS0"}}, "'host' is for"),
    ({"host": "h", "serial": {"device": "/dev/ttyS0"}}, "'serial' is for transport serial"),
    ({"host": "h", "retries": 2}, "RTU transports"),
    ({"host": "h", "tags": {"a": {"address": 0, "unit_id": 4}}}, "one source per unit id"),
    ({"transport": "serial", "serial": {"device": "/dev/ttyS0"}, "unit_id": 0},
     "1..247"),
])
def test_transport_settings_are_checked(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusSourceConfig.model_validate({**BASE, **extra})


def test_serial_defaults_follow_the_modbus_specification() -> None:
    cfg = ModbusSourceConfig.model_validate({**BASE, "transport": "serial",
                                             "serial": {"device": "/dev/ttyUSB0"}})
    assert cfg.serial is not None
    assert (cfg.serial.baudrate, cfg.serial.data_bits, cfg.serial.parity.value,
            cfg.serial.stop_bits) == (9600, 8, "even", 1)
    assert cfg.serial.char_time == pytest.approx(11 / 9600)
