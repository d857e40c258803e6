"""Failpoints: kill the agent with SIGKILL at a named point, for the durability tests.

``EDGE_AGENT_FAILPOINT=<name>`` (or ``<name>:<N>``, the N-th hit, counting from 1) makes
``hit(name)`` send SIGKILL to the own process at once: no ``finally`` block, no atexit hook, no
flush runs, exactly like a power cut for the process (the kernel keeps what was written). The
variable is read once, at import; when it is unset ``hit`` is one comparison and returns.

Points (where they sit, and what a kill there must not break):

``before_commit``
    ``Runtime.flush`` just before ``buffer.append``: the detected events and the detector
    state that produced them are lost together; after the restart the samples are read again
    and the same events (same deterministic ids) are detected again.
``after_commit``
    ``Runtime.flush`` after ``append`` returned, before the forwarders are woken: the events are
    durable and pending; the restart delivers them.
``after_2xx_before_settle``
    ``Forwarder._settle`` when a settlement with accepted rows is about to be written: the
    receiver has the events but the buffer still holds them leased; the restart returns the
    leases to pending and re-sends them, the receiver answers 409 (already have it), which
    settles them. Duplicate *deliveries* are expected here, duplicate *facts* never.

``migration_after_snapshot``
    ``buffer.migrations.migrate`` once the snapshot and the "migrating" record are written,
    before the first step: the next start snapshots again and migrates.
``migration_before_commit``
    ``migrate`` inside a step's transaction, after its statements and the version bump, before
    COMMIT: the file stays at the old version, whole; the next start repeats the step.

"After the POST is sent and before the answer" has no failpoint in the agent: httpx offers no
hook between writing the request and reading the response. The tests kill the agent from the
reference receiver's request handler when the POST arrives, which is deterministic and uses
the real socket path (see ``tests/durability/test_failpoints.py``).
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "POINTS", "hit"]

ENV = "EDGE_AGENT_FAILPOINT"
POINTS = ("before_commit", "after_commit", "after_2xx_before_settle",
          "migration_after_snapshot", "migration_before_commit")


def _parse(spec: str | None) -> tuple[str | None, int]:
    if not spec:
        return None, 0
    name, _, nth = spec.partition(":")
    name = name.strip()
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown failpoint {name!r} "
                         f"(known: {', '.join(POINTS)})")
    if not nth:
        return name, 1
    if not (nth.strip().isascii() and nth.strip().isdigit()) or int(nth) < 1:
        raise ValueError(f"{ENV}={spec!r}: the hit number after ':' must be a positive integer")
    return name, int(nth)


_armed, _remaining = _parse(os.environ.get(ENV))


def hit(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed failpoint and this is its N-th hit."""
    global _remaining
    if name != _armed:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
