"""ModbusSource against a real Modbus TCP server (the embedded simulator) on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from support import stop_task

from config.errors import ConnectionLostError, PeerTimeoutError
from config.model import Quality, TagSample
from protocols.base import next_poll_time
from protocols.modbus import ModbusSimulator, ModbusSource
from protocols.modbus.config import ModbusSourceConfig, ModbusTable
from protocols.modbus.source import RETRY_REFUSED_EVERY

H, IR, COIL, DI = ModbusTable.HOLDING, ModbusTable.INPUT, ModbusTable.COIL, ModbusTable.DISCRETE


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class Collector:
    """A SampleSink that also notes how many requests the device had seen at each batch."""

    def __init__(self, sim: ModbusSimulator | None = None) -> None:
        self.sim = sim
        self.batches: list[list[TagSample]] = []
        self.request_marks: list[int] = []
        self.connects = 0

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.batches.append(list(samples))
        self.request_marks.append(len(self.sim.requests) if self.sim else 0)

    def connected(self) -> None:
        self.connects += 1

    def by_tag(self, batch: int = -1) -> dict[str, TagSample]:
        return {s.tag: s for s in self.batches[batch]}

    def requests_of_poll(self, n: int) -> list[tuple[ModbusTable, int, int]]:
        """Requests made by poll ``n`` (1-based)."""
        assert self.sim is not None
        start = self.request_marks[n - 2] if n > 1 else 0
        return self.sim.requests[start:self.request_marks[n - 1]]


def make_config(port: int, tags: dict[str, dict[str, Any]], **kw: Any) -> ModbusSourceConfig:
    return ModbusSourceConfig.model_validate({
        "type": "modbus", "host": "127.0.0.1", "port": port, "poll_interval": "10ms",
        "timeout": "1s", "tags": tags, **kw})


@contextlib.asynccontextmanager
async def running(source: ModbusSource, out: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(out))
    try:
        yield task
    finally:
        await stop_task(task, ConnectionLostError, PeerTimeoutError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Every numeric type in every byte order, spaced 4 registers apart in the holding table.
_VALUES: dict[str, object] = {"int16": -1234, "uint16": 54321, "int32": -123456789,
                              "uint32": 3456789012, "int64": -1234567890123456789,
                              "uint64": 12345678901234567890, "float32": -3.75,
                              "float64": 6.02214076e23}


def all_types_tags() -> tuple[dict[str, dict[str, Any]], dict[str, object]]:
    tags: dict[str, dict[str, Any]] = {}
    expected: dict[str, object] = {}
    address = 0
    for type_, value in _VALUES.items():
        for order in ("ABCD", "BADC", "CDAB", "DCBA"):
            tag_id = f"{type_}.{order}"
            tags[tag_id] = {"address": address, "type": type_, "byte_order": order}
            expected[tag_id] = value
            address += 4
    for order in ("ABCD", "BADC"):
        tags[f"text.{order}"] = {"address": address, "type": "string", "length": 7,
                                 "byte_order": order}
        expected[f"text.{order}"] = "Order42"
        address += 4
    tags["flag"] = {"address": address, "type": "bool"}
    expected["flag"] = True
    tags["scaled"] = {"address": address + 1, "type": "int16", "scale": 0.1, "offset": 20}
    expected["scaled"] = pytest.approx(7.5)  # raw -125
    tags["input.int32"] = {"table": "input", "address": 7, "type": "int32"}
    expected["input.int32"] = -7
    tags["coil"] = {"table": "coil", "address": 33, "type": "bool"}
    expected["coil"] = True
    tags["discrete"] = {"table": "discrete", "address": 250, "type": "bool"}
    expected["discrete"] = True
    return tags, expected


async def test_every_type_and_byte_order_through_a_real_server(
        modbus_sim: ModbusSimulator) -> None:
    tags, expected = all_types_tags()
    cfg = make_config(modbus_sim.port, tags)
    for tag_id, tag in cfg.tags.items():
        if tag_id != "scaled":
            await modbus_sim.set_value(tag, expected[tag_id])
    await modbus_sim.set_registers(H, cfg.tags["scaled"].address, [-125 & 0xFFFF])
    # Registers written by hand (not by our encoder) for one type in every order.
    for order, regs in {"ABCD": [0xC070, 0], "BADC": [0x70C0, 0], "CDAB": [0, 0xC070],
                        "DCBA": [0, 0x70C0]}.items():
        await modbus_sim.set_registers(H, cfg.tags[f"float32.{order}"].address, regs)

    out = Collector(modbus_sim)
    source = ModbusSource("press", cfg)
    async with running(source, out):
        await wait_until(lambda: len(out.batches) >= 2)
    assert out.connects == 1
    got = out.by_tag(0)
    assert set(got) == set(tags)
    for tag_id, value in expected.items():
        sample = got[tag_id]
        assert sample.quality is Quality.GOOD, (tag_id, sample.detail)
        assert sample.value == value, tag_id
        assert sample.source_time is None  # Modbus has no source time
    assert type(got["uint16.ABCD"].value) is int
    assert got["float32.CDAB"].value == -3.75


async def test_adjacent_tags_share_requests(modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {
        "a": {"address": 0}, "b": {"address": 1, "type": "uint32"},
        "c": {"address": 5, "type": "float32"}, "far": {"address": 200},
        "c1": {"table": "coil", "address": 3, "type": "bool"},
        "c2": {"table": "coil", "address": 40, "type": "bool"}})
    source = ModbusSource("press", cfg)
    out = Collector(modbus_sim)
    async with running(source, out):
        await wait_until(lambda: len(out.batches) >= 3)
    for poll in (1, 2, 3):
        assert out.requests_of_poll(poll) == [(H, 0, 7), (H, 200, 1), (COIL, 3, 38)]
    assert all(s.good for s in out.by_tag(0).values())


async def test_refused_register_makes_only_that_tag_bad(modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {
        "a": {"address": 4}, "broken": {"address": 5}, "c": {"address": 6},
        "coil": {"table": "coil", "address": 1, "type": "bool"}})
    await modbus_sim.set_registers(H, 4, [11, 22, 33])
    modbus_sim.fail(H, 5)
    source = ModbusSource("press", cfg)
    out = Collector(modbus_sim)
    async with running(source, out):
        await wait_until(lambda: len(out.batches) >= RETRY_REFUSED_EVERY + 1)
        first = out.by_tag(0)
        assert first["a"].good and first["a"].value == 11
        assert first["c"].good and first["c"].value == 33
        assert first["coil"].good
        bad = first["broken"]
        assert bad.quality is Quality.BAD and bad.value is None
        assert bad.detail is not None
        for words in ("broken", "holding register 5", "illegal data address", "exception 2"):
            assert words in bad.detail
        # Poll 1 split the refused block; later polls go round the refused register and
        # only the periodic re-try asks for it again.
        assert out.requests_of_poll(1) == [(H, 4, 3), (H, 4, 1), (H, 5, 1), (H, 6, 1),
                                           (COIL, 1, 1)]
        for poll in range(2, RETRY_REFUSED_EVERY):
            assert out.requests_of_poll(poll) == [(H, 4, 1), (H, 6, 1), (COIL, 1, 1)], poll
            assert out.by_tag(poll - 1)["broken"].quality is Quality.BAD
        assert out.requests_of_poll(RETRY_REFUSED_EVERY) == [
            (H, 5, 1), (H, 4, 1), (H, 6, 1), (COIL, 1, 1)]

        # The device accepts the register again: the tag recovers at a re-try and rejoins
        # the coalesced read.
        modbus_sim.clear_failures()
        await wait_until(lambda: out.by_tag()["broken"].good)
        assert out.by_tag()["broken"].value == 22
        recovered_at = len(out.batches)
        await wait_until(lambda: len(out.batches) >= recovered_at + 1)
        assert out.requests_of_poll(recovered_at + 1) == [(H, 4, 3), (COIL, 1, 1)]


async def test_refused_gap_between_good_tags_is_not_read_again(
        modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {"a": {"address": 10}, "b": {"address": 14}})
    modbus_sim.fail(H, 12)
    out = Collector(modbus_sim)
    async with running(ModbusSource("press", cfg), out):
        await wait_until(lambda: len(out.batches) >= 3)
    assert all(s.good for s in out.by_tag(0).values())
    assert out.requests_of_poll(1) == [(H, 10, 5), (H, 10, 1), (H, 14, 1)]
    assert out.requests_of_poll(2) == [(H, 10, 1), (H, 14, 1)]
    assert out.requests_of_poll(3) == [(H, 10, 1), (H, 14, 1)]


async def test_addresses_outside_the_device_map(modbus_sim: ModbusSimulator) -> None:
    # The simulator has 300 addresses per table; 299 + 2 registers runs off the end.
    cfg = make_config(modbus_sim.port, {
        "last": {"address": 298}, "off_end": {"address": 299, "type": "uint32"},
        "coil_ok": {"table": "coil", "address": 299, "type": "bool"},
        "coil_gone": {"table": "coil", "address": 320, "type": "bool"},
        "input_gone": {"table": "input", "address": 1000}})
    samples = {s.tag: s for s in await ModbusSource("press", cfg).probe()}
    assert samples["last"].good and samples["coil_ok"].good
    for tag_id, unit in (("off_end", "holding register 299 (2 registers)"),
                         ("coil_gone", "coil 320"), ("input_gone", "input register 1000")):
        assert samples[tag_id].quality is Quality.BAD
        assert unit in (samples[tag_id].detail or ""), samples[tag_id].detail
        assert "illegal data address" in (samples[tag_id].detail or "")


async def test_undecodable_value_is_bad_only_while_it_lasts(modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {
        "speed": {"address": 0, "type": "float32"}, "order": {"address": 2, "type": "string",
                                                              "length": 4},
        "state": {"address": 4}})
    await modbus_sim.set_registers(H, 0, [0x7FC0, 0, 0x41C3, 0xA900, 3])  # NaN, "A\xc3\xa9"
    out = Collector(modbus_sim)
    source = ModbusSource("press", cfg)
    async with running(source, out):
        await wait_until(lambda: len(out.batches) >= 1)
        got = out.by_tag(0)
        assert got["state"].good and got["state"].value == 3
        assert got["speed"].quality is Quality.BAD and "float32" in (got["speed"].detail or "")
        assert got["order"].quality is Quality.BAD
        assert "printable ASCII" in (got["order"].detail or "")
        await modbus_sim.set_registers(H, 0, [0x4148, 0, 0x4F4B, 0])
        await wait_until(lambda: out.by_tag()["speed"].good and out.by_tag()["order"].good)
        assert out.by_tag()["speed"].value == 12.5
        assert out.by_tag()["order"].value == "OK"
    # A decode error is not a refusal: the tags stayed in the coalesced read.
    assert len(source.read_plan) == 1


async def test_server_stop_ends_the_session_and_a_restart_allows_a_new_one(
        modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {"state": {"address": 3}})
    await modbus_sim.set_registers(H, 3, [7])
    source = ModbusSource("press", cfg)
    out = Collector()
    task = asyncio.create_task(source.run(out))
    await wait_until(lambda: len(out.batches) >= 2)
    port = modbus_sim.port
    await modbus_sim.stop()
    # The bound is a guard against a hang, generous next to the 1 s request timeout.
    with pytest.raises((ConnectionLostError, PeerTimeoutError)):
        await asyncio.wait_for(task, timeout=10)
    assert out.connects == 1

    assert await modbus_sim.start() == port
    again = Collector()
    async with running(source, again) as second:
        await wait_until(lambda: len(again.batches) >= 1)
        assert not second.done()
    assert again.connects == 1
    assert again.by_tag(0)["state"].value == 7  # the device kept its registers


async def test_unreachable_device() -> None:
    cfg = make_config(free_port(), {"state": {"address": 0}})
    source = ModbusSource("press", cfg)
    out = Collector()
    with pytest.raises(ConnectionLostError):
        await asyncio.wait_for(source.run(out), timeout=10)
    assert out.connects == 0 and out.batches == []
    with pytest.raises(ConnectionLostError):
        await asyncio.wait_for(source.probe(), timeout=10)


@contextlib.asynccontextmanager
async def tcp_peer(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
                   ) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_silent_device_ends_the_session_with_a_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads requests until the client goes away, answers nothing
        writer.close()

    async with tcp_peer(never_answer) as port:
        source = ModbusSource("press", make_config(port, {"state": {"address": 0}},
                                                   timeout="200ms"))
        out = Collector()
        with pytest.raises(PeerTimeoutError, match=r"did not answer within 0\.2s"):
            await asyncio.wait_for(source.run(out), timeout=10)
        assert out.connects == 0
        with pytest.raises(PeerTimeoutError):
            await asyncio.wait_for(source.probe(), timeout=10)


async def test_drop_during_a_request_ends_the_session_without_waiting_for_the_timeout() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(12)  # one Modbus TCP read request
        writer.close()

    async with tcp_peer(hang_up) as port:
        # A 30 s request timeout: only noticing the drop can end this within the bound.
        source = ModbusSource("press", make_config(port, {"state": {"address": 0}},
                                                   timeout="30s"))
        with pytest.raises(ConnectionLostError, match="closed the connection"):
            await asyncio.wait_for(source.run(Collector()), timeout=10)


async def test_probe_reads_every_tag_once_and_leaves_the_source_untouched(
        modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {"a": {"address": 0}, "gone": {"address": 299,
                                                                       "type": "uint32"},
                                        "b": {"address": 1, "type": "int32"}})
    await modbus_sim.set_value(cfg.tags["b"], -5)
    source = ModbusSource("press", cfg)
    plan_before = source.read_plan
    samples = await source.probe()
    assert [s.tag for s in samples] == ["a", "gone", "b"]
    assert {s.tag: s.value for s in samples if s.good} == {"a": 0, "b": -5}
    assert source.read_plan == plan_before
    assert modbus_sim.requests == [(H, 0, 3), (H, 299, 2)]


async def test_cancelled_session_closes_its_connection(modbus_sim: ModbusSimulator) -> None:
    closed = asyncio.Event()

    async def count_and_forward(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        # A loopback relay in front of the simulator that notices the client hanging up.
        up_r, up_w = await asyncio.open_connection("127.0.0.1", modbus_sim.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(1024):
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)
        closed.set()

    async with tcp_peer(count_and_forward) as port:
        out = Collector()
        task = asyncio.create_task(ModbusSource("press", make_config(
            port, {"a": {"address": 0}})).run(out))
        await wait_until(lambda: len(out.batches) >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(closed.wait(), timeout=10)


async def test_busy_device_makes_the_block_bad_for_that_poll_only(
        modbus_sim: ModbusSimulator) -> None:
    cfg = make_config(modbus_sim.port, {"a": {"address": 4}, "b": {"address": 5},
                                        "c": {"address": 6}})
    modbus_sim.fail(H, 5, code=6)  # server device busy: says nothing about the address map
    source = ModbusSource("press", cfg)
    out = Collector(modbus_sim)
    async with running(source, out):
        await wait_until(lambda: len(out.batches) >= 2)
        for sample in out.by_tag(0).values():
            assert sample.quality is Quality.BAD
            assert "server device busy (Modbus exception 6)" in (sample.detail or "")
        assert out.requests_of_poll(1) == [(H, 4, 3)]  # not split
        assert out.requests_of_poll(2) == [(H, 4, 3)]
        modbus_sim.clear_failures()
        await wait_until(lambda: all(s.good for s in out.by_tag().values()))
    assert len(source.read_plan) == 1


@pytest.mark.parametrize(("last", "now", "expected"), [
    (10.0, 10.2, 11.0),   # on time: next grid point
    (10.0, 11.0, 11.0),   # exactly at the next tick: poll now
    (10.0, 11.5, 12.0),   # overran by half a tick: skip to the next grid point
    (10.0, 13.2, 14.0),   # overran by several ticks: no burst, stay on the grid
    (10.0, 9.0, 11.0),
])
def test_poll_schedule_is_drift_free_and_skips_missed_ticks(last: float, now: float,
                                                            expected: float) -> None:
    assert next_poll_time(last, now, 1.0) == pytest.approx(expected)


async def test_simulator_bit_failures_are_exact_and_restart_keeps_values() -> None:
    sim = ModbusSimulator(size=64)
    with pytest.raises(RuntimeError, match="not running"):
        await sim.set_registers(COIL, 0, [1])
    port = await sim.start()
    try:
        assert await sim.start() == port  # already running: same port, no second listener
        with pytest.raises(ValueError, match="outside"):
            await sim.set_registers(H, 60, [1, 2, 3, 4, 5])
        await sim.set_registers(DI, 20, [1, 0, 1])
        await sim.set_registers(IR, 63, [0xBEEF])
        sim.fail(COIL, 20)
        cfg = make_config(port, {
            "c19": {"table": "coil", "address": 19, "type": "bool"},
            "c20": {"table": "coil", "address": 20, "type": "bool"},
            "c21": {"table": "coil", "address": 21, "type": "bool"},
            "d22": {"table": "discrete", "address": 22, "type": "bool"},
            "i63": {"table": "input", "address": 63}}, max_gap=0)
        samples = {s.tag: s for s in await ModbusSource("press", cfg).probe()}
        # Coil 20 is refused, coils 19 and 21 right beside it are not.
        assert samples["c19"].good and samples["c21"].good
        assert samples["c20"].quality is Quality.BAD
        assert "coil 20" in (samples["c20"].detail or "")
        assert sim.requests == [(IR, 63, 1), (COIL, 19, 3), (COIL, 19, 1), (COIL, 20, 1),
                                (COIL, 21, 1), (DI, 22, 1)]
        assert samples["d22"].value is True and samples["i63"].value == 0xBEEF
        await sim.stop()
        await sim.stop()  # idempotent
        assert not sim.running
        assert await sim.start() == port
        assert await sim.get_registers(DI, 20, 3) == [1, 0, 1]
        assert await sim.get_registers(IR, 63, 1) == [0xBEEF]
    finally:
        await sim.stop()


async def test_drop_between_polls_ends_the_session_before_the_next_poll(
        modbus_sim: ModbusSimulator) -> None:
    # A 30 s poll interval: only noticing the drop while idle can end this within the bound.
    cfg = make_config(modbus_sim.port, {"state": {"address": 0}}, poll_interval="30s")
    out = Collector()
    task = asyncio.create_task(ModbusSource("press", cfg).run(out))
    await wait_until(lambda: len(out.batches) == 1)
    await modbus_sim.stop()
    with pytest.raises(ConnectionLostError, match="closed the connection"):
        await asyncio.wait_for(task, timeout=10)
    assert len(out.batches) == 1
