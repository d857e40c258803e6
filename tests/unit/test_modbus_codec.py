"""The Modbus codec: every type x byte order against hand-written registers, and round trips."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.errors import DecodeError
from protocols.modbus.codec import decode, encode, float32_shortest
from protocols.modbus.config import ByteOrder, ModbusTable, ModbusTag, ModbusType

A, B, C, D = ByteOrder.ABCD, ByteOrder.BADC, ByteOrder.CDAB, ByteOrder.DCBA
T = ModbusType


def tag(type_: ModbusType, order: ByteOrder = A, **kw: object) -> ModbusTag:
    return ModbusTag.model_validate({"address": 0, "type": type_, "byte_order": order, **kw})


# (type, order, registers as they arrive, value). Written out by hand from the table in
# codec.py's docstring, not computed with the code under test.
TABLE = [
    (T.UINT16, A, [0x1234], 0x1234),
    (T.UINT16, C, [0x1234], 0x1234),
    (T.UINT16, B, [0x3412], 0x1234),
    (T.UINT16, D, [0x3412], 0x1234),
    (T.INT16, A, [0xFFFE], -2),
    (T.INT16, C, [0xFFFE], -2),
    (T.INT16, B, [0xFEFF], -2),
    (T.INT16, D, [0xFEFF], -2),
    (T.UINT32, A, [0x1122, 0x3344], 0x11223344),
    (T.UINT32, C, [0x3344, 0x1122], 0x11223344),
    (T.UINT32, B, [0x2211, 0x4433], 0x11223344),
    (T.UINT32, D, [0x4433, 0x2211], 0x11223344),
    (T.INT32, A, [0xFFFF, 0xFFFE], -2),
    (T.INT32, C, [0xFFFE, 0xFFFF], -2),
    (T.INT32, B, [0xFFFF, 0xFEFF], -2),
    (T.INT32, D, [0xFEFF, 0xFFFF], -2),
    (T.FLOAT32, A, [0x4148, 0x0000], 12.5),
    (T.FLOAT32, C, [0x0000, 0x4148], 12.5),
    (T.FLOAT32, B, [0x4841, 0x0000], 12.5),
    (T.FLOAT32, D, [0x0000, 0x4841], 12.5),
    (T.UINT64, A, [0x1122, 0x3344, 0x5566, 0x7788], 0x1122334455667788),
    (T.UINT64, C, [0x7788, 0x5566, 0x3344, 0x1122], 0x1122334455667788),
    (T.UINT64, B, [0x2211, 0x4433, 0x6655, 0x8877], 0x1122334455667788),
    (T.UINT64, D, [0x8877, 0x6655, 0x4433, 0x2211], 0x1122334455667788),
    (T.INT64, A, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], -2),
    (T.INT64, C, [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    (T.INT64, B, [0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF], -2),
    (T.INT64, D, [0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF], -2),
    (T.FLOAT64, A, [0x3FF8, 0, 0, 0], 1.5),
    (T.FLOAT64, C, [0, 0, 0, 0x3FF8], 1.5),
    (T.FLOAT64, B, [0xF83F, 0, 0, 0], 1.5),
    (T.FLOAT64, D, [0, 0, 0, 0xF83F], 1.5),
    (T.FLOAT64, A, [0xC002, 0x0000, 0x0000, 0x0001], -2.2500000000000004),
]


@pytest.mark.parametrize(("type_", "order", "registers", "value"), TABLE,
                         ids=[f"{t.value}-{o.value}-{i}" for i, (t, o, _, _) in enumerate(TABLE)])
def test_decode_table(type_: ModbusType, order: ByteOrder, registers: list[int],
                      value: object) -> None:
    got = decode(tag(type_, order), registers)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize(("type_", "order", "registers", "value"), TABLE,
                         ids=[f"{t.value}-{o.value}-{i}" for i, (t, o, _, _) in enumerate(TABLE)])
def test_encode_table(type_: ModbusType, order: ByteOrder, registers: list[int],
                      value: object) -> None:
    assert encode(tag(type_, order), value) == registers


def test_byte_orders_agree_with_struct_little_endian() -> None:
    # DCBA is plain little-endian: the registers are the little-endian bytes read in pairs.
    raw = struct.pack("<q", -123456789012345)
    registers = [raw[i] << 8 | raw[i + 1] for i in range(0, 8, 2)]
    assert decode(tag(T.INT64, D), registers) == -123456789012345


@pytest.mark.parametrize(("order", "registers"), [
    (A, [0x4142, 0x4300]), (C, [0x4142, 0x4300]),
    (B, [0x4241, 0x0043]), (D, [0x4241, 0x0043]),
])
def test_string_byte_order(order: ByteOrder, registers: list[int]) -> None:
    t = tag(T.STRING, order, length=3)
    assert decode(t, registers) == "ABC"
    assert encode(t, "ABC") == registers


def test_string_strips_trailing_nuls_and_spaces() -> None:
    t = tag(T.STRING, length=8)
    assert decode(t, [0x4F4B, 0x2020, 0x2000, 0x0000]) == "OK"


def test_string_ends_at_first_nul_and_ignores_leftovers() -> None:
    # "AB", NUL, then old text (even non-ASCII) left behind by a longer string.
    t = tag(T.STRING, length=6)
    assert decode(t, [0x4142, 0x00C3, 0xA958]) == "AB"


def test_string_odd_length_ignores_pad_byte() -> None:
    t = tag(T.STRING, length=3)
    assert decode(t, [0x4142, 0x43FF]) == "ABC"


@pytest.mark.parametrize("registers", [[0x41C3, 0xA900], [0x4107, 0x0000], [0x7F41, 0x0000]])
def test_string_with_non_printable_byte_is_a_decode_error(registers: list[int]) -> None:
    with pytest.raises(DecodeError, match="printable ASCII"):
        decode(tag(T.STRING, length=4), registers)


def test_string_of_250_characters() -> None:
    t = tag(T.STRING, length=250)
    text = "x" * 249 + "y"
    assert t.register_count == 125
    assert decode(t, encode(t, text)) == text


@pytest.mark.parametrize("table", [ModbusTable.COIL, ModbusTable.DISCRETE])
def test_bool_from_bit_tables(table: ModbusTable) -> None:
    t = tag(T.BOOL, table=table)
    assert decode(t, [True]) is True
    assert decode(t, [False]) is False
    assert decode(t, [1]) is True


@pytest.mark.parametrize("table", [ModbusTable.HOLDING, ModbusTable.INPUT])
def test_bool_from_register_is_non_zero(table: ModbusTable) -> None:
    t = tag(T.BOOL, table=table)
    assert decode(t, [0]) is False
    assert decode(t, [1]) is True
    assert decode(t, [0x8000]) is True
    assert encode(t, True) == [1]


def test_scale_and_offset_give_float() -> None:
    t = tag(T.UINT16, scale=0.1, offset=-2)
    got = decode(t, [123])
    assert isinstance(got, float)
    assert got == pytest.approx(10.3)
    only_offset = decode(tag(T.INT16, offset=1), [0xFFFE])
    assert only_offset == -1.0
    assert isinstance(only_offset, float)


def test_scale_round_trip_through_encode() -> None:
    t = tag(T.INT32, scale=0.01)
    assert encode(t, 12.34) == [0, 1234]
    assert decode(t, [0, 1234]) == pytest.approx(12.34)


def test_float32_reported_as_shortest_decimal() -> None:
    assert decode(tag(T.FLOAT32), [0x3F8C, 0xCCCD]) == 1.1
    assert float32_shortest(0.1) == 0.1


@pytest.mark.parametrize(("type_", "registers"), [
    (T.FLOAT32, [0x7FC0, 0x0000]),  # NaN
    (T.FLOAT32, [0x7F80, 0x0000]),  # +inf
    (T.FLOAT32, [0xFF80, 0x0000]),  # -inf
    (T.FLOAT64, [0x7FF8, 0, 0, 0]),  # NaN
    (T.FLOAT64, [0xFFF0, 0, 0, 0]),  # -inf
])
def test_nan_and_infinity_are_decode_errors(type_: ModbusType, registers: list[int]) -> None:
    with pytest.raises(DecodeError):
        decode(tag(type_), registers)


def test_scaled_value_overflowing_to_infinity_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="not finite"):
        decode(tag(T.FLOAT64, scale=1e300), [0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF])


@pytest.mark.parametrize("registers", [[], [1, 2], [70000], [-1]])
def test_wrong_register_shape_is_a_decode_error(registers: list[int]) -> None:
    with pytest.raises(DecodeError):
        decode(tag(T.UINT16), registers)


@pytest.mark.parametrize(("t", "value"), [
    (tag(T.UINT16), 70000), (tag(T.UINT16), -1), (tag(T.INT16), 40000),
    (tag(T.UINT16), "12"), (tag(T.UINT16), True), (tag(T.FLOAT32), 1e300),
    (tag(T.INT32), math.nan), (tag(T.STRING, length=2), "abc"),
    (tag(T.STRING, length=4), "é"), (tag(T.STRING, length=4), 12), (tag(T.BOOL), "yes"),
])
def test_encode_refuses_values_that_do_not_fit(t: ModbusTag, value: object) -> None:
    with pytest.raises(ValueError):
        encode(t, value)


_INT_RANGES = {T.INT16: (-(2**15), 2**15 - 1), T.UINT16: (0, 2**16 - 1),
               T.INT32: (-(2**31), 2**31 - 1), T.UINT32: (0, 2**32 - 1),
               T.INT64: (-(2**63), 2**63 - 1), T.UINT64: (0, 2**64 - 1)}
orders = st.sampled_from(list(ByteOrder))


@st.composite
def int_cases(draw: st.DrawFn) -> tuple[ModbusTag, int]:
    type_ = draw(st.sampled_from(list(_INT_RANGES)))
    lo, hi = _INT_RANGES[type_]
    return tag(type_, draw(orders)), draw(st.integers(lo, hi))


@given(int_cases())
def test_integers_round_trip(case: tuple[ModbusTag, int]) -> None:
    t, value = case
    registers = encode(t, value)
    assert len(registers) == t.register_count
    assert all(0 <= r <= 0xFFFF for r in registers)
    assert decode(t, registers) == value


@given(st.sampled_from([T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64]), orders,
       st.data())
def test_any_registers_round_trip_for_integers(type_: ModbusType, order: ByteOrder,
                                               data: st.DataObject) -> None:
    t = tag(type_, order)
    registers = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=t.register_count,
                                   max_size=t.register_count))
    assert encode(t, decode(t, registers)) == registers


@given(orders, st.floats(allow_nan=False, allow_infinity=False))
def test_float64_round_trip(order: ByteOrder, value: float) -> None:
    t = tag(T.FLOAT64, order)
    assert decode(t, encode(t, value)) == value


def _digits(x: float) -> int:
    """Significant digits of the shortest repr of ``x``."""
    mantissa = repr(abs(x)).split("e")[0].replace(".", "").lstrip("0").rstrip("0")
    return max(1, len(mantissa))


@given(orders, st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_float32_round_trip(order: ByteOrder, value: float) -> None:
    t = tag(T.FLOAT32, order)
    registers = encode(t, value)
    got = decode(t, registers)
    assert isinstance(got, float)
    # Same float32, written with as few significant digits as possible (repr may still be
    # longer: 99999997952.0 is written 100000000000.0, one significant digit).
    assert struct.pack(">f", got) == struct.pack(">f", value)
    assert _digits(got) <= _digits(value)
    assert encode(t, got) == registers


@given(orders, st.integers(1, 40), st.data())
def test_strings_round_trip(order: ByteOrder, length: int, data: st.DataObject) -> None:
    t = tag(T.STRING, order, length=length)
    text = data.draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                             max_size=length))
    assert decode(t, encode(t, text)) == text.rstrip(" ")


@given(st.sampled_from(list(ModbusTable)), st.booleans())
def test_bools_round_trip(table: ModbusTable, value: bool) -> None:
    t = tag(T.BOOL, table=table)
    assert decode(t, encode(t, value)) is value
