"""``edge-agent buffer ...``: look into the buffer, and fix dead letters, while the agent runs.

Actions (all take ``--config FILE`` to find the buffer file, ``buffer.path`` or
``<data_dir>/buffer.db``)::

    stats         counts per sink (pending, leased, dead letters) and the oldest pending age
    pending       undelivered events, oldest first
    dead-letters  dead letters with their HTTP status and an excerpt of the reason
    export        every dead letter with its event (stdout or --out FILE), --format
                  jsonl (default), json or csv; ends with "exported N of T"
    replay        dead letters back to pending (all, or --id ID ...); the agent re-sends them
    purge         delete dead letters (all, or --id ID ...); needs --yes, and deletes only
                  what the last export covered unless --all (agent/buffer_export.py)

Safety while the agent runs: the read actions open the file read-only (``mode=ro``: they never
write, never take the write lock, never checkpoint); ``replay`` and ``purge`` work in chunks,
each its own short transaction (sized to stay near ``_CHUNK_SECONDS``, ~100 ms) with a pause
between them, so the agent's commits wait at most about one chunk (busy timeout) and never
fail. The agent notices the change (SQLite's ``data_version``) and recounts its statistics.

Exit codes: 0 done, 1 the buffer cannot be read or written (a replay or purge that fails
midway says how many it had already done: those are committed), 2 usage (bad arguments, a
purge without ``--yes`` or of dead letters no export covered, an invalid configuration).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
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
_DESCRIPTIONS = {
    "export": "Write every dead letter with its event, streamed from one snapshot, and record "
              "what was written beside the buffer: purge deletes only what an export covered.",
    "purge": "Delete dead letters the last export covered (all, or --id ...). If any of them "
             "failed after that export, nothing is deleted unless --all. Needs --yes.",
}
_EXCERPT = 80
_CHUNK_SECONDS = 0.1  # target write-lock hold per replay/purge chunk
_CHUNK_PAUSE = 0.05  # between chunks: the agent's writer takes its turn
_FIRST_CHUNK, _MIN_CHUNK, _MAX_CHUNK = 1000, 50, 50_000


def add_parser(sub: Any) -> None:
    """Register ``buffer`` and its actions on the CLI's subparsers."""
    from agent.cli_conventions import add_config_option, command

    buf = command(sub, "buffer", "inspect the buffer; list, export, replay or purge dead "
                  "letters (safe while the agent runs)",
                  "Look into the agent's buffer and fix dead letters while the agent runs "
                  "(reads never write; replay and purge are short transactions).",
                  ["edge-agent buffer stats --config /etc/edge-agent/config.yaml"])
    actions = buf.add_subparsers(dest="buffer_command", metavar="ACTION")
    helps = {
        "stats": "counts and oldest pending age per sink",
        "pending": "list undelivered events, oldest first",
        "dead-letters": "list dead letters with status and reason excerpt",
        "export": "write every dead letter (JSON lines, JSON or CSV)",
        "replay": "return dead letters to pending (all, or --id ...)",
        "purge": "delete exported dead letters (all, or --id ...); needs --yes",
    }
    examples = {
        "stats": "edge-agent buffer stats --config config.yaml --json",
        "pending": "edge-agent buffer pending --config config.yaml --sink erp --limit 20",
        "dead-letters": "edge-agent buffer dead-letters --config config.yaml",
        "export": "edge-agent buffer export --config config.yaml --format csv --out dead.csv",
        "replay": "edge-agent buffer replay --config config.yaml --id <event id>",
        "purge": "edge-agent buffer purge --config config.yaml --yes",
    }
    for name in _ACTIONS:
        p = command(actions, name, helps[name], _DESCRIPTIONS.get(
            name, helps[name][0].upper() + helps[name][1:] + "."), [examples[name]])
        add_config_option(p)
        p.add_argument("--sink", default=None, help="only this sink (default: all)")
        if name in ("stats", "pending", "dead-letters"):
            p.add_argument("--json", action="store_true", help="JSON instead of a table")
        if name in ("pending", "dead-letters"):
            p.add_argument("--limit", type=int, default=1000,
                           help="at most this many rows (default %(default)s)")
        if name == "export":
            p.add_argument("--out", type=Path, default=None, help="file (default: stdout)")
            p.add_argument("--format", default="jsonl", choices=["jsonl", "json", "csv"],
                           help="jsonl: one object per line (default); json: one array; "
                           "csv: flat columns with the event as JSON text")
        if name in ("replay", "purge"):
            p.add_argument("--id", dest="ids", action="append", default=None,
                           help="event id (repeatable; default: every dead letter)")
        if name == "purge":
            p.add_argument("--yes", action="store_true",
                           help="really delete (without it, only say what would go)")
            p.add_argument("--all", dest="purge_all", action="store_true",
                           help="also delete dead letters the last export did not cover")


