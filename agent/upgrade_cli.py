"""``edge-agent upgrade check`` and ``edge-agent rollback``: the gates of a rolling upgrade.

``upgrade check --config FILE [--json]`` is read-only. Run by the *new* version before it is
started on a box: is the configuration valid for it, can it take over the buffer file (not
written by a newer agent, not damaged, room for the snapshot), which migration steps it will
run, how many undelivered events the file holds. Exit 0 yes, 1 no, 2 invalid configuration.

``rollback --config FILE [--to-schema N]`` is run by the *new* version, with the agent
stopped, before the previous version is reinstalled: it restores the snapshot taken before the
migration and carries over the events detected since (``buffer/upgrade.py``). Events the new
version delivered meanwhile are sent again with the same ids; receivers deduplicate them.
Exit 0 restored, 2 refused (no snapshot, the agent still runs, nothing to undo).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register ``upgrade`` (action ``check``) and ``rollback`` on the CLI's subparsers."""
    from agent.cli_conventions import add_config_option, command

    up = command(sub, "upgrade", "upgrade helpers: 'check' tells whether this version can take "
                 "over the data directory (read-only)",
                 "Checks run by the version about to be installed, before it starts.",
                 ["edge-agent upgrade check --config /etc/edge-agent/config.yaml"])
    actions = up.add_subparsers(dest="upgrade_command", metavar="ACTION")
    chk = command(actions, "check", "can this version take over the buffer, and what will it "
                  "migrate (changes nothing)",
                  "Validate the configuration with this version and read the buffer file "
                  "without writing: its schema version, the migration steps this version "
                  "would run after a snapshot, undelivered events, free space (exit 0 it can "
                  "take over, 1 it cannot, 2 invalid configuration).",
                  ["edge-agent upgrade check --config /etc/edge-agent/config.yaml --json"])
    add_config_option(chk)
    chk.add_argument("--json", action="store_true", help="print the plan as JSON")

    rb = command(sub, "rollback", "with the agent stopped: restore the buffer snapshot taken "
                 "before the last migration, for the previous version",
                 "Run with the new version after stopping the agent, before reinstalling the "
                 "previous one: puts back the snapshot taken before the migration and carries "
                 "over events detected since; the migrated file is kept beside it. Events "
                 "delivered meanwhile are sent again with the same ids (exit 0 restored, 2 "
                 "refused: no snapshot, the agent still runs, nothing to undo).",
                 ["edge-agent rollback --config /etc/edge-agent/config.yaml"])
    add_config_option(rb)
    rb.add_argument("--to-schema", type=int, default=None,
                    help="schema version to restore (default: the one the last upgrade "
                    "started from)")


def run(args: argparse.Namespace) -> int:
    from agent.wiring.load import load_config

    if args.command == "upgrade" and getattr(args, "upgrade_command", None) != "check":
        print("usage: edge-agent upgrade check --config FILE [--json]", file=sys.stderr)
        return 2
    path = load_config(args.config).buffer_path  # ConfigError: exit 2 (by the CLI)
    if args.command == "upgrade":
        return _check(path, args.json)
    return _rollback(path, args.to_schema)


def _check(path: Path, as_json: bool) -> int:
    from agent import __version__
    from buffer.upgrade import plan

    p = plan(path)
    if as_json:
        print(json.dumps({"agent_version": __version__, **p.to_json()}, indent=2))
        return 0 if p.can_take_over else 1
    print(f"edge-agent {__version__} (buffer schema version {p.target}); buffer {path}")
    if p.found is None:
        if not p.problems:  # else unknown (an unreadable directory), not absent
            print("  no buffer file yet: it will be created")
    else:
        print(f"  schema version {p.found}: {p.events} event(s), {p.undelivered} undelivered "
              f"delivery row(s), {p.size_bytes} bytes; {p.free_bytes} bytes free")
        if p.steps:
            print(f"  will migrate {p.found} -> {p.target}, after a snapshot to "
                  f"{p.snapshot.name if p.snapshot else '?'}:")
            for version, what in p.steps:
                print(f"    v{version}: {what}")
        elif not p.problems:
            print("  nothing to migrate")
    for version, snap in p.snapshots.items():
        print(f"  snapshot of schema version {version}: {snap.name}")
    if p.last_upgrade:
        u = p.last_upgrade
        print(f"  last upgrade: schema {u.get('from_schema')} -> {u.get('to_schema')}, "
              f"{u.get('outcome')} at {u.get('at')}")
    for problem in p.problems:
        print(f"  cannot take over: {problem}")
    print("ok: this version can take over" if p.can_take_over else
          "NO: this version cannot take over this data directory")
    return 0 if p.can_take_over else 1


def _rollback(path: Path, to_schema: int | None) -> int:
    from buffer.upgrade import UpgradeError, rollback

    try:
        r = rollback(path, to_schema)
    except UpgradeError as exc:
        print(f"edge-agent rollback: {exc}", file=sys.stderr)
        return 2
    print(f"rolled back {path} from schema version {r.from_schema} to {r.to_schema} "
          f"(snapshot {r.snapshot.name}); {r.carried_over} event(s) detected since the upgrade "
          f"carried over; {r.undelivered} undelivered delivery row(s) in the restored file.\n"
          f"The migrated file is kept as {r.set_aside.name}. Events the newer version already "
          f"delivered will be sent again with the same ids (receivers deduplicate them).")
    return 0
