"""The README's configuration snippet is a valid configuration that agrees with example.yaml."""

from __future__ import annotations

import re

import pytest
from support import ROOT

from agent.wiring.load import load_config, load_config_text

README = (ROOT / "README.md").read_text()


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README, flags=re.S)


def test_readme_config_walkthrough_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", "t")
    full = [b for b in yaml_blocks() if b.startswith("agent:")]
    assert full, "README lost its configuration walk-through"
    for block in full:
        cfg = load_config_text(block, "README.md")
        assert cfg.machines and cfg.sources and cfg.sinks


def test_readme_snippet_options_exist_in_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every top-level section and source type the README shows is in the reference file."""
    monkeypatch.setenv("ERP_TOKEN", "t")
    example = load_config(ROOT / "config" / "example.yaml")
    for block in yaml_blocks():
        if not block.startswith("agent:"):
            continue
        cfg = load_config_text(block, "README.md")
        assert {s.type for s in cfg.sources.values()} <= {s.type for s in example.sources.values()}
        assert {s.type for s in cfg.sinks.values()} <= {s.type for s in example.sinks.values()}


def test_readme_names_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci  # CI runs exactly the README's test command
