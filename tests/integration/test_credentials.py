"""Credentials that cannot be used hold the sink; secret values never leave in any form
(issue 11, #3-#5). Real receiver sockets, real token files, the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from support import free_port, wait_until

from agent.receiver import Receiver
from agent.sinks.base import OutboundEvent, Outcome
from agent.sinks.config import HttpSinkConfig
from agent.sinks.http import HttpSink
from config.redaction import add_secret_values, redact

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "/sites/s/lines/l/machines/m1"
GOOD = "Tok-good-7f3a9c1e"


def event(i: int) -> OutboundEvent:
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": SOURCE,
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "data": {"quantity": i}}
    return OutboundEvent(doc["id"], SOURCE, json.dumps(doc))


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    yield rx
    await rx.aclose()


def token_sink(url: str, token_file: Path) -> HttpSink:
    return HttpSink("erp", HttpSinkConfig.model_validate({
        "type": "http", "url": url, "timeout": "2s",
        "auth": {"bearer_token": f"${{file:{token_file}}}"}}))


async def test_a_token_file_rewritten_with_non_utf8_bytes_holds_and_never_sends_without_auth(
        tmp_path: Path, receiver: Receiver) -> None:
    token = tmp_path / "token"
    token.write_text(GOOD)
    receiver.faults.require_token = GOOD
    sink = token_sink(receiver.url, token)
    try:
        assert (await sink.deliver([event(1)])).outcome is Outcome.ACCEPTED
        token.write_bytes(b"\xff\xfeTok-\x80\x81-bad")
        receiver.faults.require_token = None  # a receiver that would take anything
        await sink.reload_credentials()  # the forwarder's reaction to a hold or a 401
        for i in (2, 3):
            d = await sink.deliver([event(i)])
            assert d.outcome is Outcome.HOLD, d
            assert "UTF-8" in d.detail and str(token) in d.detail
            assert "\\x" not in d.detail and "Tok-" not in d.detail
        assert all("authorization" in r.headers for r in receiver.requests), \
            "a request left without its configured Authorization header"
        assert len(receiver.requests) == 1
        token.write_text(GOOD)  # fixed: the next reload takes it
        await sink.reload_credentials()
        assert (await sink.deliver([event(4)])).outcome is Outcome.ACCEPTED
    finally:
        await sink.aclose()


@pytest.mark.parametrize("content", ["Tok-abc123456\nsecond-line", "Tok-abc\r123456",
                                     "Tok abc 123456", "Tok-\u00e9\u00e8-123456"])
async def test_a_token_that_is_not_a_header_value_holds_without_showing_it(
        tmp_path: Path, receiver: Receiver, content: str) -> None:
    token = tmp_path / "token"
    token.write_text(content)
    sink = token_sink(receiver.url, token)
    try:
        d = await sink.deliver([event(1)])
        assert d.outcome is Outcome.HOLD, d
        assert "not a valid" in d.detail and str(token) in d.detail
        for part in content.split():
            assert part[:6] not in d.detail
        assert receiver.requests == []
    finally:
        await sink.aclose()


def test_escaped_forms_of_a_secret_are_redacted() -> None:
    secret = 'S3cr"et/\u00e9\nline-two'
    add_secret_values([secret])
    for shown in (secret, repr(secret), json.dumps(secret), quote(secret, safe=""),
                  repr(secret.encode()), json.dumps({"reason": f"Bearer {secret}"}),
                  f"Illegal header value {f'Bearer {secret}'.encode()!r}"):
        out = redact(f"before {shown} after")
        assert "S3cr" not in out and "line-two" not in out, out


# --------------------------------------------------------------------------- url and headers


async def _echo_headers_400(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A receiver that quotes the request head back in its 400 answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    body = json.dumps({"error": "bad", "request": head.decode("latin-1")}).encode()
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


async def test_env_values_in_url_and_headers_never_reach_stored_reasons_or_output(
        tmp_path: Path) -> None:
    key, bearer = "Key/7d1e+c0ffee", "Bearer-77aa-bb99-cc00"
    env = {"EDGE_TEST_API_KEY": key, "EDGE_TEST_BEARER": bearer}
    server = await asyncio.start_server(_echo_headers_400, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
agent: {{id: cred, site: s1, data_dir: "{tmp_path / 'data'}"}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {free_port()},
         tags: {{st: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: st, map: {{1: running, 3: down}}}}}}
sinks:
  central:
    type: http
    url: "http://127.0.0.1:{port}/events?key=${{env:EDGE_TEST_API_KEY}}"
    headers: {{X-Api-Key: "${{env:EDGE_TEST_API_KEY}}"}}
    auth: {{bearer_token: "${{env:EDGE_TEST_BEARER}}"}}
    retry: {{initial_backoff: 10ms, max_backoff: 50ms}}
""")
    from agent.runtime import Runtime
    from agent.wiring.load import load_config
    from config.model import Quality, TagSample, utcnow

    os.environ.update(env)
    try:
        rt = Runtime(load_config(cfg))
        await rt.start()
        try:
            rt.on_samples("plc", [TagSample("st", 3, Quality.GOOD, utcnow())])

            async def dead() -> bool:
                return (await rt.buffer.stats()).sinks["central"].dead_letters > 0

            await wait_until(dead, timeout=10, what="a dead letter")
        finally:
            await rt.stop()
    finally:
        for name in env:
            os.environ.pop(name, None)
        server.close()
        await server.wait_closed()
    shown = _cli("buffer", "dead-letters", "--json", "--config", str(cfg), env=env)
    assert shown.returncode == 0, shown.stderr
    assert '"status": 400' in shown.stdout or '"status":400' in shown.stdout
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(cfg.read_text().replace("http://127.0.0.1", "ftp://127.0.0.1"))
    bad = _cli("validate", "--config", str(bad_cfg), env=env)
    assert bad.returncode == 2 and "sinks.central.url" in bad.stderr, bad.stderr
    for out in (shown.stdout + shown.stderr, bad.stdout + bad.stderr):
        for secret in (key, bearer):
            for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
                assert form not in out, out
