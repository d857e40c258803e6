"""What one small commit writes: the detector_state table of schema 3 and its migration.

A quiet agent commits one event with the state of the machine that produced it. Every page
that transaction touches is a WAL frame written and fsynced (4 KiB each), so the pages per
commit are the disk wear per event. Saved states are 2-3 KB: in the WITHOUT ROWID table of
schema 2 each one spilled into an overflow page; schema 3 keeps it whole in its leaf.
"""

from __future__ import annotations

import sqlite3
import struct
from collections import Counter
from pathlib import Path

import pytest

from buffer import migrations
from buffer.base import NewEvent, Settlement
from buffer.sqlite import SqliteBuffer

STATE = 3072  # a saved state padded as agent/detect/snapshot.py pads a 2-3 KB one


def _state(tag: str) -> str:
    return f'{{"m": "{tag}"}}'.ljust(STATE)


def _wal_pages(wal: Path, skip: int) -> tuple[list[int], int]:
    """Page numbers of the WAL frames after the first ``skip``, and the frame count."""
    data = wal.read_bytes()
    size = struct.unpack(">I", data[8:12])[0]
    count = (len(data) - 32) // (size + 24)
    pages = [struct.unpack(">I", data[32 + i * (size + 24):36 + i * (size + 24)])[0]
             for i in range(skip, count)]
    return pages, count


def _event(i: int) -> NewEvent:
    return NewEvent(f"ev-{i:04d}", f"m{i % 10}", "plantedge.downtime.started",
                    "2026-01-01T00:00:00.000Z", '{"x": "' + "y" * 500 + '"}')


def test_a_one_event_commit_writes_one_page_of_detector_state(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    buf = SqliteBuffer(db, 2**30)
    buf.open(["central"])
    try:
        conn = buf._require()
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # keep every frame to look at
        buf.append([], {f"m{i}": _state(f"start {i}") for i in range(10)})
        per_table: Counter[str] = Counter()
        commits = 0
        for i in range(30):
            _, before = _wal_pages(Path(f"{db}-wal"), 0)
            buf.append([_event(i)], {f"m{i % 10}": _state(f"after {i}")})
            pages, _ = _wal_pages(Path(f"{db}-wal"), before)
            leased = buf.lease("central", 10)
            buf.settle("central", Settlement(accepted=[r.seq for r in leased]))
            if i < 10:
                continue  # the first commits allocate pages
            names = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
            per_table.update(names.get(p, "other") for p in pages)
            commits += 1
        # One leaf per saved state (no overflow page), and nothing else beyond the event,
        # its id index entry, the AUTOINCREMENT counter and its delivery row.
        assert per_table["detector_state"] == commits, per_table
        assert sum(per_table.values()) <= 5 * commits, per_table
        assert buf.load_states()["m9"] == _state("after 29")
    finally:
        buf.close()


def test_a_v2_file_gets_the_rowid_detector_state_keeping_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "b.db"
    with monkeypatch.context() as m:  # an agent of schema 2 writes the file
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
        m.setattr(migrations, "SCHEMA_VERSION", 2)
        old = SqliteBuffer(db, 2**30)
        old.open(["central"])
        old.append([_event(1), _event(2)], {"m1": _state("one"), "__agent__": "7"})
        old.close()
    with sqlite3.connect(db) as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'detector_state'"
                           ).fetchone()[0]
        assert "WITHOUT ROWID" in sql and conn.execute("PRAGMA user_version").fetchone() == (2,)
    buf = SqliteBuffer(db, 2**30)
    buf.open(["central"])
    try:
        assert buf.schema_version == migrations.SCHEMA_VERSION == 3
        assert buf.load_states() == {"m1": _state("one"), "__agent__": "7"}
        assert [r.id for r in buf.lease("central", 10)] == ["ev-0001", "ev-0002"]
        buf.append([], {"m1": _state("two")})  # the upsert works on the new table
        assert buf.load_states()["m1"] == _state("two")
    finally:
        buf.close()
    with sqlite3.connect(db) as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'detector_state'"
                           ).fetchone()[0]
        assert "WITHOUT ROWID" not in sql
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
