"""JSON Schema of the configuration, for editors (completion, descriptions, typo warnings).

Generated from the pydantic models, so it cannot drift from what the loader accepts. Two
things the loader checks go beyond it: references between sections (a machine's tags must be
defined by a source) and ``${env:...}``/``${file:...}`` resolution.
"""

from __future__ import annotations

from typing import Any

from agent.wiring.schema import Config
from config.units import DURATION_PATTERN, format_duration

__all__ = ["SCHEMA_DIALECT", "json_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a configuration file, as a new dict each call."""
    body = Config.model_json_schema(mode="validation")
    _ids_as_property_names(body)
    _durations_as_text(body)
    body.pop("title", None)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "plant-edge-agent configuration",
        "description": "Configuration of the plant edge agent (config.yaml). Unknown keys are "
                       "errors; durations are text like '500ms', '5s', '2m'; sizes like "
                       "'2GiB'; secrets are ${env:NAME} or ${file:/path}.",
        **body,
    }


def _ids_as_property_names(node: Any) -> None:
    """pydantic renders a map with a constrained key type as ``patternProperties``, which lets
    any key that does not match through unchecked. Say the same thing strictly instead: every
    key must match, and every value has the value schema."""
    if isinstance(node, dict):
        patterns = node.get("patternProperties")
        if isinstance(patterns, dict) and len(patterns) == 1 and "properties" not in node:
            (pattern, value_schema), = patterns.items()
            del node["patternProperties"]
            node["propertyNames"] = {"pattern": pattern}
            node["additionalProperties"] = value_schema
        for child in node.values():
            _ids_as_property_names(child)
    elif isinstance(node, list):
        for child in node:
            _ids_as_property_names(child)


def _durations_as_text(node: Any) -> None:
    """Duration defaults are floats (seconds) in the models; the schema says durations are
    text like '10s', so show the defaults that way too (editors check defaults against it)."""
    if isinstance(node, dict):
        default = node.get("default")
        if node.get("pattern") == DURATION_PATTERN and isinstance(default, int | float):
            node["default"] = format_duration(float(default))
        for child in node.values():
            _durations_as_text(child)
    elif isinstance(node, list):
        for child in node:
            _durations_as_text(child)
