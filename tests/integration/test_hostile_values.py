"""A value from the plant that is valid JSON but not text: a lone surrogate (``"\\ud800"`` in an
MQTT JSON payload, say) as a machine's order id. Events escape it (ASCII JSON); the health
endpoint encoded its answers as UTF-8 and failed with 500 and a traceback on every /status."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import free_port, wait_until

from agent.health import HealthServer
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from config.model import Quality, TagSample, utcnow


async def test_a_lone_surrogate_from_the_plant_does_not_break_status(tmp_path: Path) -> None:
    config = load_config_text(f"""
agent: {{id: hostile-values, site: s1, data_dir: "{tmp_path / 'data'}", stop_timeout: 2s}}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    port: {free_port()}
    tags:
      m.state: {{table: holding, address: 0, type: uint16}}
      m.order: {{table: holding, address: 10, type: string, length: 8}}
machines:
  m1: {{line: l1, state: {{tag: m.state, map: {{1: running, 3: down}}}}, order_tag: m.order}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:{free_port()}/events"}}
buffer: {{commit_interval: 10ms}}
""", "<test>")
    rt = Runtime(config)
    server = HealthServer(rt, "127.0.0.1:0")
    await rt.start()
    port = await server.start()
    try:
        now = utcnow()
        rt.on_samples("plc", [TagSample("m.order", "PO-\ud800-7", Quality.GOOD, now),
                              TagSample("m.state", 3, Quality.GOOD, now)])
        await wait_until(lambda: rt.detectors["m1"].episode is not None, what="down")
        async with httpx.AsyncClient() as http:
            for path in ("/status", "/", "/readyz", "/metrics"):
                r = await http.get(f"http://127.0.0.1:{port}{path}")
                assert r.status_code != 500, (path, r.text)
            doc = (await http.get(f"http://127.0.0.1:{port}/status")).json()
        assert "PO-" in str(doc)
    finally:
        await server.aclose()
        await rt.stop()
