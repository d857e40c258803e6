"""``edge-agent buffer ...``: look into the buffer, and fix dead letters, while the agent runs.

Actions (all take ``--config FILE`` to find the buffer file, ``buffer.path`` or
``<data_dir>/buffer.db``)::

    stats         counts per sink (pending, leased, dead letters) and the oldest pending age
    pending       undelivered events, oldest first
    dead-letters  dead letters with their HTTP status and an excerpt of the reason
    export        dead letters as JSON lines (stdout or --out FILE), each with its event
    replay        dead letters back to pending (all, or --id ID ...); the agent re-sends them
    purge         delete dead letters (all, or --id ID ...); needs --yes

Safety while the agent runs: the read actions open the file read-only (``mode=ro``: they never
write, never take the write lock, never checkpoint); ``replay`` and ``purge`` write in one short
transaction each, and the agent's writer waits for it (busy timeout) instead of failing. The
agent notices the change (SQLite's ``data_version``) and recounts its statistics.

Exit codes: 0 done, 1 the buffer cannot be read or written, 2 usage (bad arguments, a purge
without ``--yes``, an invalid configuration).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from config.errors import EdgeAgentError
from config.model import age_seconds

if TYPE_CHECKING:  # the parser is built on every CLI call: keep its imports light
    from buffer.base import DeadLetter
    from buffer.sqlite import SqliteBuffer

__all__ = ["add_parser", "run"]

_ACTIONS = ("stats", "pending", "dead-letters", "export", "replay", "purge")
_EXCERPT = 80


def add_parser(sub: Any) -> None:
    """Register ``buffer`` and its actions on the CLI's subparsers."""
    buf = sub.add_parser("buffer", help="inspect the buffer; list, export, replay or purge "
                         "dead letters (safe while the agent runs)")
    actions = buf.add_subparsers(dest="buffer_command", metavar="ACTION")
    helps = {
        "stats": "counts and oldest pending age per sink",
        "pending": "list undelivered events, oldest first",
        "dead-letters": "list dead letters with status and reason excerpt",
        "export": "write dead letters as JSON lines",
        "replay": "return dead letters to pending (all, or --id ...)",
        "purge": "delete dead letters (all, or --id ...); needs --yes",
    }
    for name in _ACTIONS:
        p = actions.add_parser(name, help=helps[name])
        p.add_argument("--config", "-c", required=True, type=Path)
        p.add_argument("--sink", default=None, help="only this sink (default: all)")
        if name in ("stats", "pending", "dead-letters"):
            p.add_argument("--json", action="store_true", help="JSON instead of a table")
        if name in ("pending", "dead-letters", "export"):
            p.add_argument("--limit", type=int, default=1000,
                           help="at most this many rows (default %(default)s)")
        if name == "export":
            p.add_argument("--out", type=Path, default=None, help="file (default: stdout)")
        if name in ("replay", "purge"):
            p.add_argument("--id", dest="ids", action="append", default=None,
                           help="event id (repeatable; default: every dead letter)")
        if name == "purge":
            p.add_argument("--yes", action="store_true",
                           help="really delete (without it, only say what would go)")


def run(args: argparse.Namespace) -> int:
    """Run one ``buffer`` action; the exit code."""
    from agent.wiring.load import load_config
    from buffer.sqlite import SqliteBuffer

    action = getattr(args, "buffer_command", None)
    if action not in _ACTIONS:
        print(f"usage: edge-agent buffer {{{','.join(_ACTIONS)}}} --config FILE",
              file=sys.stderr)
        return 2
    if getattr(args, "limit", 1) < 1:
        print("edge-agent buffer: --limit must be at least 1", file=sys.stderr)
        return 2
    path = load_config(args.config).buffer_path
    if not path.exists():
        print(f"edge-agent buffer: no buffer file at {path} (has the agent run yet?)",
              file=sys.stderr)
        return 1
    writes = action in ("replay", "purge")
    try:
        buf = SqliteBuffer.attach(path, readonly=not writes)
    except EdgeAgentError as exc:
        print(f"edge-agent buffer: {exc}", file=sys.stderr)
        return 1
    try:
        return _ACTION_FNS[action](buf, args, sys.stdout)
    except EdgeAgentError as exc:
        print(f"edge-agent buffer {action}: {exc}", file=sys.stderr)
        return 1
    finally:
        buf.close()


