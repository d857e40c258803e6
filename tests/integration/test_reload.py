"""Live reload: in process (object identity of what must stay untouched) and on a running agent
subprocess with SIGHUP and ``edge-agent reload``, against the Modbus simulator and the receiver."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import AgentProcess, free_port, wait_until

from agent.receiver import Receiver
from agent.runtime import Runtime
from agent.runtime.reload import reload_from_file
from agent.wiring.load import config_hash, load_config_text
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

ROOT = Path(__file__).resolve().parents[2]
STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})


def config_text(data_dir: Path, plc: int, url: str, *, plc2: int | None = None,
                reasons: str = "{}", archive_timeout: str = "2s", commit: str = "10ms",
                health: str = "127.0.0.1:0", extra: str = "") -> str:
    second_source = f"""
  plc2:
    type: modbus
    host: 127.0.0.1
    port: {plc2}
    poll_interval: 50ms
    tags:
      m2.state: {{table: holding, address: 0, type: uint16}}""" if plc2 else ""
    second_machine = """
  m2:
    line: l1
    state: {tag: m2.state, map: {1: running, 3: down}}""" if plc2 else ""
    return f"""
agent: {{id: reload-edge, site: s1, data_dir: "{data_dir}", stop_timeout: 3s}}
health: {{listen: "{health}"{extra}}}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    port: {plc}
    poll_interval: 50ms
    backoff: {{initial: 50ms, max: 200ms}}
    tags:
      m.state: {{table: holding, address: 0, type: uint16}}{second_source}
machines:
  m1:
    line: l1
    state: {{tag: m.state, map: {{1: running, 3: down}}}}
    downtime: {{min_duration: 0s, reasons: {reasons}}}{second_machine}
sinks:
  central:
    type: http
    url: "{url}"
    mode: batch
    retry: {{initial_backoff: 50ms, max_backoff: 200ms}}
  archive:
    type: http
    url: "{url}"
    timeout: {archive_timeout}
    retry: {{initial_backoff: 50ms, max_backoff: 200ms}}
