"""``edge-agent``: the command-line face of the agent.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent.errors import ConfigError, FatalError
from agent.logs import setup_logging

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Plant edge agent: PLC signals "
                                "in, downtime and scrap events out, exactly once.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent with a configuration file")
    run.add_argument("--config", "-c", required=True, type=Path)

    val = sub.add_parser("validate", help="check a configuration file (exit 0 valid, 2 invalid)")
    val.add_argument("--config", "-c", required=True, type=Path)

    cfg = sub.add_parser("config", help="configuration helpers")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    cfg_sub.add_parser("schema", help="print the JSON Schema of the configuration (for editors)")

    rcv = sub.add_parser("receiver", help="run the reference central endpoint")
    rcv.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    rcv.add_argument("--db", default=Path("receiver.db"), type=Path,
                     help="SQLite file for received events (default %(default)s)")
    rcv.add_argument("--print", dest="echo", action="store_true",
                     help="print every new event as a JSON line")

    rep = sub.add_parser("replay", help="run the configured machines over recorded samples "
                         "and print the events as JSON lines (no network, no buffer)")
    rep.add_argument("--config", "-c", required=True, type=Path)
    rep.add_argument("--samples", required=True, type=Path, help="JSON lines of samples")
    rep.add_argument("--end", default=None, help="tick once more at this RFC 3339 time "
                     "(closes scrap windows and announces stops that lasted until then)")

    rec = sub.add_parser("record", help="capture live samples as JSON lines for replay")
    rec.add_argument("--config", "-c", required=True, type=Path)
    rec.add_argument("--out", required=True, type=Path)
    rec.add_argument("--duration", type=float, default=None, help="seconds (default: until "
                     "Ctrl-C)")

    demo = sub.add_parser("demo", help="run a simulated plant, the agent and a receiver")
    demo.add_argument("--duration", type=float, default=40.0,
                      help="seconds to run (default %(default)s)")
    demo.add_argument("--keep", type=Path, default=None,
                      help="keep the demo's data in this directory instead of a temporary one")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.command is None:
        _parser().print_help(sys.stderr)
        return EXIT_INVALID
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "validate":
            return _validate(args.config)
        if args.command == "config":
            if args.config_command != "schema":
                print("usage: edge-agent config schema", file=sys.stderr)
                return EXIT_INVALID
            from config.schema import json_schema

            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        if args.command == "receiver":
            from agent.receiver import run_receiver

            return run_receiver(args.listen, args.db, args.echo)
        if args.command == "replay":
            return _replay(args.config, args.samples, args.end)
        if args.command == "record":
            return _record(args.config, args.out, args.duration)
        if args.command == "demo":
            from agent.demo import run_demo

            return run_demo(args.duration, args.keep)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    except FatalError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_INVALID


def _print_config_error(exc: ConfigError) -> None:
    n = len(exc.issues)
    print(f"edge-agent: the configuration has {n} problem{'s' if n != 1 else ''}:",
          file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def _validate(path: Path) -> int:
    from config.loader import load_config

    config = load_config(path)
    print(f"{path}: valid ({len(config.sources)} source(s), {len(config.machines)} machine(s), "
          f"{len(config.sinks)} sink(s))")
    return EXIT_OK


def _replay(config_path: Path, samples: Path, end: str | None) -> int:
    from agent.model import parse_time
    from agent.replay import SampleFileError, read_samples, replay
    from config.loader import load_config

    config = load_config(config_path)
    try:
        end_time = parse_time(end) if end else None
    except ValueError:
        print(f"edge-agent replay: --end {end!r} is not an RFC 3339 time", file=sys.stderr)
        return EXIT_INVALID
    try:
        for event in replay(config, read_samples(samples), end_time):
            print(json.dumps(event, separators=(",", ":"), sort_keys=True))
    except SampleFileError as exc:
        print(f"edge-agent replay: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"edge-agent replay: cannot read {samples}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _record(config_path: Path, out: Path, duration: float | None) -> int:
    from agent.app import run_async
    from agent.replay import record
    from config.loader import load_config

    config = load_config(config_path)
    with out.open("w", encoding="utf-8") as f:
        async def main() -> int:
            return await record(config, f, duration)

        count = run_async(main, config.agent.event_loop)
    print(f"recorded {count} sample(s) to {out}", file=sys.stderr)
    return EXIT_OK


def _run(path: Path) -> int:
    from agent.app import run_agent
    from config.loader import config_hash, load_config

    config = load_config(path)
    return run_agent(config, config_hash(config))


if __name__ == "__main__":
    sys.exit(main())
