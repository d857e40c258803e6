"""Secrets never show: an agent process logging JSON at debug level whose central API answers
401 with our own token echoed in the body (a real-world leak path: the body becomes the sink's
held reason in the log, /readyz and /status). Every log line is JSON; the token is nowhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from support import free_port, wait_until

from agent.receiver import Receiver
from config.redaction import add_secret_values, redact
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-SECRET-7f3a9c1e"
STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})


def test_redact_masks_registered_values_only() -> None:
    add_secret_values(["redact-me-0451", None, "abc"])  # too short to register: "abc"
    assert redact("x redact-me-0451 y abc") == "x *** y abc"


def spawn(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "--log-level", "debug", "--log-format", "json",
             "run", "--config", str(cfg)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=dict(os.environ, ERP_TOKEN=TOKEN))


@pytest.mark.slow
async def test_token_echoed_by_the_api_is_redacted_in_logs_and_health(tmp_path: Path) -> None:
    plc = ModbusSimulator(size=8)
    await plc.start()
    await plc.set_value(STATE, 1)
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    rx.inject(401, count=10**6, body=json.dumps(
        {"error": "invalid_token", "detail": f"token {TOKEN} was revoked"}))
    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
agent: {{id: redact-edge, site: s1, data_dir: "{tmp_path / 'agent'}", stop_timeout: 2s}}
health: {{listen: "127.0.0.1:{port}"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {plc.port}, poll_interval: 50ms,
         tags: {{m.state: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: m.state, map: {{1: running, 3: down}}}},
        downtime: {{min_duration: 0s}}}}
sinks:
  central: {{type: http, url: "{rx.url}", auth: {{bearer_token: "${{env:ERP_TOKEN}}"}},
             retry: {{initial_backoff: 50ms, max_backoff: 200ms}}}}
""")
    log = tmp_path / "agent.log"
    proc = spawn(cfg, log)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            async def held() -> list[str]:
                try:
                    r = await http.get(base + "/readyz")
                except httpx.HTTPError:
                    return []
                return [x for x in r.json().get("reasons", []) if "is held" in x]

            await plc.set_value(STATE, 3)
            reasons = await wait_until(held, timeout=20, what="sink held")
            assert "***" in reasons[0] and TOKEN not in reasons[0]
            status = (await http.get(base + "/status")).text
            assert "was revoked" in status and TOKEN not in status
        # The API really received the token (so it was there to leak).
        assert any(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in rx.requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        await rx.aclose()
        await plc.stop()
    lines = log.read_text().splitlines()
    docs = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    held_lines = [d for d in docs if "is held" in d["message"]]
    assert held_lines and all("***" in d["message"] for d in held_lines)
    assert {"time", "level", "logger", "message"} <= set(held_lines[0])
    assert TOKEN not in log.read_text()
