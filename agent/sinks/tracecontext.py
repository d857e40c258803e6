"""W3C Trace Context for delivery requests: one ``traceparent`` per HTTP request.

``traceparent: 00-<trace-id>-<parent-id>-01`` (version 00, sampled). Why one trace per request,
also for a batch: the header describes the request, and a batch is one request that the
receiver handles as one unit (one transaction, one 207); the event ids are in the body, so each
event can still be found. Per-event traces would need a header per event, which HTTP has not,
and span links need a tracing SDK on both sides.

The trace id is derived from the request's ``Idempotency-Key`` (the event id in single mode, a
hash of the ids in batch mode), so every attempt of the same request (retries after a timeout
or a 503) falls into the same trace, and an integrator can find the trace of a single-mode
event from its id alone. Each attempt gets a fresh random parent id (its own span). The trace
id is therefore not random, and the trace-flags say so (the level-2 "random" bit stays 0).
"""

from __future__ import annotations

import hashlib
import os
import re

__all__ = ["TRACEPARENT", "parse_traceparent", "trace_id_for", "traceparent"]

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def trace_id_for(idempotency_key: str) -> str:
    """32 lower-case hex digits, never all zero (an all-zero id is invalid)."""
    tid = hashlib.sha256(b"edge-agent trace\n" + idempotency_key.encode("utf-8")).hexdigest()[:32]
    return tid if tid != _ZERO_TRACE else "0" * 31 + "1"


def traceparent(idempotency_key: str) -> tuple[str, str]:
    """(header value, trace id) for one attempt of the request with this key."""
    tid = trace_id_for(idempotency_key)
    span = os.urandom(8).hex()
    if span == _ZERO_SPAN:
        span = "0" * 15 + "1"
    return f"00-{tid}-{span}-01", tid


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a well-formed version-00 header, else None."""
    m = TRACEPARENT.match((value or "").strip())
    if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
        return None
    return m.group(1), m.group(2), m.group(3)
