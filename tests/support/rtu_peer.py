"""Real Modbus RTU peers for tests and benchmarks: a serial line without hardware.

- ``PtyPair``: ``socat`` joins two pseudo-terminals; whatever one end writes the other reads,
  like the two ends of an RS-485 line. Parity N only (a pty refuses even parity).
- ``RtuDevice``: ``modbus_tk``'s ``RtuServer`` (not our client library) on one end, serving
  several unit ids; a unit id it does not serve gets silence, as on a real bus.
- ``Gateway``: a second ``socat`` that listens on TCP and passes the raw bytes to a pty: a
  serial-to-Ethernet gateway speaking RTU framing over TCP.
- ``NodeModbusDevice``: npm ``modbus-serial``'s ``ServerSerial`` (a second implementation)
  on the device end: holding register k of unit u holds ``u * 100 + k``; units not listed are
  silent. Needs ``npm ci`` in ``tests/support/node_modbus`` (``.ci/run`` does it).
- Frame faults are injected between the device and the line: ``RtuDevice.inject(unit, fault)``
  spoils the next answer of that unit (bad CRC, garbage before the frame, truncated frame).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["FAULTS", "Gateway", "NodeModbusDevice", "PtyPair", "RtuDevice", "have_node_modbus",
           "have_socat", "spoil"]

NODE_MODBUS = Path(__file__).resolve().parent / "node_modbus"

FAULTS = ("crc", "data", "garbage", "truncate", "silence", "echo")


def have_socat() -> bool:
    return shutil.which("socat") is not None


def have_node_modbus() -> bool:
    return shutil.which("node") is not None and \
        (NODE_MODBUS / "node_modules" / "modbus-serial").is_dir()


def _wait_for(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (from /proc/net/tcp, without connecting)."""
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if int(local.split(":")[1], 16) == port and state == "0A":
                return True
    return False


class PtyPair:
    """Two linked pseudo-terminals: ``.client`` and ``.device`` (paths)."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="rtu-line-"))
        self.client = str(self._dir / "client")
        self.device = str(self._dir / "device")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PtyPair:
        self._proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.client}", f"pty,raw,echo=0,link={self.device}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: os.path.exists(self.client) and os.path.exists(self.device),
                  "socat pty pair")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)


class Gateway:
    """An RTU-over-TCP gateway: ``socat TCP-LISTEN:port,fork FILE:pty,raw``."""

    def __init__(self, pty_path: str) -> None:
        self.pty_path = pty_path
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Gateway:
        self._proc = subprocess.Popen(
            ["socat", "-t", "0.01", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
             f"FILE:{self.pty_path},raw,echo=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        # Not a probe connection: socat would fork a child that opens the pty and reads from it
        # until it notices the hang-up, stealing the first answers of the real client.
        _wait_for(lambda: _listening(self.port), "socat gateway")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)


def spoil(frame: bytes, fault: str) -> bytes:
    """``frame`` as a faulty line would deliver it."""
    if fault == "crc":
        return frame[:-1] + bytes([frame[-1] ^ 0x5A])
    if fault == "data":
        # A bit flipped in the data on the wire: the CRC no longer matches.
        return frame[:3] + bytes([frame[3] ^ 0x10]) + frame[4:]
    if fault == "garbage":
        # Noise that looks like the start of a frame: unit byte 0x01, function 0x03 and a byte
        # count that promises more than follows, then the real answer.
        return b"\x00\x01\x03\x7f\xfe" + frame
    if fault == "truncate":
        return frame[:-3]
    if fault == "silence":
        return b""
    raise ValueError(f"unknown fault {fault!r}")


class RtuDevice:
    """modbus_tk RtuServer on ``path`` serving holding registers 0..199 of each unit."""

    def __init__(self, path: str, units: list[int], baudrate: int = 115200) -> None:
        self.path = path
        self.units = units
        self.baudrate = baudrate
        self.requests = 0
        self._faults: dict[int, deque[str]] = {u: deque() for u in range(256)}
        self._server: Any = None
        self._lock = threading.Lock()
        self._last_request = b""

    def __enter__(self) -> RtuDevice:
        import serial
        from modbus_tk import defines, hooks, modbus_rtu

        port = serial.Serial(self.path, baudrate=self.baudrate, bytesize=8, parity="N",
                             stopbits=1)
        self._server = modbus_rtu.RtuServer(port, error_on_missing_slave=False)
        for unit in self.units:
            slave = self._server.add_slave(unit)
            slave.add_block("h", defines.HOLDING_REGISTERS, 0, 200)
            slave.add_block("i", defines.ANALOG_INPUTS, 0, 200)
            slave.add_block("c", defines.COILS, 0, 64)
        hooks.install_hook("modbus_rtu.RtuServer.before_write", self._before_write)
        hooks.install_hook("modbus_rtu.RtuServer.after_read", self._after_read)
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from modbus_tk import hooks

        hooks.uninstall_hook("modbus_rtu.RtuServer.before_write", self._before_write)
        hooks.uninstall_hook("modbus_rtu.RtuServer.after_read", self._after_read)
        self._server.stop()

    def set(self, unit: int, address: int, values: list[int], table: str = "h") -> None:
        self._server.get_slave(unit).set_values(table, address, values)

    def inject(self, unit: int, fault: str, times: int = 1) -> None:
        """Spoil the next ``times`` answers of ``unit`` with ``fault`` (see ``spoil``)."""
        with self._lock:
            self._faults[unit].extend([fault] * times)

    def _after_read(self, args: tuple[Any, bytes]) -> None:
        server, request = args
        if server is self._server:
            self.requests += 1
            self._last_request = bytes(request)

    def _before_write(self, args: tuple[Any, bytes]) -> bytes | None:
        server, response = args
        if server is not self._server or not response:
            return None
        with self._lock:
            queue = self._faults[response[0]]
            fault = queue.popleft() if queue else None
        if fault is None:
            return None
        if fault == "echo":  # an adapter that hears its own request before the answer
            return self._last_request + bytes(response)
        spoilt = spoil(bytes(response), fault)
        # modbus_tk skips writing an empty answer only if it is falsy.
        return spoilt if spoilt else b""


class NodeModbusDevice:
    """``node server.js --path PTY --units 1,2`` (modbus-serial ServerSerial)."""

    def __init__(self, path: str, units: list[int]) -> None:
        self.path, self.units = path, units
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> NodeModbusDevice:
        self._proc = subprocess.Popen(
            ["node", "server.js", "--path", self.path, "--units", ",".join(map(str, self.units))],
            cwd=NODE_MODBUS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # {"ready": ...} or EOF when it failed
        if not line.startswith('{"ready"'):
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(f"modbus-serial device did not start: {line}{err[-1000:]}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)
