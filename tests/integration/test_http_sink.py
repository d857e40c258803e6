"""HttpSink against the real reference receiver (one attempt per call, classified)."""

import hashlib
import json
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from agent.receiver import CE_BATCH, CE_SINGLE, Receiver
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import HttpSinkConfig
from agent.sinks.http import HttpSink

SOURCE = "/sites/s/lines/l/machines/m1"


def event(i, size=0):
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": SOURCE,
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "data": {"quantity": i, "pad": "x" * size}}
    return OutboundEvent(doc["id"], SOURCE, json.dumps(doc))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def receiver(tmp_path):
    rx = Receiver(tmp_path / "rx.db", "127.0.0.1", 0)
    await rx.start()
    yield rx
    await rx.aclose()


def make_sink(url, **cfg):
    config = HttpSinkConfig.model_validate({"type": "http", "url": url, "timeout": "2s", **cfg})
    return HttpSink("erp", config)


@pytest.fixture
async def sinks():
    made = []

    def factory(url, **cfg):
        sink = make_sink(url, **cfg)
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        await sink.aclose()
        await sink.aclose()  # idempotent


async def test_single_mode_headers_and_409_on_resend(receiver, sinks):
    sink = sinks(receiver.url, headers={"X-Plant": "plant-a"})
    assert sink.max_batch == 1
    d = await sink.deliver([event(1)])
    assert (d.outcome, d.status) == (Outcome.ACCEPTED, 201)
    seen = receiver.requests[-1]
    assert seen.headers["content-type"] == CE_SINGLE
    assert seen.headers["idempotency-key"] == "ev-1"
    assert seen.headers["x-plant"] == "plant-a"
    assert "authorization" not in seen.headers

    d = await sink.deliver([event(1)])
    assert (d.outcome, d.status) == (Outcome.ACCEPTED, 409)
    assert receiver.stats() == {"received": 1, "duplicates": 1}


async def test_batch_mode_body_key_and_content_type(receiver, sinks, tmp_path):
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    sink = sinks(receiver.url, mode="batch", batch_max_events=50,
                 auth={"bearer_token": f"${{file:{token}}}"})
    assert sink.max_batch == 50
    events = [event(i) for i in range(5)]
    d = await sink.deliver(events)
    assert d.outcome is Outcome.ACCEPTED and d.status == 207
    # All accepted: read in bulk, so no per-item map is needed to say so.
    assert all(d.result_for(e.id).outcome is Outcome.ACCEPTED for e in events)
    seen = receiver.requests[-1]
    assert seen.headers["content-type"] == CE_BATCH
    expected_key = hashlib.sha256("\n".join(e.id for e in events).encode()).hexdigest()
    assert seen.headers["idempotency-key"] == expected_key
    assert seen.headers["authorization"] == "Bearer t0k3n"
    assert seen.ids == [e.id for e in events]
    assert [e["id"] for e in receiver.events()] == [e.id for e in events]


async def test_207_mixed_is_parsed_per_item(receiver, sinks):
    sink = sinks(receiver.url, mode="batch")
    await sink.deliver([event(1)])  # so ev-1 becomes a duplicate
    receiver.faults.reject_ids = {"ev-2"}
    d = await sink.deliver([event(1), event(2), event(3)])
    assert d.status == 207
    assert d.outcome is Outcome.REJECTED  # the most urgent thing left to do
    assert d.result_for("ev-1").outcome is Outcome.ACCEPTED
    assert d.result_for("ev-1").status == 409
    assert d.result_for("ev-2").outcome is Outcome.REJECTED
    assert d.result_for("ev-2").status == 422
    assert "reject_ids" in d.result_for("ev-2").detail
    assert d.result_for("ev-3").outcome is Outcome.ACCEPTED


async def test_207_with_missing_ids_retries_those(receiver, sinks):
    sink = sinks(receiver.url, mode="batch")
    receiver.inject(207, body=json.dumps({"results": [
        {"id": "ev-1", "status": 201}, {"id": "someone-else", "status": 500}]}))
    d = await sink.deliver([event(1), event(2)])
    assert d.outcome is Outcome.RETRY
    assert d.result_for("ev-1").outcome is Outcome.ACCEPTED
    assert d.result_for("ev-2").outcome is Outcome.RETRY
    assert "someone-else" not in d.items


@pytest.mark.parametrize("body", ["not json", "{}", '{"results": "x"}',
                                  '{"results": [{"id": "ev-1", "status": "ok"}]}',
                                  '{"results": [{"id": "ev-1", "status": 999}]}'])
async def test_207_nonsense_is_retry(receiver, sinks, body):
    sink = sinks(receiver.url, mode="batch")
    receiver.inject(207, body=body)
    d = await sink.deliver([event(1)])
    assert d.outcome is Outcome.RETRY
    assert d.detail.startswith("receiver answered nonsense: ")
    assert body[:20] in d.detail


