"""Zero where zero makes no sense is a located configuration error, exit 2 (issue 11, #8).

Before: ``window: 0s``, ``max_size: 0``, ``lease_timeout: 0s``, ``timeout: 0s`` and ``map: {}``
passed ``validate``; a running agent with ``window: 0s`` hit ZeroDivisionError and its Modbus
session crash-looped, and ``max_size: 0`` ended ``run`` in a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two CLI subprocesses per case

ROOT = Path(__file__).resolve().parents[2]

BASE = {"window": "1m", "map": "{1: running}", "sink_timeout": "10s", "max_size": "1GiB",
        "lease_timeout": "60s", "poll_timeout": "1s"}


def config(tmp: Path, **changes: str) -> Path:
    v = {**BASE, **changes}
    path = tmp / "agent.yaml"
    path.write_text(f"""\
agent: {{id: a, site: s, data_dir: "{tmp / 'data'}"}}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    timeout: {v['poll_timeout']}
    tags:
      st: {{table: holding, address: 0, type: uint16}}
      c: {{table: holding, address: 1, type: uint16}}
machines:
  m1:
    line: l1
    state: {{tag: st, map: {v['map']}}}
    scrap: {{counter: c, window: {v['window']}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:9/events", timeout: {v['sink_timeout']}}}
buffer: {{max_size: {v['max_size']}, lease_timeout: {v['lease_timeout']}}}
""")
    return path


@pytest.mark.parametrize(("change", "where"), [
    ({"window": "0s"}, "agent.yaml:14:"),
    ({"max_size": "0"}, "agent.yaml:17:"),
    ({"lease_timeout": "0s"}, "agent.yaml:17:"),
    ({"sink_timeout": "0s"}, "agent.yaml:16:"),
    ({"poll_timeout": "0ms"}, "agent.yaml:6:"),
    ({"map": "{}"}, "agent.yaml:13:"),
])
def test_zero_is_refused_with_its_location(tmp_path: Path, change: dict[str, str],
                                           where: str) -> None:
    path = config(tmp_path, **change)
    for command in ("validate", "run"):
        done = subprocess.run([sys.executable, "-m", "agent.cli", command, "--config",
                               str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (command, done.stderr)
        assert where in done.stderr and ("more than 0" in done.stderr
                                         or "at least 1" in done.stderr), done.stderr
        assert "Traceback" not in done.stderr


def test_zero_is_still_fine_where_it_means_something(tmp_path: Path) -> None:
    path = config(tmp_path)
    text = path.read_text().replace("    line: l1\n", "    line: l1\n"
                                    "    downtime: {min_duration: 0s}\n")
    path.write_text(text + "  \n")
    done = subprocess.run([sys.executable, "-m", "agent.cli", "validate", "--config",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
