"""Fleet heartbeat through the real app wiring (``agent.app.serve``): a heartbeat collector on
HttpServer, the Modbus simulator and the reference receiver. Heartbeat failures never touch event
delivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from support import wait_until

from agent import __version__
from agent.app import serve
from agent.httpserver import HttpServer, Request, Response
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import config_hash, load_config_text
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})


class Collector:
    def __init__(self) -> None:
        self.beats: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        self.server = HttpServer(self._handle, "127.0.0.1", 0)

    async def _handle(self, req: Request) -> Response:
        self.headers.append(req.headers)
        if self.status == 200:
            self.beats.append(json.loads(req.body))
        return Response.json({}, self.status)


async def test_heartbeats_carry_identity_and_state_and_failures_do_not_touch_delivery(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_TOKEN", "fleet-tok-123")
    plc = ModbusSimulator(size=8)
    await plc.start()
    await plc.set_value(STATE, 1)
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    collector = Collector()
    fleet_port = await collector.server.start()
    config = load_config_text(f"""
agent: {{id: fleet-edge, site: s9, data_dir: "{tmp_path / 'agent'}", stop_timeout: 2s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {plc.port}, poll_interval: 50ms,
         tags: {{m.state: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: m.state, map: {{1: running, 3: down}}}},
        downtime: {{min_duration: 0s}}}}
sinks:
  central: {{type: http, url: "{receiver.url}", retry: {{initial_backoff: 50ms,
                                                         max_backoff: 200ms}}}}
fleet:
  url: "http://127.0.0.1:{fleet_port}/heartbeat"
  interval: 100ms
  auth: {{bearer_token: "${{env:FLEET_TOKEN}}"}}
  headers: {{X-Fleet: plant-s9}}
buffer: {{commit_interval: 10ms}}
""", "<fleet>")
    stop = asyncio.Event()
    box: dict[str, Runtime] = {}

    def ready(rt: Runtime, port: int) -> None:
        box["rt"] = rt

    task = asyncio.create_task(serve(config, config_hash(config), stop, on_ready=ready))
    try:
        await wait_until(lambda: len(collector.beats) >= 2, what="two heartbeats")
        beat = collector.beats[-1]
        assert beat["kind"] == "plantedge.agent.heartbeat"
        assert (beat["agent"], beat["site"], beat["version"]) == ("fleet-edge", "s9",
                                                                 __version__)
        assert beat["config_hash"] == config_hash(config)
        assert beat["uptime_s"] >= 0 and beat["sent_at"].endswith("Z")
        assert set(beat["sources"]) == {"plc"} and set(beat["sinks"]) == {"central"}
        assert set(beat["buffer"]["sinks"]) == {"central"}
        assert isinstance(beat["ready"], bool) and isinstance(beat["reasons"], list)
        assert collector.headers[-1]["authorization"] == "Bearer fleet-tok-123"
        assert collector.headers[-1]["x-fleet"] == "plant-s9"
        assert "fleet-tok-123" not in json.dumps(beat)

        # The fleet endpoint fails (500, then nobody listens): events still flow.
        with caplog.at_level(logging.INFO, logger="agent.fleet"):
            collector.status = 500
            n = len(collector.headers)
            await wait_until(lambda: len(collector.headers) >= n + 3, what="failing beats")
            await collector.server.aclose()
            await plc.set_value(STATE, 3)
            await wait_until(lambda: receiver.stats()["received"] >= 1, what="event delivered")
            rt = box["rt"]
            assert rt.forwarders["central"].status()["consecutive_failures"] == 0
            fails = [r for r in caplog.records if "fleet heartbeat" in r.getMessage()
                     and "fails" in r.getMessage()]
            assert len(fails) == 1  # logged once, not per beat
            # The collector is back on the same port: beats resume, and that is logged once.
            collector.server = HttpServer(collector._handle, "127.0.0.1", fleet_port)
            collector.status = 200
            await collector.server.start()
            before = len(collector.beats)
            await wait_until(lambda: len(collector.beats) > before, what="beats resume")
            await wait_until(lambda: any("works again" in r.getMessage()
                                         for r in caplog.records), what="recovery logged")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        await collector.server.aclose()
        await receiver.aclose()
        await plc.stop()
    assert task.done() and task.exception() is None
