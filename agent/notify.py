"""systemd's notify protocol (``Type=notify``), spoken directly over an AF_UNIX datagram socket.

systemd passes the socket path in ``NOTIFY_SOCKET`` (a leading ``@`` means the Linux abstract
namespace: the first byte of the address is NUL). Each message is one datagram of
``KEY=VALUE`` lines. We send:

- ``READY=1`` once the runtime and the health endpoint are up (systemd then counts the unit as
  started, so ``ExecStartPost`` and dependent units wait for a working agent);
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` **only while the event loop turns and the buffer
  commits**: when either stops, the pings stop and systemd restarts the service after
  ``WatchdogSec`` (a restart is what fixes a hung loop; a held sink or a stale PLC is not fixed by
  a restart, so those do not stop the pings);
- ``STATUS=...`` a one-line summary on every change (shown by ``systemctl status``);
- ``STOPPING=1`` when a stop begins (draining may take ``agent.stop_timeout``).

Without ``NOTIFY_SOCKET`` every call is a no-op. ``WATCHDOG_PID``, when set, must be our pid
(otherwise the watchdog is meant for another process). Send errors are logged once and never
raised: a missing systemd must not stop the agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "run_watchdog"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; True when it was sent."""
        if self.address is None:
            return False
        data = "\n".join(f"{k}={v}" for k, v in fields.items()).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd on %s: %s", self.address.replace("\0", "@"),
                            exc)
            self._failed = True
            return False
        if self._failed:
            log.info("notifying systemd works again")
            self._failed = False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        """Send STATUS only when it changed (the text is shown by ``systemctl status``)."""
        if status != self._last_status:
            self._last_status = status
            self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self, status: str = "stopping: draining the buffer to the sinks") -> None:
        self._last_status = status
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds (systemd's advice), or None when there is no watchdog."""
    usec = env.get("WATCHDOG_USEC", "")
    # isascii: str.isdigit() is true for digits int() refuses, such as '²'.
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not (pid.isascii() and pid.isdigit()) or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


async def run_watchdog(notifier: Notifier, healthy: Callable[[], bool],
                       describe: Callable[[], str], interval: float | None = None) -> None:
    """Ping while ``healthy()``; update STATUS from ``describe()``. Runs until cancelled.

    ``interval`` defaults to the notifier's watchdog interval; without a watchdog it still keeps
    STATUS current every 5 s.
    """
    period = interval or notifier.watchdog_interval
    ping = period is not None
    period = min(period or 5.0, 5.0)
    unhealthy_logged = False
    while True:
        ok = healthy()
        if ok and ping:
            notifier.watchdog()
        if not ok and not unhealthy_logged:
            log.error("the agent is unhealthy (event loop or buffer); systemd watchdog pings "
                      "stop so that systemd can restart it")
        elif ok and unhealthy_logged:
            log.info("the agent is healthy again; systemd watchdog pings resume")
        unhealthy_logged = not ok
        notifier.status(describe())
        await asyncio.sleep(period)
