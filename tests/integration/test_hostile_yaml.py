"""Hostile configuration files: located errors with exit 2, and a reload that meets one keeps
the running configuration (issue 11, #9). Real CLI subprocesses, a real agent and SIGHUP.

Before: 500-deep nesting ended in RecursionError, an 865-byte alias bomb expanded to 2.5 GB
(MemoryError after 42 s), ``${file:/dev/zero}`` read 1.3 GB; tracebacks, exit 1, and a SIGHUP
reload parsed all that inside the agent's process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import AgentProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True))

HOSTILE = {
    "flow nesting": "agent: " + "[" * 500 + "]" * 500 + "\n",
    "block nesting": "".join(" " * i + f"k{i}:\n" for i in range(500)) + " " * 500 + "v: 1\n",
    "alias bomb": BOMB,
    "huge file": "agent: {id: a, site: s}\n#" + "x" * (2**20) + "\n",
    "secret from /dev/zero": 'agent: {id: a, site: s}\nsinks:\n  c: {type: http, url: '
                             '"http://127.0.0.1:9/e", auth: {bearer_token: "${file:/dev/zero}"}}\n',
    "substitution from /dev/zero": 'agent: {id: a, site: s}\nsinks:\n  c: {type: http, url: '
                                   '"http://127.0.0.1:9/${file:/dev/zero}"}\n',
}
EXPECTED = {"flow nesting": "nested more than", "block nesting": "nested more than",
            "alias bomb": "expands to more than", "huge file": "larger than 1 MiB",
            "secret from /dev/zero": "larger than", "substitution from /dev/zero": "larger than"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow  # a CLI subprocess per case
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_get_a_located_error_and_exit_2(tmp_path: Path, name: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(HOSTILE[name])
    done = cli("validate", "--config", str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert EXPECTED[name] in done.stderr and str(path) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
async def test_a_reload_that_meets_a_limit_keeps_the_running_configuration(
        tmp_path: Path) -> None:
    health = free_port()
    path = tmp_path / "agent.yaml"
    good = f"""
agent: {{id: hostile, site: s1, data_dir: "{tmp_path / 'data'}"}}
health: {{listen: "127.0.0.1:{health}"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {free_port()},
         tags: {{st: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: st, map: {{1: running}}}}}}
sinks:
  central: {{type: http, url: "http://127.0.0.1:{free_port()}/events"}}
"""
    path.write_text(good)
    agent = AgentProcess(path, tmp_path / "agent.log")
    agent.start()
    try:
        url = f"http://127.0.0.1:{health}"
        pid_file = tmp_path / "data" / "edge-agent.pid"  # the file names the config's data_dir
        await wait_until(lambda: cli("status", "--url", url).returncode in (0, 1), timeout=30,
                         interval=0.2, what="agent up")
        for name in ("alias bomb", "flow nesting", "huge file"):
            path.write_text(good + HOSTILE[name].replace("agent:", "extra:"))
            done = cli("reload", "--url", url, "--pid-file", str(pid_file))
            assert done.returncode == 2, (name, done.stdout, done.stderr)
            assert EXPECTED[name] in done.stdout + done.stderr, (name, done.stdout)
            assert agent.alive
        path.write_text(good.replace("map: {1: running}", "map: {1: running, 2: idle}"))
        done = cli("reload", "--url", url, "--pid-file", str(pid_file))
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        agent.terminate()
    assert "Traceback" not in (tmp_path / "agent.log").read_text(errors="replace")
