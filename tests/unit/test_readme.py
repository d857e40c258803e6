"""The README and the guides under docs/ agree with the code.

- Every complete configuration shown (a YAML block that starts with ``agent:``) in README.md or
  docs/ is valid, and uses only source and sink types that config/example.yaml also shows.
- Every option of the configuration schema is named in the guide that documents its section,
  and every allowed value of an option with a fixed set of values appears in the guides.
- README names the two commands a newcomer needs, and CI runs exactly the test command.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from support import ROOT

from agent.wiring.jsonschema import json_schema
from agent.wiring.load import load_config, load_config_text

README = ROOT / "README.md"
DOCS = ROOT / "docs"
GUIDES = [README, *sorted(DOCS.rglob("*.md"))]


def _yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def _full_configs() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), b) for p in GUIDES for b in _yaml_blocks(p)
            if b.startswith("agent:")]


def test_readme_and_configuration_guide_show_a_full_configuration() -> None:
    shown = {name for name, _ in _full_configs()}
    assert "README.md" in shown, "README lost its configuration example"
    assert "docs/configuration.md" in shown, "the configuration guide lost its full example"
    readme_block = next(b for n, b in _full_configs() if n == "README.md")
    assert len(readme_block.splitlines()) <= 30, "README's example is meant to stay short"


@pytest.mark.parametrize(("name", "block"), _full_configs(), ids=lambda v: str(v)[:40])
def test_shown_configurations_validate(name: str, block: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", "t")
    cfg = load_config_text(block, name)
    assert cfg.machines and cfg.sources and cfg.sinks
    example = load_config(ROOT / "config" / "example.yaml")
    assert {s.type for s in cfg.sources.values()} <= {s.type for s in example.sources.values()}
    assert {s.type for s in cfg.sinks.values()} <= {s.type for s in example.sinks.values()}


def _guide_for(definition: str) -> Path:
    """The guide that documents the options of one schema definition."""
    if definition in ("MqttSinkConfig", "NatsSinkConfig"):
        return DOCS / "sinks.md"
    if definition.startswith("Modbus"):
        return DOCS / "protocols" / "modbus.md"
    if definition.startswith("Opcua") or definition == "Deadband":
        return DOCS / "protocols" / "opcua.md"
    if definition.startswith("Mqtt") or definition in ("TopicTag", "SparkplugTag"):
        return DOCS / "protocols" / "mqtt.md"
    return DOCS / "configuration.md"


def _named(option: str, text: str) -> bool:
    """``option`` appears as a word inside inline code (`option`, `retry.max_backoff`, ...)."""
    return re.search(r"`[^`\n]*(?<![\w-])" + re.escape(option) + r"(?![\w-])[^`\n]*`",
                     text) is not None


def test_every_configuration_option_is_documented() -> None:
    schema: dict[str, Any] = json_schema()
    missing = []
    for name in schema["properties"]:
        if not _named(name, (DOCS / "configuration.md").read_text(encoding="utf-8")):
            missing.append(f"docs/configuration.md: top-level section '{name}'")
    for definition, body in schema["$defs"].items():
        guide = _guide_for(definition)
        text = guide.read_text(encoding="utf-8")
        for option in body.get("properties", {}):
            if not _named(option, text):
                missing.append(f"{guide.relative_to(ROOT)}: {definition}.{option}")
    assert not missing, "options not documented:\n  " + "\n  ".join(missing)


def test_every_allowed_value_is_documented() -> None:
    schema: dict[str, Any] = json_schema()
    text = "\n".join(p.read_text(encoding="utf-8") for p in GUIDES)
    missing = [f"{definition}: {value}"
               for definition, body in schema["$defs"].items()
               for value in body.get("enum", ())
               if not _named(str(value), text)]
    assert not missing, "values not documented:\n  " + "\n  ".join(missing)


def test_readme_names_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci  # CI runs exactly the README's test command


def test_readme_stays_short_and_links_every_guide() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    guides = {p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")}
    assert guides <= linked, f"README does not link {sorted(guides - linked)}"