# ------------------------------------------------------------------ actions


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _stats(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    st = buf.stats()
    sinks = {n: s for n, s in st.sinks.items() if args.sink in (None, n)}
    doc = {"path": str(buf.path), "events": st.events, "size_bytes": st.size_bytes,
           "dropped_total": st.dropped_total,
           "sinks": {n: {"pending": s.pending, "leased": s.leased,
                         "dead_letters": s.dead_letters,
                         "oldest_pending_time": s.oldest_pending_time,
                         "oldest_pending_age_s": age_seconds(s.oldest_pending_time)}
                     for n, s in sinks.items()}}
    if args.json:
        out.write(json.dumps(doc, indent=2) + "\n")
        return 0
    out.write(f"buffer {buf.path}: {st.events} events, {st.size_bytes} bytes, "
              f"{st.dropped_total} dropped since creation\n")
    rows = [["SINK", "PENDING", "LEASED", "DEAD", "OLDEST PENDING", "AGE (s)"]]
    for n, s in doc["sinks"].items():  # type: ignore[attr-defined]
        age = s["oldest_pending_age_s"]
        rows.append([n, str(s["pending"]), str(s["leased"]), str(s["dead_letters"]),
                     s["oldest_pending_time"] or "-", "-" if age is None else f"{age:.1f}"])
    _table(rows, out)
    return 0


def _pending(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    rows = buf.pending(args.sink, args.limit)
    if args.json:
        for r in rows:
            out.write(json.dumps({"seq": r.seq, "id": r.id, "key": r.key, "type": r.type,
                                  "attempts": r.attempts}) + "\n")
        return 0
    table = [["SEQ", "ID", "KEY", "TYPE", "ATTEMPTS"]]
    table += [[str(r.seq), r.id, r.key, r.type, str(r.attempts)] for r in rows]
    _table(table, out)
    out.write(f"{len(rows)} undelivered event(s) shown\n")
    return 0


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT else flat[:_EXCERPT - 3] + "..."


def _letter_doc(d: DeadLetter) -> dict[str, Any]:
    try:
        event: Any = json.loads(d.payload)
    except ValueError:
        event = d.payload
    return {"sink": d.sink, "id": d.id, "type": d.type, "status": d.status,
            "detail": d.detail, "failed_at": d.failed_at, "event": event}


def _dead_letters(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    letters = buf.dead_letters(args.sink, args.limit)
    if args.json:
        for d in letters:
            out.write(json.dumps(_letter_doc(d)) + "\n")
        return 0
    table = [["SINK", "ID", "TYPE", "STATUS", "FAILED AT", "REASON"]]
    table += [[d.sink, d.id, d.type, "-" if d.status is None else str(d.status),
               d.failed_at or "-", _excerpt(d.detail)] for d in letters]
    _table(table, out)
    out.write(f"{len(letters)} dead letter(s)\n")
    return 0


def _export(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    letters = buf.dead_letters(args.sink, args.limit)
    lines = "".join(json.dumps(_letter_doc(d)) + "\n" for d in letters)
    if args.out is None:
        out.write(lines)
    else:
        try:
            args.out.write_text(lines, encoding="utf-8")
        except OSError as exc:
            print(f"edge-agent buffer export: cannot write {args.out}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"exported {len(letters)} dead letter(s) to {args.out}", file=sys.stderr)
    return 0


def _replay(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    n = buf.replay_dead_letters(args.sink, args.ids)
    out.write(f"returned {n} dead letter(s) to pending; the agent delivers them next\n")
    return 0


def _purge(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    if not args.yes:
        wanted = set(args.ids) if args.ids else None
        n = sum(1 for d in buf.dead_letters(args.sink, 2**31)
                if wanted is None or d.id in wanted)
        print(f"edge-agent buffer purge: would delete {n} dead letter(s); nothing deleted. "
              "Run again with --yes (consider 'export' first).", file=sys.stderr)
        return 2
    n = buf.purge_dead_letters(args.sink, args.ids)
    out.write(f"deleted {n} dead letter(s)\n")
    return 0


_ACTION_FNS: dict[str, Callable[[SqliteBuffer, argparse.Namespace, TextIO], int]] = {
    "stats": _stats, "pending": _pending, "dead-letters": _dead_letters, "export": _export,
    "replay": _replay, "purge": _purge,
}
