"""``edge-agent status`` and ``edge-agent reload``: talk to a running agent's health endpoint.

Both find the endpoint from ``--url``, else from ``health.listen`` in ``--config`` (read
without validating it: the shell running the command usually cannot read the service's secrets),
else ``http://127.0.0.1:9780``.

``status`` prints ``/status`` as a readable table (``--json`` for the raw document); exit 0 when
the agent is ready, 1 when it is not ready or cannot be reached.

``reload`` sends SIGHUP to the pid that ``/status`` reports and waits until the agent reports the
outcome in ``last_reload``: exit 0 applied, 2 rejected (the located errors are printed; the
previous configuration keeps running), 1 no answer.
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

__all__ = ["DEFAULT_URL", "format_status", "health_url", "reload_main", "status_main"]

DEFAULT_URL = "http://127.0.0.1:9780"


def health_url(config: Path | None, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    if config is not None:
        from ruamel.yaml import YAML

        try:
            doc = YAML(typ="safe").load(config.read_text(encoding="utf-8"))
            listen = str(((doc or {}).get("health") or {}).get("listen") or "")
        except Exception:  # unreadable or odd file: fall back to the default address
            listen = ""
        host, _, port = listen.rpartition(":")
        if host and port.isdigit() and port != "0":
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
    except (httpx.HTTPError, ValueError) as exc:
        print(f"edge-agent status: no agent answers at {base} ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if as_json else format_status(doc))
    return 0 if doc.get("ready") else 1


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
    reason = f" reason {ep['reason_code']}" if ep.get("reason_code") else ""
    return f"{ep.get('category')} since {ep.get('started_at')}{reason}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
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
    lines += _table(["id", "state", "pending", "oldest", "dead letters", "delivered",
                     "last error"], [
        [n, str(s.get("state")), str(bsinks.get(n, {}).get("pending", "-")),
         _age(bsinks.get(n, {}).get("oldest_pending_age_s")),
         str(bsinks.get(n, {}).get("dead_letters", "-")), str(s.get("delivered_total", "-")),
         str(s.get("held_reason") or s.get("last_error") or "")[:60]]
        for n, s in (doc.get("sinks") or {}).items()])
    return "\n".join(lines)


def reload_main(base: str, timeout: float = 30.0) -> int:
    try:
        before = _get_status(base)
    except (httpx.HTTPError, ValueError) as exc:
        print(f"edge-agent reload: no agent answers at {base} ({exc})", file=sys.stderr)
        return 1
    pid = before.get("pid")
    if not isinstance(pid, int):
        print("edge-agent reload: the agent did not report its pid", file=sys.stderr)
        return 1
    previous = (before.get("last_reload") or {}).get("at"), before.get("last_reload")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"edge-agent reload: cannot signal pid {pid}: {exc.strerror}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)  # a CLI polling another process: no event to wait on
        try:
            last = _get_status(base).get("last_reload")
        except (httpx.HTTPError, ValueError):
            continue
        if last and last != previous[1]:
            print(describe_reload(last))
            return 0 if last.get("ok") else 2
    print(f"edge-agent reload: no answer from pid {pid} within {timeout:g}s; see its log",
          file=sys.stderr)
    return 1


def describe_reload(last_reload: dict[str, Any] | None) -> str:
    """One line about the last reload, for ``edge-agent reload``."""
    if not last_reload:
        return "no reload yet"
    if last_reload.get("ok"):
        what = ", ".join(last_reload.get("changes") or []) or "no component changed"
        return f"applied at {last_reload.get('at')}: {what}"
    return f"REJECTED at {last_reload.get('at')}: " + "; ".join(last_reload.get("issues") or [])
