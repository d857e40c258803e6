"""``edge-agent top`` against a running agent: live under tmux (capture-pane shows the state
change without a keypress, in colour; ``q`` quits), and one plain frame through a pipe."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import ROOT, wait_until
from support.configs import modbus_agent_yaml
from support.plant import HOLDING_0, modbus_plant

from agent.runtime import Runtime
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

TMUX = shutil.which("tmux")
STATE = HOLDING_0
REASON = ModbusTag.model_validate({"table": "holding", "address": 1, "type": "uint16"})
CLI = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]


class Plant:
    def __init__(self, plc: ModbusSimulator, rt: Runtime, url: str) -> None:
        self.plc, self.rt, self.url = plc, rt, url


def _config(tmp: Path, plc_port: int, sink_url: str) -> str:
    return modbus_agent_yaml("top-edge", tmp / "agent", plc_port) + f"""\
    tags:
      m.state: {{table: holding, address: 0, type: uint16}}
      m.reason: {{table: holding, address: 1, type: uint16}}
machines:
  filler-1:
    line: l1
    state: {{tag: m.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 0s, reason_tag: m.reason, reasons: {{42: Film break}}}}
sinks:
  central: {{type: http, url: "{sink_url}", timeout: 2s}}
buffer: {{commit_interval: 10ms}}
"""


@pytest.fixture
async def plant(tmp_path: Path) -> AsyncIterator[Plant]:
    async with modbus_plant(tmp_path, lambda port, url: _config(tmp_path, port, url)) as p:
        await wait_until(lambda: p.rt.detectors["filler-1"].state.value == "running")
        yield Plant(p.plc, p.rt, f"http://127.0.0.1:{p.health_port}")


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (.ci/run does)")
async def test_top_live_under_tmux(plant: Plant, tmp_path: Path) -> None:
    assert TMUX is not None
    sock = str(tmp_path / "tmux.sock")
    tmux = [TMUX, "-S", sock]
    command = " ".join([f"PYTHONPATH={ROOT}", "TERM=xterm-256color", *(
        f"'{a}'" for a in CLI), "top", "--url", plant.url])
    code, _, err = await _run(*tmux, "new-session", "-d", "-s", "top", "-x", "150", "-y", "30",
                           command)
    assert code == 0, err

    async def pane(colour: bool = False, target: str = "top") -> str:
        _, out, _ = await _run(*tmux, "capture-pane", "-p", "-t", target,
                               *(["-e"] if colour else []))
        return out

    try:
        screen = await wait_until(lambda: _has(pane(), "filler-1", "RUNNING"), what="top")
        assert "SOURCE" in screen and "plc" in screen and "central" in screen
        # Live: the machine stops with reason 42 and the same running top shows it.
        await plant.plc.set_value(REASON, 42)
        await plant.plc.set_value(STATE, 3)
        screen = await wait_until(lambda: _has(pane(), "DOWN", "reason 42 (Film break)"),
                                  what="redraw")
        assert "unplanned" in screen
        coloured = await pane(colour=True)
        assert "\x1b[31mDOWN" in coloured  # red, as the terminal received it
        # NO_COLOR: the same view in a second window, without colour.
        await _run(*tmux, "new-window", "-d", "-t", "top", "-n", "plain",
                   f"NO_COLOR=1 {command}")
        plain = await wait_until(lambda: _has(pane(True, "top:plain"), "DOWN"), what="plain")
        assert "\x1b[3" not in plain
        await _run(*tmux, "kill-window", "-t", "top:plain")
        await _run(*tmux, "send-keys", "-t", "top", "q")
        await wait_until(lambda: _gone(tmux), what="top to quit on q")
    finally:
        await _run(*tmux, "kill-server")


async def _has(screen_coro: object, *needles: str) -> str | None:
    screen = await screen_coro  # type: ignore[misc]
    return screen if all(n in screen for n in needles) else None


async def _gone(tmux: list[str]) -> bool:
    code, _, _ = await _run(*tmux, "has-session")
    return code != 0  # the session ends when top exits


async def test_top_one_shot_through_a_pipe(plant: Plant) -> None:
    code, out, err = await _run(*CLI, "top", "--url", plant.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("edge-agent top-edge @ s1")
    assert any(line.split()[:2] == ["filler-1", "RUNNING"] for line in lines)
    assert "\x1b[" not in out  # no colour and no screen control through a pipe
    # Unreachable: exit 3 with the reason.
    code, out, err = await _run(*CLI, "top", "--url", "http://127.0.0.1:9")
    assert code == 3 and out == "" and "no agent answers" in err
