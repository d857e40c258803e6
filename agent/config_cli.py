"""``edge-agent config schema|example``: help for writing a configuration file.

- ``config schema [--draft 2020-12|7]``: the JSON Schema for editors
  (``agent/wiring/jsonschema.py``); the default output is draft 2020-12 as before; ``--draft 7``
  suits VS Code's YAML extension.
- ``config example``: the reference file that shows every option with its explanation
  (``config/example.yaml``); ``--source modbus|opcua|mqtt``: a short commented starting file
  for one kind of source (``config/starters/``).

Both start with the ``# yaml-language-server: $schema=edge-agent.schema.json`` modeline, so a
file saved next to the schema gets completion and checks in the editor.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.resources import files
from typing import Any

__all__ = ["add_parser", "example_text", "run"]

SOURCES = ("modbus", "opcua", "mqtt")


def add_parser(sub: Any) -> None:
    from agent.cli_conventions import command

    cfg = command(sub, "config", "configuration helpers: JSON Schema, example files",
                  "Helpers for writing a configuration file.",
                  ["edge-agent config example --source modbus > config.yaml",
                   "edge-agent config schema --draft 7 > edge-agent.schema.json"])
    actions = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    schema = command(
        actions, "schema", "print the JSON Schema of the configuration (for editors)",
        "Print the JSON Schema of the configuration file: completion, descriptions and typo "
        "warnings in editors. Save it next to your file; the "
        "'# yaml-language-server: $schema=edge-agent.schema.json' first line points the "
        "editor at it.", ["edge-agent config schema --draft 7 > edge-agent.schema.json"])
    schema.add_argument("--draft", default="2020-12", choices=["2020-12", "7"],
                        help="JSON Schema draft (default %(default)s; 7 for VS Code's YAML "
                        "extension)")
    example = command(
        actions, "example", "print a commented configuration to start from",
        "Print a commented configuration: without --source the reference file with every "
        "option; with --source a short starting file for that kind of device.",
        ["edge-agent config example --source opcua > config.yaml"])
    example.add_argument("--source", choices=SOURCES, default=None,
                         help="a starting file for this source type (default: every option)")


def example_text(source: str | None) -> str:
    base = files("config")
    item = base / "example.yaml" if source is None else base / "starters" / f"{source}.yaml"
    return item.read_text(encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "config_command", None)
    if action == "schema":
        from agent.wiring.jsonschema import json_schema

        print(json.dumps(json_schema(args.draft), indent=2))
        return 0
    if action == "example":
        sys.stdout.write(example_text(args.source))
        return 0
    print("usage: edge-agent config {schema,example} [options]", file=sys.stderr)
    return 2
