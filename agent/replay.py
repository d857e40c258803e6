"""Offline replay and live recording of samples (``edge-agent replay`` / ``edge-agent record``).

Sample file format: one JSON object per line,
``{"tag": ..., "value": ..., "time": RFC 3339, "quality": "good|uncertain|bad"}``
(``quality`` defaults to good; ``detail`` is optional). Replay runs the configured machines
over such a file with no network and no buffer and yields the CloudEvents they produce:
deterministic, so the same input gives the same output and the same ids.

Time in replay is the samples' time: before each group of samples that share a timestamp
every detector is ticked at that time (as the runtime ticks them), so ``min_duration``, stale
signals and scrap windows behave as they would live. ``end`` ticks once more at that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from agent.runtime.supervisor import Supervisor
from agent.wiring.build import build_detectors, build_source
from agent.wiring.schema import Config
from config.backoff import Backoff
from config.errors import PermanentError
from config.model import Quality, TagSample, Value, format_time, parse_time
from config.tasks import cancel_all, wait_event

__all__ = ["SampleFileError", "read_samples", "record", "replay", "sample_to_json"]


class SampleFileError(PermanentError):
    """A line of a sample file cannot be read; the message names the file and line."""


def sample_to_json(s: TagSample) -> str:
    doc: dict[str, Any] = {"tag": s.tag, "value": s.value, "time": format_time(s.time),
                           "quality": s.quality.value}
    if s.detail:
        doc["detail"] = s.detail
    return json.dumps(doc, separators=(",", ":"))


def read_samples(path: Path) -> Iterator[TagSample]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict):
                    raise ValueError("expected a JSON object")
                t = parse_time(str(doc["time"]))
                value: Value = doc.get("value")
                if isinstance(value, dict | list):
                    raise ValueError("'value' must be a number, text, true/false or null")
                quality = Quality(doc.get("quality", "good"))
                tag = doc["tag"]
                if not isinstance(tag, str):
                    raise ValueError("'tag' must be text")
            except KeyError as exc:
                raise SampleFileError(f"{path}:{n}: missing key {exc}") from None
            except ValueError as exc:
                raise SampleFileError(f"{path}:{n}: {exc}") from None
            yield TagSample(tag=tag, value=value, quality=quality, agent_time=t,
                            source_time=t, detail=doc.get("detail"))


def replay(config: Config, samples: Iterable[TagSample],
           end: datetime | None = None) -> Iterator[dict[str, Any]]:
    detectors = build_detectors(config)
    agent_id = config.agent.id
    batch: list[TagSample] = []

    def run(batch: list[TagSample]) -> Iterator[dict[str, Any]]:
        t = batch[0].time
        for det in detectors.values():
            for e in det.on_tick(t):
                yield e.to_cloudevent(agent_id)
        for det in detectors.values():
            for e in det.on_samples(batch):
                yield e.to_cloudevent(agent_id)

    for s in samples:
        if batch and s.time != batch[0].time:
            yield from run(batch)
            batch = []
        batch.append(s)
    if batch:
        yield from run(batch)
    if end is not None:
        for det in detectors.values():
            for e in det.on_tick(end):
                yield e.to_cloudevent(agent_id)


async def record(config: Config, out: TextIO, duration: float | None,
                 on_progress: Callable[[int, float], None] | None = None) -> int:
    """Capture live samples of every configured source until ``duration`` or a signal;
    ``on_progress(count, elapsed seconds)`` is called about once a second."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    count = 0

    class _Writer:
        def __init__(self, sup: list[Supervisor]) -> None:
            self._sup = sup

        def emit(self, samples: Iterable[TagSample]) -> None:
            nonlocal count
            for s in samples:
                out.write(sample_to_json(s) + "\n")
                count += 1
            self._sup[0].progress()

        def connected(self) -> None:
            self._sup[0].mark_up()

    tasks = []
    for name, cfg in config.sources.items():
        source = build_source(name, cfg)
        holder: list[Supervisor] = []
        writer = _Writer(holder)

        async def session(source: Any = source, writer: _Writer = writer) -> None:
            await source.run(writer)

        sup = Supervisor("source", name, session, backoff=Backoff(cfg.backoff.initial,
                                                                    cfg.backoff.max))
        holder.append(sup)
        tasks.append(asyncio.create_task(sup.run()))
    started = time.monotonic()
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - started
            left = None if duration is None else duration - elapsed
            if left is not None and left <= 0:
                break
            await wait_event(stop, 1.0 if left is None else min(1.0, left))
            if on_progress is not None:
                on_progress(count, time.monotonic() - started)
    finally:
        # cancel_all, not one cancel and an await: a session in a library that loses the
        # cancel (wait_for on Python 3.11) would keep the command from ever ending.
        await cancel_all(tasks)
        out.flush()
    return count
