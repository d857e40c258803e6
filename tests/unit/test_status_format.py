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
