"""The CLI as an operator meets it (issue 11, #11 and #12): buffer commands need only the data
directory (credentials exist only for the running service), and output cut short by its reader
ends quietly (exit 141, what a shell shows for SIGPIPE). Real CLI subprocesses on a real buffer
file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from buffer.base import NewEvent, Settlement
from buffer.sqlite import SqliteBuffer

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    """A buffer with 3000 dead letters and a configuration whose credentials are gone."""
    data = tmp_path / "data"
    data.mkdir()
    buf = SqliteBuffer(data / "buffer.db", 2**40)
    buf.open(["central"])
    buf.append([NewEvent(id=f"e{i}", key="m1", type="plantedge.scrap.recorded",
                         time="2026-01-01T00:00:00.000Z", payload=f'{{"id":"e{i}"}}')
                for i in range(3000)], {})
    rows = buf.lease("central", 3000)
    buf.settle("central", Settlement(dead={r.seq: (422, "refused " * 10) for r in rows}))
    buf.close()
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{id: a, site: s, data_dir: "{data}"}}
sinks:
  central:
    type: http
    url: "https://erp.example/events?k=${{env:EDGE_TEST_GONE_KEY}}"
    headers: {{X-Api-Key: "${{file:/run/credentials/edge-agent/api-key}}"}}
    auth: {{bearer_token: "${{file:/run/credentials/edge-agent/erp-token}}"}}
""")
    return config


def test_buffer_commands_need_no_credentials(setup: Path) -> None:
    assert cli("validate", "--config", str(setup)).returncode == 2  # they really are gone
    for action in ("stats", "pending", "dead-letters", "export"):
        done = cli("buffer", action, "--config", str(setup))
        assert done.returncode == 0, (action, done.stderr)
    assert "3000" in cli("buffer", "stats", "--config", str(setup)).stdout
    done = cli("buffer", "replay", "--config", str(setup))
    assert done.returncode == 0 and "returned 3000" in done.stdout, done.stderr


@pytest.mark.parametrize("args", [("buffer", "dead-letters", "--limit", "3000"),
                                  ("buffer", "export"), ("config", "schema")])
def test_output_cut_short_by_its_reader_ends_quietly(setup: Path, args: tuple[str, ...]) -> None:
    argv = [*args, "--config", str(setup)] if args[0] == "buffer" else list(args)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()  # like `| head -1`: one line, then the reader is gone
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) in (0, 141), err  # 0: everything fitted into the pipe first
    assert "Traceback" not in err and "BrokenPipe" not in err, err
