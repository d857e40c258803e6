"""The event contract for tests: load an event type's JSON Schema and check a CloudEvent
against it strictly.

Validation uses ``jsonschema`` (PyPI, a test dependency): it implements draft 2020-12 fully,
which a hand-written checker would only approximate, and the schemas are the published
contract that receivers validate with the same kind of tool.

Strict: the published schemas are open (a receiver built for 1.0 must accept a 1.1 event
with a new optional field), so a check against them alone would let the agent emit a field
the contract never declares. ``check_event`` closes every object that lists its properties
(``additionalProperties: false``) before validating, so an undeclared field fails here.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

import jsonschema

__all__ = ["SCHEMA_DIR", "check_event", "event_schema", "strict"]

SCHEMA_DIR = resources.files("config") / "event_schemas"

_ENVELOPE = {"specversion", "id", "source", "type", "time", "datacontenttype", "dataschema",
             "agentid", "sequence", "data"}
_OPTIONAL = {"detectedat"}  # set when committed to the buffer; replay has none


@functools.cache
def event_schema(type_: str, major: int) -> dict[str, Any]:
    doc = json.loads((SCHEMA_DIR / type_ / f"v{major}.json").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def strict(schema: Any) -> Any:
    """A copy of ``schema`` in which every object with ``properties`` admits no other key."""
    out = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    close(out)
    return out


@functools.cache
def _validator(type_: str, major: int) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(strict(event_schema(type_, major)))


def check_event(doc: dict[str, Any]) -> list[str]:
    """What is wrong with one CloudEvent: envelope keys, its dataschema, its data."""
    where = f"event {doc.get('id')} ({doc.get('type')})"
    problems = [f"{where}: unknown attribute {k!r}"
                for k in sorted(set(doc) - _ENVELOPE - _OPTIONAL)]
    problems += [f"{where}: missing attribute {k!r}" for k in sorted(_ENVELOPE - set(doc))]
    uri = str(doc.get("dataschema", ""))
    prefix = f"urn:plant-edge-agent:event:{doc.get('type')}:"
    if not uri.startswith(prefix):
        return [*problems, f"{where}: dataschema {uri!r} does not name its type"]
    major = int(uri[len(prefix):].split(".")[0])
    schema = event_schema(str(doc["type"]), major)
    if schema["$id"] != uri:
        problems.append(f"{where}: dataschema {uri} but the schema file is {schema['$id']}")
    for err in _validator(str(doc["type"]), major).iter_errors(doc.get("data")):
        path = "/".join(str(p) for p in err.absolute_path) or "(data)"
        problems.append(f"{where}: data/{path}: {err.message}")
    return problems
