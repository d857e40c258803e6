"""``edge-agent status`` text: the leased column, and a recovered error shown as past."""

from __future__ import annotations

from agent.status_cli import format_status


def _doc(sink: dict[str, object]) -> dict[str, object]:
    return {"agent_id": "a", "site": "s", "ready": True, "time": "2026-01-01T12:05:00.000Z",
            "buffer": {"sinks": {"erp": {"pending": 4, "leased": 7, "dead_letters": 0,
                                         "oldest_pending_age_s": 3.0}}},
            "sinks": {"erp": {"type": "http", "state": "delivering", "delivered_total": 9,
                              **sink}}}


def test_leased_column_and_recovered_error() -> None:
    text = format_status(_doc({"last_error": None, "previous_error": {
        "error": "HTTP 503: busy", "at": "2026-01-01T12:00:00.000Z"}}))
    header, row = [line.split() for line in text.splitlines()[-2:]]
    assert header[:5] == ["id", "type", "state", "pending", "leased"]
    assert row[:5] == ["erp", "http", "delivering", "4", "7"]
    assert "(recovered; last error 5m ago: HTTP 503: busy)" in text


def test_current_error_is_shown_as_is() -> None:
    text = format_status(_doc({"last_error": "HTTP 503: busy", "state": "retrying"}))
    assert text.splitlines()[-1].endswith("HTTP 503: busy") and "recovered" not in text


def test_open_downtime_shows_the_reason_name() -> None:
    doc = _doc({})
    doc["machines"] = {"m1": {"state": "down", "open_downtime": {
        "category": "unplanned", "started_at": "2026-01-01T12:00:00.000Z",
        "reason_code": "7", "reason": "Bottle jam"}},
        "m2": {"state": "down", "open_downtime": {"category": "unplanned",
                                                  "reason_code": None}}}
    text = format_status(doc)
    assert "reason 7 (Bottle jam)" in text and "no reason yet" in text


def test_text_from_elsewhere_cannot_break_the_table_or_drive_the_terminal() -> None:
    """A proxy's multi-line error page and a PLC reason string with escape sequences: one row
    each in `status` and `top`, and no control character reaches the terminal (top's own
    colours are off here)."""
    from agent.top import render

    doc = _doc({"last_error": "HTTP 502: <html>\r\n<head><title>502</title></head>\r\n",
                "state": "retrying"})
    doc["machines"] = {"m\n1": {"state": "down", "open_downtime": {
        "category": "unplanned", "reason_code": "JAM\x1b[2J\x1b]0;owned\x07\x9b31m"}}}
    for text in (format_status(doc), "\n".join(render(doc, {}, colour=False))):
        assert not any((ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f for c in text)
        assert len([line for line in text.splitlines() if "HTTP 502" in line]) == 1
        jam = [line for line in text.splitlines() if "JAM" in line]
        assert len(jam) == 1 and jam[0].split()[:2] == ["m", "1"]


def test_top_clips_lines_to_the_terminal_width_not_counting_colours() -> None:
    """A line wider than the terminal would wrap and push the live frame off the screen."""
    import re

    from agent.top import _clip, render

    doc = _doc({})
    doc["machines"] = {"press-3": {"state": "down", "order_id": "PO-" + "9" * 60,
                                   "open_downtime": {"category": "unplanned",
                                                     "reason_code": "7", "reason": "Jam"}}}
    for line in render(doc, {}, colour=True):
        clipped = _clip(line, 40)
        visible = re.sub(r"\x1b\[[0-9;]*m", "", clipped)
        assert visible == re.sub(r"\x1b\[[0-9;]*m", "", line)[:40]
        assert clipped.count("\x1b[31m") == line.count("\x1b[31m")  # colour kept
        if "\x1b[" in clipped:
            assert clipped.endswith("\x1b[0m")  # never leaves the terminal red
