"""JSON Schema of the configuration, for editors (completion, descriptions, typo warnings).

Generated from the pydantic models, so it cannot drift from what the loader accepts. Two
things the loader checks go beyond it: references between sections (a machine's tags must be
defined by a source) and ``${env:...}``/``${file:...}`` resolution.
"""

from __future__ import annotations

from typing import Any

from agent.wiring.schema import Config
from config.units import DURATION_PATTERN, format_duration

__all__ = ["DRAFTS", "SCHEMA_DIALECT", "json_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DRAFT_07 = "http://json-schema.org/draft-07/schema#"
DRAFTS = {"2020-12": SCHEMA_DIALECT, "7": DRAFT_07}


def json_schema(draft: str = "2020-12") -> dict[str, Any]:
    """The JSON Schema of a configuration file, as a new dict each call.

    ``draft="7"`` gives the same constraints in draft-07 terms for editors that work best with
    it (VS Code's YAML extension): ``definitions`` instead of ``$defs``, and a ``$ref`` with
    sibling keywords (ignored next to ``$ref`` before 2019-09) wrapped in ``allOf``."""
    if draft not in DRAFTS:
        raise ValueError(f"unknown JSON Schema draft {draft!r} (known: {', '.join(DRAFTS)})")
    body = Config.model_json_schema(mode="validation")
    _ids_as_property_names(body)
    _durations_as_text(body)
    body.pop("title", None)
    if draft == "7":
        body = _as_draft_07(body)
    return {
        "$schema": DRAFTS[draft],
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


def _as_draft_07(node: Any) -> Any:
    if isinstance(node, dict):
        out = {("definitions" if k == "$defs" else k): _as_draft_07(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            out["$ref"] = ref.replace("#/$defs/", "#/definitions/")
            if len(out) > 1:
                siblings = {k: v for k, v in out.items() if k != "$ref"}
                return {**siblings, "allOf": [{"$ref": out["$ref"]}]}
        return out
    if isinstance(node, list):
        return [_as_draft_07(v) for v in node]
    if isinstance(node, str) and node.startswith("#/$defs/"):  # discriminator mappings
        return node.replace("#/$defs/", "#/definitions/", 1)
    return node
