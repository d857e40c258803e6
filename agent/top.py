"""``edge-agent top``: a live terminal view of a running agent, redrawn every second.

Reads the agent's ``/status`` (found like ``status`` finds it: ``--url``, else
``health.listen`` of ``--config``, else the default address) and shows:

- machines: state (in its colour), time in state, the open downtime with its reason, order,
  last event;
- sources: up or down, age of the last sample, bad tags;
- sinks: state, pending, leased, dead letters, age of the oldest pending event, and the
  delivery rate (events/s between two refreshes).

On a terminal it takes the alternate screen and redraws until ``q`` or Ctrl-C. When stdout is
not a terminal (a pipe, a file, a CI log) it prints one plain frame and exits; ``--once`` does
that on a terminal too. Colour follows the NO_COLOR convention (https://no-color.org): any
non-empty ``NO_COLOR`` turns it off, and so does ``--no-color``.

Exit codes: 0 (the agent answered; quit by the user), 3 when the agent cannot be reached
in one-shot mode (the live view keeps trying and says so on screen).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, TextIO

from agent.cli_conventions import printable
from agent.status_page import age_text, reason_label

__all__ = ["add_parser", "render", "run"]

EXIT_OK, EXIT_UNREACHABLE = 0, 3
_MACHINE_COLOURS = {"running": "32", "idle": "33", "down": "31", "planned": "34",
                    "unknown": "90"}
# Sources and sinks: green when working, yellow when trying again, red when stuck.
_LINK_COLOURS = {"up": "32", "delivering": "32", "idle": "32", "connecting": "33",
                 "retrying": "33", "backoff": "31", "down": "31", "held": "31"}


def add_parser(sub: Any) -> None:
    from agent.cli_conventions import add_config_option, command

    p = command(sub, "top", "live view of a running agent: machines, sources, sinks",
                "Show a running agent's machines (state, time in state, open downtime, order, "
                "last event), sources (up/down, sample age, bad tags) and sinks (backlog and "
                "rate), refreshed every second; q quits. Plain one-shot output when stdout is "
                "not a terminal.",
                ["edge-agent top --config /etc/edge-agent/config.yaml",
                 "edge-agent top --url http://127.0.0.1:9780 --once | mail -s status ot-team"])
    add_config_option(p, required=False,
                      help="take the health address from this file's health.listen")
    p.add_argument("--url", default=None, help="health endpoint, e.g. http://127.0.0.1:9780")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between refreshes (default %(default)s)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1)")
    p.add_argument("--json", action="store_true",
                   help="print the /status document once as JSON (what the view is made of)")


def run(args: argparse.Namespace) -> int:
    import httpx

    from agent.status_cli import health_url

    base = health_url(args.config, args.url)
    out = sys.stdout
    colour = out.isatty() and not os.environ.get("NO_COLOR") and not args.no_color
    client = httpx.Client(timeout=min(5.0, max(1.0, args.interval * 2)))
    with client:
        if args.once or args.json or not out.isatty():
            try:
                doc = _fetch(client, base)
            except httpx.HTTPStatusError as exc:
                print(f"edge-agent top: the agent at {base} answers HTTP "
                      f"{exc.response.status_code}: {printable(exc.response.text[:200])}",
                      file=sys.stderr)
                return EXIT_UNREACHABLE
            except (httpx.HTTPError, ValueError) as exc:
                print(f"edge-agent top: no agent answers at {base} ({exc})", file=sys.stderr)
                return EXIT_UNREACHABLE
            if args.json:
                import json

                out.write(json.dumps(doc, indent=2) + "\n")
            else:
                out.write("\n".join(render(doc, {}, colour=colour)) + "\n")
            return EXIT_OK
        return _live(client, base, out, colour, max(0.1, args.interval))


def _fetch(client: Any, base: str) -> dict[str, Any]:
    r = client.get(f"{base}/status")
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def _live(client: Any, base: str, out: TextIO, colour: bool, interval: float) -> int:
    import httpx

    rates: dict[str, float] = {}
    previous: tuple[float, dict[str, int]] | None = None
    with _screen(out):
        while True:
            try:
                doc = _fetch(client, base)
            except httpx.HTTPStatusError as exc:
                lines = [f"edge-agent top: the agent at {base} answers HTTP "
                         f"{exc.response.status_code}",
                         f"  {printable(exc.response.text[:200])}",
                         "  retrying every second; q or Ctrl-C quits"]
            except (httpx.HTTPError, ValueError) as exc:
                lines = [f"edge-agent top: no agent answers at {base}", f"  {exc}",
                         "  retrying every second; q or Ctrl-C quits"]
            else:
                now = time.monotonic()
                delivered = {n: int(s.get("delivered_total") or 0)
                             for n, s in (doc.get("sinks") or {}).items()}
                if previous is not None and now > previous[0]:
                    rates = {n: max(0, v - previous[1].get(n, v)) / (now - previous[0])
                             for n, v in delivered.items()}
                previous = (now, delivered)
                lines = render(doc, rates, colour=colour)
            width, height = shutil.get_terminal_size()
            # Clipped to the width: a wrapped line would push the frame off the screen.
            frame = "".join(f"{_clip(line, width)}\x1b[K\r\n"
                            for line in lines[:max(1, height - 1)])
            out.write("\x1b[H" + frame + "\x1b[J")
            out.flush()
            if _wait_for_quit(interval):
                return EXIT_OK


@contextlib.contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    """Alternate screen, hidden cursor and single-key input; all restored on the way out."""
    restore = None
    if sys.stdin.isatty():
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

        def restore() -> None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    out.write("\x1b[?1049h\x1b[?25l")
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        if restore is not None:
            restore()


def _wait_for_quit(seconds: float) -> bool:
    """Sleep up to ``seconds``; True when the user pressed q."""
    if not sys.stdin.isatty():
        time.sleep(seconds)  # nothing to read keys from: a plain pause between frames
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready and sys.stdin.read(1) in ("q", "Q"):
            return True
    return False


# ------------------------------------------------------------------ rendering


def render(doc: dict[str, Any], rates: dict[str, float], *, colour: bool) -> list[str]:
    """One frame as lines of text (ANSI colours only when ``colour``)."""
    from config.model import parse_time, utcnow

    def when(text: Any) -> datetime | None:
        try:
            return parse_time(text) if isinstance(text, str) else None
        except ValueError:
            return None

    now = when(doc.get("time")) or utcnow()

    def since(text: Any) -> str:
        t = when(text)
        return age_text((now - t).total_seconds()) if t else "-"

    ready = "READY" if doc.get("ready") else "NOT READY"
    head = (f"edge-agent {printable(doc.get('agent_id'))} @ {printable(doc.get('site'))}  "
            f"{_paint(ready, '32' if doc.get('ready') else '31', colour)}  "
            f"up {age_text(doc.get('uptime_s'))}  v{printable(doc.get('version'))}  "
            f"{printable(doc.get('time') or '')}")
    lines = [head]
    lines += [f"  ! {printable(r)}" for r in doc.get("readiness_reasons") or []]

    machines = doc.get("machines") or {}
    rows = []
    for mid, m in machines.items():
        ep = m.get("open_downtime")
        open_dt = ""
        if isinstance(ep, dict):
            open_dt = f"{ep.get('category')} {since(ep.get('started_at'))}"
            open_dt += " " + reason_label(ep)
        last = m.get("last_event")
        last_s = f"{last.get('type')} {since(last.get('time'))} ago" \
            if isinstance(last, dict) else "-"
        rows.append([mid, str(m.get("state") or "unknown").upper(), since(m.get("since")),
                     open_dt or "-", str(m.get("order_id") or "-"), last_s])
    lines += ["", *_table(["MACHINE", "STATE", "IN STATE", "OPEN DOWNTIME", "ORDER",
                           "LAST EVENT"], rows, colour, _MACHINE_COLOURS)]

    rows = []
    for name, s in (doc.get("sources") or {}).items():
        bad = s.get("bad_tags") or {}
        rows.append([name, str(s.get("state")), age_text(s.get("last_sample_age_s")),
                     str(len(bad)) + (f" ({', '.join(sorted(bad))[:40]})" if bad else ""),
                     "" if s.get("state") == "up" else str(s.get("last_error") or "")[:50]])
    lines += ["", *_table(["SOURCE", "STATE", "SAMPLE AGE", "BAD TAGS", "LAST ERROR"], rows,
                          colour, _LINK_COLOURS)]

    backlog = (doc.get("buffer") or {}).get("sinks") or {}
    rows = []
    for name, s in (doc.get("sinks") or {}).items():
        b = backlog.get(name) or {}
        rate = rates.get(name)
        rows.append([name, str(s.get("state")), str(b.get("pending", "-")),
                     str(b.get("leased", "-")), str(b.get("dead_letters", "-")),
                     age_text(b.get("oldest_pending_age_s")),
                     "-" if rate is None else f"{rate:.1f}/s",
                     str(s.get("held_reason") or s.get("last_error") or "")[:50]])
    lines += ["", *_table(["SINK", "STATE", "PENDING", "LEASED", "DEAD", "OLDEST", "RATE",
                           "LAST ERROR"], rows, colour, _LINK_COLOURS)]
    return lines


def _table(headers: list[str], rows: list[list[str]], colour: bool,
           palette: dict[str, str], state_col: int = 1) -> list[str]:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
        cells[state_col] = _paint(cells[state_col], palette.get(r[state_col].lower(), "0"),
                                  colour)
        out.append("  ".join(cells).rstrip())
    return out


_SGR = re.compile(r"(\x1b\[[0-9;]*m)")


def _clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (colour codes do not count)."""
    out: list[str] = []
    left = width
    for part in _SGR.split(line):
        if part.startswith("\x1b["):
            out.append(part)
        elif len(part) <= left:
            out.append(part)
            left -= len(part)
        else:
            out.append(part[:left])
            left = 0
    return "".join(out) + ("\x1b[0m" if left == 0 and "\x1b[" in line else "")


def _paint(text: str, code: str, colour: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colour else text