@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.ACCEPTED), (202, Outcome.ACCEPTED), (409, Outcome.ACCEPTED),
    (408, Outcome.RETRY), (429, Outcome.RETRY), (500, Outcome.RETRY), (503, Outcome.RETRY),
    (401, Outcome.HOLD), (403, Outcome.HOLD), (413, Outcome.TOO_LARGE),
    (400, Outcome.REJECTED), (410, Outcome.REJECTED), (422, Outcome.REJECTED),
    (302, Outcome.HOLD), (404, Outcome.HOLD), (405, Outcome.HOLD),
])
async def test_status_classes(receiver, sinks, status, outcome):
    sink = sinks(receiver.url)
    receiver.inject(status, body="x" * 2000)
    d = await sink.deliver([event(1)])
    assert (d.outcome, d.status) == (outcome, status)
    if outcome is Outcome.REJECTED:
        assert d.detail == "x" * 500  # body excerpt, at most 500 characters


async def test_retry_after_seconds_date_and_invalid(receiver, sinks):
    sink = sinks(receiver.url)
    receiver.inject(503, retry_after="2")
    d = await sink.deliver([event(1)])
    assert (d.outcome, d.retry_after) == (Outcome.RETRY, 2.0)

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    receiver.inject(429, retry_after=when)
    d = await sink.deliver([event(1)])
    assert d.outcome is Outcome.RETRY
    assert 20 < d.retry_after <= 30

    receiver.inject(503, retry_after="whenever")
    d = await sink.deliver([event(1)])
    assert (d.outcome, d.retry_after) == (Outcome.RETRY, None)

    receiver.inject(503, retry_after="-4")
    d = await sink.deliver([event(1)])
    assert d.retry_after == 0.0


async def test_connection_refused_is_retry(sinks):
    sink = sinks(f"http://127.0.0.1:{free_port()}/events")
    d = await sink.deliver([event(1)])
    assert d.outcome is Outcome.RETRY
    assert d.status is None
    assert "Connect" in d.detail


async def test_timeout_is_retry(receiver, sinks):
    sink = sinks(receiver.url, timeout="200ms")
    receiver.inject_commit_then_delay(2.0)
    d = await sink.deliver([event(1)])
    assert d.outcome is Outcome.RETRY
    assert d.detail.startswith("timeout")


async def test_401_then_rotated_token_works_after_reload(receiver, sinks, tmp_path):
    token = tmp_path / "token"
    token.write_text("old")
    receiver.faults.require_token = "new"
    sink = sinks(receiver.url, auth={"bearer_token": f"${{file:{token}}}"})
    d = await sink.deliver([event(1)])
    assert (d.outcome, d.status) == (Outcome.HOLD, 401)
    token.write_text("new\n")
    # The token is cached until the forwarder asks for a reload (it does so when held).
    assert (await sink.deliver([event(1)])).outcome is Outcome.HOLD
    await sink.reload_credentials()
    d = await sink.deliver([event(1)])
    assert (d.outcome, d.status) == (Outcome.ACCEPTED, 201)


async def test_unreadable_token_holds_without_sending(receiver, sinks, tmp_path):
    token = tmp_path / "token"
    token.write_text("abc")
    sink = sinks(receiver.url, auth={"bearer_token": f"${{file:{token}}}"})
    token.unlink()  # config validated while it existed; it vanished since
    d = await sink.deliver([event(1)])
    assert d.outcome is Outcome.HOLD
    assert str(token) in d.detail
    assert receiver.requests == []
    token.write_text("abc")
    await sink.reload_credentials()
    assert (await sink.deliver([event(1)])).outcome is Outcome.ACCEPTED
    assert receiver.requests[-1].headers["authorization"] == "Bearer abc"


async def test_single_mode_refuses_more_than_one_event_without_sending(receiver, sinks):
    sink = sinks(receiver.url)
    d = await sink.deliver([event(1), event(2)])
    assert d.outcome is Outcome.TOO_LARGE
    assert receiver.requests == []


async def test_404_for_an_item_in_a_207_is_a_rejection(receiver, sinks):
    sink = sinks(receiver.url, mode="batch")
    receiver.inject(207, body=json.dumps({"results": [
        {"id": "ev-1", "status": 404, "detail": "unknown machine"}]}))
    d = await sink.deliver([event(1)])
    assert d.result_for("ev-1").outcome is Outcome.REJECTED
    assert d.result_for("ev-1").detail == "unknown machine"


async def test_wrong_url_holds_with_a_clear_reason(receiver, sinks):
    sink = sinks(receiver.url, mode="batch")
    receiver.inject(404, body="no such route")
    d = await sink.deliver([event(1), event(2)])
    assert d.outcome is Outcome.HOLD
    assert "check the sink url" in d.detail


async def test_static_headers_never_duplicate_the_per_request_ones(receiver, sinks, caplog):
    """A static traceparent or Idempotency-Key (any case) would reach the receiver as a
    second line, joined into one malformed value; the agent's own wins, with a warning."""
    sink = sinks(receiver.url, headers={"Traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                                        "IDEMPOTENCY-KEY": "static", "X-Plant": "plant-a"})
    d = await sink.deliver([event(1)])
    assert d.outcome is Outcome.ACCEPTED
    seen = receiver.requests[-1]
    assert seen.headers["idempotency-key"] == "ev-1"
    assert seen.headers["traceparent"].count("-") == 3  # one header, not two joined
    assert not seen.headers["traceparent"].startswith("00-" + "a" * 32)
    assert seen.headers["x-plant"] == "plant-a"
    assert "Traceparent" in caplog.text and "IDEMPOTENCY-KEY" in caplog.text
