"""History backfill against a server whose history ignores the requested bounds and repeats
timestamps (an asyncua server with such a history storage, in process): what is fed to
detection is the same as from a well-behaved server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from asyncua import Server, ua
from asyncua.server.history import HistoryStorageInterface
from support import free_port

from config.model import parse_time, utcnow
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.history import BackfillReport, backfill
from protocols.opcua.session import Session

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOW = utcnow().replace(microsecond=0)
RESUME = NOW - timedelta(minutes=10)


def at(seconds: float, value: int) -> ua.DataValue:
    t = RESUME + timedelta(seconds=seconds)
    return ua.DataValue(ua.Variant(value, ua.VariantType.Int32), SourceTimestamp=t,
                        ServerTimestamp=t)


# Long before the gap (and the margin), just before it, then the gap with repeated times.
HISTORY = [at(-3600, 3), at(-30, 1), at(-20, 3), at(-5, 1), at(5, 3), at(5, 3), at(10, 1),
           at(10, 3), at(20, 1)]


# A node whose history honours the bounds; its last value came after the backfill began
# (or the server's clock is ahead of the agent's).
LATE = [at(-5, 1), at(5, 3)]


class IgnoresBounds(HistoryStorageInterface):  # type: ignore[misc]
    """Every stored value of node State for every request, whatever the bounds and counts
    asked for; node Honest's values within the bounds."""

    async def read_node_history(self, node_id: ua.NodeId, start: datetime | None,
                                end: datetime | None, nb_values: int
                                ) -> tuple[list[ua.DataValue], datetime | None]:
        if node_id.Identifier == "Honest":
            assert start is not None and end is not None
            return [dv for dv in LATE if start <= dv.SourceTimestamp <= end], None
        return list(HISTORY), None

    async def new_historized_node(self, *args: Any, **kw: Any) -> None:
        pass

    async def save_node_value(self, *args: Any, **kw: Any) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[str]:
    srv = Server()
    await srv.init()
    port = free_port()
    srv.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    srv.iserver.history_manager.set_storage(IgnoresBounds())
    idx = await srv.register_namespace("urn:test:hostile-history")
    var = await srv.nodes.objects.add_variable(ua.NodeId("State", idx), "State",
                                               ua.Variant(1, ua.VariantType.Int32))
    honest = await srv.nodes.objects.add_variable(ua.NodeId("Honest", idx), "Honest",
                                                  ua.Variant(1, ua.VariantType.Int32))
    for node in (var, honest):
        await node.write_attribute(ua.AttributeIds.Historizing,
                                   ua.DataValue(ua.Variant(True, ua.VariantType.Boolean)))
    await srv.start()
    try:
        yield f"opc.tcp://127.0.0.1:{port}"
    finally:
        await srv.stop()


async def test_values_outside_the_bounds_and_repeated_times(server: str) -> None:
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": server, "history": {"margin": "10s"},
        "tags": {"st": {"node": "nsu=urn:test:hostile-history;s=State", "type": "int"}}})
    assert cfg.history is not None
    report = BackfillReport()
    async with Session("t", cfg) as session:
        node = ua.NodeId("State", session.namespaces.index("urn:test:hostile-history"))
        batches = await backfill(session, cfg.history, {"st": (node, "State")},
                                 lambda _t: RESUME, {"st": None}, report)
    fed = [(s.time - RESUME, s.value) for b in batches for s in b]
    # The state at the gap's start (the last value at or before it), then the gap in order;
    # values of one instant stay in the server's order, in one batch.
    assert fed == [(timedelta(seconds=-5), 1), (timedelta(seconds=5), 3),
                   (timedelta(seconds=5), 3), (timedelta(seconds=10), 1),
                   (timedelta(seconds=10), 3), (timedelta(seconds=20), 1)]
    assert [len(b) for b in batches] == [1, 2, 2, 1]
    assert report.tags["st"]["values"] == 6 and report.tags["st"]["truncated"] is False


async def test_max_values_holds_when_the_server_ignores_the_count(server: str) -> None:
    """The server sends all nine values in one answer to a request for at most four: no more
    than max_values are taken, and the read says it was truncated."""
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": server,
        "history": {"margin": "10s", "max_values": 4},
        "tags": {"st": {"node": "nsu=urn:test:hostile-history;s=State", "type": "int"}}})
    assert cfg.history is not None
    report = BackfillReport()
    async with Session("t", cfg) as session:
        node = ua.NodeId("State", session.namespaces.index("urn:test:hostile-history"))
        batches = await backfill(session, cfg.history, {"st": (node, "State")},
                                 lambda _t: RESUME, {"st": None}, report)
    # The oldest four, of which only the state at the gap's start is fed.
    assert [(s.time - RESUME, s.value) for b in batches for s in b] == [
        (timedelta(seconds=-5), 1)]
    assert report.tags["st"]["truncated"] is True


async def test_max_span_caps_how_far_back_the_backfill_goes(server: str) -> None:
    """Detection lacks ten minutes, max_span allows one: only the last minute is replayed,
    starting from the state at its beginning, and /status says the span was capped."""
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": server, "history": {"margin": "10s", "max_span": "1m"},
        "tags": {"st": {"node": "nsu=urn:test:hostile-history;s=State", "type": "int"}}})
    assert cfg.history is not None
    report = BackfillReport()
    async with Session("t", cfg) as session:
        node = ua.NodeId("State", session.namespaces.index("urn:test:hostile-history"))
        batches = await backfill(session, cfg.history, {"st": (node, "State")},
                                 lambda _t: RESUME, {"st": None}, report)
    assert [(s.time - RESUME, s.value) for b in batches for s in b] == [
        (timedelta(seconds=20), 1)]
    note = report.tags["st"]
    assert note["span_capped"] is True and parse_time(note["from"]) > RESUME
    assert report.as_dict()["last_tags"]["st"]["span_capped"] is True


async def test_values_stamped_after_the_backfill_began_are_read(server: str) -> None:
    """A change between the start of the backfill and the first live read would otherwise be
    in neither (a whole short stop lost); the same for values of a server whose clock is
    ahead. The read reaches ``margin`` past the agent's now."""
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": server, "history": {"margin": "10s"},
        "tags": {"st": {"node": "nsu=urn:test:hostile-history;s=Honest", "type": "int"}}})
    assert cfg.history is not None
    LATE[-1] = ua.DataValue(ua.Variant(3, ua.VariantType.Int32),
                            SourceTimestamp=utcnow() + timedelta(seconds=5))
    report = BackfillReport()
    async with Session("t", cfg) as session:
        node = ua.NodeId("Honest", session.namespaces.index("urn:test:hostile-history"))
        batches = await backfill(session, cfg.history, {"st": (node, "Honest")},
                                 lambda _t: RESUME, {"st": None}, report)
    assert [s.value for b in batches for s in b] == [1, 3]
