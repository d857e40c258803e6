"""``edge-agent buffer export`` and the record that lets ``purge`` delete only what was saved.

Export streams every dead letter (no default limit) from one read snapshot of the buffer, in
``jsonl`` (one object per line, the default), ``json`` (one array) or ``csv`` (flat columns,
the event as JSON text), and ends with "exported N of T" on stderr, T being the snapshot's
count. Memory stays constant whatever the size.

The export record: after a complete export the CLI writes ``<buffer file>.export.json`` beside
the buffer: when (the snapshot time), which sink (or all), and per sink the highest ``seq``
exported. ``purge`` without ``--all`` deletes only dead letters the record covers: of an
exported sink, ``seq`` at most that sink's highest, and dead-lettered before the export's
snapshot time (``failed_at``); if any selected dead letter is not covered it deletes nothing
and says how many are missing. A dead letter that failed after the export, or a replayed one
that failed again, is therefore never purged unseen.

Why a side file and not a table: export opens the buffer read-only (safe beside the running
agent), and the record is about the operator's files, not about delivery.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from config.model import format_time, parse_time, utcnow

__all__ = ["FORMATS", "ExportRecord", "Steps", "coverage", "export_rows", "letter_doc",
           "read_record", "record_path", "write_record"]

FORMATS = ("jsonl", "json", "csv")
_CSV_COLUMNS = ["sink", "id", "type", "status", "detail", "failed_at", "event"]


def letter_doc(d: Any) -> dict[str, Any]:
    """One dead letter as the export writes it (the event parsed when it is JSON)."""
    try:
        event: Any = json.loads(d.payload)
    except ValueError:
        event = d.payload
    return {"sink": d.sink, "id": d.id, "type": d.type, "status": d.status,
            "detail": d.detail, "failed_at": d.failed_at, "event": event}


class Steps(Protocol):
    """Progress of a long export (``agent.cli_conventions.Progress``)."""

    def step(self, n: int = 1) -> None: ...

    def finish(self) -> None: ...


def export_rows(letters: Iterable[Any], out: TextIO, fmt: str, progress: Steps) -> int:
    """Write every dead letter in ``fmt``; the count written."""
    n = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(_CSV_COLUMNS)
        for d in letters:
            doc = letter_doc(d)
            doc["event"] = d.payload
            writer.writerow(["" if doc[c] is None else doc[c] for c in _CSV_COLUMNS])
            n += 1
            progress.step()
    elif fmt == "json":
        out.write("[")
        for d in letters:
            out.write(("\n" if n == 0 else ",\n") + json.dumps(letter_doc(d)))
            n += 1
            progress.step()
        out.write("\n]\n" if n else "]\n")
    else:
        for d in letters:
            out.write(json.dumps(letter_doc(d)) + "\n")
            n += 1
            progress.step()
    progress.finish()
    return n


def tracked(letters: Iterable[Any], highest: dict[str, int]) -> Iterator[Any]:
    """Pass dead letters through, noting the highest seq per sink (for the record)."""
    for d in letters:
        if d.seq > highest.get(d.sink, 0):
            highest[d.sink] = d.seq
        yield d


@dataclass(frozen=True, slots=True)
class ExportRecord:
    at: str  # RFC 3339: the export's snapshot time
    sink: str | None  # the --sink filter; None: every sink
    highest_seq: dict[str, int]
    count: int
    out: str | None


def record_path(buffer_path: Path) -> Path:
    return buffer_path.with_name(buffer_path.name + ".export.json")


def write_record(buffer_path: Path, record: ExportRecord) -> None:
    path = record_path(buffer_path)
    tmp = path.with_name(path.name + ".tmp")
    # A fresh file, never through a link left at the temporary name (export may run as root
    # in a directory the agent's user can write).
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"at": record.at, "sink": record.sink,
                            "highest_seq": record.highest_seq, "count": record.count,
                            "out": record.out}, indent=2) + "\n")
    tmp.replace(path)


def read_record(buffer_path: Path) -> ExportRecord | None:
    try:
        doc = json.loads(record_path(buffer_path).read_text(encoding="utf-8"))
        return ExportRecord(str(doc["at"]), doc.get("sink"),
                            {str(k): int(v) for k, v in dict(doc["highest_seq"]).items()},
                            int(doc.get("count", 0)), doc.get("out"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def now_text() -> str:
    return format_time(utcnow())


def coverage(letters: Iterable[Any], record: ExportRecord | None) -> tuple[list[Any], int]:
    """(the dead letters the record covers, how many it does not)."""
    covered: list[Any] = []
    missing = 0
    at = parse_time(record.at) if record is not None else None
    for d in letters:
        ok = (record is not None and at is not None
              and record.sink in (None, d.sink)
              and d.seq <= record.highest_seq.get(d.sink, 0)
              and bool(d.failed_at) and parse_time(d.failed_at) < at)
        if ok:
            covered.append(d)
        else:
            missing += 1
    return covered, missing
