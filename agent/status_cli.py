"""``edge-agent status`` and ``edge-agent reload``: talk to a running agent's health endpoint.

Both find the endpoint from ``--url``, else from ``health.listen`` in ``--config`` (read
without validating it: the shell running the command usually cannot read the service's secrets),
else ``http://127.0.0.1:9780``.

``status`` prints ``/status`` as a readable table (``--json`` for the raw document); exit 0 when
the agent is ready, 1 when it is not ready, 3 when no agent answers.

``reload`` finds the agent through its pid file in ``agent.data_dir`` of ``--config`` (or
``--pid-file``), checked as ``agent/pidfile.py`` says, sends it SIGHUP and waits until the agent
reports the outcome in ``last_reload``: exit 0 applied, 2 rejected (the located errors are
printed; the previous configuration keeps running) or no pid file to trust, 1 no outcome in
time, 3 the health endpoint does not answer. The pid is never taken from ``/status``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from agent.cli_conventions import printable
from config.errors import ConfigError, ConfigIssue

__all__ = ["DEFAULT_URL", "format_status", "health_url", "reload_main", "status_main"]

DEFAULT_URL = "http://127.0.0.1:9780"
DEFAULT_DATA_DIR = Path("/var/lib/edge-agent")
EXIT_OK, EXIT_NOT_READY, EXIT_INVALID, EXIT_UNREACHABLE = 0, 1, 2, 3


def _loose(config: Path | None) -> dict[str, Any]:
    """The file's YAML without validating it (the shell running the command usually cannot
    read the service's secrets); {} when it is not YAML. A file that cannot be read at all is
    a ConfigError: the defaults would send the command to another agent's address, or to
    another data directory's pid file, without a word."""
    if config is None or str(config) == "-":
        return {}
    from ruamel.yaml import YAML

    try:
        text = config.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([ConfigIssue("", f"cannot read the configuration file: {why}",
                                       file=str(config))]) from None
    try:
        doc = YAML(typ="safe").load(text)
    except Exception:  # not YAML the loose reading understands: the defaults apply
        return {}
    return doc if isinstance(doc, dict) else {}


