"""Reason entry, time-to-detect/synchronise figures and trace context on a real run:
Modbus simulator -> runtime -> reference receiver, with the health listener serving the
reason-entry endpoint and ``edge-agent reason`` run as a real subprocess against it."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT, free_port, wait_until
from support.configs import http_sink_yaml, modbus_agent_yaml

from agent import reasons_api
from agent.detect.classify import key_digest
from agent.health import HealthServer
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.sinks.http import batch_idempotency_key
from agent.sinks.tracecontext import parse_traceparent, trace_id_for
from agent.wiring.load import load_config_text
from config.errors import StorageFullError
from config.model import parse_time
from config.redaction import redact
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})
TOKEN = "line-terminal-token-1"
CLASSIFIED = "plantedge.downtime.classified"


def config_text(tmp: Path, plc_port: int, sink_url: str, *, entry: bool = True,
                mode: str = "batch") -> str:
    token_file = tmp / "reason-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    health = f', reason_entry: {{bearer_token: "${{file:{token_file}}}"}}' if entry else ""
    return modbus_agent_yaml("reason-edge", tmp / "agent", plc_port,
                             health=f'{{listen: "127.0.0.1:0"{health}}}') + """\
    timeout: 300ms
    tags:
      m.state: {table: holding, address: 0, type: uint16}
machines:
  m1:
    line: l1
    state: {tag: m.state, map: {1: running, 3: down}}
    downtime:
      reasons: {7: Bottle jam, 9: No material}
      reason_categories: {9: unplanned}
""" + http_sink_yaml(sink_url, mode=mode)


@dataclass
class Agent:
    rt: Runtime
    rx: Receiver
    plc: ModbusSimulator
    base: str

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.rx.events() if e["type"] == type_]

    async def one_stop(self) -> str:
        """Stop the machine and run it again; the ended episode's id once it arrived."""
        n = len(self.of_type("plantedge.downtime.ended"))
        await self.plc.set_value(STATE, 3)
        await wait_until(lambda: len(self.of_type("plantedge.downtime.started")) > n,
                         what="started")
        await self.plc.set_value(STATE, 1)
        await wait_until(lambda: len(self.of_type("plantedge.downtime.ended")) > n,
                         what="ended")
        return str(self.of_type("plantedge.downtime.ended")[-1]["data"]["episode_id"])


