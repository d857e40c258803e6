"""The JSON Schema for editors: documented everywhere, strict everywhere."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from agent.wiring.jsonschema import SCHEMA_DIALECT, json_schema
from config.units import DURATION_PATTERN


def objects(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON object (dict) in the schema with its JSON-pointer-ish location."""
    if isinstance(node, dict):
        yield where, node
        for key, child in node.items():
            yield from objects(child, f"{where}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from objects(child, f"{where}/{i}")


def test_schema_header() -> None:
    schema = json_schema()
    assert schema["$schema"] == SCHEMA_DIALECT
    assert schema["title"] and schema["description"]
    assert schema["required"] == ["agent"]
    json.dumps(schema)  # plain JSON, nothing pydantic-specific left in it


def test_every_property_has_a_description() -> None:
    missing = [f"{where}/properties/{name}"
               for where, node in objects(json_schema())
               if isinstance(node.get("properties"), dict) and node.get("type") == "object"
               for name, prop in node["properties"].items()
               if not (isinstance(prop, dict) and prop.get("description", "").strip())]
    assert missing == []


def test_every_model_forbids_additional_properties() -> None:
    models = [(where, node) for where, node in objects(json_schema())
              if node.get("type") == "object" and "properties" in node]
    assert len(models) >= 10  # agent, health, buffer, modbus source and tag, machine, sink...
    assert [where for where, node in models if node.get("additionalProperties") is not False] \
        == []


def test_id_maps_constrain_every_key() -> None:
    props = json_schema()["properties"]
    for section in ("sources", "machines", "sinks"):
        assert props[section]["propertyNames"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.\\-]*$"
        assert props[section]["additionalProperties"]  # the value schema
        assert "patternProperties" not in props[section]


def test_sources_and_sinks_are_discriminated_by_type() -> None:
    props = json_schema()["properties"]
    assert props["sources"]["additionalProperties"]["discriminator"]["propertyName"] == "type"
    assert props["sinks"]["additionalProperties"]["discriminator"]["propertyName"] == "type"


def test_duration_defaults_are_written_as_durations() -> None:
    durations = [node for _, node in objects(json_schema())
                 if node.get("pattern") == DURATION_PATTERN and "default" in node]
    assert durations, "expected duration options with defaults"
    for node in durations:
        assert isinstance(node["default"], str)
        assert re.match(DURATION_PATTERN, node["default"]), node


def test_enum_defaults_are_allowed_values() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    for _, node in objects(schema):
        ref = node.get("$ref")
        if ref and "default" in node:
            target = defs[ref.rsplit("/", 1)[1]]
            if "enum" in target:
                assert node["default"] in target["enum"], node


def test_each_call_returns_a_fresh_copy() -> None:
    first = json_schema()
    first["properties"].clear()
    assert json_schema()["properties"]
