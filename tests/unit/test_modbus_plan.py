"""Read coalescing: which tags share a Modbus request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from protocols.modbus.config import ModbusSourceConfig, ModbusTable, ModbusTag, ModbusType
from protocols.modbus.plan import ReadBlock, plan

H, IR, COIL, DI = ModbusTable.HOLDING, ModbusTable.INPUT, ModbusTable.COIL, ModbusTable.DISCRETE


def t(address: int, type_: str = "uint16", table: ModbusTable = H, **kw: object) -> ModbusTag:
    return ModbusTag.model_validate({"table": table, "address": address, "type": type_, **kw})


def spans(blocks: list[ReadBlock]) -> list[tuple[str, int, int, list[str]]]:
    return [(b.table.value, b.start, b.count, [tag_id for tag_id, _, _ in b.tags])
            for b in blocks]


def test_no_tags_no_reads() -> None:
    assert plan({}) == []


def test_adjacent_tags_share_one_read_with_offsets() -> None:
    blocks = plan({"a": t(10), "b": t(11, "uint32"), "c": t(13, "float64")})
    assert spans(blocks) == [("holding", 10, 7, ["a", "b", "c"])]
    assert [off for _, _, off in blocks[0].tags] == [0, 1, 3]


def test_gap_of_exactly_max_gap_is_bridged() -> None:
    # a ends at 11; b starts at 11 + 8: eight unused registers in between.
    assert spans(plan({"a": t(10), "b": t(19)}, max_gap=8)) == [("holding", 10, 10, ["a", "b"])]


def test_gap_one_larger_than_max_gap_splits() -> None:
    assert spans(plan({"a": t(10), "b": t(20)}, max_gap=8)) == [
        ("holding", 10, 1, ["a"]), ("holding", 20, 1, ["b"])]


def test_max_gap_zero_merges_only_adjacent_and_overlapping() -> None:
    assert spans(plan({"a": t(0), "b": t(1), "c": t(3)}, max_gap=0)) == [
        ("holding", 0, 2, ["a", "b"]), ("holding", 3, 1, ["c"])]


def test_block_of_exactly_125_registers() -> None:
    assert spans(plan({"a": t(0), "b": t(124)}, max_gap=200)) == [
        ("holding", 0, 125, ["a", "b"])]


def test_block_never_exceeds_125_registers() -> None:
    assert spans(plan({"a": t(0), "b": t(124, "uint32")}, max_gap=200)) == [
        ("holding", 0, 1, ["a"]), ("holding", 124, 2, ["b"])]


def test_lower_device_limit_is_respected() -> None:
    tags = {f"r{i}": t(i) for i in range(25)}
    blocks = plan(tags, max_registers=10)
    assert [(b.start, b.count) for b in blocks] == [(0, 10), (10, 10), (20, 5)]


def test_string_of_250_characters_fills_one_read_alone() -> None:
    blocks = plan({"before": t(0), "text": t(1, "string", length=250), "after": t(126)})
    assert spans(blocks) == [("holding", 0, 1, ["before"]), ("holding", 1, 125, ["text"]),
                             ("holding", 126, 1, ["after"])]


def test_tag_wider_than_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="text needs 8 registers"):
        plan({"text": t(0, "string", length=16)}, max_registers=4)


@pytest.mark.parametrize("kwargs", [{"max_registers": 0}, {"max_registers": 126},
                                    {"max_gap": -1}])
def test_bad_limits_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        plan({"a": t(0)}, **kwargs)


def test_overlapping_tags_share_registers() -> None:
    # A uint32 and a uint16 on its low word, and a second tag on the very same register.
    blocks = plan({"total": t(10, "uint32"), "low": t(11), "low_again": t(11, "int16")})
    assert spans(blocks) == [("holding", 10, 2, ["total", "low", "low_again"])]
    assert {tag_id: off for tag_id, _, off in blocks[0].tags} == {
        "total": 0, "low": 1, "low_again": 1}


def test_tag_inside_a_wider_one_does_not_shrink_the_block() -> None:
    blocks = plan({"wide": t(0, "float64"), "inner": t(1)})
    assert spans(blocks) == [("holding", 0, 4, ["wide", "inner"])]


def test_tables_are_planned_separately_in_fixed_order() -> None:
    tags = {"d": t(0, "bool", DI), "c": t(0, "bool", COIL), "i": t(0, table=IR), "h": t(0)}
    assert spans(plan(tags)) == [("holding", 0, 1, ["h"]), ("input", 0, 1, ["i"]),
                                 ("coil", 0, 1, ["c"]), ("discrete", 0, 1, ["d"])]


def test_bit_tables_count_in_bits() -> None:
    # 2000 bits per read at most; gaps of max_gap * 16 bits.
    assert spans(plan({"a": t(0, "bool", COIL), "b": t(1999, "bool", COIL)}, max_gap=200)) == [
        ("coil", 0, 2000, ["a", "b"])]
    assert len(plan({"a": t(0, "bool", COIL), "b": t(2000, "bool", COIL)}, max_gap=200)) == 2
    assert len(plan({"a": t(0, "bool", DI), "b": t(129, "bool", DI)}, max_gap=8)) == 1
    assert len(plan({"a": t(0, "bool", DI), "b": t(130, "bool", DI)}, max_gap=8)) == 2
    assert spans(plan({"a": t(0, "bool", COIL), "b": t(15, "bool", COIL)}, max_registers=1)) == [
        ("coil", 0, 16, ["a", "b"])]


def test_barrier_in_a_gap_stops_bridging() -> None:
    tags = {"a": t(10), "b": t(14)}
    assert spans(plan(tags, barriers=[(H, 12, 1)])) == [
        ("holding", 10, 1, ["a"]), ("holding", 14, 1, ["b"])]


def test_barrier_elsewhere_or_on_another_table_changes_nothing() -> None:
    tags = {"a": t(10), "b": t(14)}
    for barrier in [(H, 20, 5), (H, 0, 10), (IR, 12, 1), (H, 10, 1)]:
        assert len(plan(tags, barriers=[barrier])) == 1, barrier


def test_barrier_partly_in_the_gap_stops_bridging() -> None:
    tags = {"a": t(10), "b": t(14)}
    assert len(plan(tags, barriers=[(H, 9, 3)])) == 2


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    tags = {"b": t(5), "a": t(5), "c": t(1)}
    assert plan(tags) == plan(dict(reversed(list(tags.items()))))
    assert [tag_id for tag_id, _, _ in plan(tags)[0].tags] == ["c", "a", "b"]


_TYPES = [ModbusType.UINT16, ModbusType.INT32, ModbusType.FLOAT64, ModbusType.BOOL]


@st.composite
def tag_sets(draw: st.DrawFn) -> dict[str, ModbusTag]:
    n = draw(st.integers(1, 30))
    tags = {}
    for i in range(n):
        table = draw(st.sampled_from(list(ModbusTable)))
        type_ = ModbusType.BOOL if table in (COIL, DI) else draw(st.sampled_from(_TYPES))
        if draw(st.booleans()):
            type_ = ModbusType.STRING if table in (H, IR) else type_
        extra = {"length": draw(st.integers(1, 250))} if type_ is ModbusType.STRING else {}
        tags[f"t{i}"] = t(draw(st.integers(0, 3000)), type_.value, table, **extra)
    return tags


@given(tag_sets(), st.integers(1, 125), st.integers(0, 20))
def test_every_tag_read_once_within_limits(tags: dict[str, ModbusTag], max_registers: int,
                                           max_gap: int) -> None:
    wide = [k for k, v in tags.items() if v.table in (H, IR) and v.register_count > max_registers]
    if wide:
        with pytest.raises(ValueError):
            plan(tags, max_registers=max_registers, max_gap=max_gap)
        return
    blocks = plan(tags, max_registers=max_registers, max_gap=max_gap)
    seen: list[str] = []
    for b in blocks:
        bits = b.table in (COIL, DI)
        assert b.count <= (min(2000, 16 * max_registers) if bits else max_registers)
        for tag_id, tag, offset in b.tags:
            seen.append(tag_id)
            assert tag.table is b.table
            assert tag.address == b.start + offset
            assert offset + tag.register_count <= b.count
        # The block is exactly as wide as its tags need.
        assert b.start == min(tag.address for _, tag, _ in b.tags)
        assert b.end == max(tag.address + tag.register_count for _, tag, _ in b.tags)
    assert sorted(seen) == sorted(tags)


def _config(**kw: object) -> dict[str, object]:
    return {"type": "modbus", "host": "127.0.0.1", **kw}


def test_config_refuses_tag_past_the_last_address() -> None:
    with pytest.raises(ValidationError, match="runs past the last address"):
        ModbusSourceConfig.model_validate(_config(tags={"x": {"address": 65535,
                                                              "type": "uint32"}}))
    ok = ModbusSourceConfig.model_validate(_config(tags={"x": {"address": 65534,
                                                               "type": "uint32"}}))
    assert ok.tags["x"].register_count == 2


def test_config_refuses_tag_wider_than_max_registers_per_read() -> None:
    with pytest.raises(ValidationError, match="max_registers_per_read"):
        ModbusSourceConfig.model_validate(_config(
            max_registers_per_read=4,
            tags={"text": {"address": 0, "type": "string", "length": 16}}))
