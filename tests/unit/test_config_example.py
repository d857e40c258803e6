"""The example configuration shows every option; starters and both schema drafts agree with
the loader."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from ruamel.yaml import YAML

from agent.config_cli import SOURCES, example_text
from agent.wiring.jsonschema import SCHEMA_DIALECT, json_schema
from agent.wiring.load import load_config

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "config" / "example.yaml"
MODELINE = "# yaml-language-server: $schema=edge-agent.schema.json\n"


def option_names(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        if isinstance(node.get("properties"), dict):
            out.update(node["properties"])
        for child in node.values():
            option_names(child, out)
    elif isinstance(node, list):
        for child in node:
            option_names(child, out)
    return out


def yaml_keys(node: Any, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, child in node.items():
            out.add(str(key))
            yaml_keys(child, out)
    elif isinstance(node, list):
        for child in node:
            yaml_keys(child, out)
    return out


def commented_keys(text: str) -> set[str]:
    """Keys of commented-out alternatives: '#   name: value' and '{name: ...}' on such lines."""
    keys: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^\s*#\s*([a-z_][a-z0-9_]*):(\s|$)", line)
        if m:
            keys.add(m.group(1))
            keys.update(re.findall(r"[{,]\s*([a-z_][a-z0-9_]*):", line))
    return keys


def test_example_shows_every_option_of_the_schema() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    names = option_names(json_schema(), set())
    assert len(names) > 100
    shown = yaml_keys(YAML(typ="safe").load(text), set()) | commented_keys(text)
    assert sorted(names - shown) == []


@pytest.mark.parametrize("draft", ["2020-12", "7"])
@pytest.mark.parametrize("source", [None, *SOURCES])
def test_examples_pass_the_schema_in_both_drafts(draft: str, source: str | None) -> None:
    schema = json_schema(draft)
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    doc = YAML(typ="safe").load(example_text(source))
    errors = [e.message for e in validator(schema).iter_errors(doc)]
    assert errors == []
    # ... and the schema is strict: a typo is an error in either draft.
    doc["agent"]["stop_timeuot"] = "1s"
    assert any("stop_timeuot" in e.message for e in validator(schema).iter_errors(doc))


def test_draft_7_uses_definitions_only() -> None:
    schema = json_schema("7")
    text = json.dumps(schema)
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "$defs" not in text and "definitions" in schema
    assert json_schema()["$schema"] == SCHEMA_DIALECT  # the default stays 2020-12


@pytest.mark.parametrize("source", [None, *SOURCES])
def test_starters_load_and_carry_the_modeline(source: str | None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", "t")
    monkeypatch.setenv("MQTT_PASSWORD", "p")
    text = example_text(source)
    assert text.startswith(MODELINE)
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    if source is not None:
        assert {s.type for s in config.sources.values()} == {source}


def test_cli_config_example_and_schema() -> None:
    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", "import sys; from agent.cli import main; "
                               "sys.exit(main())", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60, check=True)
        return done.stdout

    assert cli("config", "example", "--source", "mqtt") == example_text("mqtt")
    assert cli("config", "example") == EXAMPLE.read_text(encoding="utf-8")
    assert json.loads(cli("config", "schema")) == json_schema()
    assert json.loads(cli("config", "schema", "--draft", "7")) == json_schema("7")
