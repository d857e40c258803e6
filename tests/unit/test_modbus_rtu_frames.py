"""RTU framing: request bytes, CRC, and finding the answer in noisy received bytes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.wiring.load import load_config_text
from config.errors import ConfigError
from protocols.modbus.config import ModbusSourceConfig
from protocols.modbus.rtu import (
    READ_COILS,
    READ_DISCRETE,
    READ_HOLDING,
    READ_INPUT,
    FrameFault,
    crc16,
    expected_data_bytes,
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
    ({"transport": "serial", "serial": {"device": "/dev/ttyS0", "data_bits": 7}},
     "needs 8 data bits"),
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


# --- Property: no corruption of a good frame is ever taken as a different good value ---------

@st.composite
def answers(draw: st.DrawFn) -> tuple[int, int, int, bytes, bytes]:
    """(unit, function, count, data, frame) of a correct answer, bits padded with zeros."""
    unit = draw(st.integers(1, 247))
    function = draw(st.sampled_from([READ_COILS, READ_DISCRETE, READ_HOLDING, READ_INPUT]))
    count = draw(st.integers(1, 125))
    size = expected_data_bytes(function, count)
    data = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if function in (READ_COILS, READ_DISCRETE) and count % 8:
        data[-1] &= (1 << (count % 8)) - 1
    return unit, function, count, bytes(data), frame(bytes([unit, function, size]) + data)


def _flip(buf: bytes, bits: list[int]) -> bytes:
    out = bytearray(buf)
    for b in bits:
        out[b // 8] ^= 1 << (b % 8)
    return bytes(out)


@st.composite
def corrupted(draw: st.DrawFn, good: bytes) -> bytes:
    kind = draw(st.sampled_from(["bits", "burst", "truncate", "delete", "insert", "prefix",
                                 "suffix"]))
    nbits = 8 * len(good)
    if kind == "bits":  # up to 3 flipped bits: CRC-16/MODBUS detects every such error
        bits = draw(st.lists(st.integers(0, nbits - 1), min_size=1, max_size=3, unique=True))
        return _flip(good, bits)
    if kind == "burst":  # a burst of at most 16 bits: always detected too
        start = draw(st.integers(0, nbits - 1))
        width = draw(st.integers(1, min(16, nbits - start)))
        inner = draw(st.lists(st.integers(start + 1, start + width - 2), unique=True)) \
            if width > 2 else []
        return _flip(good, sorted({start, start + width - 1, *inner}))
    if kind == "truncate":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "delete":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at] + good[at + 1:]
    if kind == "insert":
        at = draw(st.integers(1, len(good) - 1))
        return good[:at] + draw(st.binary(min_size=1, max_size=3)) + good[at:]
    noise = draw(st.binary(min_size=1, max_size=12))
    return noise + good if kind == "prefix" else good + noise


@settings(max_examples=600, derandomize=True, deadline=None)
@given(st.data())
def test_a_corrupted_frame_never_yields_another_value(data: st.DataObject) -> None:
    unit, function, count, payload, good = data.draw(answers())
    scan = find_answer(good, unit, function, count)
    assert scan.answer is not None and scan.answer.data == payload
    bad = data.draw(corrupted(good))
    scan = find_answer(bad, unit, function, count)
    if scan.answer is not None:
        # Only the original frame itself (found behind noise, or with noise after it).
        assert (scan.answer.data, scan.answer.exception_code) == (payload, None), bad.hex()
    else:
        assert scan.fault is not None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(unit=st.integers(1, 247), function=st.integers(1, 4), code=st.integers(1, 11),
       bit=st.integers(0, 39))
def test_a_corrupted_exception_answer_is_never_taken(unit: int, function: int, code: int,
                                                     bit: int) -> None:
    good = frame(bytes([unit, function | 0x80, code]))
    scan = find_answer(_flip(good, [bit]), unit, function, 2)
    assert scan.answer is None or scan.answer.exception_code == code


def test_two_sources_on_one_rtu_line_are_refused() -> None:
    """Each source serialises only its own requests: two on one line would collide."""
    text = """
agent: {id: edge-01, site: plant-a}
sources:
  a: {type: modbus, transport: serial, serial: {device: /dev/ttyUSB0}, tags: {t1: {address: 0}}}
  b: {type: modbus, transport: serial, serial: {device: /dev/ttyUSB0, baudrate: 19200},
      tags: {t2: {address: 0, unit_id: 2}}}
  c: {type: modbus, transport: rtu-over-tcp, host: gw, port: 4001, tags: {t3: {address: 0}}}
  d: {type: modbus, transport: rtu-over-tcp, host: gw, port: 4001, tags: {t4: {address: 0}}}
  e: {type: modbus, transport: rtu-over-tcp, host: gw, port: 4002, tags: {t5: {address: 0}}}
  f: {type: modbus, host: gw, port: 4001, tags: {t6: {address: 0}}}
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "cfg.yaml")
    messages = [str(i) for i in info.value.issues]
    assert len(messages) == 2, messages
    assert messages[0].startswith("cfg.yaml:5:49: sources.b.serial.device: ")
    assert "sources 'a' and 'b' both use the RTU line /dev/ttyUSB0" in messages[0]
    assert "sources 'c' and 'd' both use the RTU line gw:4001" in messages[1]


def test_zero_request_gap_is_allowed() -> None:
    """0 is request_gap's default and the value docs/brownfield.md shows."""
    cfg = ModbusSourceConfig.model_validate({**BASE, "transport": "serial", "request_gap": "0ms",
                                             "serial": {"device": "/dev/ttyUSB0"}})
    assert cfg.request_gap == 0.0
