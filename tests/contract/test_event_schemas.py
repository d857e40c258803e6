"""The versioned event contract: one JSON Schema per event type (``config/event_schemas``),
named by every event's ``dataschema``; every event the detectors emit follows it; and today's
schemas stay compatible with the first release's (``data/event_schemas_1.0``, frozen: never
regenerate it).

Compatibility within a major version: every field of the old schema is still there with the
same definition, the required fields are the same, and a new field is optional; the minor
version grows when anything is added. Anything else is a new major version: a new
``v<N>.json`` beside the old file, which stays as it was.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from support import ROOT
from support.events import SCHEMA_DIR, check_event, event_schema

from config.model import DATA_SCHEMA, EventType, data_schema_uri

FROZEN = Path(__file__).parent / "data" / "event_schemas_1.0"
_DOC_KEYS = {"description", "title", "$schema"}  # wording; not part of the contract


def _version(schema_id: str) -> tuple[int, int]:
    major, minor = schema_id.rsplit(":", 1)[1].split(".")
    return int(major), int(minor)


def incompatibilities(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why ``new`` cannot be a minor version of ``old`` (empty when it can)."""
    problems: list[str] = []
    (old_major, old_minor), (new_major, new_minor) = _version(old["$id"]), _version(new["$id"])
    if new_major != old_major:
        problems.append(f"{new['$id']}: a major version {new_major} in the file of major "
                        f"version {old_major} (a new major version is a new file)")
    added: list[str] = []
    _compare(old, new, "", problems, added)
    if added and new_minor <= old_minor:
        problems.append(f"{new['$id']}: adds {', '.join(added)} without a new minor version")
    if not added and not problems and new_minor != old_minor:
        problems.append(f"{new['$id']}: a new minor version with nothing added")
    return problems


def _compare(old: dict[str, Any], new: dict[str, Any], where: str, problems: list[str],
             added: list[str]) -> None:
    keys = (set(old) | set(new)) - _DOC_KEYS - {"$id", "properties", "required"}
    for k in sorted(keys):
        if _plain(old.get(k)) != _plain(new.get(k)):
            problems.append(f"{where or '(data)'}: {k} changed from {old.get(k)!r} to "
                            f"{new.get(k)!r}")
    if set(old.get("required", [])) != set(new.get("required", [])):
        problems.append(f"{where or '(data)'}: required changed from "
                        f"{sorted(old.get('required', []))} to {sorted(new.get('required', []))}")
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name, sub in old_props.items():
        if name not in new_props:
            problems.append(f"{where}/{name}: removed")
        else:
            _compare(sub, new_props[name], f"{where}/{name}", problems, added)
    added.extend(f"{where}/{n}" for n in new_props if n not in old_props)


def _plain(node: Any) -> Any:
    """``node`` without its documentation keys, for comparing definitions."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items() if k not in _DOC_KEYS}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _frozen(type_: str) -> dict[str, Any]:
    doc = json.loads((FROZEN / type_ / "v1.json").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


# --------------------------------------------------------------------------- the schemas


@pytest.mark.parametrize("type_", list(EventType), ids=str)
def test_each_type_has_a_valid_schema_whose_id_is_its_dataschema(type_: EventType) -> None:
    major = int(DATA_SCHEMA[type_].rsplit(":", 1)[1].split(".")[0])
    schema = event_schema(type_.value, major)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == DATA_SCHEMA[type_]
    assert schema["title"] == type_.value


def test_no_schema_without_an_event_type() -> None:
    on_disk = {p.name for p in SCHEMA_DIR.iterdir() if p.is_dir()}
    assert on_disk == {t.value for t in EventType}


@pytest.mark.parametrize("type_", sorted(p.name for p in FROZEN.iterdir()))
def test_todays_schema_is_compatible_with_the_first_release(type_: str) -> None:
    assert type_ in {t.value for t in EventType}, f"event type {type_} was removed"
    old = _frozen(type_)
    # The first release's major version keeps its file, compatible, whatever majors follow.
    assert incompatibilities(old, event_schema(type_, 1)) == []


def test_the_compatibility_rule_catches_breaking_changes() -> None:
    old = _frozen("plantedge.downtime.ended")

    def changed(edit: Any, version: str = "1.1") -> list[str]:
        new = copy.deepcopy(old)
        edit(new)
        new["$id"] = data_schema_uri("plantedge.downtime.ended", version)
        return incompatibilities(old, new)

    def add_optional(s: dict[str, Any]) -> None:
        s["properties"]["shift"] = {"type": "string"}

    def add_required(s: dict[str, Any]) -> None:
        add_optional(s)
        s["required"].append("shift")

    def retype(s: dict[str, Any]) -> None:
        s["properties"]["microstops"]["type"] = "number"

    def remove(s: dict[str, Any]) -> None:
        del s["properties"]["split"]

    def widen_enum(s: dict[str, Any]) -> None:
        s["properties"]["category"]["enum"].append("maintenance")

    assert changed(add_optional) == []
    assert changed(add_optional, "1.0")  # added without a new minor
    assert changed(add_optional, "2.0")  # a major version in the v1 file
    assert any("required" in p for p in changed(add_required))
    assert any("microstops" in p for p in changed(retype))
    assert any("split: removed" in p for p in changed(remove))
    assert any("category" in p for p in changed(widen_enum))
    assert changed(lambda s: s.update(description="reworded"), "1.0") == []


# --------------------------------------------------------------------------- the events


def test_the_checker_rejects_what_the_contract_does_not_allow() -> None:
    from cases.test_cases import CASES, run_case

    event = next(e for c in CASES for e in run_case(c) if e["type"] == "plantedge.scrap.recorded")
    assert check_event(event) == []
    undeclared = {**event, "data": {**event["data"], "colour": "red"}}
    missing = {**event, "data": {k: v for k, v in event["data"].items() if k != "quantity"}}
    wrong = {**event, "data": {**event["data"], "quantity": "ten"}}
    stale = {**event, "dataschema": data_schema_uri(event["type"], "1.7")}
    for bad, what in ((undeclared, "colour"), (missing, "quantity"), (wrong, "quantity"),
                      (stale, "schema file")):
        problems = check_event(bad)
        assert problems and what in " ".join(problems), (what, problems)


def test_every_event_of_every_detector_case_follows_its_schema() -> None:
    from cases.test_cases import CASES, run_case

    seen: set[str] = set()
    problems: list[str] = []
    for case in CASES:
        for event in run_case(case):
            seen.add(event["type"])
            problems += [f"{case.name}: {p}" for p in check_event(event)]
    assert problems == []
    # Data gaps come from the runtime, not the detectors (checked in test_capacity.py).
    assert seen == {t.value for t in EventType} - {EventType.DATA_GAP.value}


@pytest.mark.slow
def test_every_event_of_a_demo_run_follows_its_schema(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--duration", "12",
                           "--keep", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with sqlite3.connect(tmp_path / "receiver.db") as conn:
        events = [json.loads(r[0]) for r in conn.execute("SELECT payload FROM received")]
    assert len({e["type"] for e in events}) >= 3, [e["type"] for e in events]
    assert [p for e in events for p in check_event(e)] == []