def health_url(config: Path | None, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    if config is not None:
        listen = str((_loose(config).get("health") or {}).get("listen") or "")
        host, _, port = listen.rpartition(":")
        if host and port.isascii() and port.isdigit() and port != "0":
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
            return f"http://{host}:{port}"
    return DEFAULT_URL


def _get_status(base: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/status", timeout=5.0)
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def status_main(base: str, as_json: bool) -> int:
    try:
        doc = _get_status(base)
    except httpx.HTTPStatusError as exc:
        # Something answers: a stalled agent's watchdog (503) is there but not serving.
        code = exc.response.status_code
        print(f"edge-agent status: the agent at {base} answers HTTP {code}: "
              f"{printable(exc.response.text[:200])}", file=sys.stderr)
        return EXIT_NOT_READY if code == 503 else EXIT_UNREACHABLE
    except (httpx.HTTPError, ValueError) as exc:
        print(f"edge-agent status: no agent answers at {base} ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(doc, indent=2) if as_json else format_status(doc))
    return EXIT_OK if doc.get("ready") else EXIT_NOT_READY


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _episode(ep: Any) -> str:
    if not isinstance(ep, dict):
        return ""
    from agent.status_page import reason_label

    return f"{ep.get('category')} since {ep.get('started_at')}, {reason_label(ep)}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*headers).rstrip(),
            *("  " + fmt.format(*r).rstrip() for r in rows)]


def format_status(doc: dict[str, Any]) -> str:
    """The /status document as text for a person at a terminal."""
    ready = "READY" if doc.get("ready") else "NOT READY"
    lines = [f"agent {doc.get('agent_id')} at site {doc.get('site')}: {ready}",
             f"  version {doc.get('version')}, up {_age(doc.get('uptime_s'))}, pid "
             f"{doc.get('pid')}, config {str(doc.get('config_hash') or '-')[:12]}"]
    for reason in doc.get("readiness_reasons") or []:
        lines.append(f"  ! {reason}")
    disk = doc.get("disk") or {}
    clock = doc.get("clock") or {}
    buf = doc.get("buffer") or {}
    lines.append(f"  disk free {_size(disk.get('free_bytes'))} of "
                 f"{_size(disk.get('total_bytes'))}; clock {clock.get('state', '-')}; buffer "
                 f"{_size(buf.get('size_bytes'))} of {_size(buf.get('max_size'))}"
                 + (f", ERROR: {buf['storage_error']}" if buf.get("storage_error") else ""))
    last = doc.get("last_reload")
    if last:
        lines.append(f"  last reload {describe_reload(last)}")
    lines += ["", "SOURCES"]
    lines += _table(["id", "state", "last sample", "samples", "last error"], [
        [n, str(s.get("state")), _age(s.get("last_sample_age_s")),
         str(s.get("samples_total", "-")), str(s.get("last_error") or "")[:60]]
        for n, s in (doc.get("sources") or {}).items()])
    lines += ["", "MACHINES"]
    lines += _table(["id", "state", "since", "signal", "open downtime", "order"], [
        [n, str(m.get("state")), str(m.get("since") or "-"), str(m.get("signal", "-")),
         _episode(m.get("open_downtime")), str(m.get("order_id") or "")]
        for n, m in (doc.get("machines") or {}).items()])
    lines += ["", "SINKS"]
    bsinks = buf.get("sinks") or {}
    lines += _table(["id", "type", "state", "pending", "leased", "oldest", "dead letters",
                     "delivered", "last error"], [
        [n, str(s.get("type") or "-"), str(s.get("state")),
         str(bsinks.get(n, {}).get("pending", "-")),
         str(bsinks.get(n, {}).get("leased", "-")),
         _age(bsinks.get(n, {}).get("oldest_pending_age_s")),
         str(bsinks.get(n, {}).get("dead_letters", "-")), str(s.get("delivered_total", "-")),
         _sink_error(s, doc.get("time"))[:70]]
        for n, s in (doc.get("sinks") or {}).items()])
    return "\n".join(printable(line) for line in lines)


def _sink_error(s: dict[str, Any], now_text: Any) -> str:
    """The current problem; else the last one, as "recovered; last error 5m ago: ..."."""
    current = s.get("held_reason") or s.get("last_error")
    if current:
        return str(current)
    prev = s.get("previous_error")
    if not isinstance(prev, dict) or not prev.get("error"):
        return ""
    from config.model import parse_time, utcnow

    try:
        now = parse_time(now_text) if isinstance(now_text, str) else utcnow()
        ago = _age((now - parse_time(str(prev.get("at")))).total_seconds()) + " ago"
    except ValueError:
        ago = "earlier"
    return f"(recovered; last error {ago}: {prev['error']})"


def reload_main(base: str, config: Path | None, pid_file: Path | None = None,
                timeout: float = 30.0) -> int:
    from agent.pidfile import PID_FILE, PidFileError, check_pidfile

    doc = _loose(config)
    agent = doc.get("agent") or {}
    if pid_file is not None:
        path, expected = pid_file, None
    elif config is not None:
        # Relative to the file's directory, as the agent itself reads it (agent/wiring/load.py).
        path = config.parent / str(agent.get("data_dir") or DEFAULT_DATA_DIR) / PID_FILE
        expected = str(agent["id"]) if agent.get("id") is not None else None
    else:
        print("edge-agent reload: name the agent's configuration with --config (its "
              "agent.data_dir holds the pid file) or give --pid-file", file=sys.stderr)
        return EXIT_INVALID
    try:
        proc = check_pidfile(path, expected)
    except PidFileError as exc:
        print(f"edge-agent reload: {exc}; nothing signalled", file=sys.stderr)
        return EXIT_INVALID
    try:
        before = _get_status(base)
    except (httpx.HTTPError, ValueError) as exc:
        print(f"edge-agent reload: no agent answers at {base} ({exc}); nothing signalled",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if before.get("agent_id") != proc.agent_id:
        print(f"edge-agent reload: {base} is agent {before.get('agent_id')!r}, the pid file "
              f"names {proc.agent_id!r}; nothing signalled", file=sys.stderr)
        return EXIT_INVALID
    previous = before.get("last_reload")
    try:
        os.kill(proc.pid, signal.SIGHUP)
    except OSError as exc:
        print(f"edge-agent reload: cannot signal pid {proc.pid}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_READY
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)  # a CLI polling another process: no event to wait on
        try:
            last = _get_status(base).get("last_reload")
        except (httpx.HTTPError, ValueError):
            continue
        if last and last != previous:
            print(describe_reload(last))
            return EXIT_OK if last.get("ok") else EXIT_INVALID
    print(f"edge-agent reload: no answer from pid {proc.pid} within {timeout:g}s; see its log",
          file=sys.stderr)
    return EXIT_NOT_READY


def describe_reload(last_reload: dict[str, Any] | None) -> str:
    """One line about the last reload, for ``edge-agent reload``."""
    if not last_reload:
        return "no reload yet"
    if last_reload.get("ok"):
        what = ", ".join(last_reload.get("changes") or []) or "no component changed"
        return f"applied at {last_reload.get('at')}: {what}"
    return f"REJECTED at {last_reload.get('at')}: " + "; ".join(last_reload.get("issues") or [])
