"""MachineDetector: downtime episodes, signal quality, scrap windows, order context, restore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.detect import MachineDetector
from agent.detect.config import MachineConfig
from config.model import Event, Quality, TagSample

T0 = datetime(2026, 11, 28, 8, 0, 0, tzinfo=UTC)


def machine(**over: object) -> MachineConfig:
    raw: dict[str, object] = {
        "line": "line-1",
        "state": {"tag": "st", "map": {1: "running", 2: "idle", 3: "down", 4: "planned"}},
        "downtime": {"min_duration": "5s", "reason_tag": "rsn", "reasons": {7: "Jam"}},
        "scrap": {"counter": "cnt", "window": "60s"},
        "order_tag": "ord",
    }
    raw.update(over)
    return MachineConfig.model_validate(raw)


def s(tag: str, value: object, t: float, quality: Quality = Quality.GOOD) -> TagSample:
    at = T0 + timedelta(seconds=t)
    return TagSample(tag=tag, value=value, quality=quality, agent_time=at)  # type: ignore[arg-type]


def feed(det: MachineDetector, *samples: TagSample) -> list[Event]:
    out: list[Event] = []
    for x in samples:
        out += det.on_samples([x])
    return out


def types(events: list[Event]) -> list[str]:
    return [e.type.value.removeprefix("plantedge.") for e in events]


def test_downtime_episode_with_reason_and_duration() -> None:
    det = MachineDetector("m1", machine(), "plant-a", stale_after=10)
    ev = feed(det, s("ord", "PO-1", 0), s("st", 1, 0), s("st", 3, 10), s("rsn", 7, 11),
              s("st", 3, 16), s("st", 1, 40))
    assert types(ev) == ["downtime.started", "downtime.ended"]
    started, ended = ev
    assert started.time == T0 + timedelta(seconds=10)
    assert started.data["category"] == "unplanned"
    assert started.data["reason_code"] == "7" and started.data["reason"] == "Jam"
    assert ended.data["duration_seconds"] == 30.0
    assert ended.data["episode_id"] == started.data["episode_id"]
    assert ended.data["order_id"] == "PO-1"
    assert started.source == "/sites/plant-a/lines/line-1/machines/m1"
    assert [e.sequence for e in ev] == [1, 2]


def test_short_stop_is_a_microstop_reported_on_next_end() -> None:
    det = MachineDetector("m1", machine(), "plant-a")
    ev = feed(det, s("st", 1, 0), s("st", 3, 1), s("st", 1, 3), s("st", 3, 10), s("st", 1, 20))
    assert types(ev) == ["downtime.started", "downtime.ended"]
    assert ev[1].data["microstops"] == 1 and ev[1].data["microstop_seconds"] == 2.0


def test_tick_announces_after_min_duration() -> None:
    det = MachineDetector("m1", machine(), "plant-a")
    feed(det, s("st", 1, 0), s("st", 4, 1))
    assert det.on_tick(T0 + timedelta(seconds=5)) == []
    ev = det.on_tick(T0 + timedelta(seconds=6.5))
    assert types(ev) == ["downtime.started"] and ev[0].data["category"] == "planned"


def test_category_change_ends_and_starts_episode() -> None:
    det = MachineDetector("m1", machine(downtime={"min_duration": "0s"}), "plant-a")
    ev = feed(det, s("st", 1, 0), s("st", 3, 1), s("st", 4, 20), s("st", 1, 30))
    assert types(ev) == ["downtime.started", "downtime.ended", "downtime.started",
                         "downtime.ended"]
    assert [e.data["category"] for e in ev] == ["unplanned", "unplanned", "planned", "planned"]


def test_bad_signal_is_unknown_not_down_and_flags_open_episode() -> None:
    det = MachineDetector("m1", machine(downtime={"min_duration": "0s"}), "plant-a")
    ev = feed(det, s("st", 1, 0), s("st", None, 5, Quality.BAD), s("st", 1, 9))
    assert types(ev) == ["signal.lost", "signal.restored"]
    ev = feed(det, s("st", 3, 10), s("st", None, 12, Quality.BAD), s("st", 3, 15),
              s("st", 1, 20))
    assert types(ev) == ["downtime.started", "signal.lost", "signal.restored", "downtime.ended"]
    assert ev[-1].data["had_signal_gap"] is True
    assert ev[-1].data["duration_seconds"] == 10.0


def test_stale_state_tag_loses_signal_on_tick() -> None:
    det = MachineDetector("m1", machine(), "plant-a", stale_after=3)
    feed(det, s("st", 1, 0))
    assert det.on_tick(T0 + timedelta(seconds=2)) == []
    ev = det.on_tick(T0 + timedelta(seconds=4))
    assert types(ev) == ["signal.lost"] and det.state.value == "unknown"


@pytest.mark.parametrize(("values", "bits", "expected"), [
    ([10, 12, 20], 32, 10),
    ([4294967290, 4294967295, 3], 32, 9),          # rollover at 32 bits
    ([65530, 2], 16, 8),                           # rollover at 16 bits
    ([500, 510, 0, 4], 32, 14),                    # reset to zero, then counts again
    ([500, 510, 3], 32, 13),                       # reset to a small value
])
def test_counter_scrap(values: list[int], bits: int, expected: int) -> None:
    det = MachineDetector("m1", machine(), "plant-a", counter_bits=bits)
    ev = feed(det, *(s("cnt", v, i) for i, v in enumerate(values)))
    ev += det.on_tick(T0 + timedelta(seconds=120))
    assert sum(e.data["quantity"] for e in ev) == expected
    assert all(e.data["quantity"] > 0 for e in ev)


def test_order_change_splits_scrap_window() -> None:
    det = MachineDetector("m1", machine(), "plant-a")
    ev = feed(det, s("ord", "A", 0), s("cnt", 0, 0), s("cnt", 5, 1), s("ord", "B", 2),
              s("cnt", 7, 3))
    ev += det.on_tick(T0 + timedelta(seconds=61))
    assert [(e.data["order_id"], e.data["quantity"]) for e in ev] == [("A", 5), ("B", 2)]
    assert ev[0].data["window_end"] == ev[1].data["window_start"]


def test_restore_mid_episode_ends_once_with_same_ids() -> None:
    cfg = machine(downtime={"min_duration": "0s"})
    det = MachineDetector("m1", cfg, "plant-a")
    first = feed(det, s("st", 1, 0), s("st", 3, 10))
    saved = det.snapshot()
    later = MachineDetector("m1", cfg, "plant-a")
    later.restore(saved)
    ended = feed(later, s("st", 3, 20), s("st", 1, 30))
    assert types(first) == ["downtime.started"] and types(ended) == ["downtime.ended"]
    assert ended[0].data["episode_id"] == first[0].data["episode_id"]
    assert ended[0].sequence == first[0].sequence + 1
    # Re-detecting from the same saved state yields the same event id (no duplicates).
    again = MachineDetector("m1", cfg, "plant-a")
    again.restore(saved)
    assert [e.id for e in feed(again, s("st", 1, 30))] == [ended[0].id]


def test_running_above_threshold() -> None:
    cfg = machine(state={"tag": "st", "running_above": 10})
    det = MachineDetector("m1", cfg, "plant-a")
    ev = feed(det, s("st", 50.0, 0), s("st", 2.5, 1), s("st", 12.0, 30))
    assert types(ev) == ["downtime.started", "downtime.ended"]


def test_stall_on_production_counter_is_down_no_output() -> None:
    cfg = machine(state={"tag": "st", "map": {1: "running", 3: "down"},
                         "production_counter": "cnt", "stalled_after": "10s"},
                  scrap=None, downtime={"min_duration": "0s"})
    det = MachineDetector("m1", cfg, "plant-a")
    ev = feed(det, s("st", 1, 0), s("cnt", 5, 0), s("cnt", 6, 4), s("st", 1, 9))
    assert ev == []
    ev = det.on_tick(T0 + timedelta(seconds=15))
    assert types(ev) == ["downtime.started"]
    assert ev[0].data["reason_code"] == "no-output"
    assert ev[0].time == T0 + timedelta(seconds=4)  # output stopped at the last increase
    ev = feed(det, s("cnt", 7, 20))
    assert types(ev) == ["downtime.ended"] and ev[0].data["duration_seconds"] == 16.0


def test_running_below() -> None:
    cfg = machine(state={"tag": "st", "running_below": 5})
    det = MachineDetector("m1", cfg, "plant-a")
    ev = feed(det, s("st", 1, 0), s("st", 9, 1), s("st", 2, 20))
    assert types(ev) == ["downtime.started", "downtime.ended"]


def test_total_minus_good_scrap() -> None:
    cfg = machine(scrap={"total_counter": "tot", "good_counter": "good", "window": "60s"})
    det = MachineDetector("m1", cfg, "plant-a")
    ev = feed(det, s("tot", 100, 0), s("good", 90, 0), s("tot", 110, 5), s("good", 97, 5),
              s("tot", 120, 9), s("good", 107, 9))
    ev += det.on_tick(T0 + timedelta(seconds=61))
    assert len(ev) == 1
    assert ev[0].data["quantity"] == 3  # (120-100) - (107-90)
    assert ev[0].data["total_increase"] == 20 and ev[0].data["good_increase"] == 17


def test_max_step_jump_is_reported_not_scrap() -> None:
    cfg = machine(scrap={"counter": "cnt", "window": "60s", "max_step": 100})
    det = MachineDetector("m1", cfg, "plant-a")
    ev = feed(det, s("cnt", 10, 0), s("cnt", 5000, 1), s("cnt", 5003, 2))
    ev += det.on_tick(T0 + timedelta(seconds=61))
    assert sum(e.data["quantity"] for e in ev) == 3
    assert det.status()["counter_anomalies"] == 1


def test_max_duration_splits_long_episodes() -> None:
    cfg = machine(downtime={"min_duration": "0s", "max_duration": "60s"})
    det = MachineDetector("m1", cfg, "plant-a")
    ev = feed(det, s("st", 1, 0), s("st", 3, 10))
    ev += det.on_tick(T0 + timedelta(seconds=135))
    ev += feed(det, s("st", 1, 140))
    assert types(ev) == ["downtime.started", "downtime.ended"] * 3
    assert [e.data.get("duration_seconds") for e in ev if e.type.value.endswith("ended")] == \
        [60.0, 60.0, 10.0]
    assert ev[2].data["continued_from"] == ev[0].data["episode_id"]


def test_clock_jump_flags_open_episode() -> None:
    det = MachineDetector("m1", machine(downtime={"min_duration": "0s"}), "plant-a")
    feed(det, s("st", 1, 0), s("st", 3, 1))
    det.note_clock_jump(-3600)
    ev = feed(det, s("st", 1, 5))
    assert ev[0].data["clock_adjusted"] is True and det.status()["clock_jumps"] == 1


def test_source_clock_going_backwards_never_gives_negative_durations() -> None:
    det = MachineDetector("m1", machine(downtime={"min_duration": "0s"}), "plant-a")
    ev = feed(det, s("st", 1, 0), s("st", 3, 10), s("st", 1, 4))
    assert types(ev) == ["downtime.started", "downtime.ended"]
    assert ev[1].data["duration_seconds"] == 0.0
