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
        # The first key may be a tag id (saw.state: {unit_id: 3, ...}); its flow keys count.
        m = re.match(r"^\s*#\s*([a-z_][a-z0-9_.-]*):(\s|$)", line)
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


# ------------------------------------------------- every option where it applies, not just its name

class _Coverage:
    """Walks the example and the JSON Schema together: which (definition, option) pairs the
    example sets, and the line spans of each definition's instances (for commented
    alternatives). A name shared by several definitions (stale_after: machines and three
    source types) must be shown for each of them, not once anywhere."""

    def __init__(self, text: str) -> None:
        self.schema = json_schema()
        self.defs: dict[str, Any] = self.schema.get("$defs", {})
        self.lines = text.splitlines()
        self.seen: set[tuple[str, str]] = set()
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self._walk(self.schema, "<root>", YAML().load(text), 0, len(self.lines), None)

    def _resolve(self, node: Any, name: str) -> tuple[Any, str]:
        while "$ref" in node:
            name = node["$ref"].split("/")[-1]
            node = self.defs[name]
        return node, name

    def _branches(self, node: Any, name: str, data: Any) -> list[Any]:
        out = []
        for key in ("anyOf", "oneOf", "allOf"):
            for branch in node.get(key, []):
                props = self._resolve(branch, name)[0].get("properties")
                if isinstance(data, dict) and props is not None:
                    kind = props.get("type") or {}
                    const = kind.get("const") or (kind.get("enum") or [None])[0]
                    if ("type" in data and const is not None and data["type"] != const) \
                            or not set(data) <= set(props):
                        continue
                out.append(branch)
        return out

    def _walk(self, node: Any, name: str, data: Any, start: int, end: int,
              parent: tuple[int, int] | None) -> None:
        node, name = self._resolve(node, name)
        for branch in self._branches(node, name, data):
            self._walk(branch, name, data, start, end, parent)
        if isinstance(data, list) and isinstance(node.get("items"), dict):
            for item in data:
                self._walk(node["items"], name, item, start, end, parent)
        props, extra = node.get("properties"), node.get("additionalProperties")
        if not isinstance(data, dict) or (props is None and not isinstance(extra, dict)):
            return
        here = parent
        if props is not None:
            # A commented alternative may sit in the instance or in the block around it.
            self.spans.setdefault(name, []).extend([(start, end), *([parent] if parent else [])])
            here = (start, end) if name != "<root>" else None
        keys = list(data)
        for i, key in enumerate(keys):
            first = data.lc.key(key)[0]
            last = data.lc.key(keys[i + 1])[0] if i + 1 < len(keys) else end
            if props is None:
                self._walk(extra, name, data[key], first, last, here)
                continue
            self.seen.add((name, key))
            if key in props:
                self._walk(props[key], name, data[key], first, last, here)

    def missing(self) -> list[str]:
        commented = [(i, key) for i, line in enumerate(self.lines)
                     for key in sorted(commented_keys(line))]
        anywhere = {key for _, key in commented}
        out = []
        for name, node in [*self.defs.items(), ("<root>", self.schema)]:
            for option in node.get("properties") or {}:
                if (name, option) in self.seen:
                    continue
                if name in self.spans:  # shown in (or around) one of its instances
                    shown = any(a <= i < b and key == option for i, key in commented
                                for a, b in self.spans[name])
                else:  # only shown commented out (e.g. oauth2): its name anywhere
                    shown = option in anywhere
                if not shown:
                    out.append(f"{name}.{option}")
        return sorted(out)


def test_example_shows_every_option_where_it_applies() -> None:
    assert _Coverage(EXAMPLE.read_text(encoding="utf-8")).missing() == []


def test_the_per_definition_check_finds_an_option_shown_only_elsewhere() -> None:
    """stale_after of a machine is missing when only the sources show stale_after."""
    text = EXAMPLE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines(keepends=True)
             if not line.startswith("    # stale_after: 30s          # state unknown")]
    assert len(lines) == len(text.splitlines()) - 1
    assert _Coverage("".join(lines)).missing() == ["MachineConfig.stale_after"]
