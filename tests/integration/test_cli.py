"""The edge-agent command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

EXAMPLE = ROOT / "config" / "example.yaml"


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_version() -> None:
    from agent import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edge-agent {__version__}"


def test_validate_example_is_valid() -> None:
    r = cli("validate", "--config", str(EXAMPLE), env={"ERP_TOKEN": "s3cr3t-token"})
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "s3cr3t-token" not in r.stdout + r.stderr


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda t: t.replace("    poll_interval: 500ms", "    poll_intervall: 500ms"),
     ["sources.press-plc.poll_intervall", "unknown key", "poll_interval"]),
    (lambda t: t.replace("type: float32", "type: flaot32"),
     ['sources.press-plc.tags."press.speed".type', "float32"]),
    (lambda t: t.replace("port: 502", "port: many"), ["sources.press-plc.port"]),
    (lambda t: t.replace("reason_tag: press.reason", "reason_tag: press.reasn"),
     ["machines.press-3.downtime.reason_tag", "press.reasn"]),
    (lambda t: t.replace("agent:\n", "agent: [\n", 1), [":"]),
])
def test_validate_reports_located_errors_with_exit_2(
        tmp_path: Path, mutate: object, expected: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(mutate(EXAMPLE.read_text()))  # type: ignore[operator]
    r = cli("validate", "--config", str(bad), env={"ERP_TOKEN": "x"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{bad}:" in r.stderr  # FILE:LINE:COL
    for text in expected:
        assert text in r.stderr, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if str(bad) in ln)
    loc = line.strip().split(str(bad) + ":", 1)[1].split(":")
    assert loc[0].isdigit() and loc[1].isdigit()


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    r = cli("validate", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr


def test_run_with_invalid_config_exits_2_before_doing_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent: {id: a, site: b, data_dir: d}\nsurprise: 1\n")
    r = cli("run", "--config", str(bad))
    assert r.returncode == 2 and "surprise" in r.stderr
    assert not (tmp_path / "d").exists()


def test_config_schema_is_json_schema() -> None:
    r = cli("config", "schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert "agent" in schema["properties"] and schema.get("additionalProperties") is False


def test_demo_delivers_events_and_prints_summary() -> None:
    r = cli("demo", "--duration", "12", timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    fields = dict(part.split("=") for part in last.split())
    assert set(fields) == {"delivered", "pending", "dead_letters"}
    assert int(fields["delivered"]) > 0 and fields["pending"] == "0"
    assert "DOWNTIME STARTED" in r.stdout and "SCRAP RECORDED" in r.stdout
    # An operator classified press-3's stop from the command line while the demo ran.
    assert "operator$ edge-agent reason set press-3 20" in r.stdout
    assert "DOWNTIME CLASSIFIED  press-3    planned  reason=20 (Die change)  by operator" \
        in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mosquitto") is None and not os.access("/usr/sbin/mosquitto",
                                                                        os.X_OK),
                    reason="the mosquitto binary is not installed")
def test_demo_with_the_mqtt_sink_shows_events_on_uns_topics() -> None:
    r = cli("demo", "--duration", "8", "--sink", "mqtt", timeout=90)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    fields = dict(part.split("=") for part in r.stdout.strip().splitlines()[-1].split())
    assert int(fields["delivered"]) > 0 and fields["pending"] == "0"
    assert "UNS demo-plant/line-1/filler-1/events/downtime.started" in r.stdout
    assert "UNS demo-plant/line-1/filler-1/state" in r.stdout
