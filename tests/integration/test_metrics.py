"""/metrics vocabulary (docs/operations.md) and one registry per runtime."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from agent.health import HealthServer
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config_text

NAME = re.compile(r"^edge_agent_[a-z0-9_]+$")
UNITS = ("_total", "_seconds", "_bytes", "_events", "_up", "_held", "_ready", "_dead_letters",
         "_info", "_state")


def config(tmp: Path, agent_id: str, sink_url: str) -> str:
    return f"""
agent: {{id: {agent_id}, site: s1, data_dir: "{tmp / agent_id}", stop_timeout: 1s}}
health: {{listen: "127.0.0.1:0"}}
sinks:
  {agent_id}-sink: {{type: http, url: "{sink_url}"}}
"""


async def test_two_runtimes_in_one_process_have_their_own_metrics(tmp_path: Path) -> None:
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    runtimes = [Runtime(load_config_text(config(tmp_path, n, rx.url), "<t>"))
                for n in ("a", "b")]
    servers = [HealthServer(rt, "127.0.0.1:0") for rt in runtimes]
    texts = []
    try:
        for rt, server in zip(runtimes, servers, strict=True):
            await rt.start()
            port = await server.start()
            async with httpx.AsyncClient() as http:
                r = await http.get(f"http://127.0.0.1:{port}/metrics")
            assert r.status_code == 200
            texts.append(r.text)
    finally:
        for rt, server in zip(runtimes, servers, strict=True):
            await server.aclose()
            await rt.stop()
        await rx.aclose()
    assert runtimes[0].registry is not runtimes[1].registry
    sinks = []
    for text in texts:
        families = list(text_string_to_metric_families(text))
        assert families
        for fam in families:
            if fam.name.startswith("process_"):
                continue  # the standard process collector keeps its standard names
            assert NAME.match(fam.name), fam.name
            assert fam.documentation, fam.name
            full = fam.name + ("_total" if fam.type == "counter" else "")
            assert full.endswith(UNITS) or fam.type == "histogram", full
        sinks.append({s.labels["sink"] for fam in families for s in fam.samples
                      if "sink" in s.labels})
    assert sinks == [{"a-sink"}, {"b-sink"}]  # nothing leaks between runtimes
    assert "edge_agent_delivery_duration_seconds_bucket" in texts[0]
