"""CLI conventions: global options after the command, EDGE_AGENT_* environment variables,
validate --no-secrets, --config - (stdin), help with a description and an example for every
command, --json on read commands, exit codes 0/1/2/3, no traceback on a closed pipe, progress
only on a terminal."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import ROOT, free_port

from agent.cli import _parser
from agent.cli_conventions import Progress, global_defaults, hoist_global_options

EXAMPLE = ROOT / "config" / "example.yaml"
CLI = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]


def cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
        drop: tuple[str, ...] = ("ERP_TOKEN", "EDGE_AGENT_CONFIG", "EDGE_AGENT_LOG_LEVEL",
                                 "EDGE_AGENT_LOG_FORMAT")) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([*CLI, *args], cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT),
                                                         **(env or {})},
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def test_global_options_anywhere_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = hoist_global_options(["buffer", "stats", "-c", "x.yaml", "--log-format", "json",
                                 "--log-level=debug"])
    assert argv == ["--log-format", "json", "--log-level=debug", "buffer", "stats", "-c",
                    "x.yaml"]
    assert hoist_global_options(["replay", "--", "--log-level"]) == \
        ["replay", "--", "--log-level"]
    monkeypatch.setenv("EDGE_AGENT_LOG_FORMAT", "JSON")
    monkeypatch.delenv("EDGE_AGENT_LOG_LEVEL", raising=False)
    assert global_defaults() == {"--log-level": "info", "--log-format": "json"}
    monkeypatch.setenv("EDGE_AGENT_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="EDGE_AGENT_LOG_LEVEL='loud'"):
        global_defaults()
    r = cli("validate", "-c", str(EXAMPLE), env={"EDGE_AGENT_LOG_LEVEL": "loud"})
    assert r.returncode == 2 and "EDGE_AGENT_LOG_LEVEL" in r.stderr


@pytest.mark.slow
def test_run_in_a_container_style_from_environment_only(tmp_path: Path) -> None:
    """EDGE_AGENT_CONFIG and EDGE_AGENT_LOG_FORMAT are enough: `edge-agent run` needs no
    arguments; its log lines are JSON. The same with the option after the command."""
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{id: env-edge, site: s1, data_dir: "{tmp_path / 'data'}", stop_timeout: 1s}}
health: {{listen: "127.0.0.1:{free_port()}"}}
sinks: {{erp: {{type: http, url: "http://127.0.0.1:9/events"}}}}
""")
    for args, env in ((["run"], {"EDGE_AGENT_CONFIG": str(config),
                                 "EDGE_AGENT_LOG_FORMAT": "json"}),
                      (["run", "-c", str(config), "--log-format", "json"], {})):
        base = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        proc = subprocess.Popen([*CLI, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                env={**base, "PYTHONPATH": str(ROOT), **env})
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()  # blocks until the first log line
            doc = json.loads(line)
            assert doc["level"] and "message" in doc, line
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0


def test_validate_without_secrets_and_from_stdin() -> None:
    r = cli("validate", "-c", str(EXAMPLE))
    assert r.returncode == 2 and "ERP_TOKEN" in r.stderr and "--no-secrets" in r.stderr
    r = cli("validate", "--no-secrets", "-c", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "references not resolved" in r.stdout
    # A typo is still an error without secrets.
    bad = EXAMPLE.read_text().replace("stop_timeout:", "stop_timeuot:")
    r = cli("validate", "--no-secrets", "--config", "-", stdin=bad)
    assert r.returncode == 2 and "<stdin>:" in r.stderr and "stop_timeuot" in r.stderr
    assert "--no-secrets" not in r.stderr  # the hint only where a secret was missing
    # --json says "invalid" on stdout too, with every located issue.
    r = cli("validate", "--no-secrets", "--json", "--config", "-", stdin=bad)
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["valid"] is False and doc["issues"][0]["path"] == "agent.stop_timeuot"
    assert doc["issues"][0]["line"] and doc["issues"][0]["message"].startswith("<stdin>:")
    r = cli("validate", "--json", "--config", "-", stdin=EXAMPLE.read_text(),
            env={"ERP_TOKEN": "t"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["valid"] and doc["file"] == "<stdin>" and "filler-1" in doc["machines"]
    # EDGE_AGENT_CONFIG stands in for --config.
    r = cli("validate", "--no-secrets", env={"EDGE_AGENT_CONFIG": str(EXAMPLE)})
    assert r.returncode == 0 and str(EXAMPLE) in r.stdout


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
              ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.append(((*path, name), child))
                out += _commands(child, (*path, name))
    return out


def test_every_command_has_a_description_and_an_example() -> None:
    commands = _commands(_parser(global_defaults()))
    assert len(commands) >= 20
    missing = [" ".join(path) for path, p in commands
               if not p.description or "example" not in (p.epilog or "")
               or "edge-agent " + " ".join(path) not in (p.epilog or "")]
    assert missing == []


def test_read_commands_take_json() -> None:
    commands = dict(_commands(_parser(global_defaults())))
    for path in [("validate",), ("status",), ("top",), ("probe",), ("browse",),
                 ("buffer", "stats"), ("buffer", "pending"), ("buffer", "dead-letters")]:
        options = {o for a in commands[path]._actions for o in a.option_strings}
        assert "--json" in options, path


def test_exit_codes_and_no_traceback_on_a_closed_pipe() -> None:
    r = cli("status", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 3 and "no agent answers" in r.stderr
    r = cli("status", "--bogus")
    assert r.returncode == 2  # usage
    # The reader is gone before the first byte: exit 141, and no traceback.
    read, write = os.pipe()
    os.close(read)
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    done = subprocess.run([*CLI, "config", "example"], cwd=ROOT, stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=60,
                          env={**base, "PYTHONPATH": str(ROOT)})
    os.close(write)
    assert done.returncode == 141
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal() -> None:
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress("exported", 3, stream=stream)
        p.step()
        p._last = time.monotonic() - 1  # the next step may draw again
        p.step()
        p.finish()
    assert "\rexported 1 of 3" in tty.getvalue().replace("\x1b[K", "")
    assert "exported 2 of 3" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")
    assert pipe.getvalue() == ""


def test_buffer_commands_need_no_secrets(tmp_path: Path) -> None:
    """`buffer stats` on the edge box, from a shell that cannot read the service's token: the
    buffer's path is all it needs from the configuration."""
    from buffer.sqlite import SqliteBuffer

    (tmp_path / "data").mkdir()
    buf = SqliteBuffer(tmp_path / "data" / "buffer.db", 2**20)
    buf.open(["erp"])
    buf.close()
    config = tmp_path / "c.yaml"
    config.write_text(EXAMPLE.read_text().replace("data_dir: /var/lib/edge-agent",
                                                  "data_dir: data"))
    assert "data_dir: data" in config.read_text()
    r = cli("buffer", "stats", "--json", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sinks"]["erp"]["pending"] == 0


def test_a_config_that_cannot_be_read_is_bad_input_not_the_default_address(
        tmp_path: Path) -> None:
    """status/top/reload with a --config that is not there said "no agent answers at
    http://127.0.0.1:9780" (exit 3): another address than the user meant, without a word."""
    missing = str(tmp_path / "nope.yaml")
    for args in (("status", "-c", missing), ("top", "--once", "-c", missing),
                 ("reload", "-c", missing)):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert f"{missing}: cannot read the configuration file" in r.stderr
        assert "127.0.0.1:9780" not in r.stderr
