"""The status page at ``/`` in a real headless Chromium: a running agent (Modbus simulator ->
runtime -> receiver), two machines in different states, one past downtime episode; the
rendered DOM shows each machine's state and the episode, and a screenshot is kept."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import httpx
import pytest
from support import ROOT, wait_until
from support.configs import modbus_agent_yaml
from support.plant import HOLDING_0, modbus_plant

from agent.status_page import render_page
from protocols.modbus.config import ModbusTag

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
M1 = HOLDING_0
M2 = ModbusTag.model_validate({"table": "holding", "address": 1, "type": "uint16"})
R2 = ModbusTag.model_validate({"table": "holding", "address": 2, "type": "uint16"})


def _config(tmp: Path, plc_port: int, sink_url: str) -> str:
    return modbus_agent_yaml("page-edge", tmp / "agent", plc_port) + f"""\
    tags:
      m1.state: {{table: holding, address: 0, type: uint16}}
      m2.state: {{table: holding, address: 1, type: uint16}}
      m2.reason: {{table: holding, address: 2, type: uint16}}
machines:
  filler-1:
    line: l1
    state: {{tag: m1.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 0s}}
  press-2:
    line: l1
    state: {{tag: m2.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 0s, reason_tag: m2.reason, reasons: {{17: Die change}}}}
sinks:
  central: {{type: http, url: "{sink_url}", timeout: 2s}}
buffer: {{commit_interval: 10ms}}
"""


async def _chromium(*args: str) -> bytes:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-dev-shm-usage", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run does)")
async def test_status_page_in_chromium(tmp_path: Path) -> None:
    async with modbus_plant(tmp_path, lambda port, url: _config(tmp_path, port, url),
                            initial=((M1, 1), (M2, 1))) as p:
        plc, rt, url = p.plc, p.rt, f"http://127.0.0.1:{p.health_port}/"
        await wait_until(lambda: rt.detectors["filler-1"].state.value == "running")
        # filler-1: one closed episode (down, then running again); press-2: down now, reason 17.
        await plc.set_value(M1, 3)
        await wait_until(lambda: rt.detectors["filler-1"].state.value == "down")
        await plc.set_value(M1, 1)
        await wait_until(lambda: rt.history.recent("filler-1", rt.detectors["filler-1"]
                                                    .state_since) != [], what="episode")
        await plc.set_value(R2, 17)
        await plc.set_value(M2, 3)
        await wait_until(lambda: (rt.detectors["press-2"].episode or 0) and
                         rt.detectors["press-2"].episode.reason_code == "17", what="reason")

        async with httpx.AsyncClient() as http:
            policy = (await http.get(url)).headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "script-src" not in policy

        profile = tmp_path / "chromium-profile"
        dom = (await _chromium(f"--user-data-dir={profile}", "--dump-dom", url)).decode()
        tiles = dict(re.findall(r'<section class="tile \w+" data-machine="([^"]+)" '
                                r'data-state="(\w+)"', dom))
        assert tiles == {"filler-1": "running", "press-2": "down"}
        assert re.search(r'data-machine="press-2".*?reason 17 \(Die change\)', dom, re.S)
        rows = dict(re.findall(r'class="row" data-machine="([^"]+)" data-episodes="(\d+)"', dom))
        assert rows == {"filler-1": "1", "press-2": "1"}  # one closed, one open
        assert '<tr data-source="plc">' in dom and '<tr data-sink="central">' in dom
        assert "<script" not in dom and "http-equiv=\"refresh\"" in dom
        assert not re.search(r'(src|href)="https?://', dom)  # no external assets

        shot = tmp_path / "status-page.png"
        await _chromium(f"--user-data-dir={profile}", "--window-size=1280,900",
                        "--hide-scrollbars", f"--screenshot={shot}", url)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        # Kept as a test artifact where CI can collect it (build/ is not versioned).
        kept = ROOT / "build" / "test-artifacts" / "status-page.png"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, kept)
        print(f"status page screenshot: {kept}")


def test_page_escapes_values_and_draws_open_downtime() -> None:
    doc = {"agent_id": "<a&b>", "site": "s", "ready": False, "time": "2026-01-01T12:00:00Z",
           "readiness_reasons": ["sink x is held: <401>"],
           "machines": {"m<1>": {"state": "down", "since": "2026-01-01T11:00:00Z",
                                 "open_downtime": {"category": "unplanned",
                                                   "started_at": "2026-01-01T11:00:00Z",
                                                   "reason_code": "<r>",
                                                   "reason": "Bottle <jam>"},
                                 "recent_downtime": [
                                     {"category": "planned", "started_at": "2026-01-01T01:00:00Z",
                                      "ended_at": "2026-01-01T02:00:00Z"},  # before the shift
                                     {"category": "idle", "started_at": "2026-01-01T08:00:00Z",
                                      "ended_at": "2026-01-01T08:30:00Z"}]}}}
    page = render_page(doc)
    assert "<a&b>" not in page and "&lt;a&amp;b&gt;" in page
    assert 'data-machine="m&lt;1&gt;" data-state="down"' in page
    assert 'data-episodes="2"' in page  # the idle one and the open one; the 01:00 one is older
    assert "for 60m" in page and "NOT READY" in page and "last 8 hours (UTC)" in page
    assert "reason &lt;r&gt; (Bottle &lt;jam&gt;)" in page  # the reason's name beside its code
