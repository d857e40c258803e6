"""W3C traceparent for delivery requests: well-formed, one trace per request key."""

from __future__ import annotations

from agent.sinks.tracecontext import parse_traceparent, trace_id_for, traceparent


def test_header_is_well_formed_and_its_trace_follows_the_request_key() -> None:
    header, trace = traceparent("6f1d2c7e-3b4a-5e8f-9a0b-1c2d3e4f5a6b")
    parsed = parse_traceparent(header)
    assert parsed is not None
    assert parsed[0] == trace == trace_id_for("6f1d2c7e-3b4a-5e8f-9a0b-1c2d3e4f5a6b")
    assert parsed[2] == "01" and len(header) == 55
    again, _ = traceparent("6f1d2c7e-3b4a-5e8f-9a0b-1c2d3e4f5a6b")
    assert again != header and again[:36] == header[:36]  # same trace, a new span per attempt
    assert trace_id_for("another key") != trace


def test_malformed_headers_are_refused() -> None:
    good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert parse_traceparent(good) == ("a" * 32, "b" * 16, "01")
    for bad in (None, "", good.upper(), "01" + good[2:], "00-" + "0" * 32 + "-" + "b" * 16 +
                "-01", "00-" + "a" * 32 + "-" + "0" * 16 + "-01", good + "-x", good[:-1]):
        assert parse_traceparent(bad) is None, bad
