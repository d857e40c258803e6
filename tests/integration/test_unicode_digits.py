"""``str.isdigit()`` is true for '²' (and other digits ``int()`` refuses): every number parsed
from outside input checks ``isascii()`` too (issue 11, #6). Real token endpoint over a socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.httpserver import HttpServer, Request, Response
from agent.notify import _watchdog_interval
from agent.receiver import Receiver
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import HttpSinkConfig
from agent.sinks.http import HttpSink

SOURCE = "/sites/s/lines/l/machines/m1"


@pytest.mark.parametrize("expires_in", ["²", "١٢", "1e999", 1e308 * 10])
async def test_an_odd_expires_in_is_ignored_not_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, expires_in: object) -> None:
    async def token(req: Request) -> Response:
        return Response(200, json.dumps({"access_token": "tok-abcdef123456",
                                         "expires_in": expires_in}).encode())

    endpoint = HttpServer(token, "127.0.0.1", 0)
    port = await endpoint.start()
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    rx.faults.require_token = "tok-abcdef123456"
    sink = HttpSink("erp", HttpSinkConfig.model_validate({
        "type": "http", "url": rx.url, "auth": {"oauth2": {
            "token_url": f"http://127.0.0.1:{port}/token", "client_id": "edge",
            "client_secret": "s3cret-value"}}}))
    try:
        doc = {"specversion": "1.0", "id": "ev-1", "source": SOURCE,
               "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
               "data": {"quantity": 1}}
        d = await sink.deliver([OutboundEvent("ev-1", SOURCE, json.dumps(doc))])
        assert d.outcome is Outcome.ACCEPTED, d
        assert "Traceback" not in caplog.text
    finally:
        await sink.aclose()
        await rx.aclose()
        await endpoint.aclose()


@pytest.mark.parametrize("usec", ["²", "\uff11\uff10", "-5", ""])
def test_a_watchdog_usec_that_is_not_ascii_digits_means_no_watchdog(usec: str) -> None:
    assert _watchdog_interval({"WATCHDOG_USEC": usec}) is None
    assert _watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "²"}) is None
