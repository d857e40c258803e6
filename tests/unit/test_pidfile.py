"""The pid file `edge-agent reload` trusts: every check refuses what is not this agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.pidfile import PID_FILE, PidFileError, check_pidfile, remove_pidfile, write_pidfile


def test_written_file_names_this_process(tmp_path: Path) -> None:
    path = write_pidfile(tmp_path, "edge-1")
    proc = check_pidfile(tmp_path, "edge-1")
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
        check_pidfile(tmp_path, "edge-1")


def test_missing_and_stale_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PidFileError, match="no pid file"):
        check_pidfile(tmp_path, None)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _rewrite(tmp_path, pid=int(done.stdout))  # a process that has exited
    with pytest.raises(PidFileError, match="not running"):
        check_pidfile(tmp_path, "edge-1")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = write_pidfile(tmp_path, "edge-1")
    os.chown(path, 65534, 65534)
    with pytest.raises(PidFileError, match="owned by uid 65534"):
        check_pidfile(tmp_path, "edge-1")


def test_remove_leaves_a_file_of_another_process(tmp_path: Path) -> None:
    path = _rewrite(tmp_path, pid=1)
    remove_pidfile(path)
    assert (tmp_path / PID_FILE).exists()
