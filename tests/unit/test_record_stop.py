"""``edge-agent record`` ends even when a source's session loses the first cancel.

The protocol libraries wait with ``asyncio.wait_for``, which on Python 3.11 loses a cancel that
arrives with a response. ``record`` stopped its sources with one cancel and an unbounded
``await``: the command hung at the end of its duration and never flushed the file.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

import agent.replay
from agent.replay import record
from agent.wiring.load import load_config_text

CONFIG = """
agent: {id: a, site: s, data_dir: /tmp/edge-record-stop}
sources:
  plc: {type: modbus, host: 127.0.0.1, tags: {st: {table: holding, address: 0, type: uint16}}}
machines:
  m1: {line: l1, state: {tag: st, map: {1: running}}}
sinks:
  central: {type: http, url: "http://127.0.0.1:9/events"}
"""


class _LosesOneCancel:
    """A session in a library that loses the first cancel it gets (a test double of the
    source: the loss itself is a race in the library that a real peer cannot make certain)."""

    tag_ids = ["st"]
    stale_after = float("inf")

    def __init__(self) -> None:
        self.cancels = 0

    async def run(self, out: Any) -> None:
        out.connected()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancels += 1
                if self.cancels > 1:
                    raise


async def test_record_ends_when_a_session_loses_its_first_cancel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    source = _LosesOneCancel()
    monkeypatch.setattr(agent.replay, "build_source", lambda name, cfg: source)
    config = load_config_text(CONFIG, "record.yaml")
    done, _ = await asyncio.wait({asyncio.ensure_future(record(config, io.StringIO(), 0.05))},
                                 timeout=5)
    assert done, "record did not end: its source's session ran on after the stop"
    assert source.cancels == 2