async def _start(tmp: Path, **kw: Any) -> AsyncIterator[Agent]:
    plc = ModbusSimulator(size=8)
    await plc.start()
    await plc.set_value(STATE, 1)
    rx = Receiver(tmp / "rx.db")
    await rx.start()
    assert plc.port is not None
    rt = Runtime(load_config_text(config_text(tmp, plc.port, rx.url, **kw), "<test>"))
    server = HealthServer(rt, "127.0.0.1:0")
    await rt.start()
    port = await server.start()
    try:
        await wait_until(lambda: rt.detectors["m1"].state.value == "running", what="running")
        yield Agent(rt, rx, plc, f"http://127.0.0.1:{port}")
    finally:
        await server.aclose()
        await rt.stop()
        await rx.aclose()
        await plc.stop()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    async for a in _start(tmp_path):
        yield a


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_reason_entry_over_http(agent: Agent) -> None:
    episode = await agent.one_stop()
    url = f"{agent.base}/machines/m1/episodes"
    reason = f"{url}/{episode}/reason"
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).status_code == 401
        assert (await http.get(url, headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await http.post(reason, json={"code": "7"})).status_code == 401
        r = await http.get(f"{agent.base}/machines/nope/episodes", headers=AUTH)
        assert r.status_code == 404 and r.json()["machines"] == ["m1"]
        r = await http.get(url, params={"open": "1", "recent": "5"}, headers=AUTH)
        assert r.status_code == 200
        listed = r.json()["episodes"]
        assert [e["episode_id"] for e in listed] == [episode]
        assert listed[0]["open"] is False and listed[0]["reason_code"] is None

        r = await http.post(reason, json={"code": "42"}, headers=AUTH)
        assert r.status_code == 422 and r.json()["known_codes"] == ["7", "9"]
        r = await http.post(f"{url}/not-an-episode/reason", json={"code": "7"}, headers=AUTH)
        assert r.status_code == 404
        r = await http.post(reason, json={"code": "7", "by": "plc"}, headers=AUTH)
        assert r.status_code == 422  # only the PLC itself classifies as plc
        r = await http.post(reason, content=b"not json", headers=AUTH)
        assert r.status_code == 400
        r = await http.post(reason, content=b'{"code": "7", "text": "\\ud800 jam"}',
                            headers=AUTH)
        assert r.status_code == 422  # a lone surrogate could not be stored

        body = {"code": "7", "text": "jam at the infeed", "by": "operator"}
        first = await http.post(reason, json=body, headers=AUTH)
        assert first.status_code == 201, first.text
        again = await http.post(reason, json=body, headers=AUTH)
        assert again.status_code == 200
        assert again.json()["event_id"] == first.json()["event_id"]
        assert again.json()["created"] is False
        # Already committed when answered: the event is in the buffer or delivered.
        got = await wait_until(lambda: agent.of_type(CLASSIFIED), what="classified")
        assert len(got) == 1
        data = got[0]["data"]
        assert got[0]["id"] == first.json()["event_id"]
        assert data["episode_id"] == episode and data["reason_code"] == "7"
        assert data["reason"] == "Bottle jam" and data["comment"] == "jam at the infeed"
        assert data["classified_by"] == "operator" and "category" not in data
        assert data["ended_at"] is not None and data["previous_reason_code"] is None

        other = await http.post(reason, json={"code": 9}, headers=AUTH)
        assert other.status_code == 201 and other.json()["event_id"] != first.json()["event_id"]
        got = await wait_until(lambda: len(agent.of_type(CLASSIFIED)) == 2 and
                               agent.of_type(CLASSIFIED), what="re-classification")
        assert got[1]["data"]["category"] == "unplanned"
        assert got[1]["data"]["classified_by"] == "api"
        assert got[1]["data"]["previous_reason_code"] == "7"
        r = await http.get(url, headers=AUTH)
        assert r.json()["episodes"][0]["reason_code"] == "9"
    assert agent.rx.stats()["duplicates"] == 0


async def test_a_retry_with_its_idempotency_key_does_not_undo_a_later_classification(
        agent: Agent) -> None:
    """A terminal retries request A (its answer was lost) after a supervisor classified the
    same stop with B: with the key, A answers as it did and B stays the latest."""
    episode = await agent.one_stop()
    url = f"{agent.base}/machines/m1/episodes"
    reason = f"{url}/{episode}/reason"
    keyed = {**AUTH, "Idempotency-Key": "terminal-3-req-0001"}
    async with httpx.AsyncClient() as http:
        first = await http.post(reason, json={"code": "7", "by": "operator"}, headers=keyed)
        assert first.status_code == 201, first.text
        later = await http.post(reason, json={"code": "9"}, headers=AUTH)
        assert later.status_code == 201
        retry = await http.post(reason, json={"code": "7", "by": "operator"}, headers=keyed)
        assert retry.status_code == 200, retry.text
        assert retry.json() == {**first.json(), "created": False}
        listed = (await http.get(url, headers=AUTH)).json()["episodes"]
        assert listed[0]["reason_code"] == "9"  # B is still the latest

        reused = await http.post(reason, json={"code": "9", "by": "operator"}, headers=keyed)
        assert reused.status_code == 422 and "terminal-3-req-0001" in reused.json()["error"]
        bad = await http.post(reason, json={"code": "7"},
                              headers={**AUTH, "Idempotency-Key": "with space"})
        assert bad.status_code == 400
        bad = await http.post(reason, json={"code": "7"},
                              headers={**AUTH, "Idempotency-Key": "k" * 256})
        assert bad.status_code == 400
        await wait_until(lambda: len(agent.of_type(CLASSIFIED)) == 2, what="two events")
    await agent.rt.flush()
    assert [e["data"]["reason_code"] for e in agent.of_type(CLASSIFIED)] == ["7", "9"]
    # The key is detector state: a restart (the snapshot restored) still knows it.
    det = agent.rt.detectors["m1"]
    clone = type(det)(det.machine_id, det.cfg, det.site)
    clone.restore(det.snapshot())
    again, events = clone.classify(episode, "7", None, "operator",
                                   parse_time("2030-01-01T00:00:00Z"), "terminal-3-req-0001")
    assert (again.event_id, again.created, events) == (first.json()["event_id"], False, [])


async def test_an_open_stop_can_be_classified_and_its_end_carries_the_code(
        agent: Agent) -> None:
    await agent.plc.set_value(STATE, 3)
    await wait_until(lambda: agent.of_type("plantedge.downtime.started"), what="started")
    async with httpx.AsyncClient() as http:
        url = f"{agent.base}/machines/m1/episodes"
        listed = (await http.get(url, headers=AUTH)).json()["episodes"]
        assert listed[0]["open"] is True
        r = await http.post(f"{url}/{listed[0]['episode_id']}/reason", json={"code": "9"},
                            headers=AUTH)
        assert r.status_code == 201
    await agent.plc.set_value(STATE, 1)
    ended = await wait_until(lambda: agent.of_type("plantedge.downtime.ended"), what="ended")
    assert ended[0]["data"]["reason_code"] == "9"
    classified = agent.of_type(CLASSIFIED)
    assert len(classified) == 1 and classified[0]["data"]["ended_at"] is None


async def test_an_empty_token_refuses_everyone_and_a_rotated_one_is_redacted(
        agent: Agent, tmp_path: Path) -> None:
    """An empty token file (emptied, or caught mid-rotation) must not let an empty bearer
    in; a token rotated while the agent runs works at once and is hidden from logs."""
    token_file = tmp_path / "reason-token"
    url = f"{agent.base}/machines/m1/episodes"
    async with httpx.AsyncClient() as http:
        token_file.write_text("\n", encoding="utf-8")
        # (The server strips header values: "Bearer " arrives as "Bearer".)
        r = await http.get(url, headers={"Authorization": "Bearer"})
        assert r.status_code == 503 and "empty" in r.json()["error"], r.text
        rotated = "rotated-line-token-2"
        token_file.write_text(rotated, encoding="utf-8")
        assert (await http.get(url, headers=AUTH)).status_code == 401
        r = await http.get(url, headers={"Authorization": f"Bearer {rotated}"})
        assert r.status_code == 200
    assert redact(f"token {rotated}") == "token ***"


async def test_hostile_bodies_get_clear_answers(agent: Agent) -> None:
    episode = await agent.one_stop()
    reason = f"{agent.base}/machines/m1/episodes/{episode}/reason"
    async with httpx.AsyncClient() as http:
        # Deep nesting is bad input (400), not a handler crash (500).
        r = await http.post(reason, content=b"[" * 100_000 + b"]" * 100_000, headers=AUTH)
        assert r.status_code == 413  # over the listener's body limit already
        r = await http.post(reason, content=b"[" * 20_000 + b"]" * 20_000, headers=AUTH)
        assert r.status_code == 400 and "nested" in r.json()["error"], r.text
        # Nobody, with a token or not, makes the health listener buffer megabytes.
        big = b'{"code": "7", "text": "' + b"x" * 100_000 + b'"}'
        assert (await http.post(reason, content=big)).status_code == 413
        r = await http.post(reason, json={"code": 7.5}, headers=AUTH)
        assert r.status_code == 422 and "whole number" in r.json()["error"]
        r = await http.post(reason, json={"code": "  "}, headers=AUTH)
        assert r.status_code == 422 and "required" in r.json()["error"]
    assert agent.of_type(CLASSIFIED) == []


async def test_reason_entry_is_off_by_default(tmp_path: Path) -> None:
    async for a in _start(tmp_path, entry=False):
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{a.base}/machines/m1/episodes", headers=AUTH)
        assert r.status_code == 404 and "off" in r.json()["error"]


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "reason", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "EDGE_AGENT_REASON_TOKEN": ""})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_reason_cli_against_the_running_agent(agent: Agent, tmp_path: Path) -> None:
    episode = await agent.one_stop()
    token = tmp_path / "reason-token"
    common = ["--url", agent.base, "--token-file", str(token)]
    code, out, err = await _cli("list", "m1", *common)
    assert code == 0, err
    assert episode in out and "ended" in out

    code, out, err = await _cli("set", "m1", "9", "--text", "no bottles", *common)
    assert code == 0, err
    assert f"latest stop is {episode}" in out and "classified: reason 9" in out
    code, out, err = await _cli("set", "m1", episode, "9", "--text", "no bottles", *common)
    assert code == 0, err
    assert "already classified" in out  # the same request twice: one event
    got = await wait_until(lambda: agent.of_type(CLASSIFIED), what="classified")
    assert len(got) == 1 and got[0]["data"]["classified_by"] == "operator"

    code, out, err = await _cli("set", "m1", "42", *common)
    assert code == 2 and "known codes: 7, 9" in err
    code, out, err = await _cli("set", "m1", "unknown-episode", "7", *common)
    assert code == 2 and "HTTP 404" in err
    code, out, err = await _cli("list", "m9", *common)
    assert code == 2 and "HTTP 404" in err
    bad = tmp_path / "bad-token"
    bad.write_text("nope", encoding="utf-8")
    code, out, err = await _cli("list", "m1", "--url", agent.base, "--token-file", str(bad))
    assert code == 2 and "HTTP 401" in err
    await asyncio.sleep(0)
    code, out, err = await _cli("list", "m1", "--url", agent.base, "--token-file",
                                str(tmp_path / "missing"))
    assert code == 2 and "cannot read" in err
    assert len(agent.of_type(CLASSIFIED)) == 1
    code, out, err = await _cli("list", "m1", "--url", f"http://127.0.0.1:{free_port()}",
                                "--token-file", str(token))
    assert code == 3 and "no agent answers" in err  # the CLI's exit code for unreachable


