"""The configuration snippets of docs/brownfield.md load (with a minimal agent and sink)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.wiring.load import load_config_text

DOC = Path(__file__).resolve().parents[2] / "docs" / "brownfield.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
WRAP = """agent: {id: edge-doc, site: s, data_dir: /nonexistent/edge-doc}
sinks:
  central: {type: http, url: "https://erp.example/api"}
"""


def test_the_guide_has_its_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[2].strip()[:30])
def test_snippet_loads(block: str) -> None:
    cfg = load_config_text(WRAP + block, "docs/brownfield.md")
    assert cfg.sources
