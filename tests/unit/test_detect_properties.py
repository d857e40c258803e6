"""Properties of detection over generated inputs (hypothesis).

- Scrap: for any sequence of counter readings made from a model counter (random increments,
  rollovers at 2**bits, resets, implausible jumps, bad samples), the posted scrap equals the
  knowable true increase (what is knowable is spelt out in ``_counter_story``).
- Episodes: for any sequence of state samples (mapped, unmapped, bad; a stall rule; ticks),
  episodes never overlap, every ``ended`` has exactly one ``started`` with the same episode id
  before it, durations are never negative, sequences are 1..N.
- Restart: snapshot + restore at any point gives the same events as an uninterrupted run.
- Replay is deterministic and gives every event its own id.

Source times may stand still (several polls in one instant, as from a source with coarse
timestamps) or step back (a PLC clock corrected): durations must stay non-negative, episodes
apart and ids distinct all the same (the cases ``time-backwards-reopen``,
``time-backwards-across-signal-loss``, ``same-instant-flap`` and ``same-instant-signal-flap``
record what these properties found).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.detect import MachineDetector
from agent.detect.classify import EpisodeNotFound
from agent.detect.config import MachineConfig
from agent.replay import replay
from agent.wiring.load import load_config_text
from config.model import Event, Quality, TagSample

T0 = datetime(2026, 11, 28, 8, 0, 0, tzinfo=UTC)
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _sample(tag: str, value: Any, t: float, quality: Quality = Quality.GOOD) -> TagSample:
    at = T0 + timedelta(seconds=t)
    return TagSample(tag=tag, value=value, quality=quality, agent_time=at, source_time=at)


def _run(det: MachineDetector, steps: list[tuple[float, list[TagSample]]],
         end: float | None = None) -> list[Event]:
    """Drive a detector as replay and the runtime do: a tick, then the poll's batch."""
    out: list[Event] = []
    for t, batch in steps:
        out += det.on_tick(T0 + timedelta(seconds=t))
        if batch:
            out += det.on_samples(batch)
    if end is not None:
        out += det.on_tick(T0 + timedelta(seconds=end))
    return out


# --------------------------------------------------------------------------- scrap counters

K = 1000  # largest true increase between two readings (well under a quarter of 16 bits)


@dataclass
class CounterStory:
    bits: int
    max_step: int | None
    readings: list[int | None]  # None: a bad-quality sample
    true_increase: int


@st.composite
def _counter_story(draw: st.DrawFn) -> CounterStory:
    """A true counter and what the PLC shows of it, one reading per second.

    Knowable, and so expected as scrap: every increase between two good readings, including
    across a rollover at 2**bits (the counter's width) and what was counted after a reset.
    Not knowable, and so not expected: whatever happened before the first reading (it is the
    baseline), what was counted between the last reading and a reset, and an implausible jump
    (> max_step), which the rules say is reported and not posted.

    A reset is only generated where the rules can tell it from a rollover or from ordinary
    counting: the reading drops (new < last) and the drop is not one that would read as a
    rollover, i.e. the rollover's increase ``2**bits - last + new`` exceeds ``max_step`` (or a
    quarter of the range without ``max_step``). Elsewhere the step becomes ordinary counting.
    """
    bits = draw(st.sampled_from([16, 32]))
    span = 1 << bits
    max_step = draw(st.sampled_from([None, 5000]))
    limit = max_step if max_step is not None else span // 4
    near_top = draw(st.booleans())  # start close to the top so rollovers really happen
    c = draw(st.integers(span - 3 * K, span - 1) if near_top else st.integers(0, span - 1))
    readings: list[int | None] = [c]
    truth = 0
    kinds = ["count", "count", "count", "reset", "bad"] + (["jump"] if max_step else [])
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(kinds))
        k = draw(st.integers(0, K))
        if kind == "reset" and k < c and span - c + k > limit:
            c = k  # reset to 0, then k counted
            truth += k
        elif kind == "jump" and max_step is not None and c + 10 * max_step < span:
            c += draw(st.integers(max_step + 1, 10 * max_step))
        elif kind == "bad":
            readings.append(None)
            continue
        else:
            c = (c + k) % span
            truth += k
        readings.append(c)
    return CounterStory(bits, max_step, readings, truth)


