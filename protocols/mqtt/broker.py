"""A local Mosquitto broker in a subprocess, for the demo, the tests and the benchmark.

Not used in production (the plant runs its own broker). ``MosquittoBroker`` writes a config
file into a work directory, starts the ``mosquitto`` binary on a loopback port, and can stop it
gracefully (``stop``: persistence is saved), kill it (``kill``: SIGKILL, nothing saved) and start
it again on the same port with the same persistence file. ``find_mosquitto()`` says whether the
binary is installed (``apt-get install mosquitto``).

Mosquitto 2.x needs an explicit ``listener`` and ``allow_anonymous true`` to accept anonymous
clients; persistence, when on, lives in the work directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BrokerTls", "MosquittoBroker", "find_mosquitto"]


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None (it often lives in /usr/sbin, outside PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class BrokerTls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_certificate: bool = False


class MosquittoBroker:
    def __init__(self, workdir: Path, *, port: int | None = None, persistence: bool = False,
                 tls: BrokerTls | None = None, max_queued_messages: int = 1000,
                 password_file: Path | None = None, extra_config: str = "") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.persistence = persistence
        self.tls = tls
        self.max_queued_messages = max_queued_messages
        self.password_file = password_file
        self.extra_config = extra_config
        self.log_file = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config_text(self) -> str:
        anonymous = "false" if self.password_file else "true"
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {anonymous}",
                 f"max_queued_messages {self.max_queued_messages}",
                 f"log_dest file {self.log_file}", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", "connection_messages true"]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}",
                      f"keyfile {self.tls.key_file}",
                      f"require_certificate {str(self.tls.require_client_certificate).lower()}"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/",
                      "persistence_file mosquitto.db"]
        else:
            lines.append("persistence false")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Started as root, Mosquitto switches to user 'mosquitto', which cannot write the
            # log and persistence files in our work directory.
            lines.append("user root")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until the port accepts connections; RuntimeError with the broker's
        log if it does not come up."""
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("the mosquitto binary is not installed (apt-get install "
                               "mosquitto)")
        if self.running:
            return
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._config_text(), encoding="utf-8")
        self._proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr \
                    else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}: {err}"
                                   f"{self._log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on port {self.port} within "
                                   f"{timeout:g}s{self._log_tail()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto saves its persistence file."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: like a power cut, nothing saved since the last autosave."""
        self._end(signal.SIGKILL, 10.0)

    def restart(self, *, kill: bool = False) -> None:
        self.kill() if kill else self.stop()
        self.start()

    def _end(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return ""
        return "\n" + "\n".join(lines) if lines else ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()
