"""A central API or token endpoint that answers hostile bodies (a real server on loopback):
the sink turns each into a retry with a clear detail, never an exception out of ``deliver``
(which logged a traceback on every attempt)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.httpserver import HttpServer, Request, Response
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import HttpSinkConfig
from agent.sinks.http import HttpSink

SOURCE = "/sites/s/lines/l/machines/m1"
DEEP = b"[" * 50000 + b"]" * 50000  # deeper than json.loads can recurse


def event(i: int) -> OutboundEvent:
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": SOURCE,
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "data": {"quantity": i}}
    return OutboundEvent(str(doc["id"]), SOURCE, json.dumps(doc))


async def hostile(req: Request) -> Response:
    if req.path == "/token":
        return Response(200, DEEP)
    if req.path == "/token-refused":
        return Response(400, b'{"error": ' + DEEP + b"}")
    return Response(207, b'{"results": ' + DEEP + b"}")


@pytest.fixture
async def base() -> AsyncIterator[str]:
    server = HttpServer(hostile, "127.0.0.1", 0)
    port = await server.start()
    yield f"http://127.0.0.1:{port}"
    await server.aclose()


def sink(base: str, tmp: Path, token_path: str | None = None) -> HttpSink:
    cfg: dict[str, object] = {"type": "http", "url": f"{base}/events", "timeout": "2s",
                              "mode": "batch"}
    if token_path is not None:
        (tmp / "secret").write_text("Client-Secret-42")
        cfg["auth"] = {"oauth2": {"token_url": f"{base}{token_path}", "client_id": "edge",
                                  "client_secret": f"${{file:{tmp / 'secret'}}}"}}
    return HttpSink("erp", HttpSinkConfig.model_validate(cfg))


@pytest.mark.parametrize("token_path, outcome", [
    (None, Outcome.RETRY), ("/token", Outcome.RETRY), ("/token-refused", Outcome.HOLD)])
async def test_json_nested_too_deep_is_an_answer_not_an_exception(
        base: str, tmp_path: Path, token_path: str | None, outcome: Outcome) -> None:
    s = sink(base, tmp_path, token_path)
    try:
        delivery = await s.deliver([event(1), event(2)])
    finally:
        await s.aclose()
    assert delivery.outcome is outcome, delivery
    assert "RecursionError" not in delivery.detail  # understood, not an unexpected failure