async def test_figures_and_trace_context_on_a_real_run(agent: Agent) -> None:
    for _ in range(2):
        await agent.one_stop()
    # Settled (counted after the delivery's figures were observed) for all that arrived.
    fw = agent.rt.forwarders["central"]
    await wait_until(lambda: fw.delivered_total >= len(agent.rx.events()), what="settled")
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{agent.base}/metrics")).text
        status = (await http.get(f"{agent.base}/status")).json()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(metrics) for s in fam.samples}
    received = agent.rx.events()
    n = len(received)
    assert n >= 4
    lag_count = samples[("edge_agent_event_detection_lag_seconds_count", (("machine", "m1"),))]
    lag_sum = samples[("edge_agent_event_detection_lag_seconds_sum", (("machine", "m1"),))]
    delay_count = samples[("edge_agent_event_delivery_delay_seconds_count",
                           (("sink", "central"),))]
    delay_sum = samples[("edge_agent_event_delivery_delay_seconds_sum", (("sink", "central"),))]
    assert lag_count >= n and delay_count >= n
    # Sane: min_duration is 0 and the PLC is polled every 50 ms, the receiver is local.
    assert 0 <= lag_sum / lag_count < 2.0
    assert 0 <= delay_sum / delay_count < 2.0
    assert samples[("edge_agent_reasons_unattributed_total", (("machine", "m1"),))] == 0
    figures = status["latency"]
    det, dlv = figures["detection_lag_s"]["m1"], figures["delivery_delay_s"]["central"]
    assert det["count"] >= n and 0 <= det["p50"] <= det["p90"] <= det["p99"] <= det["max"]
    assert dlv["count"] >= n and 0 <= dlv["p50"] <= dlv["p99"] < 2.0
    # The receiver can compute the same figures from detectedat.
    for e in received:
        detected = parse_time(e["detectedat"])
        assert detected >= parse_time(e["time"])

    # A well-formed traceparent on every delivery request, one trace per request.
    posts = [r for r in agent.rx.requests if r.method == "POST"]
    assert posts
    for r in posts:
        parsed = parse_traceparent(r.headers.get("traceparent"))
        assert parsed is not None, r.headers
        trace, _span, flags = parsed
        assert flags == "01"
        assert trace == trace_id_for(batch_idempotency_key(r.ids))
        assert r.headers["idempotency-key"] == batch_idempotency_key(r.ids)
    spans = [parse_traceparent(r.headers["traceparent"]) for r in posts]
    assert len({s[1] for s in spans if s}) == len(posts)  # one span per attempt


