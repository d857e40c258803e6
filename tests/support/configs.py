"""YAML fragments shared by the tests' agent configurations (so a default of the test plant
changes in one place). Each returns text ending in a newline; the caller writes what differs
between them (source keys, tags, machines) between the two."""

from __future__ import annotations

from pathlib import Path


def modbus_agent_yaml(agent_id: str, data_dir: Path | str, plc_port: int | None, *,
                      health: str = '{listen: "127.0.0.1:0"}') -> str:
    """The agent (site s1, stop_timeout 2s), its health listener and the start of a Modbus
    source ``plc`` on the loopback simulator polled every 50 ms; further keys of that source
    follow at an indent of four spaces."""
    return f"""
agent: {{id: {agent_id}, site: s1, data_dir: "{data_dir}", stop_timeout: 2s}}
health: {health}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 50ms
"""


def http_sink_yaml(sink_url: str, *, mode: str = "batch", max_backoff: str = "200ms") -> str:
    """One HTTP sink ``central`` with a short retry backoff, and a buffer committing every
    10 ms: the end of a test agent's configuration."""
    return f"""sinks:
  central:
    type: http
    url: "{sink_url}"
    mode: {mode}
    timeout: 2s
    retry: {{initial_backoff: 50ms, max_backoff: {max_backoff}}}
buffer: {{commit_interval: 10ms}}
"""