def run(args: argparse.Namespace) -> int:
    """Run one ``buffer`` action; the exit code."""
    from agent.wiring.load import load_buffer_path
    from buffer.sqlite import SqliteBuffer

    action = getattr(args, "buffer_command", None)
    if action not in _ACTIONS:
        print(f"usage: edge-agent buffer {{{','.join(_ACTIONS)}}} --config FILE",
              file=sys.stderr)
        return 2
    if (getattr(args, "limit", 1) or 1) < 1:
        print("edge-agent buffer: --limit must be at least 1", file=sys.stderr)
        return 2
    # Only what locates the file: no secret is resolved (see load_buffer_path).
    path = load_buffer_path(args.config)
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
    from agent.buffer_export import letter_doc

    return letter_doc(d)


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
    from agent.buffer_export import ExportRecord, export_rows, now_text, tracked, write_record
    from agent.cli_conventions import Progress

    at = now_text()  # before the snapshot: what failed later is not taken as exported
    total, letters = buf.iter_dead_letters(args.sink)
    highest: dict[str, int] = {}
    progress = Progress("exported", total)
    try:
        if args.out is None:
            n = export_rows(tracked(letters, highest), out, args.format, progress)
            out.flush()
        else:
            with args.out.open("w", encoding="utf-8", newline="") as f:
                n = export_rows(tracked(letters, highest), f, args.format, progress)
    except BrokenPipeError:
        raise  # the reader of stdout went away: nothing recorded, main() ends quietly
    except OSError as exc:
        print(f"edge-agent buffer export: cannot write {args.out or 'stdout'}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        letters.close()
    where = f" to {args.out}" if args.out is not None else ""
    print(f"exported {n} of {total} dead letter(s){where}", file=sys.stderr)
    try:
        write_record(buf.path, ExportRecord(at, args.sink, highest, n,
                                            None if args.out is None else str(args.out)))
    except OSError as exc:
        print(f"edge-agent buffer export: cannot record the export beside the buffer "
              f"({exc.strerror or exc}); purge will need --all", file=sys.stderr)
    return 0


def in_chunks(step: Callable[[int], tuple[int, bool]], what: str) -> int:
    """Run ``step(size)`` (one transaction of at most ``size`` rows; returns the rows done and
    whether more may follow) until it says no more; chunk sizes adapt so that each holds the
    write lock for about ``_CHUNK_SECONDS``. Raises ``PartialError`` saying how many rows were
    done if a chunk fails after others committed."""
    done, size = 0, _FIRST_CHUNK
    while True:
        started = time.monotonic()
        try:
            n, more = step(size)
        except EdgeAgentError as exc:
            if done:
                raise PartialError(f"{what} {done} dead letter(s) (committed), then "
                                   f"failed: {exc}") from exc
            raise
        done += n
        if not more:
            return done
        took = time.monotonic() - started
        size = max(_MIN_CHUNK, min(_MAX_CHUNK, int(size * _CHUNK_SECONDS / max(took, 1e-3))))
        time.sleep(_CHUNK_PAUSE)


def _limited(n: int, size: int) -> tuple[int, bool]:
    """A chunk of a ``limit=size`` call: more may follow only if it came back full."""
    return n, n == size


def _slices(call: Callable[[list[str]], int],
            ids: list[str]) -> Callable[[int], tuple[int, bool]]:
    """Steps over ``ids`` in slices: each step calls ``call`` on the next ``size`` ids."""
    pos = 0

    def step(size: int) -> tuple[int, bool]:
        nonlocal pos
        chunk = ids[pos:pos + size]
        pos += len(chunk)
        return (call(chunk) if chunk else 0), pos < len(ids)
    return step


class PartialError(EdgeAgentError):
    """A chunked replay or purge failed after some chunks were committed."""


def _replay(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    n = in_chunks(lambda size: _limited(buf.replay_dead_letters(args.sink, args.ids,
                                                                 limit=size), size),
                  "returned")
    out.write(f"returned {n} dead letter(s) to pending; the agent delivers them next\n")
    return 0


def _purge(buf: SqliteBuffer, args: argparse.Namespace, out: TextIO) -> int:
    from agent.buffer_export import coverage, read_record

    total, letters = buf.iter_dead_letters(args.sink, args.ids)
    try:
        if args.purge_all:
            # Start the stream: closing one that never started would not end its read
            # snapshot, and the first chunk's write would then fail with "database is locked".
            next(letters, None)
            covered: list[DeadLetter] = []
            missing = 0
        else:
            covered, missing = coverage(letters, read_record(buf.path))
    finally:
        letters.close()
    if missing:
        print(f"edge-agent buffer purge: {missing} of {total} dead letter(s) are not in the "
              "last export (failed since, or never exported); nothing deleted. Run "
              "'edge-agent buffer export' first, or purge --all to delete them unseen.",
              file=sys.stderr)
        return 2
    if not args.yes:
        print(f"edge-agent buffer purge: would delete {total} dead letter(s); nothing "
              "deleted. Run again with --yes.", file=sys.stderr)
        return 2
    if args.purge_all:
        n = in_chunks(lambda size: _limited(buf.purge_dead_letters(args.sink, args.ids,
                                                                     limit=size), size),
                      "deleted")
    else:
        by_sink: dict[str, list[str]] = {}
        for d in covered:
            by_sink.setdefault(d.sink, []).append(d.id)
        n = sum(in_chunks(_slices(functools.partial(buf.purge_dead_letters, sink), ids),
                          "deleted") for sink, ids in by_sink.items())
    out.write(f"deleted {n} dead letter(s)\n")
    return 0


_ACTION_FNS: dict[str, Callable[[SqliteBuffer, argparse.Namespace, TextIO], int]] = {
    "stats": _stats, "pending": _pending, "dead-letters": _dead_letters, "export": _export,
    "replay": _replay, "purge": _purge,
}
