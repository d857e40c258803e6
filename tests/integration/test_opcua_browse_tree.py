"""``edge-agent browse`` prints a true tree: every node directly followed by its own children
(nodes are fetched level by level, printed depth first)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from asyncua import Server, ua
from support import free_port

from agent.cli import main

NS = "urn:plant-edge-agent:browse-tree"


@pytest_asyncio.fixture
async def endpoint() -> AsyncIterator[str]:
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    server = Server()
    await server.init()
    url = f"opc.tcp://127.0.0.1:{free_port()}"
    server.set_endpoint(url)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(NS)
    plant = await server.nodes.objects.add_folder(ua.NodeId("Plant", idx), "Plant")
    # Two lines with machines and variables: a level-by-level listing would put both lines
    # first, then all machines, so Oven would appear under Press.
    line1 = await plant.add_object(ua.NodeId("L1", idx), "Line1")
    filler = await line1.add_object(ua.NodeId("L1.Filler", idx), "Filler")
    await filler.add_variable(ua.NodeId("L1.Filler.State", idx), "State", 1)
    await filler.add_variable(ua.NodeId("L1.Filler.Speed", idx), "Speed", 1.5)
    press = await line1.add_object(ua.NodeId("L1.Press", idx), "Press")
    await press.add_variable(ua.NodeId("L1.Press.State", idx), "State", 3)
    line2 = await plant.add_object(ua.NodeId("L2", idx), "Line2")
    oven = await line2.add_object(ua.NodeId("L2.Oven", idx), "Oven")
    await oven.add_variable(ua.NodeId("L2.Oven.Temp", idx), "Temp", 180.0)
    await server.start()
    try:
        yield url
    finally:
        await server.stop()


async def test_browse_prints_children_under_their_parent(
        endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(main, ["browse", "--endpoint", endpoint, "--node",
                                          f"nsu={NS};s=Plant", "--depth", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    header, *lines = out.splitlines()
    width = header.index("CLASS")
    rows = [line[:width].rstrip() for line in lines if line.strip()]
    assert rows == [
        "Line1",
        "  Filler",
        "    State",
        "    Speed",
        "  Press",
        "    State",
        "Line2",
        "  Oven",
        "    Temp",
    ]
    assert f"nsu={NS};s=L2.Oven.Temp" in out.splitlines()[-1]
