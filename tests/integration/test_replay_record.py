"""``edge-agent record`` against a real Modbus device, then ``edge-agent replay`` on the file.

The recorder runs as a real subprocess polling the embedded simulator over loopback; the test
changes registers while it records and synchronises on the simulator's request log (a poll
served after a change has read the new value), never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from agent.cli import main as cli_main
from agent.replay import read_samples
from config.model import parse_time
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

ROOT = Path(__file__).resolve().parents[2]
ST = ModbusTag.model_validate({"address": 0, "type": "uint16"})
RSN = ModbusTag.model_validate({"address": 1, "type": "uint16"})


def _config(path: Path, port: int) -> Path:
    path.write_text(f"""
agent: {{id: rec-edge, site: plant-r, data_dir: "{path.parent / 'data'}"}}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    port: {port}
    poll_interval: 50ms
    timeout: 500ms
    stale_after: 5s
    backoff: {{initial: 50ms, max: 200ms}}
    tags:
      m.state: {{address: 0, type: uint16}}
      m.reason: {{address: 1, type: uint16}}
machines:
  m1:
    line: l1
    state: {{tag: m.state, map: {{1: running, 3: down}}}}
    downtime: {{reason_tag: m.reason, reasons: {{5: Jam}}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:9/events"}}
""", encoding="utf-8")
    return path


async def _cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _polls_after(sim: ModbusSimulator, n: int = 2) -> None:
    """Wait until the device has served ``n`` more polls (so the recorder saw the change)."""
    start = len(sim.requests)
    await wait_until(lambda: len(sim.requests) >= start + n, timeout=10, what=f"{n} polls")


async def test_record_then_replay_gives_the_downtime_caused(
        tmp_path: Path, modbus_sim: ModbusSimulator) -> None:
    cfg = _config(tmp_path / "config.yaml", modbus_sim.port)
    out = tmp_path / "shift.jsonl"
    await modbus_sim.set_value(ST, 1)
    rec = await _cli("record", "--config", str(cfg), "--out", str(out), "--duration", "2")
    await _polls_after(modbus_sim, 3)  # recording, machine running
    await modbus_sim.set_value(ST, 3)  # stop
    await _polls_after(modbus_sim)
    await modbus_sim.set_value(RSN, 5)  # the operator enters the reason after the stop
    await _polls_after(modbus_sim)
    await modbus_sim.set_value(ST, 1)  # running again
    await _polls_after(modbus_sim)
    _, err = await asyncio.wait_for(rec.communicate(), timeout=30)
    assert rec.returncode == 0, err.decode()
    assert b"recorded" in err

    samples = list(read_samples(out))
    states = [(s.time, s.value) for s in samples if s.tag == "m.state" and s.good]
    assert {"m.state", "m.reason"} <= {s.tag for s in samples}
    first_down = next(t for t, v in states if v == 3)
    back_up = next(t for t, v in states if v == 1 and t > first_down)

    rep = await _cli("replay", "--config", str(cfg), "--samples", str(out))
    stdout, err = await asyncio.wait_for(rep.communicate(), timeout=30)
    assert rep.returncode == 0, err.decode()
    events: list[dict[str, Any]] = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [e["type"] for e in events] == ["plantedge.downtime.started",
                                           "plantedge.downtime.ended"]
    started, ended = events
    assert parse_time(started["time"]) == first_down
    assert parse_time(ended["data"]["ended_at"]) == back_up
    assert started["data"]["episode_id"] == ended["data"]["episode_id"]
    assert ended["data"]["reason_code"] == "5" and ended["data"]["reason"] == "Jam"
    assert ended["data"]["duration_seconds"] == round((back_up - first_down).total_seconds(), 3)
    assert started["source"] == "/sites/plant-r/lines/l1/machines/m1"


_BAD_FILES = [
    (['{"tag": "m.state", "value": 1, "time": "2026-11-28T08:00:00Z"}', "{not json"], 2, ""),
    (['{"tag": "m.state", "value": 1, "time": "2026-11-28T08:00:00Z"}', "",
      '{"tag": "m.state", "value": 3}'], 3, "time"),
    (['{"tag": "m.state", "value": 1, "time": "yesterday"}'], 1, ""),
    (['{"tag": "m.state", "value": 1, "time": "2026-11-28T08:00:00Z", "quality": "meh"}'],
     1, "meh"),
    (['["m.state", 1]'], 1, "object"),
    (['{"tag": "m.state", "value": [1], "time": "2026-11-28T08:00:00Z"}'], 1, "value"),
]


@pytest.mark.parametrize(("lines", "bad_line", "why"), _BAD_FILES)
def test_malformed_samples_file_exits_2_naming_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[str], bad_line: int,
        why: str) -> None:
    # In-process through the CLI's own main(); the subprocess test below covers the exit.
    cfg = _config(tmp_path / "config.yaml", 1502)  # replay never connects
    samples = tmp_path / "bad.jsonl"
    samples.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = cli_main(["replay", "--config", str(cfg), "--samples", str(samples)])
    message = capsys.readouterr().err
    assert code == 2, message
    assert f"{samples}:{bad_line}:" in message and why in message


async def test_malformed_samples_file_subprocess(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "config.yaml", 1502)
    samples = tmp_path / "bad.jsonl"
    samples.write_text('{"tag": "m.state", "value": 1, "time": "2026-11-28T08:00:00Z"}\n'
                       '{"tag": "m.state", "value": 3, "time": "2026-11-28T08:00:0',
                       encoding="utf-8")
    rep = await _cli("replay", "--config", str(cfg), "--samples", str(samples))
    _, err = await asyncio.wait_for(rep.communicate(), timeout=30)
    message = err.decode()
    assert rep.returncode == 2, message
    assert f"{samples}:2:" in message and "Traceback" not in message


def test_missing_samples_file_exits_2(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path / "config.yaml", 1502)
    code = cli_main(["replay", "--config", str(cfg), "--samples", str(tmp_path / "none.jsonl")])
    assert code == 2 and "none.jsonl" in capsys.readouterr().err
