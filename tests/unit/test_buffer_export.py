"""``buffer export`` streams every dead letter in three formats, and its record lets purge
delete only what was exported (a dead letter that failed later is not covered)."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from agent.buffer_export import (
    ExportRecord,
    coverage,
    export_rows,
    now_text,
    read_record,
    tracked,
    write_record,
)
from agent.cli_conventions import Progress
from buffer.base import NewEvent, Settlement
from buffer.sqlite import SqliteBuffer


def _dead(buf: SqliteBuffer, first: int, n: int) -> None:
    buf.append([NewEvent(id=f"e{i}", key="m1", type="plantedge.scrap.recorded",
                         time="2026-01-01T00:00:00.000Z", payload=json.dumps({"id": f"e{i}"}))
                for i in range(first, first + n)], {})
    rows = buf.lease("erp", n)
    buf.settle("erp", Settlement(dead={r.seq: (422, "no, \"quoted\"\nline") for r in rows}))


def test_every_row_in_each_format_and_purge_coverage(tmp_path: Path) -> None:
    buf = SqliteBuffer(tmp_path / "buffer.db", 2**30)
    buf.open(["erp"])
    try:
        _dead(buf, 0, 1500)  # more than the old default limit of 1000
        time.sleep(0.002)  # failed_at has millisecond precision: the export is strictly later
        at = now_text()
        out: dict[str, str] = {}
        highest: dict[str, int] = {}
        for fmt in ("jsonl", "json", "csv"):
            total, letters = buf.iter_dead_letters()
            f = io.StringIO()
            assert export_rows(tracked(letters, highest), f, fmt, Progress("x", total)) == 1500
            assert total == 1500
            out[fmt] = f.getvalue()
        ids = [f"e{i}" for i in range(1500)]
        assert [json.loads(line)["id"] for line in out["jsonl"].splitlines()] == ids
        assert [d["event"]["id"] for d in json.loads(out["json"])] == ids
        rows = list(csv.DictReader(io.StringIO(out["csv"])))
        assert [r["id"] for r in rows] == ids and rows[0]["detail"] == 'no, "quoted"\nline'
        write_record(buf.path, ExportRecord(at, None, highest, 1500, None))
        record = read_record(buf.path)
        assert record is not None and record.highest_seq == {"erp": 1500}

        _, letters = buf.iter_dead_letters()
        covered, missing = coverage(letters, record)
        assert (len(covered), missing) == (1500, 0)
        time.sleep(0.002)  # failed_at has millisecond precision: the next failure is later
        _dead(buf, 1500, 3)  # failed after the export
        _, letters = buf.iter_dead_letters()
        covered, missing = coverage(letters, record)
        assert (len(covered), missing) == (1500, 3)
        _, letters = buf.iter_dead_letters()
        assert coverage(letters, None) == ([], 1503)  # never exported: nothing covered
    finally:
        buf.close()


def test_purge_coverage_refuses_a_replayed_letter_that_failed_again_and_a_clock_step(
        tmp_path: Path) -> None:
    """Each condition of the record has its own case: a dead letter replayed after the export
    and dead again keeps its seq (only failed_at tells), and one that failed after the export
    while the wall clock stepped back has an old failed_at (only its seq tells)."""
    import sqlite3

    buf = SqliteBuffer(tmp_path / "buffer.db", 2**30)
    buf.open(["erp"])
    try:
        _dead(buf, 0, 5)
        time.sleep(0.002)
        at = now_text()
        highest: dict[str, int] = {}
        total, letters = buf.iter_dead_letters()
        assert export_rows(tracked(letters, highest), io.StringIO(), "jsonl",
                           Progress("x", total)) == 5
        record = ExportRecord(at, None, highest, 5, None)
        time.sleep(0.002)
        assert buf.replay_dead_letters("erp", ["e0"]) == 1
        buf.settle("erp", Settlement(dead={r.seq: (422, "again") for r in buf.lease("erp", 1)}))
        _dead(buf, 5, 1)
        with sqlite3.connect(buf.path) as conn:  # as if the clock had stepped back an hour
            conn.execute("UPDATE deliveries SET failed_at = '2000-01-01T00:00:00.000Z' "
                         "WHERE seq = ?", (highest["erp"] + 1,))
        _, letters = buf.iter_dead_letters()
        covered, missing = coverage(letters, record)
        assert sorted(d.id for d in covered) == ["e1", "e2", "e3", "e4"] and missing == 2
    finally:
        buf.close()


def test_the_record_is_never_written_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    buffer_path = tmp_path / "buffer.db"
    tmp = buffer_path.with_name(buffer_path.name + ".export.json.tmp")
    tmp.symlink_to(victim)
    write_record(buffer_path, ExportRecord("2026-01-01T00:00:00.000Z", None, {"erp": 3}, 3, None))
    assert victim.read_text() == "precious\n"
    record = read_record(buffer_path)
    assert record is not None and record.highest_seq == {"erp": 3}
