"""The lease reads its rows in one step (fields as a JSON array, payloads as one string cut by
their lengths): every payload and field must come back exactly as appended, in seq order, and
a payload SQLite cannot measure (a NUL character) must still come back whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from buffer.base import NewEvent
from buffer.sqlite import SqliteBuffer

_ODD = [
    '{"data":{"text":"plain"}}',
    "",
    '{"note":"\u00fc\u20ac\U0001f600 \\" \\\\ \\u2028"}',
    "line\nbreak\ttab\x1e\x1f",
    "x" * 70_000,  # larger than a page
]
# SQLite's length() stops at a NUL: then the lease falls back to fetching row by row.
_NUL = "nul \x00 inside"


@pytest.mark.parametrize("payloads", [_ODD, [*_ODD[:2], _NUL, *_ODD[2:]]],
                         ids=["packed", "nul-fallback"])
def test_leased_rows_are_exactly_what_was_appended(tmp_path: Path,
                                                   payloads: list[str]) -> None:
    b = SqliteBuffer(tmp_path / "buffer.db", 2**30)
    b.open(["erp"])
    try:
        events = [NewEvent(f"id-{i}-\u00e9\x01", f"m{i % 2}\x00k", 't"ype',
                           "2026-01-01T00:00:00Z", payload) for i, payload in enumerate(payloads)]
        b.append(events, {})
        leased = b.lease("erp", 100)
        assert [(r.id, r.key, r.type, r.payload, r.attempts) for r in leased] == [
            (e.id, e.key, e.type, e.payload, 0) for e in events]
        assert [r.seq for r in leased] == sorted(r.seq for r in leased)
    finally:
        b.close()


def test_a_lease_without_a_nul_reads_the_same_rows_in_order(tmp_path: Path) -> None:
    b = SqliteBuffer(tmp_path / "buffer.db", 2**30)
    b.open(["erp"])
    e_acute = "\u00e9"
    try:
        events = [NewEvent(f"e{i}", f"m{i % 3}", "t", "2026-01-01T00:00:00Z",
                           f'{{"n":{i},"s":"{e_acute * (i % 5)}"}}') for i in range(50)]
        b.append(events, {})
        first = b.lease("erp", 20)
        second = b.lease("erp", 100)
        assert [r.payload for r in first + second] == [e.payload for e in events]
        assert b.lease("erp", 10) == []
    finally:
        b.close()