@FAST
@given(story=_counter_story(), window=st.sampled_from(["1s", "7s", "60s"]))
def test_posted_scrap_equals_the_knowable_true_increase(story: CounterStory,
                                                        window: str) -> None:
    tag = "c16" if story.bits == 16 else "cnt"
    cfg = MachineConfig.model_validate({
        "line": "l1", "state": {"tag": "st", "map": {1: "running"}},
        "scrap": {"counter": tag, "window": window, "max_step": story.max_step}})
    det = MachineDetector("m1", cfg, "plant-t", counter_bits=story.bits)
    steps = [(0.0, [_sample("st", 1, 0)])]
    for i, v in enumerate(story.readings):
        t = 1.0 + i
        s = _sample(tag, v, t) if v is not None else _sample(tag, None, t, Quality.BAD)
        steps.append((t, [s]))
    events = _run(det, steps, end=len(story.readings) + 2 * cfg.scrap.window)
    scrap = [e for e in events if e.type.value == "plantedge.scrap.recorded"]
    assert sum(e.data["quantity"] for e in scrap) == story.true_increase
    assert all(e.data["quantity"] > 0 for e in scrap)
    ends = [e.data["window_end"] for e in scrap]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)  # one event per window
    assert det.scrap is not None and det.scrap.window is None  # the end tick closed it


# --------------------------------------------------------------------------- episodes

_STATE_VALUES = st.sampled_from([1, 1, 1, 2, 3, 3, 4, 9, None])  # 9: unmapped; None: bad


@st.composite
def _state_story(draw: st.DrawFn, still_or_back: bool = True
                 ) -> tuple[dict[str, Any], list[tuple[float, list[TagSample]]]]:
    """Random polls of a machine with a state map, a reason and maybe a stall rule, and bare
    ticks. Times move forward by 0.5..12 s, or with ``still_or_back`` by -3..12 s (0: several
    polls in one instant; < 0: the source's clock stepped back)."""
    stall = draw(st.booleans())
    raw: dict[str, Any] = {
        "line": "l1",
        "state": {"tag": "st", "map": {1: "running", 2: "idle", 3: "down", 4: "planned"}},
        "downtime": {"min_duration": draw(st.sampled_from(["0s", "3s", "10s"])),
                     "reason_tag": "rsn"},
        "order_tag": "ord",
    }
    if stall:
        raw["state"].update(production_counter="prod", stalled_after="15s")
    if draw(st.booleans()):
        raw["downtime"]["max_duration"] = "20s"
    t, prod = 0.0, 0
    steps: list[tuple[float, list[TagSample]]] = []
    for _ in range(draw(st.integers(1, 50))):
        if draw(st.integers(0, 5)) == 0:
            steps.append((t + 0.25, []))  # a tick with nothing read, between two polls
        t += draw(st.sampled_from([0, 0.5, 1, 2, 5, 12, -3] if still_or_back else [0.5, 1, 5, 12]))
        v = draw(_STATE_VALUES)
        batch = [_sample("st", v, t) if v is not None else _sample("st", None, t, Quality.BAD)]
        if draw(st.integers(0, 3)) == 0:
            batch.append(_sample("rsn", draw(st.sampled_from([0, 5, 7])), t))
        if draw(st.integers(0, 6)) == 0:
            batch.append(_sample("ord", draw(st.sampled_from(["PO-1", "PO-2"])), t))
        if stall:
            prod += draw(st.sampled_from([0, 0, 1]))
            batch.append(_sample("prod", prod, t))
        steps.append((t, batch))
    return raw, steps


