"""systemd notify protocol against a real AF_UNIX datagram socket.

The subprocess test runs ``edge-agent run`` with NOTIFY_SOCKET and WATCHDOG_USEC set, its data
directory on a small real tmpfs: READY=1 after start, WATCHDOG=1 while healthy, and still while
the disk is full (a state the agent handles; STATUS and /readyz say so), STATUS back to "buffer
ok" once space is back, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support import AgentProcess, fill_disk, free_port, small_tmpfs, stop_task, wait_until

from agent.notify import Notifier, run_watchdog
from agent.receiver import Receiver
from protocols.modbus.config import ModbusTag
from protocols.modbus.simulator import ModbusSimulator

STATE = ModbusTag.model_validate({"table": "holding", "address": 0, "type": "uint16"})


class Listener:
    """The systemd side: a bound datagram socket collecting messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        new = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            new.append(msg)
        self.messages += new
        return new

    def count(self, key: str) -> int:
        self.drain()
        return sum(1 for m in self.messages if key in m)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    lst = Listener(str(tmp_path / "notify.sock"))
    yield lst
    lst.close()


def test_notifier_sends_to_a_path_socket(listener: Listener, tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
    assert n.enabled and n.watchdog_interval == 1.0
    n.ready("all good")
    n.status("all good")  # unchanged: not sent again
    n.status("one source down")
    n.watchdog()
    n.stopping()
    n.close()
    assert listener.drain() == [{"READY": "1", "STATUS": "all good"},
                                {"STATUS": "one source down"}, {"WATCHDOG": "1"},
                                {"STOPPING": "1",
                                 "STATUS": "stopping: draining the buffer to the sinks"}]


def test_notifier_abstract_namespace() -> None:
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    lst = Listener("\0" + name)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.ready("up")
        assert lst.drain() == [{"READY": "1", "STATUS": "up"}]
    finally:
        lst.close()


def test_watchdog_settings_and_disabled_notifier(tmp_path: Path) -> None:
    sock = str(tmp_path / "x.sock")
    assert Notifier({}).enabled is False and Notifier({}).send(READY="1") is False
    assert Notifier({"NOTIFY_SOCKET": sock}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "0"}).watchdog_interval is None
    # WATCHDOG_PID names another process: the watchdog is not ours to feed.
    other = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_interval is None
    mine = dict(other, WATCHDOG_PID=str(os.getpid()))
    assert Notifier(mine).watchdog_interval == 0.5
    # Nobody listens on that path: sending fails quietly, the agent goes on.
    assert Notifier({"NOTIFY_SOCKET": sock}).send(READY="1") is False


async def test_watchdog_pings_only_while_healthy(listener: Listener, tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "40000"})
    state = {"ok": True, "checks": 0}

    def healthy() -> bool:
        state["checks"] += 1  # one call per watchdog period
        return bool(state["ok"])

    task = asyncio.create_task(run_watchdog(
        n, healthy, lambda: "fine" if state["ok"] else "buffer FAILING"))
    try:
        await wait_until(lambda: listener.count("WATCHDOG") >= 3, what="pings")
        state["ok"] = False
        listener.drain()
        listener.messages.clear()  # pings sent before the flip are already in the socket
        first = state["checks"]
        await wait_until(lambda: state["checks"] >= first + 4, what="four unhealthy periods")
        assert listener.count("WATCHDOG") == 0
        assert {"STATUS": "buffer FAILING"} in listener.messages
        state["ok"] = True
        await wait_until(lambda: listener.count("WATCHDOG") >= 1, what="pings resume")
        assert listener.messages[-1] in ({"WATCHDOG": "1"}, {"STATUS": "fine"})
    finally:
        await stop_task(task)
        n.close()


# ------------------------------------------------------------------ the real agent process


@pytest.fixture
def data_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "data", "3m") as mnt:
        yield mnt




@pytest.mark.slow
async def test_agent_process_ready_watchdog_through_disk_full_and_stopping(
        tmp_path: Path, data_tmpfs: Path, listener: Listener) -> None:
    plc = ModbusSimulator(size=8)
    await plc.start()
    receiver = Receiver(tmp_path / "rx.db")
    await receiver.start()
    health_port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
agent: {{id: notify-edge, site: s1, data_dir: "{data_tmpfs}", stop_timeout: 3s}}
health: {{listen: "127.0.0.1:{health_port}", min_disk_free: 0B}}
sources:
  plc: {{type: modbus, host: 127.0.0.1, port: {plc.port}, poll_interval: 20ms,
         tags: {{m.state: {{table: holding, address: 0, type: uint16}}}}}}
machines:
  m1: {{line: l1, state: {{tag: m.state, map: {{1: running, 3: down}}}}}}
sinks:
  central: {{type: http, url: "{receiver.url}", mode: batch,
             retry: {{initial_backoff: 50ms, max_backoff: 200ms}}}}
buffer: {{commit_interval: 5ms}}
""")
    agent = AgentProcess(cfg, tmp_path / "agent.log", env={
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "300000"})
    await plc.set_value(STATE, 1)
    agent.start()
    base = f"http://127.0.0.1:{health_port}"
    state = 1
    try:
        await wait_until(lambda: listener.count("READY") == 1, timeout=20, what="READY=1")
        assert next(m for m in listener.messages if "READY" in m)["STATUS"]
        await wait_until(lambda: listener.count("WATCHDOG") >= 3, what="watchdog pings")

        filler = fill_disk(data_tmpfs)
        async with httpx.AsyncClient(timeout=5) as http:
            async def commits_fail() -> bool:
                nonlocal state
                state = 3 if state == 1 else 1  # every flip is an event to commit
                await plc.set_value(STATE, state)
                r = await http.get(base + "/readyz")
                return r.status_code == 503 and any(x.startswith("buffer:")
                                                    for x in r.json()["reasons"])

            await wait_until(commits_fail, timeout=30, interval=0.1, what="commits failing")

            def full_at() -> int | None:
                listener.drain()
                # The position just after that STATUS (never 0, so it is truthy).
                return next((i + 1 for i, m in enumerate(listener.messages)
                             if "FULL" in m.get("STATUS", "")), None)

            # A full disk is a state the agent handles, not a fault a restart would cure: the
            # STATUS says so and the watchdog keeps being fed (a restart would lose what waits
            # in memory); /readyz is 503 meanwhile.
            first = await wait_until(full_at, what="STATUS names the full buffer")
            def after(start: int, pred: Callable[[dict[str, str]], bool]) -> bool:
                listener.drain()
                return any(pred(m) for m in listener.messages[start:])

            await wait_until(lambda: after(first, lambda m: "WATCHDOG" in m), what="pings go on")
            assert (await http.get(base + "/readyz")).status_code == 503
            seen = len(listener.messages)

            filler.unlink()  # space is back: commits work, STATUS says so
            await wait_until(lambda: after(seen, lambda m: "buffer ok" in m.get("STATUS", "")),
                             timeout=20, what="buffer ok again")
            r = await http.get(base + "/status")
            assert r.json()["buffer"]["storage_error"] is None
        assert agent.terminate() == 0
        assert listener.count("STOPPING") == 1
    finally:
        agent.kill()
        await receiver.aclose()
        await plc.stop()
