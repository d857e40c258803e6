"""The package layers hold, and the linter that enforces them really fails on a wrong import.

``lint-imports`` (import-linter, configured in pyproject.toml) runs in ``make lint``; here it
runs on the tree as it is, and on copies of the tree with one wrong-direction import planted:
inside a function and under ``TYPE_CHECKING``, the two places a naive checker misses.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "protocols", "buffer", "config")
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def _copy(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_its_layers() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "planted", "expected"), [
    # the contract reaching up into the runtime, hidden inside a function
    ("config/model.py", "\n\ndef _sneaky() -> object:\n    from agent.runtime import Runtime\n"
     "\n    return Runtime\n", "config is not allowed to import agent.runtime"),
    # a sibling importing a sibling, only for type checking
    ("buffer/base.py", "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
     "    from agent.sinks.base import Sink  # noqa: F401\n",
     "buffer is not allowed to import agent.sinks"),
    # detection asking a protocol
    ("agent/detect/state.py", "\n\ndef _bits() -> object:\n    import protocols.modbus.config"
     "\n\n    return protocols.modbus.config\n",
     "agent.detect is not allowed to import protocols"),
    # one protocol importing another
    ("protocols/opcua/nodeids.py", "\n\ndef _tick() -> object:\n"
     "    from protocols.modbus.plan import plan\n\n    return plan\n",
     "protocols.opcua is not allowed to import protocols.modbus"),
])
def test_a_wrong_direction_import_fails_the_lint(tmp_path: Path, module: str, planted: str,
                                                 expected: str) -> None:
    tree = _copy(tmp_path)
    with (tree / module).open("a") as f:
        f.write(planted)
    result = _lint(tree)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout


def test_every_module_of_the_agent_package_has_a_layer() -> None:
    """A module left out of the contract would be free to import anything: name each one."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in contracts["contracts"] if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    agent = ROOT / "agent"
    modules = {f"agent.{p.stem}" for p in agent.glob("*.py") if p.stem != "__init__"}
    modules |= {f"agent.{p.name}" for p in agent.iterdir() if (p / "__init__.py").exists()}
    assert modules - named == set()
    assert {"config", "buffer", "protocols"} <= named