def _check_episodes(events: list[Event]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    open_ep: dict[str, Any] | None = None
    last_end: str | None = None
    seen_started: set[str] = set()
    seen_ended: set[str] = set()
    for e in events:
        d = e.data
        if e.type.value == "plantedge.downtime.started":
            assert open_ep is None, f"started {d['episode_id']} while {open_ep} is open"
            assert d["episode_id"] not in seen_started
            assert last_end is None or d["started_at"] >= last_end, "episodes overlap"
            seen_started.add(d["episode_id"])
            open_ep = d
        elif e.type.value == "plantedge.downtime.ended":
            assert open_ep is not None and open_ep["episode_id"] == d["episode_id"]
            assert d["episode_id"] not in seen_ended
            assert d["duration_seconds"] >= 0 and d["ended_at"] >= d["started_at"]
            assert d["started_at"] == open_ep["started_at"]
            seen_ended.add(d["episode_id"])
            last_end, open_ep = d["ended_at"], None


def _episodes_hold(story: tuple[dict[str, Any], Any]) -> None:
    raw, steps = story
    det = MachineDetector("m1", MachineConfig.model_validate(raw), "plant-t")
    events = _run(det, steps, end=steps[-1][0] + 60)
    _check_episodes(events)
    assert len({e.id for e in events}) == len(events)


@FAST
@given(story=_state_story(still_or_back=False))
def test_episodes_never_overlap_and_end_once(story: tuple[dict[str, Any], Any]) -> None:
    _episodes_hold(story)


@FAST
@given(story=_state_story(still_or_back=True))
def test_episodes_hold_when_source_time_stands_still_or_steps_back(
        story: tuple[dict[str, Any], Any]) -> None:
    _episodes_hold(story)


@FAST
@given(story=_state_story(), data=st.data())
def test_restart_anywhere_changes_nothing(story: tuple[dict[str, Any], Any],
                                          data: st.DataObject) -> None:
    raw, steps = story
    cfg = MachineConfig.model_validate(raw)
    end = steps[-1][0] + 60
    straight = _run(MachineDetector("m1", cfg, "plant-t"), steps, end)
    cut = data.draw(st.integers(0, len(steps)), label="restart after step")
    first = MachineDetector("m1", cfg, "plant-t")
    events = _run(first, steps[:cut])
    second = MachineDetector("m1", cfg, "plant-t")
    second.restore(first.snapshot())
    events += _run(second, steps[cut:], end)
    assert events == straight


@st.composite
def _operator_story(draw: st.DrawFn) -> tuple[list[tuple[float, list[TagSample]]],
                                              dict[int, str]]:
    """Stops long enough to be reported, a PLC reason tag that is set, re-read and cleared,
    and an operator who classifies the open or latest stop now and then (code by step)."""
    t = 0.0
    steps: list[tuple[float, list[TagSample]]] = []
    operator: dict[int, str] = {}
    for i in range(draw(st.integers(1, 40))):
        t += draw(st.sampled_from([0, 1, 3, 6, 20, 400]))
        batch = []
        if draw(st.booleans()):
            batch.append(_sample("st", draw(st.sampled_from([1, 3, 3, 9])), t))
        if draw(st.integers(0, 2)) > 0:  # often: most polls re-read an unchanged reason
            batch.append(_sample("rsn", draw(st.sampled_from([0, 7, 9, 9])), t))
        if draw(st.integers(0, 2)) == 0:
            operator[i] = draw(st.sampled_from(["7", "9"]))
        steps.append((t, batch))
    return steps, operator


def _run_classifying(det: MachineDetector, steps: list[tuple[float, list[TagSample]]],
                     operator: dict[int, str], start: int = 0,
                     end: float | None = None) -> list[Event]:
    """As ``_run``, with an operator classifying the open or latest stop (code
    ``operator[i]``) just before step ``start + i``'s poll."""
    out: list[Event] = []
    for i, (t, batch) in enumerate(steps, start):
        out += det.on_tick(T0 + timedelta(seconds=t))
        if i in operator:
            with contextlib.suppress(EpisodeNotFound):
                out += det.classify(None, operator[i], None, "operator",
                                    T0 + timedelta(seconds=t))[1]
        if batch:
            out += det.on_samples(batch)
    if end is not None:
        out += det.on_tick(T0 + timedelta(seconds=end))
    return out


@FAST
@given(story=_operator_story())
def test_restart_anywhere_changes_nothing_with_operator_reasons(
        story: tuple[list[tuple[float, list[TagSample]]], dict[int, str]]) -> None:
    """Operator classifications mixed into the PLC's polls: the classifier's state survives
    a restart, and the PLC's reason re-read after one does not undo an operator's code.
    Every cut is tried (the detector is pure and fast): a failure needs a restart between
    a classification and a re-read, too rare to find by drawing one cut."""
    steps, operator = story
    cfg = MachineConfig.model_validate({
        "line": "l1", "state": {"tag": "st", "map": {1: "running", 3: "down"}},
        "downtime": {"min_duration": "5s", "reason_tag": "rsn"}})
    end = steps[-1][0] + 60
    straight = _run_classifying(MachineDetector("m1", cfg, "plant-t"), steps, operator, 0, end)
    for cut in range(len(steps) + 1):
        first = MachineDetector("m1", cfg, "plant-t")
        events = _run_classifying(first, steps[:cut], operator)
        second = MachineDetector("m1", cfg, "plant-t")
        second.restore(first.snapshot())
        events += _run_classifying(second, steps[cut:], operator, cut, end)
        assert events == straight, f"restart after step {cut}"


@st.composite
def _running_with_gaps(draw: st.DrawFn) -> tuple[dict[str, Any], list[Any]]:
    """A machine that runs and produces the whole time, observed badly: state samples that
    are missing (stale), bad or unmapped, and maybe a production counter (stall rule) that
    is missing or bad now and then but counts on in the meantime."""
    stall = draw(st.booleans())
    raw: dict[str, Any] = {"line": "l1", "stale_after": "10s",
                           "state": {"tag": "st", "map": {1: "running", 3: "down"}}}
    if stall:
        raw["state"].update(production_counter="prod", stalled_after="30s")
    t = 0.0
    steps: list[tuple[float, list[TagSample]]] = []
    for produced in range(1, draw(st.integers(1, 40)) + 1):  # one more part every poll
        t += draw(st.sampled_from([1, 5, 12, 40]))
        batch = []
        how = draw(st.sampled_from(["good", "good", "bad", "unmapped", "missing"]))
        if how != "missing":
            batch.append(_sample("st", None, t, Quality.BAD) if how == "bad"
                         else _sample("st", 1 if how == "good" else 99, t))
        prod = draw(st.sampled_from(["good", "good", "bad", "missing"]))
        if stall and prod != "missing":
            batch.append(_sample("prod", produced, t) if prod == "good"
                         else _sample("prod", None, t, Quality.BAD))
        steps.append((t, batch))
    return raw, steps


@FAST
@given(story=_running_with_gaps())
def test_missing_data_never_makes_downtime(story: tuple[dict[str, Any], Any]) -> None:
    raw, steps = story
    det = MachineDetector("m1", MachineConfig.model_validate(raw), "plant-t")
    kinds = [e.type.value.removeprefix("plantedge.") for e in _run(det, steps)]
    assert not [k for k in kinds if k.startswith("downtime")], kinds
    assert kinds == ["signal.lost", "signal.restored"] * (len(kinds) // 2) + (
        ["signal.lost"] if len(kinds) % 2 else []), "lost and restored must alternate"


# --------------------------------------------------------------------------- replay

_CONFIG = load_config_text("""
agent: {id: prop-edge, site: plant-t}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    stale_after: 8s
    tags:
      st: {address: 0}
      rsn: {address: 1}
      cnt: {address: 2, type: uint16}
      ord: {address: 10, type: string, length: 8}
      spd: {address: 20, type: float32}
machines:
  m1:
    line: l1
    state: {tag: st, map: {1: running, 2: idle, 3: down, 4: planned}}
    downtime: {min_duration: 2s, reason_tag: rsn, reasons: {5: Jam}}
    scrap: {counter: cnt, window: 10s}
    order_tag: ord
  m2:
    line: l1
    state: {tag: spd, running_above: 10}
    downtime: {max_duration: 30s}
sinks:
  central: {type: http, url: "http://127.0.0.1:9/events"}
""", "<properties>")

_POLL = st.fixed_dictionaries({}, optional={
    "st": _STATE_VALUES,
    "rsn": st.sampled_from([0, 5, 6]),
    "cnt": st.integers(0, 65535),
    "ord": st.sampled_from(["PO-1", "PO-2", ""]),
    "spd": st.sampled_from([0.0, 10.0, 25.5, None]),
})


@FAST
@given(polls=st.lists(st.tuples(st.sampled_from([0, 0.25, 1, 3, 9, -2]), _POLL),
                      max_size=60))
def test_replay_is_deterministic(polls: list[tuple[float, dict[str, Any]]]) -> None:
    """Polls of some of the tags (times may stand still or step back); same input, same
    output and ids, and no two events share an id."""
    t, samples = 0.0, []
    for dt, poll in polls:
        t += dt
        for tag, value in poll.items():
            q = Quality.BAD if value is None else Quality.GOOD
            samples.append(_sample(tag, value, t, q))
    end = T0 + timedelta(seconds=t + 100)
    first = list(replay(_CONFIG, samples, end))
    assert first == list(replay(_CONFIG, samples, end))
    for source in {e["source"] for e in first}:
        seq = [int(e["sequence"]) for e in first if e["source"] == source]
        assert seq == list(range(1, len(seq) + 1))
    assert len({e["id"] for e in first}) == len(first), "two events share an id"


# --------------------------------------------------------------------------- not a property


def test_only_scrap_counters_count_as_counter_anomalies() -> None:
    cfg = MachineConfig.model_validate({
        "line": "l1", "state": {"tag": "spd", "running_above": 10},
        "scrap": {"counter": "cnt", "max_step": 10}})
    det = MachineDetector("m1", cfg, "plant-t")
    steps = [(float(i), [_sample("spd", v, i), _sample("cnt", 5, i)])
             for i, v in enumerate([0.0, 1500.0, 0.0, 1500.0])]
    _run(det, steps)
    assert det.status()["counter_anomalies"] == 0  # the scrap counter never moved


def test_clock_jump_flags_what_was_open_and_only_that() -> None:
    cfg = MachineConfig.model_validate({
        "line": "l1", "state": {"tag": "st", "map": {1: "running", 3: "down"}},
        "scrap": {"counter": "cnt", "window": "60s"}})
    det = MachineDetector("m1", cfg, "plant-t")
    events = _run(det, [(0.0, [_sample("st", 1, 0), _sample("cnt", 0, 0)]),
                        (10.0, [_sample("st", 3, 10), _sample("cnt", 2, 10)])])
    det.note_clock_jump(-30.0)  # the agent's clock stepped back while both were open
    events += _run(det, [(20.0, [_sample("st", 1, 20)]), (30.0, [_sample("st", 3, 30)]),
                         (40.0, [_sample("st", 1, 40)])], end=130)
    by_type = [(e.type.value.removeprefix("plantedge."), e.data.get("clock_adjusted"))
               for e in events]
    assert by_type == [("downtime.started", None), ("downtime.ended", True),
                       ("downtime.started", None), ("downtime.ended", None),
                       ("scrap.recorded", True)]
    assert det.status()["clock_jumps"] == 1


def test_no_overlap_when_the_clock_steps_back_right_after_a_cut() -> None:
    """Found by the property above: a stall cut by max_duration at 20 s, then the source's
    clock steps back to 17 s as the machine runs and stalls again; the new stop began at
    17 s, inside the piece that had just ended at 20 s."""
    cfg = MachineConfig.model_validate({
        "line": "l1", "state": {"tag": "st", "map": {1: "running", 3: "down"},
                                "production_counter": "prod", "stalled_after": "15s"},
        "downtime": {"min_duration": "0s", "max_duration": "20s"}})
    polls = [(0.0, 1), (5.0, 1), (10.0, 1), (15.0, 1), (20.0, 3), (17.0, 1)]
    steps = [(t, [_sample("st", st, t), _sample("prod", 0, t)]) for t, st in polls]
    events = _run(MachineDetector("m1", cfg, "plant-t"), steps, end=80.0)
    assert sum(e.type.value == "plantedge.downtime.started" for e in events) >= 3
    _check_episodes(events)
