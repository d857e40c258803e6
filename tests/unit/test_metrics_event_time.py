"""The delivery-delay metric reads an event's time without parsing our own payloads."""

from __future__ import annotations

from agent.sinks.instrumented import _event_time
from config.model import Event, EventType, parse_time

T = parse_time("2026-11-28T08:00:00.123Z")


def test_reads_the_top_level_time_of_our_payload_even_with_a_time_in_data() -> None:
    e = Event(id="x", type=EventType.SCRAP_RECORDED, source="/s", time=T, key="m", sequence=1,
              data={"time": "1999-01-01T00:00:00Z", "quantity": 1})
    assert _event_time(e.to_json("agent")) == T.timestamp()


def test_other_serialisations_fall_back_to_parsing() -> None:
    assert _event_time('{"time": "2026-11-28T08:00:00.123Z", "id": "x"}') == T.timestamp()
    assert _event_time('{"id": "x", "type": "t", "time":"2026-11-28T08:00:00.123Z"}') \
        == T.timestamp()


def test_unreadable_is_none() -> None:
    assert _event_time("not json") is None
    assert _event_time('{"time": "yesterday"}') is None
    assert _event_time("[1, 2]") is None


def test_delivery_delay_counts_from_detectedat_even_with_one_in_data() -> None:
    from agent.sinks.instrumented import _committed_time

    committed = parse_time("2026-11-28T08:00:05.456Z")
    e = Event(id="x", type=EventType.SCRAP_RECORDED, source="/s", time=T, key="m", sequence=1,
              data={"detectedat": "1999-01-01T00:00:00Z"})
    assert _committed_time(e.to_json("agent", committed)) == committed.timestamp()
    # Buffered before detectedat existed: from the event's time.
    assert _committed_time(e.to_json("agent")) == T.timestamp()
    assert _committed_time('{"detectedat": "2026-11-28T08:00:05.456Z", "time": "x"}') \
        == committed.timestamp()
