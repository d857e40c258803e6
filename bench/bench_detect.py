"""Detection throughput: samples per second through 200 machines' detectors on one core.

The workload is a plant polled once a second: 200 machines, each with a state tag (a value
map with a reason tag: downtime episodes) and a 32-bit scrap counter (windows of 60 s), so
600 samples a poll. Machines stop now and then, reasons get entered, counters count and
sometimes roll over, so every rule does real work.

Both loops below consume the same pre-generated raw (tag, value) tuples:

- baseline: decode only, i.e. build the ``TagSample`` of every raw tuple, poll by poll;
- detection: the same decoding, then what ``agent/runtime.py`` does with a poll: route the
  batch by tag to the machines that read those tags, call ``MachineDetector.on_samples`` once
  per machine, and tick every detector once per poll.

Run: ``.venv/bin/python bench/bench_detect.py [--polls N] [--machines N] [--profile]``.
The target is at least 200,000 samples/s through detection.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.detect import MachineDetector
from agent.wiring.build import build_detectors
from agent.wiring.load import load_config_text
from agent.wiring.schema import Config
from config.model import Quality, TagSample, Value

TARGET = 200_000
T0 = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)
Poll = tuple[datetime, list[tuple[str, Value]]]


def make_config(machines: int) -> Config:
    tags, mach = [], []
    for i in range(machines):
        a = i * 4
        tags += [f"      m{i}.st: {{address: {a}, type: uint16}}",
                 f"      m{i}.rsn: {{address: {a + 1}, type: uint16}}",
                 f"      m{i}.cnt: {{address: {a + 2}, type: uint32}}"]
        mach += [f"  m{i}:", "    line: l1",
                 f"    state: {{tag: m{i}.st, map: {{1: running, 2: idle, 3: down, "
                 "4: planned}}",
                 f"    downtime: {{min_duration: 5s, reason_tag: m{i}.rsn, "
                 "reasons: {7: Jam}}",
                 f"    scrap: {{counter: m{i}.cnt, window: 60s}}"]
    text = "\n".join([
        "agent: {id: bench-edge, site: plant-b}",
        "sources:", "  plc:", "    type: modbus", "    host: 127.0.0.1",
        "    stale_after: 1h", "    tags:", *tags,
        "machines:", *mach,
        "sinks:", '  central: {type: http, url: "http://127.0.0.1:9/events"}', ""])
    return load_config_text(text, "<bench>")


def make_polls(machines: int, polls: int, seed: int = 7) -> list[Poll]:
    """Raw values a PLC would give, poll by poll (decided up front, outside the timing)."""
    rng = random.Random(seed)
    state = [1] * machines
    reason = [0] * machines
    counter = [rng.randrange(0, 2**32) if rng.random() < 0.1 else rng.randrange(0, 10_000)
               for _ in range(machines)]
    out: list[Poll] = []
    for p in range(polls):
        raw: list[tuple[str, Value]] = []
        for i in range(machines):
            if state[i] == 1 and rng.random() < 0.01:
                state[i] = rng.choice((2, 3, 3, 4))
            elif state[i] != 1 and rng.random() < 0.05:
                state[i], reason[i] = 1, 0
            elif state[i] != 1 and reason[i] == 0 and rng.random() < 0.2:
                reason[i] = rng.choice((5, 7))
            if rng.random() < 0.3:
                counter[i] = (counter[i] + rng.randrange(1, 4)) % 2**32
            raw += [(f"m{i}.st", state[i]), (f"m{i}.rsn", reason[i]), (f"m{i}.cnt", counter[i])]
        out.append((T0 + timedelta(seconds=p), raw))
    return out


def decode_only(polls: list[Poll]) -> int:
    n = 0
    good = Quality.GOOD
    for t, raw in polls:
        batch = [TagSample(tag, value, good, t) for tag, value in raw]
        n += len(batch)
    return n


def detect(polls: list[Poll], detectors: dict[str, MachineDetector]) -> tuple[int, int]:
    by_tag: dict[str, list[MachineDetector]] = {}
    for det in detectors.values():
        for tag in det.tags:
            by_tag.setdefault(tag, []).append(det)
    dets = list(detectors.values())
    n = events = 0
    good = Quality.GOOD
    for t, raw in polls:
        batch = [TagSample(tag, value, good, t) for tag, value in raw]
        n += len(batch)
        touched: dict[str, list[TagSample]] = {}
        for s in batch:  # routing as Runtime.on_samples does it
            for det in by_tag.get(s.tag, ()):
                touched.setdefault(det.machine_id, []).append(s)
        for mid, mine in touched.items():
            events += len(detectors[mid].on_samples(mine))
        for det in dets:  # one tick per poll, as the runtime's tick loop
            events += len(det.on_tick(t))
    return n, events


def _best(fn: object, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machines", type=int, default=200)
    ap.add_argument("--polls", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one detection run")
    args = ap.parse_args()

    config = make_config(args.machines)
    polls = make_polls(args.machines, args.polls)
    samples = sum(len(raw) for _, raw in polls)

    base_s, _ = _best(lambda: decode_only(polls), args.repeat)
    runs: list[tuple[int, int]] = []

    def one_detect_run() -> tuple[int, int]:
        # Fresh detectors each run, so every run sees the same stops and windows.
        result = detect(polls, build_detectors(config))
        runs.append(result)
        return result

    det_s, _ = _best(one_detect_run, args.repeat)
    events = runs[-1][1]
    base_rate, det_rate = samples / base_s, samples / det_s

    print(f"{args.machines} machines x 3 tags, {args.polls} polls = {samples:,} samples, "
          f"{events:,} events; best of {args.repeat}, one process, one core")
    print(f"{'loop':<28}{'seconds':>10}{'samples/s':>14}{'vs baseline':>13}")
    print(f"{'decode only (baseline)':<28}{base_s:>10.3f}{base_rate:>14,.0f}{1.0:>12.2f}x")
    print(f"{'decode + route + detect':<28}{det_s:>10.3f}{det_rate:>14,.0f}"
          f"{det_rate / base_rate:>12.2f}x")
    print(f"target: >= {TARGET:,} samples/s through detection: "
          f"{'met' if det_rate >= TARGET else 'NOT met'} "
          f"(detection alone costs {(det_s - base_s) / samples * 1e6:.2f} us/sample)")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        detect(polls, build_detectors(config))
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
