"""A node-opcua server (npm; not our client library) for the alarm and history tests.

``NodeOpcuaServer(port).start()`` runs ``node tests/support/node_opcua/server.js`` (see that
file for its address space); ``set(name, value, time=None)`` changes a variable through the
server's own API (so history and alarms see it as a device change). ``stop()`` ends it; a new
``start()`` on the same port brings it back with a fresh address space.

The npm packages are installed by ``.ci/run`` (``npm ci`` in ``tests/support/node_opcua``);
``available()`` says whether they are there, so tests can skip with a reason otherwise.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

__all__ = ["NS_URI_INDEX", "NodeOpcuaServer", "available", "needs_node_opcua"]

HERE = Path(__file__).resolve().parent / "node_opcua"
NS_URI_INDEX = 1  # the server's own namespace


def available() -> bool:
    return shutil.which("node") is not None and (HERE / "node_modules" / "node-opcua").is_dir()


# The marks of a test module that runs this server (slow: it starts a node process).
needs_node_opcua = [pytest.mark.slow, pytest.mark.skipif(
    not available(), reason="node and tests/support/node_opcua/node_modules are needed "
    "(.ci/run installs them)")]


class NodeOpcuaServer:
    def __init__(self, port: int, seed_seconds: int = 0) -> None:
        self.port = port
        self.seed_seconds = seed_seconds
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str] = queue.Queue()

    def start(self, timeout: float = 30.0) -> NodeOpcuaServer:
        args = ["node", "server.js", "--port", str(self.port)]
        if self.seed_seconds:
            args += ["--seed-seconds", str(self.seed_seconds)]
        self._proc = subprocess.Popen(args, cwd=HERE, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc, self._lines), daemon=True).start()
        ready = self._answer(timeout)
        if ready.get("ready") != self.port:
            raise RuntimeError(f"node-opcua server did not start: {ready}")
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def set(self, name: str, value: Any, time: datetime | None = None) -> None:
        cmd: dict[str, Any] = {"set": name, "value": value}
        if time is not None:
            cmd["time"] = time.isoformat()
        self._command(cmd)

    def severity(self, alarm: str, value: int) -> None:
        """The Severity (1..1000) an alarm, e.g. ``Filler.MotorFault``, has when next raised."""
        self._command({"severity": alarm, "value": value})

    def _command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        answer = self._answer(10.0)
        if not answer.get("ok"):
            raise RuntimeError(f"node-opcua server refused {cmd}: {answer}")
        return answer

    @staticmethod
    def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            if line.startswith('{"'):  # the rest is node-opcua's own diagnostics
                lines.put(line)
            else:
                tail = [*tail[-40:], line]
        lines.put("EXIT " + "".join(tail))

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no answer from the node-opcua server") from None
        if line.startswith("EXIT "):
            raise RuntimeError(f"node-opcua server exited: {line[5:][-2000:]}")
        return dict(json.loads(line))
