"""OPC UA source and its commissioning commands (``edge-agent browse``, ``probe``,
``opcua gen-cert``) against a real asyncua server on 127.0.0.1 (one server for the module; the
CLI runs in a worker thread with its own event loop).

The server publishes and *enforces* small operation limits (MaxNodesPerRead and
MaxMonitoredItemsPerCall of 25), so every test also checks that the agent chunks its requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from asyncua import ua
from cryptography import x509
from support import free_port, stop_task, wait_until
from support.configs import http_sink_yaml

from agent.cli import main
from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.wiring.load import load_config_text
from config.errors import ConnectionLostError, PeerTimeoutError
from config.model import Quality, TagSample
from protocols.opcua.config import OpcuaSourceConfig
from protocols.opcua.security import certificate_uri, fingerprint
from protocols.opcua.source import OpcuaSource
from protocols.opcua.testserver import OpcuaTestServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMIT = 25
BIG = 120

VARIABLES: dict[str, Any] = {}
for prefix in ("Sub", "Poll"):
    VARIABLES.update({f"{prefix}.State": 1, f"{prefix}.Reason": 0, f"{prefix}.Scrap": 100,
                      f"{prefix}.Order": "PO-1"})
VARIABLES.update({"Q.Value": 1.5, "Q.Flag": True, "Mixed.Good": 7, "Mixed.Text": "hello",
                  "Mixed.Array": 0})
VARIABLES.update({f"Big.N{i}": i for i in range(BIG)})
VARIABLES.update({"Cell.State": 3, "Cell.Speed": 12.5, "Cell.Order": "PO-9"})
VARIABLES.update({"Dead.Band": 100.0})
TYPES = {f"{p}.Scrap": ua.VariantType.UInt32 for p in ("Sub", "Poll")}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[OpcuaTestServer]:
    srv = OpcuaTestServer(dict(VARIABLES), types=TYPES, max_nodes_per_read=LIMIT,
                          max_monitored_items_per_call=LIMIT)
    await srv.start()
    # An array-valued node: a tag on it must be bad, not a guessed scalar.
    await srv.set("Mixed.Array", [1, 2, 3])
    yield srv
    await srv.stop()


class Collect:
    """A SampleSink that keeps everything."""

    def __init__(self) -> None:
        self.samples: list[TagSample] = []
        self.up = 0

    def emit(self, samples: Sequence[TagSample]) -> None:
        self.samples.extend(samples)

    def connected(self) -> None:
        self.up += 1

    def last(self, tag: str) -> TagSample | None:
        for s in reversed(self.samples):
            if s.tag == tag:
                return s
        return None


def source_config(srv: OpcuaTestServer, tags: dict[str, Any], **extra: Any) -> OpcuaSourceConfig:
    return OpcuaSourceConfig.model_validate({"type": "opcua", "endpoint": srv.endpoint,
                                             "timeout": "2s", "tags": tags, **extra})


def runtime_config(tmp: Path, srv: OpcuaTestServer, prefix: str, mode: str, sink_url: str):
    timing = "publishing_interval: 50ms" if mode == "subscribe" else "poll_interval: 50ms"
    text = f"""
agent: {{id: test-edge, site: plant-t, data_dir: "{tmp / 'agent'}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:0"}}
sources:
  plc:
    type: opcua
    endpoint: {srv.endpoint}
    mode: {mode}
    {timing}
    timeout: 2s
    backoff: {{initial: 50ms, max: 500ms}}
    tags:
      m.state: {{node: "{srv.node(prefix + '.State')}", type: int}}
      m.reason: {{node: "{srv.node(prefix + '.Reason')}"}}
      m.scrap: {{node: "{srv.node(prefix + '.Scrap')}", type: int}}
      m.order: {{node: "{srv.node(prefix + '.Order')}", type: string}}