async def test_single_mode_trace_id_follows_the_event_id(tmp_path: Path) -> None:
    async for a in _start(tmp_path, mode="single"):
        await a.one_stop()
        posts = [r for r in a.rx.requests if r.method == "POST"]
        assert len(posts) >= 2
        for r in posts:
            parsed = parse_traceparent(r.headers.get("traceparent"))
            assert parsed is not None and parsed[0] == trace_id_for(r.ids[0])


async def test_one_stop_can_be_followed_through_the_log(agent: Agent,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG the event id and episode id are logged where the event passes, and the
    delivered line carries the trace id that the request's traceparent had."""
    caplog.set_level(logging.DEBUG)
    episode = await agent.one_stop()
    fw = agent.rt.forwarders["central"]
    await wait_until(lambda: fw.delivered_total >= len(agent.rx.events()), what="settled")
    ended = agent.of_type("plantedge.downtime.ended")[-1]
    stages: dict[str, logging.LogRecord] = {}
    for r in caplog.records:
        if getattr(r, "event_id", None) == ended["id"]:
            stages[r.stage] = r  # type: ignore[attr-defined]
    assert {"detected", "committed", "delivered"} <= set(stages), sorted(stages)
    for r in stages.values():
        assert r.episode_id == episode  # type: ignore[attr-defined]
        assert ended["id"] in r.getMessage()
    trace = stages["delivered"].trace_id  # type: ignore[attr-defined]
    sent = next(r for r in agent.rx.requests if ended["id"] in r.ids)
    parsed = parse_traceparent(sent.headers.get("traceparent"))
    assert parsed is not None and parsed[0] == trace and trace in stages["delivered"].getMessage()


async def test_a_dead_letter_is_logged_with_its_episode_and_trace(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    agent.rx.faults.status, agent.rx.faults.count = 422, 1  # the next request is refused
    await agent.plc.set_value(STATE, 3)
    record = await wait_until(lambda: next((r for r in caplog.records
                                            if getattr(r, "stage", None) == "dead_lettered"),
                                           None), what="dead letter")
    refused = next(r for r in agent.rx.requests if r.status == 422)
    parsed = parse_traceparent(refused.headers.get("traceparent"))
    assert parsed is not None and record.trace_id == parsed[0]
    assert record.event_id in record.getMessage() and parsed[0] in record.getMessage()
    assert record.episode_id == agent.rt.detectors["m1"].episode.episode_id  # type: ignore[union-attr]


async def test_a_retry_warning_carries_the_trace_of_the_refused_request(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    """At the default level the only delivery lines are failures: the warning that a sink is
    unavailable names the trace the receiver saw, so both logs can be matched."""
    caplog.set_level(logging.WARNING)
    agent.rx.faults.status, agent.rx.faults.count = 503, 1
    await agent.plc.set_value(STATE, 3)
    record = await wait_until(lambda: next((r for r in caplog.records
                                            if "unavailable" in r.getMessage()), None),
                              what="retry warning")
    refused = next(r for r in agent.rx.requests if r.status == 503)
    parsed = parse_traceparent(refused.headers.get("traceparent"))
    assert parsed is not None and record.trace_id == parsed[0]  # type: ignore[attr-defined]
    assert parsed[0] in record.getMessage()


def _disk_full(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Every commit fails as on a full disk, and a reason request waits 0.3 s for its
    commit; the function returned gives the disk back."""
    monkeypatch.setattr(reasons_api, "COMMIT_TIMEOUT", 0.3)
    buffer = agent.rt.committer._buffer
    real_append = buffer.append

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise StorageFullError("disk full (test)")

    monkeypatch.setattr(buffer, "append", full)
    return lambda: monkeypatch.setattr(buffer, "append", real_append)


async def test_a_commit_that_cannot_finish_answers_503_and_the_repeat_commits_once(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full while an operator classifies: 503 (queued, not committed), the repeat says
    the same event id, and once commits work the repeat answers 200 and one event arrives."""
    episode = await agent.one_stop()
    disk_back = _disk_full(agent, monkeypatch)
    reason = f"{agent.base}/machines/m1/episodes/{episode}/reason"
    async with httpx.AsyncClient() as http:
        first = await http.post(reason, json={"code": "7"}, headers=AUTH)
        assert first.status_code == 503 and "repeating" in first.json()["error"]
        again = await http.post(reason, json={"code": "7"}, headers=AUTH)
        assert again.status_code == 503
        assert again.json()["event_id"] == first.json()["event_id"]
        disk_back()
        done = await wait_until(lambda: _post_ok(http, reason), what="committed")
        assert done.status_code == 200 and done.json()["event_id"] == first.json()["event_id"]
    got = await wait_until(lambda: agent.of_type(CLASSIFIED), what="classified")
    assert [e["id"] for e in got] == [first.json()["event_id"]]


async def _post_ok(http: httpx.AsyncClient, url: str) -> httpx.Response | None:
    r = await http.post(url, json={"code": "7"}, headers=AUTH)
    return r if r.status_code != 503 else None


async def test_the_recent_stops_of_the_timeline_survive_a_restart(tmp_path: Path) -> None:
    """The status page's timeline is drawn from memory; after a restart it is seeded from the
    detector state, which keeps the recent ended stops with their classification."""
    async for a in _start(tmp_path):
        episode = await a.one_stop()
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{a.base}/machines/m1/episodes/{episode}/reason",
                                json={"code": "7", "by": "operator"}, headers=AUTH)
            assert r.status_code == 201
        before = (await a.rt.status())["machines"]["m1"]["recent_downtime"]
    async for b in _start(tmp_path):
        after = (await b.rt.status())["machines"]["m1"]["recent_downtime"]
        assert [e["episode_id"] for e in after] == [e["episode_id"] for e in before] == [episode]
        assert after[0]["reason"] == "Bottle jam" and after[0]["classified_by"] == "operator"
        assert after[0]["started_at"] == before[0]["started_at"]
        assert after[0]["ended_at"] == before[0]["ended_at"]


async def test_a_new_key_is_answered_only_once_it_is_committed(
        agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed request that changes nothing (the stop already has that reason) still records
    its key, and the key is what lets a retry after a restart answer as this one did. So the
    2xx waits for the commit of the state that holds it, as it does for an event: while the
    buffer cannot commit the answer is 503, not a 200 a crash would take back."""
    episode = await agent.one_stop()
    reason = f"{agent.base}/machines/m1/episodes/{episode}/reason"
    keyed = {**AUTH, "Idempotency-Key": "terminal-3-req-0002"}
    async with httpx.AsyncClient() as http:
        first = await http.post(reason, json={"code": "7"}, headers=AUTH)
        assert first.status_code == 201, first.text
        disk_back = _disk_full(agent, monkeypatch)
        same = await http.post(reason, json={"code": "7"}, headers=keyed)
        assert same.status_code == 503, same.text  # the key is not durable yet
        assert same.json()["event_id"] == first.json()["event_id"]
        disk_back()

        async def answered() -> httpx.Response | None:
            # 503 until the committer, backing off after the failures, has committed.
            r = await http.post(reason, json={"code": "7"}, headers=keyed)
            return r if r.status_code != 503 else None

        retry = await wait_until(answered, what="the key committed")
        assert retry.status_code == 200, retry.text
        assert retry.json()["event_id"] == first.json()["event_id"]
    # Committed with the detector state (a restart restores it from there).
    assert key_digest("terminal-3-req-0002") in (await agent.rt.buffer.load_states())["m1"]
