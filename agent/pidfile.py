"""The agent's pid file: the local channel ``edge-agent reload`` uses to find this agent.

The running agent writes ``<data_dir>/edge-agent.pid`` (JSON: pid, the process start time in
clock ticks since boot from ``/proc/<pid>/stat``, agent id, written at) atomically after start
and removes it on stop if it is still its own. ``edge-agent reload`` reads it from the data
directory named in the configuration and signals the pid only when every check holds:

- the file is a regular file (not a symlink) owned by the same user as the process it names
  (or by root);
- that process exists and started at the recorded time (a pid reused after a crash differs;
  a file without a start time is refused where ``/proc`` can tell it);
- the agent id in the file is the one in the configuration.

Why not the pid from ``/status``: the health port may be published from a container (pid 1 in
there is someone else's pid 1 on the host), and anything that answers HTTP could name any pid.
A pid file in the agent's own data directory reaches this agent and only it.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from config.model import format_time, utcnow

__all__ = ["PID_FILE", "PidFileError", "check_pidfile", "remove_pidfile", "write_pidfile"]

PID_FILE = "edge-agent.pid"


class PidFileError(Exception):
    """The pid file is missing or does not name this agent; the message says which check."""


@dataclass(frozen=True, slots=True)
class AgentProcess:
    pid: int
    agent_id: str
    path: Path


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time since boot); None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def write_pidfile(data_dir: Path, agent_id: str) -> Path:
    path = data_dir / PID_FILE
    tmp = path.with_name(path.name + ".tmp")
    doc = {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()), "agent_id": agent_id,
           "written_at": format_time(utcnow())}
    # A fresh file, never through a link someone else left at the temporary name (the agent
    # may run as root); the rename then replaces whatever is at ``path`` without following it.
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(json.dumps(doc) + "\n")
    os.replace(tmp, path)
    return path


def remove_pidfile(path: Path) -> None:
    """Remove the pid file if it still names this process (a newer agent may own it now)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()


def check_pidfile(path: Path, agent_id: str | None) -> AgentProcess:
    """The agent process named by the pid file ``path`` (usually ``<data_dir>/PID_FILE``),
    after every check."""
    try:
        st = path.lstat()
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PidFileError(f"no pid file at {path}: is the agent running with this "
                           "configuration (agent.data_dir)?") from None
    except (OSError, ValueError) as exc:
        raise PidFileError(f"cannot read the pid file {path}: {exc}") from None
    if not isinstance(doc, dict):
        doc = {}
    pid, ticks = doc.get("pid"), doc.get("start_ticks")
    if (not path.is_file() or path.is_symlink() or not isinstance(pid, int)
            or isinstance(pid, bool) or pid <= 0):
        raise PidFileError(f"{path} is not a pid file written by the agent")
    try:
        proc_uid = Path(f"/proc/{pid}").stat().st_uid
    except FileNotFoundError:
        raise PidFileError(f"{path} names pid {pid}, which is not running (a stale file "
                           "from an agent that stopped?)") from None
    except OSError as exc:
        raise PidFileError(f"cannot look at pid {pid}: {exc}") from None
    if st.st_uid not in (proc_uid, 0):
        raise PidFileError(f"{path} is owned by uid {st.st_uid}, but pid {pid} runs as uid "
                           f"{proc_uid}: not trusted")
    actual = _start_ticks(pid)
    if actual is not None and (not isinstance(ticks, int) or actual != ticks):
        raise PidFileError(f"pid {pid} is not the agent that wrote {path} (it started at "
                           "another time than the file records: the pid was reused)")
    found = str(doc.get("agent_id"))
    if agent_id is not None and found != agent_id:
        raise PidFileError(f"{path} belongs to agent {found!r}, not {agent_id!r}")
    return AgentProcess(pid, found, path)