machines:
  m1:
    line: l1
    state: {{tag: m.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 100ms, reason_tag: m.reason, reasons: {{5: Jam}}}}
    scrap: {{counter: m.scrap, window: 500ms}}
    order_tag: m.order
""" + http_sink_yaml(sink_url, max_backoff="500ms")
    return load_config_text(text, "<test>")


def of_type(events: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"plantedge.{suffix}"]


@pytest.mark.parametrize("mode,prefix", [("subscribe", "Sub"), ("poll", "Poll")])
async def test_downtime_and_scrap_events_in_both_modes(
        tmp_path: Path, server: OpcuaTestServer, mode: str, prefix: str) -> None:
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    rt = Runtime(runtime_config(tmp_path, server, prefix, mode, receiver.url))
    await rt.start()
    try:
        det = rt.detectors["m1"]
        await wait_until(lambda: det.state.value == "running" and det.counter_last == 100,
                         what="first values")
        await server.set(f"{prefix}.Order", "PO-42")
        await server.set(f"{prefix}.State", 3)
        await server.set(f"{prefix}.Reason", 5)
        await server.set(f"{prefix}.Scrap", 104)
        await wait_until(lambda: det.episode is not None and det.episode.announced
                         and det.counter_last == 104, what="downtime announced")
        await server.set(f"{prefix}.State", 1)
        await server.set(f"{prefix}.Reason", 0)

        def done() -> bool:
            ev = receiver.events()
            return (len(of_type(ev, "downtime.ended")) == 1
                    and sum(e["data"]["quantity"] for e in of_type(ev, "scrap.recorded")) == 4)

        await wait_until(done, timeout=15, what="downtime ended and scrap delivered")
        status = await rt.status()
    finally:
        await rt.stop()
        await server.set(f"{prefix}.State", 1)
    events = receiver.events()
    await receiver.aclose()
    started, ended = of_type(events, "downtime.started"), of_type(events, "downtime.ended")
    assert len(started) == 1 and len(ended) == 1
    assert started[0]["data"]["reason_code"] == "5" and started[0]["data"]["reason"] == "Jam"
    assert ended[0]["data"]["order_id"] == "PO-42"
    scrap = of_type(events, "scrap.recorded")
    assert scrap[0]["data"]["counter_from"] == 100
    assert status["sources"]["plc"]["state"] == "up"
    assert status["sources"]["plc"]["bad_tags"] == {}


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_status_codes_map_to_quality_and_timestamps_are_the_servers(
        server: OpcuaTestServer, mode: str) -> None:
    extra = {"publishing_interval": "50ms"} if mode == "subscribe" else {"poll_interval": "50ms"}
    cfg = source_config(server, {"q": {"node": server.node("Q.Value"), "type": "float"}},
                        mode=mode, **extra)
    out = Collect()
    task = _start(OpcuaSource("q", cfg), out)
    try:
        await wait_until(lambda: out.up == 1 and out.last("q") is not None, what="first value")
        stamp = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        await server.set("Q.Value", 2.5, status=ua.StatusCodes.UncertainLastUsableValue,
                         source_time=stamp)
        s = await wait_until(lambda: _seen(out, "q", 2.5), what="uncertain value")
        assert s.quality is Quality.UNCERTAIN and "UncertainLastUsableValue" in (s.detail or "")
        assert s.source_time == stamp and s.time == stamp
        await server.set("Q.Value", 3.5, status=ua.StatusCodes.BadSensorFailure)
        s = await wait_until(lambda: (x := out.last("q")) is not None and x.quality is
                             Quality.BAD and x, what="bad value")
        assert s.value is None and "BadSensorFailure" in (s.detail or "")
        assert "tag q" in (s.detail or "") and "Q.Value" in (s.detail or "")
        await server.set("Q.Value", 4.5)
        s = await wait_until(lambda: _seen(out, "q", 4.5), what="good again")
        assert s.quality is Quality.GOOD and s.detail is None
    finally:
        await _stop(task)
        await server.set("Q.Value", 1.5)


async def test_timestamp_choice_server_and_agent(server: OpcuaTestServer) -> None:
    old = datetime.now(UTC) - timedelta(days=3)
    await server.set("Q.Flag", True, source_time=old)
    tags = {"flag": {"node": server.node("Q.Flag"), "type": "bool"}}
    by_source = await OpcuaSource("a", source_config(server, tags)).probe()
    by_server = await OpcuaSource("b", source_config(server, tags, timestamp="server")).probe()
    by_agent = await OpcuaSource("c", source_config(server, tags, timestamp="agent")).probe()
    assert by_source[0].source_time is not None
    assert abs(by_source[0].source_time - old) < timedelta(milliseconds=1)
    assert by_server[0].source_time is not None
    assert (by_server[0].source_time - old) > timedelta(days=2)  # the server's own stamp
    assert by_agent[0].source_time is None and by_agent[0].time == by_agent[0].agent_time


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_bad_nodes_among_good_ones_only_those_tags_are_bad(
        server: OpcuaTestServer, mode: str) -> None:
    extra = {"publishing_interval": "50ms"} if mode == "subscribe" else {"poll_interval": "50ms"}
    tags = {
        "good": {"node": server.node("Mixed.Good"), "type": "int"},
        "text": {"node": server.node("Mixed.Text")},
        "missing": {"node": server.node("Mixed.DoesNotExist")},
        "wrong_type": {"node": server.node("Mixed.Text"), "type": "float"},
        "array": {"node": server.node("Mixed.Array")},
        "no_such_ns": {"node": "nsu=urn:nobody:here;s=Mixed.Good"},
        "folder": {"node": f"nsu={server.namespace};s=Plant"},
    }
    out = Collect()
    task = _start(OpcuaSource("mixed", source_config(server, tags, mode=mode, **extra)), out)
    try:
        await wait_until(lambda: all(out.last(t) for t in tags), what="a sample of every tag")
        await server.set("Mixed.Good", 8)
        await wait_until(lambda: _seen(out, "good", 8), what="good tag keeps flowing")
        latest = {t: out.last(t) for t in tags}
    finally:
        await _stop(task)
        await server.set("Mixed.Good", 7)
    assert latest["good"] is not None and latest["good"].quality is Quality.GOOD
    assert latest["text"] is not None and latest["text"].value == "hello"
    for tag in ("missing", "wrong_type", "array", "no_such_ns", "folder"):
        s = latest[tag]
        assert s is not None and s.quality is Quality.BAD and s.value is None, tag
        assert f"tag {tag}" in (s.detail or "") and tags[tag]["node"] in (s.detail or ""), s
    assert "BadNodeIdUnknown" in (latest["missing"].detail or "")  # type: ignore[union-attr]
    assert "expects float" in (latest["wrong_type"].detail or "")  # type: ignore[union-attr]
    assert "array" in (latest["array"].detail or "")  # type: ignore[union-attr]
    assert "urn:nobody:here" in (latest["no_such_ns"].detail or "")  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_many_tags_respect_the_servers_operation_limits(
        server: OpcuaTestServer, mode: str) -> None:
    extra = {"publishing_interval": "100ms"} if mode == "subscribe" else {"poll_interval": "100ms"}
    tags = {f"n{i}": {"node": server.node(f"Big.N{i}"), "type": "int"} for i in range(BIG)}
    server.largest_read = server.largest_create = 0
    out = Collect()
    task = _start(OpcuaSource("big", source_config(server, tags, mode=mode, **extra)), out)
    try:
        await wait_until(lambda: out.up == 1 and all(out.last(t) for t in tags),
                         what="every tag read")
        await server.set("Big.N77", 7777)
        await wait_until(lambda: _seen(out, "n77", 7777), what="a change among many")
    finally:
        await _stop(task)
        await server.set("Big.N77", 77)
    assert all(out.last(f"n{i}").quality is Quality.GOOD for i in range(BIG))  # type: ignore[union-attr]
    # The server refuses larger requests (BadTooManyOperations); chunks were actually used.
    assert 0 < server.largest_read <= LIMIT
    if mode == "subscribe":
        assert 0 < server.largest_create <= LIMIT


async def test_absolute_deadband_reaches_the_server(server: OpcuaTestServer) -> None:
    tags = {"d": {"node": server.node("Dead.Band"), "type": "float", "queue_size": 10,
                  "deadband": {"type": "absolute", "value": 5}}}
    out = Collect()
    task = _start(OpcuaSource("db", source_config(server, tags, publishing_interval="50ms")),
                  out)
    try:
        await wait_until(lambda: out.up == 1 and _seen(out, "d", 100.0), what="first value")
        # Within the deadband, then beyond it. The item's queue keeps both if both were
        # reported, and notifications arrive in order, so seeing 120 settles it.
        await server.set("Dead.Band", 101.0)
        await server.set("Dead.Band", 120.0)
        await wait_until(lambda: _seen(out, "d", 120.0), what="the big change")
    finally:
        await _stop(task)
    assert 101.0 not in [s.value for s in out.samples if s.tag == "d"]


async def test_a_refused_node_is_monitored_once_it_appears(
        server: OpcuaTestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from protocols.opcua import source as source_module

    monkeypatch.setattr(source_module, "RETRY_REFUSED_AFTER", 0.2)
    tags = {"good": {"node": server.node("Mixed.Good")},
            "late": {"node": server.node("Late.Node"), "type": "int"},
            "no_ns": {"node": "nsu=urn:nobody:here;s=X"}}
    out = Collect()
    task = _start(OpcuaSource("late", source_config(server, tags, publishing_interval="50ms")),
                  out)
    try:
        await wait_until(lambda: (s := out.last("late")) is not None
                         and "refused" in (s.detail or ""), what="refused at first")
        await server.add("Late.Node", 5)
        await wait_until(lambda: _seen(out, "late", 5), what="monitored once it exists")
        await server.set("Late.Node", 6)
        await wait_until(lambda: _seen(out, "late", 6), what="changes flow")
        retried = sum(1 for s in out.samples if s.tag == "no_ns")
        await wait_until(lambda: sum(1 for s in out.samples if s.tag == "no_ns") > retried,
                         what="still-missing namespace reported again")
    finally:
        await _stop(task)
    assert out.up == 1  # all of it within one session
    assert out.last("late").quality is Quality.GOOD  # type: ignore[union-attr]
    assert out.last("no_ns").quality is Quality.BAD  # type: ignore[union-attr]


async def test_a_subscription_that_goes_silent_ends_the_session(
        server: OpcuaTestServer) -> None:
    cfg = source_config(server, {"g": {"node": server.node("Mixed.Good")}},
                        publishing_interval="100ms", keepalive_interval="1s")
    out = Collect()
    task = _start(OpcuaSource("silent", cfg), out)
    try:
        await wait_until(lambda: out.up == 1 and out.last("g") is not None, what="first value")
        await server.freeze_subscriptions()  # reads still work: only publishing stops
        with pytest.raises(ConnectionLostError, match="subscription has been silent"):
            await asyncio.wait_for(asyncio.shield(task), 10)
    finally:
        await _stop(task)


async def test_a_server_that_accepts_but_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # swallow everything, answer nothing
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    cfg = OpcuaSourceConfig.model_validate({
        "type": "opcua", "endpoint": f"opc.tcp://127.0.0.1:{port}", "timeout": "300ms",
        "tags": {"x": {"node": "ns=2;s=X"}}})
    try:
        with pytest.raises(PeerTimeoutError, match="did not"):
            await asyncio.wait_for(OpcuaSource("hung", cfg).probe(), 10)
    finally:
        listener.close()


async def test_probe_reads_every_tag_once(server: OpcuaTestServer) -> None:
    cfg = source_config(server, {"good": {"node": server.node("Mixed.Good")},
                                 "missing": {"node": server.node("Mixed.Nope")}})
    samples = {s.tag: s for s in await OpcuaSource("p", cfg).probe()}
    assert samples["good"].value == 7 and samples["good"].quality is Quality.GOOD
    assert samples["missing"].quality is Quality.BAD


# ------------------------------------------------------------------------------ CLI


async def run_cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


async def test_browse_lists_names_types_and_nsu_node_ids(
        server: OpcuaTestServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_cli("browse", "--endpoint", server.endpoint, "--node",
                         f"nsu={server.namespace};s=Plant", "--depth", "1")
    out = capsys.readouterr().out
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert set(lines) == set(server.variables)  # exactly the folder's children, one level
    assert "Int32" in lines["Cell.State"] and "Double" in lines["Cell.Speed"]
    assert "String" in lines["Cell.Order"]
    assert lines["Cell.State"].rstrip().endswith(f"nsu={server.namespace};s=Cell.State")


async def test_browse_unreachable_endpoint_fails_cleanly(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_cli("browse", "--endpoint", f"opc.tcp://127.0.0.1:{free_port()}")
    assert code == 3  # unreachable
    assert "edge-agent:" in capsys.readouterr().err


async def test_probe_prints_a_table_and_flags_unreachable_sources(
        server: OpcuaTestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
agent: {{id: t, site: s, data_dir: "{tmp_path}"}}
sources:
  cell:
    type: opcua
    endpoint: {server.endpoint}
    timeout: 2s
    tags:
      cell.state: {{node: "{server.node('Cell.State')}"}}
      cell.speed: {{node: "{server.node('Cell.Speed')}"}}
      cell.ghost: {{node: "{server.node('Cell.Ghost')}"}}
  gone:
    type: opcua
    endpoint: opc.tcp://127.0.0.1:{free_port()}
    timeout: 1s
    tags:
      gone.x: {{node: "ns=2;s=X"}}
""")
    code = await run_cli("probe", "--config", str(cfg), "cell")
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["TAG"][:5] == ["TAG", "VALUE", "TYPE", "QUALITY", "TIMESTAMP"]
    assert rows["cell.state"][1:4] == ["3", "int", "good"]
    assert rows["cell.speed"][1:4] == ["12.5", "float", "good"]
    assert rows["cell.ghost"][1:4] == ["-", "-", "bad"] and "BadNodeIdUnknown" in out
    code = await run_cli("probe", "--config", str(cfg))
    out = capsys.readouterr().out
    assert code == 3  # unreachable
    assert "source gone: UNREACHABLE" in out and "source cell: 3 tag(s)" in out
    assert await run_cli("probe", "--config", str(cfg), "nope") == 2


async def test_gen_cert_writes_a_certificate_with_the_application_uri(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    code = await run_cli("opcua", "gen-cert", "--dir", str(pki), "--application-uri",
                         "urn:edge-01:plant-edge-agent", "--hostname", "edge-01")
    out = capsys.readouterr().out
    assert code == 0
    cert = x509.load_der_x509_certificate((pki / "edge-agent.der").read_bytes())
    assert certificate_uri(cert) == "urn:edge-01:plant-edge-agent"
    assert fingerprint(cert) in out and "trust" in out and (pki / "trusted").is_dir()
    assert (pki / "edge-agent.pem").stat().st_mode & 0o077 == 0
    # A second run must not silently replace a certificate servers already trust.
    assert await run_cli("opcua", "gen-cert", "--dir", str(pki)) == 1
    assert "already exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ helpers


def _seen(out: Collect, tag: str, value: Any) -> TagSample | None:
    s = out.last(tag)
    return s if s is not None and s.value == value else None


def _start(source: OpcuaSource, out: Collect) -> Any:
    return asyncio.ensure_future(source.run(out))


async def _stop(task: Any) -> None:

    await stop_task(task, ConnectionLostError)
