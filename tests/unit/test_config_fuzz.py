"""Whatever the file holds, the loader answers with a Config or a located ConfigError."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from agent.wiring.load import load_config_text
from agent.wiring.schema import Config
from config._yamlmarks import parse_yaml
from config.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "example.yaml"
EXAMPLE_DATA, _, _ = parse_yaml(EXAMPLE.read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=False), st.text(max_size=12),
                    st.sampled_from(["5s", "2GiB", "modbus", "http", "${env:NOPE}", "on",
                                     "float32", "press.speed", "running"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)


def leaf_paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            out += leaf_paths(child, (*path, key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            out += leaf_paths(child, (*path, i))
    return out


PATHS = [p for p in leaf_paths(EXAMPLE_DATA) if p]


def mutate(data: Any, path: tuple[Any, ...], value: Any, rename: bool) -> Any:
    data = _copy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if rename and isinstance(parent, dict):
        parent[f"{last}x"] = parent.pop(last)
    else:
        parent[last] = value
    return data


def _copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


def dump(data: Any) -> str:
    out = io.StringIO()
    YAML(typ="safe", pure=True).dump(data, out)
    return out.getvalue()


def check(text: str) -> None:
    lines = max(1, len(text.splitlines()))
    try:
        result = load_config_text(text, "fuzz.yaml")
    except ConfigError as err:
        assert err.issues
        for issue in err.issues:
            assert issue.file == "fuzz.yaml"
            assert issue.message
            assert issue.line is not None and 1 <= issue.line <= lines + 1, (issue, text)
            assert issue.column is not None and issue.column >= 1
    else:
        assert isinstance(result, Config)


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_TOKEN", "fuzz-token")
    monkeypatch.delenv("NOPE", raising=False)


# ruamel's round-trip parser takes ~25 ms for the example: keep the example count modest.
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PATHS), values, st.booleans())
def test_mutated_example_loads_or_explains(path: tuple[Any, ...], value: Any,
                                           rename: bool) -> None:
    check(dump(mutate(EXAMPLE_DATA, path, value, rename)))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from(list("ab:- \n\t{}[],&*!|>'\"#%@`?$0")), max_size=60))
def test_arbitrary_text_loads_or_explains(text: str) -> None:
    check(text)


def test_unmutated_dump_is_valid() -> None:
    check(dump(EXAMPLE_DATA))
    assert isinstance(load_config_text(dump(EXAMPLE_DATA), "fuzz.yaml"), Config)
