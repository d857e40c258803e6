"""A stand-in for the next release of the agent: this code plus one buffer migration step.

Upgrade and rollback tests need a version that migrates the buffer. Until a release adds a
real schema step, this adds one (a new nullable column, as a real step would add) and runs the
CLI, so ``python tests/support/next_version.py run --config F`` is "the new agent" and
``python -m agent.cli run --config F`` "the old one"; ``next_version.py --never-ready run ...``
is a bad release (it migrates, runs, and /readyz never answers 200).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from buffer import migrations

__all__ = ["NEXT", "install", "never_ready"]

NEXT = migrations.Migration(
    migrations.SCHEMA_VERSION + 1, "test stand-in for the next release: a new nullable column",
    ("ALTER TABLE events ADD COLUMN next_release_note TEXT",))


def install() -> None:
    """Make this process the next version (its migrations end with ``NEXT``)."""
    if migrations.MIGRATIONS[-1] is not NEXT:
        migrations.MIGRATIONS = (*migrations.MIGRATIONS, NEXT)
        migrations.SCHEMA_VERSION = NEXT.version


def never_ready() -> None:
    """Make this process a release that starts, migrates, and never becomes ready."""
    from agent.runtime import Runtime

    Runtime.readiness = lambda self: ["a broken release (test stand-in)"]  # type: ignore


if __name__ == "__main__":
    install()
    args = sys.argv[1:]
    if args[:1] == ["--never-ready"]:
        never_ready()
        args = args[1:]
    from agent.cli import main

    sys.exit(main(args))
