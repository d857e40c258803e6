"""A source id YAML reads as a number (issue 11, #12): before, source ``123`` reported "tag
defined by both source '123' and source '123'" for its own tags."""

from __future__ import annotations

import pytest

from agent.wiring.load import load_config_text
from config.errors import ConfigError

BASE = """
agent: {id: a, site: s, data_dir: /tmp/edge-numeric-ids}
sources:
  123: {type: modbus, host: 127.0.0.1, tags: {st: {table: holding, address: 0, type: uint16}}}
SECOND
machines:
  m1: {line: l1, state: {tag: st, map: {1: running}}}
sinks:
  central: {type: http, url: "http://127.0.0.1:9/events"}
"""


def test_a_numeric_source_id_is_not_its_own_duplicate() -> None:
    with pytest.raises(ConfigError) as caught:  # the id must be quoted: that, and only that
        load_config_text(BASE.replace("SECOND", ""), "ids.yaml")
    messages = [i.message for i in caught.value.issues]
    assert not any("defined by both" in m for m in messages), messages
    quoted = BASE.replace("SECOND", "").replace("  123:", '  "123":')
    assert list(load_config_text(quoted, "ids.yaml").sources) == ["123"]


def test_a_real_duplicate_across_numeric_ids_names_both() -> None:
    second = "  456: {type: modbus, host: 127.0.0.2, tags: {st: {table: holding, address: 1, " \
             "type: uint16}}}"
    with pytest.raises(ConfigError) as caught:
        load_config_text(BASE.replace("SECOND", second), "ids.yaml")
    messages = [i.message for i in caught.value.issues]
    assert any("source '123' and source '456'" in m for m in messages), messages
