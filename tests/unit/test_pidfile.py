"""The pid file `edge-agent reload` trusts: every check refuses what is not this agent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli_conventions import EXIT_UNREACHABLE
from agent.pidfile import PID_FILE, PidFileError, check_pidfile, remove_pidfile, write_pidfile
from agent.status_cli import reload_main


def test_written_file_names_this_process(tmp_path: Path) -> None:
    path = write_pidfile(tmp_path, "edge-1")
    proc = check_pidfile(tmp_path / PID_FILE, "edge-1")
    assert (proc.pid, proc.agent_id, proc.path) == (os.getpid(), "edge-1", path)
    remove_pidfile(path)
    assert not path.exists()


def _rewrite(tmp_path: Path, **changes: object) -> Path:
    path = write_pidfile(tmp_path, "edge-1")
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"start_ticks": 1}, "pid was reused"),
    ({"agent_id": "other"}, "belongs to agent 'other'"),
    ({"pid": "1"}, "not a pid file"),
])
def test_a_file_that_does_not_name_this_agent_is_refused(
        tmp_path: Path, changes: dict[str, object], message: str) -> None:
    _rewrite(tmp_path, **changes)
    with pytest.raises(PidFileError, match=message):
        check_pidfile(tmp_path / PID_FILE, "edge-1")


def test_missing_and_stale_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PidFileError, match="no pid file"):
        check_pidfile(tmp_path / PID_FILE, None)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _rewrite(tmp_path, pid=int(done.stdout))  # a process that has exited
    with pytest.raises(PidFileError, match="not running"):
        check_pidfile(tmp_path / PID_FILE, "edge-1")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write_pidfile(tmp_path, "edge-1")
    os.chown(path, 65534, 65534)
    with pytest.raises(PidFileError, match="owned by uid 65534"):
        check_pidfile(tmp_path / PID_FILE, "edge-1")


def test_remove_leaves_a_file_of_another_process(tmp_path: Path) -> None:
    path = _rewrite(tmp_path, pid=1)
    remove_pidfile(path)
    assert (tmp_path / PID_FILE).exists()


@pytest.mark.parametrize("content", [
    '{"pid": %d, "agent_id": "edge-1"}',  # no start time: the pid-reuse check cannot hold
    '{"pid": %d, "start_ticks": null, "agent_id": "edge-1"}',
    '{"pid": %d, "start_ticks": "1", "agent_id": "edge-1"}',
])
def test_a_file_without_a_true_start_time_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / PID_FILE).write_text(content % os.getpid())
    with pytest.raises(PidFileError, match="pid was reused"):
        check_pidfile(tmp_path / PID_FILE, "edge-1")


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', '{"pid": true}', "null"])
def test_odd_json_is_refused_with_a_message(tmp_path: Path, content: str) -> None:
    (tmp_path / PID_FILE).write_text(content)
    with pytest.raises(PidFileError, match="not a pid file"):
        check_pidfile(tmp_path / PID_FILE, None)


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    real = write_pidfile(tmp_path / "real", "edge-1")
    (tmp_path / PID_FILE).symlink_to(real)
    with pytest.raises(PidFileError, match="not a pid file"):
        check_pidfile(tmp_path / PID_FILE, "edge-1")


def _unreachable_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_reload_finds_the_pid_file_where_the_agent_writes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative data_dir is relative to the configuration file (as the agent reads it), and
    --pid-file is the file named, whatever its name. Past the pid-file checks, reload asks the
    health endpoint first: nobody answers here, so exit 3 and nothing is signalled."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    config = conf_dir / "agent.yaml"
    config.write_text("agent: {id: edge-1, data_dir: data}\n")
    (conf_dir / "data").mkdir()
    written = write_pidfile(conf_dir / "data", "edge-1")
    monkeypatch.chdir(tmp_path)  # not the configuration's directory
    assert reload_main(_unreachable_url(), config, timeout=1) == EXIT_UNREACHABLE
    custom = written.rename(tmp_path / "agent.pid")
    assert reload_main(_unreachable_url(), None, custom, timeout=1) == EXIT_UNREACHABLE


def test_writing_never_follows_a_link_left_at_the_temporary_name(tmp_path: Path) -> None:
    """A link planted at edge-agent.pid.tmp (or at the pid file) must not make an agent
    running as root write through it."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / (PID_FILE + ".tmp")).symlink_to(victim)
    (tmp_path / "data" / PID_FILE).symlink_to(victim)
    path = write_pidfile(tmp_path / "data", "edge-1")
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and check_pidfile(path, "edge-1").pid == os.getpid()
    assert (path.stat().st_mode & 0o777) == 0o644