buffer: {{commit_interval: {commit}}}
"""


@pytest.fixture
async def plcs() -> AsyncIterator[tuple[ModbusSimulator, ModbusSimulator]]:
    a, b = ModbusSimulator(size=8), ModbusSimulator(size=8)
    await a.start()
    await b.start()
    await a.set_value(STATE, 1)
    await b.set_value(STATE, 1)
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    yield rx
    await rx.aclose()


def of(rx: Receiver, machine: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in rx.events() if e["type"] == f"plantedge.downtime.{kind}"
            and e["source"].endswith(f"/machines/{machine}")]


async def test_reload_in_process_keeps_what_did_not_change(
        tmp_path: Path, plcs: tuple[ModbusSimulator, ModbusSimulator],
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    plc, plc2 = plcs
    assert plc.port and plc2.port
    data = tmp_path / "agent"
    v1 = load_config_text(config_text(data, plc.port, receiver.url), "<v1>")
    rt = Runtime(v1, config_hash=config_hash(v1))
    await rt.start()
    try:
        det1 = rt.detectors["m1"]
        await wait_until(lambda: det1.state.value == "running", what="first poll")
        await plc.set_value(STATE, 3)
        await wait_until(lambda: of(receiver, "m1", "started"), what="downtime delivered")
        episode = det1.episode
        assert episode is not None
        plc_task = rt.components.sources["plc"].task
        plc_info, central = rt.sources["plc"], rt.forwarders["central"]
        archive = rt.forwarders["archive"]

        v2 = load_config_text(config_text(
            data, plc.port, receiver.url, plc2=plc2.port, reasons="{7: Jam}",
            archive_timeout="3s", commit="20ms"), "<v2>")
        changes = await rt.reload(v2, config_hash(v2))

        assert sorted(changes) == ["machine m1", "machine m2", "sink archive", "source plc2"]
        assert "changes to buffer need a restart" in caplog.text
        # Untouched: the same supervisor task (still running), source info and forwarder.
        assert rt.components.sources["plc"].task is plc_task
        assert not plc_task.done() and rt.sources["plc"] is plc_info
        assert rt.forwarders["central"] is central and rt.forwarders["archive"] is not archive
        assert rt.config.buffer == v1.buffer  # buffer changes wait for a restart
        assert rt.config.sinks["archive"].timeout == 3.0
        # m1 changed: a new detector carrying the open episode on.
        det1b = rt.detectors["m1"]
        assert det1b is not det1 and det1b.episode is not None
        assert det1b.episode.episode_id == episode.episode_id
        # The new source feeds the new machine.
        await wait_until(lambda: rt.detectors["m2"].state.value == "running", what="m2 runs")

        await plc.set_value(STATE, 1)
        await wait_until(lambda: of(receiver, "m1", "ended"), what="the episode ends once")
        await rt.flush()
    finally:
        await rt.stop()
    started, ended = of(receiver, "m1", "started"), of(receiver, "m1", "ended")
    assert len(started) == 1 and len(ended) == 1
    assert ended[0]["data"]["episode_id"] == started[0]["data"]["episode_id"]


async def test_invalid_file_is_rejected_with_located_errors(
        tmp_path: Path, plcs: tuple[ModbusSimulator, ModbusSimulator],
        receiver: Receiver) -> None:
    plc, _ = plcs
    assert plc.port
    path = tmp_path / "agent.yaml"
    path.write_text(config_text(tmp_path / "agent", plc.port, receiver.url))
    v1 = load_config_text(path.read_text(), str(path))
    rt = Runtime(v1, config_hash=config_hash(v1))
    await rt.start()
    try:
        before_tasks = {n: s.task for n, s in rt.components.sources.items()}
        path.write_text(path.read_text().replace("poll_interval: 50ms", "poll_intervall: 50ms",
                                                 1))
        assert await reload_from_file(rt, path) is False
        after_tasks = {n: s.task for n, s in rt.components.sources.items()}
        assert rt.config is v1 and after_tasks == before_tasks
        assert rt.last_reload is not None and rt.last_reload["ok"] is False
        assert any(i.startswith(f"{path}:") and "poll_intervall" in i
                   for i in rt.last_reload["issues"])
        path.write_text(config_text(tmp_path / "agent", plc.port, receiver.url))
        assert await reload_from_file(rt, path) is True
        assert rt.last_reload["ok"] is True and rt.last_reload["changes"] == []
    finally:
        await rt.stop()


# ------------------------------------------------------------------ a real agent process


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
async def test_sighup_and_reload_command_on_a_running_agent(
        tmp_path: Path, plcs: tuple[ModbusSimulator, ModbusSimulator],
        receiver: Receiver) -> None:
    plc, _ = plcs
    assert plc.port
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = tmp_path / "agent.yaml"
    write = lambda **kw: path.write_text(config_text(  # noqa: E731
        tmp_path / "agent", plc.port, receiver.url, health=f"127.0.0.1:{port}", **kw))
    write()
    agent = AgentProcess(path, tmp_path / "agent.log")
    agent.start()
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            async def status() -> dict[str, Any]:
                try:
                    r = await http.get(base + "/status")
                except httpx.HTTPError:
                    return {}
                return dict(r.json())

            first = await wait_until(lambda: _up(status), timeout=20, what="agent up")
            await plc.set_value(STATE, 3)
            await wait_until(lambda: of(receiver, "m1", "started"), what="downtime delivered")

            # 1. SIGHUP with an invalid file: rejected, the old configuration keeps running.
            path.write_text(path.read_text().replace("mode: batch", "mode: bulk"))
            assert agent.proc is not None
            os.kill(agent.proc.pid, signal.SIGHUP)

            async def rejected() -> dict[str, Any] | None:
                last = (await status()).get("last_reload")
                return last if last and last["ok"] is False else None

            last = await wait_until(rejected, what="reload rejected")
            assert any(i.startswith(f"{path}:") and "'bulk'" in i for i in last["issues"])
            assert (await status())["config_hash"] == first["config_hash"]
            assert agent.alive
            # `edge-agent reload` says so too, with exit code 2.
            done = await asyncio.to_thread(cli, "reload", "--config", str(path))
            assert done.returncode == 2 and "REJECTED" in done.stdout
            # Without the configuration (its data_dir holds the pid file) nothing is signalled:
            # the pid is never taken from /status.
            done = await asyncio.to_thread(cli, "reload", "--url", base)
            assert done.returncode == 2 and "--config" in done.stderr

            # 2. A valid change through `edge-agent reload --config`: applied; the PLC session
            #    is untouched; the open downtime continues under the new rules.
            write(reasons="{7: Jam}", extra=", max_pending_age: 2h")
            done = await asyncio.to_thread(cli, "reload", "--config", str(path))
            assert done.returncode == 0, done.stderr
            assert "applied" in done.stdout and "machine m1" in done.stdout
            assert "health thresholds" in done.stdout and "source plc" not in done.stdout
            after = await status()
            assert after["config_hash"] != first["config_hash"]
            assert after["sources"]["plc"]["since"] == first["sources"]["plc"]["since"]
            await plc.set_value(STATE, 1)
            await wait_until(lambda: of(receiver, "m1", "ended"), what="episode ended")
            shown = await asyncio.to_thread(cli, "status", "--url", base)
            assert "last reload applied" in shown.stdout and "m1" in shown.stdout
            assert (tmp_path / "agent" / "edge-agent.pid").exists()
        assert agent.terminate() == 0
        assert not (tmp_path / "agent" / "edge-agent.pid").exists()  # removed on stop
    finally:
        agent.kill()
    log = (tmp_path / "agent.log").read_text()
    assert "the new configuration is invalid; keeping the running one" in log
    started, ended = of(receiver, "m1", "started"), of(receiver, "m1", "ended")
    assert len(started) == 1 and len(ended) == 1
    assert ended[0]["data"]["episode_id"] == started[0]["data"]["episode_id"]


async def _up(status: Any) -> dict[str, Any] | None:
    doc: dict[str, Any] = await status()
    return doc if doc.get("sources", {}).get("plc", {}).get("state") == "up" else None


@pytest.mark.slow
async def test_an_agent_without_a_file_to_reread_survives_sighup_and_writes_no_pid_file(
        tmp_path: Path, plcs: tuple[ModbusSimulator, ModbusSimulator],
        receiver: Receiver) -> None:
    """`run --config -` (and the demo) cannot re-read their configuration: SIGHUP's default
    action would end the process, and `edge-agent reload` would find a pid file to signal."""
    plc, _ = plcs
    assert plc.port
    port = free_port()
    text = config_text(tmp_path / "agent", plc.port, receiver.url, health=f"127.0.0.1:{port}")
    log = tmp_path / "agent.log"
    proc = _run_from_stdin(text, log)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            async def status() -> dict[str, Any]:
                try:
                    return dict((await http.get(f"http://127.0.0.1:{port}/status")).json())
                except httpx.HTTPError:
                    return {}

            await wait_until(lambda: _up(status), timeout=20, what="agent up")
            assert not (tmp_path / "agent" / "edge-agent.pid").exists()
            proc.send_signal(signal.SIGHUP)
            await wait_until(lambda: "no configuration file to re-read" in log.read_text(),
                             what="SIGHUP logged")
            assert proc.poll() is None and (await status()).get("agent_id") == "reload-edge"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _run_from_stdin(text: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", "-"],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    proc.stdin.write(text.encode())
    proc.stdin.close()
    return proc
