"""Live reload is a plan computed from two configurations alone: tested without an agent."""

from __future__ import annotations

from pathlib import Path

from agent.runtime.reload import plan_reload
from agent.wiring.load import load_config_text
from agent.wiring.schema import Config


def cfg(tmp_path: Path, *, port: int = 5020, reasons: str = "{}", plc2: bool = False,
        timeout: str = "2s", buffer: str = "64MiB", sinks: str = "central, archive",
        press_map: str = "{1: running, 3: down}") -> Config:
    second = """
  plc2:
    type: modbus
    host: 127.0.0.1
    port: 5021
    tags:
      m2.state: {table: holding, address: 0, type: uint16}""" if plc2 else ""
    machine2 = """
  m2:
    line: l1
    state: {tag: m2.state, map: {1: running}}""" if plc2 else ""
    sink_blocks = "".join(f"""
  {name}:
    type: http
    url: http://127.0.0.1:9/{name}
    timeout: {timeout if name == "archive" else "2s"}""" for name in sinks.split(", "))
    return load_config_text(f"""
agent: {{id: e, site: s, data_dir: "{tmp_path}"}}
buffer: {{max_size: {buffer}}}
sources:
  plc:
    type: modbus
    host: 127.0.0.1
    port: {port}
    tags:
      m.state: {{table: holding, address: 0, type: uint16}}
      p.state: {{table: holding, address: 1, type: uint16}}{second}
machines:
  m1:
    line: l1
    state: {{tag: m.state, map: {{1: running, 3: down}}}}
    downtime: {{reasons: {reasons}}}
  press:
    line: l1
    state: {{tag: p.state, map: {press_map}}}{machine2}
sinks:{sink_blocks}
""", "<t>")


def test_nothing_changed_plans_nothing(tmp_path: Path) -> None:
    plan = plan_reload(cfg(tmp_path), cfg(tmp_path))
    assert plan.changes == [] and plan.kept == ()


def test_a_rule_change_rebuilds_only_that_machine(tmp_path: Path) -> None:
    plan = plan_reload(cfg(tmp_path), cfg(tmp_path, reasons="{7: Jam}"))
    assert plan.machines == ("m1",) and plan.sources == () and plan.sinks == ()


def test_a_source_change_restarts_it_and_rebuilds_every_machine_it_feeds(tmp_path: Path) -> None:
    plan = plan_reload(cfg(tmp_path), cfg(tmp_path, port=5030))
    assert plan.sources == ("plc",)
    assert set(plan.machines) == {"m1", "press"}


def test_new_source_and_machine_removed_machine(tmp_path: Path) -> None:
    grow = plan_reload(cfg(tmp_path), cfg(tmp_path, plc2=True))
    assert grow.sources == ("plc2",) and grow.machines == ("m2",)
    shrink = plan_reload(cfg(tmp_path, plc2=True), cfg(tmp_path))
    assert shrink.sources == ("plc2",) and shrink.removed_machines == ("m2",)
    assert "machine m2 removed" in shrink.changes


def test_a_changed_sink_is_replaced_but_a_new_sink_set_waits_for_a_restart(
        tmp_path: Path) -> None:
    plan = plan_reload(cfg(tmp_path), cfg(tmp_path, timeout="5s"))
    assert plan.sinks == ("archive",)
    grown = plan_reload(cfg(tmp_path, sinks="central"), cfg(tmp_path))
    assert "the set of sink ids" in grown.kept
    assert set(grown.effective.sinks) == {"central"} and grown.sinks == ()


def test_buffer_changes_are_kept_for_a_restart(tmp_path: Path) -> None:
    old = cfg(tmp_path)
    plan = plan_reload(old, cfg(tmp_path, buffer="128MiB", reasons="{7: Jam}"))
    assert plan.kept == ("buffer",)
    assert plan.effective.buffer == old.buffer
    assert plan.machines == ("m1",)
