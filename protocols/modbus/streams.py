"""Byte streams under an RTU line: a TCP socket to a serial gateway, or a local serial port.

Received bytes accumulate in ``rx`` and ``arrived`` is set on every arrival; ``lost`` says why
the stream broke (the socket closed, the serial port failed or vanished). Neither stream
interprets the bytes: framing is ``rtu.py``'s, the request discipline ``transport.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from config.errors import ConnectionLostError
from protocols.modbus.config import ModbusSourceConfig, Parity

__all__ = ["SerialStream", "Stream", "TcpStream"]


class Stream:
    """Received bytes accumulate in ``rx``; ``arrived`` is set on every arrival."""

    def __init__(self) -> None:
        self.rx = bytearray()
        self.arrived = asyncio.Event()
        self.lost: str | None = None

    def _received(self, data: bytes) -> None:
        self.rx += data
        self.arrived.set()

    def _gone(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        self.arrived.set()

    async def open(self) -> None:
        raise NotImplementedError

    def write(self, frame: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TcpStream(Stream, asyncio.Protocol):
    """RTU frames over a TCP socket (a serial gateway in transparent mode)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        Stream.__init__(self)
        self._host, self._port, self._timeout = host, port, timeout
        self._transport: asyncio.Transport | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                await loop.create_connection(lambda: self, self._host, self._port)
        except (OSError, TimeoutError) as exc:
            raise ConnectionLostError(f"cannot connect to Modbus RTU gateway "
                                      f"{self._host}:{self._port}: {exc or 'timed out'}") from exc

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone(f"the gateway closed the connection{f': {exc}' if exc else ''}")

    def write(self, frame: bytes) -> None:
        assert self._transport is not None
        self._transport.write(frame)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class SerialStream(Stream):
    """RTU frames on a local serial port (pyserial configures it; asyncio watches its fd)."""

    _PARITY = {Parity.NONE: "N", Parity.EVEN: "E", Parity.ODD: "O"}

    def __init__(self, config: ModbusSourceConfig) -> None:
        super().__init__()
        assert config.serial is not None
        self._settings = config.serial
        self._port: Any = None
        self._fd = -1

    async def open(self) -> None:
        import serial  # pyserial: only a serial line needs it

        s = self._settings
        try:
            self._port = serial.Serial(s.device, baudrate=s.baudrate, bytesize=s.data_bits,
                                       parity=self._PARITY[s.parity], stopbits=s.stop_bits,
                                       timeout=0, write_timeout=0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise ConnectionLostError(f"cannot open serial port {s.device} "
                                      f"({s.baudrate} {s.data_bits}{self._PARITY[s.parity]}"
                                      f"{s.stop_bits}): {exc}") from exc
        self._fd = self._port.fileno()
        os.set_blocking(self._fd, False)
        self._port.reset_input_buffer()
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._stop_reading()
            self._gone(f"serial port {self._settings.device} failed: {exc}")
            return
        if not data:
            self._stop_reading()
            self._gone(f"serial port {self._settings.device} was closed")
            return
        self._received(data)

    def _stop_reading(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)

    def write(self, frame: bytes) -> None:
        # Read requests are 8 bytes: the kernel's tty buffer always takes them whole.
        try:
            written = os.write(self._fd, frame)
        except OSError as exc:
            raise ConnectionLostError(f"serial port {self._settings.device}: write failed: "
                                      f"{exc}") from exc
        if written != len(frame):
            raise ConnectionLostError(f"serial port {self._settings.device}: wrote {written} "
                                      f"of {len(frame)} bytes")

    def close(self) -> None:
        if self._port is None:
            return
        if self._fd >= 0:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._fd)
        self._port.close()
        self._port = None
        self._fd = -1
