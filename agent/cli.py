"""``edge-agent``: the command-line face of the agent.

Conventions shared by every command (``agent/cli_conventions.py``): exit codes 0 ok, 1 failed
or not ready, 2 bad input, 3 unreachable (141: the reader closed the pipe); global options
before or after the command, with ``EDGE_AGENT_LOG_LEVEL``/``EDGE_AGENT_LOG_FORMAT`` as their
defaults; ``--config`` defaults to ``EDGE_AGENT_CONFIG`` and ``-`` reads standard input; every
command's help has a description and an example; read commands take ``--json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from agent import __version__
from agent.cli_conventions import (
    EXIT_CLOSED_PIPE,
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OK,
    GLOBAL_OPTIONS,
    add_config_option,
    command,
    global_defaults,
    hoist_global_options,
)
from agent.logs import setup_logging
from config.errors import ConfigError, FatalError

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _parser(defaults: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent", description="Plant edge agent: PLC signals in, downtime and scrap "
        "events out, exactly once.", epilog="Run 'edge-agent COMMAND --help' for a command's "
        "options and an example. Exit codes: 0 ok, 1 failed or not ready, 2 bad input, "
        "3 unreachable.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    for option, (env, _, choices) in GLOBAL_OPTIONS.items():
        p.add_argument(option, default=defaults[option], choices=choices,
                       help=f"(default %(default)s, or ${env}; may follow the command)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = command(sub, "run", "run the agent with a configuration file",
                  "Run the agent until SIGTERM or SIGINT (it drains within agent.stop_timeout); "
                  "SIGHUP re-reads the configuration file.",
                  ["edge-agent run --config /etc/edge-agent/config.yaml --log-format json",
                   "EDGE_AGENT_CONFIG=/etc/edge-agent/config.yaml edge-agent run"])
    add_config_option(run)

    val = command(sub, "validate", "check a configuration file (exit 0 valid, 2 invalid)",
                  "Check a configuration file and print every problem as "
                  "FILE:LINE:COL: key.path: message.",
                  ["edge-agent validate --config config.yaml",
                   "edge-agent validate --no-secrets --config config.yaml   # without the "
                   "secrets at hand",
                   "cat config.yaml | edge-agent validate --config -"])
    add_config_option(val)
    val.add_argument("--no-secrets", action="store_true", help="do not resolve ${env:...} "
                     "and ${file:...} references (their form is still checked)")
    val.add_argument("--json", action="store_true", help="the result as JSON")

    from agent import buffer_cli, config_cli, top

    config_cli.add_parser(sub)

    rcv = command(sub, "receiver", "run the reference central endpoint",
                  "Run the reference central endpoint: accepts the agent's CloudEvents "
                  "(single and batch), deduplicates by id and stores them in SQLite.",
                  ["edge-agent receiver --listen 127.0.0.1:8080 --db receiver.db --print"])
    rcv.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    rcv.add_argument("--db", default=Path("receiver.db"), type=Path,
                     help="SQLite file for received events (default %(default)s)")
    rcv.add_argument("--print", dest="echo", action="store_true",
                     help="print every new event as a JSON line")

    rep = command(sub, "replay", "run the configured machines over recorded samples",
                  "Run the configured machines over recorded samples and print the events "
                  "they detect as JSON lines (no network, no buffer).",
                  ["edge-agent replay --config config.yaml --samples shift.jsonl "
                   "--end 2026-03-02T14:00:00Z > events.jsonl"])
    add_config_option(rep)
    rep.add_argument("--samples", required=True, type=Path, help="JSON lines of samples")
    rep.add_argument("--end", default=None, help="tick once more at this RFC 3339 time "
                     "(closes scrap windows and announces stops that lasted until then)")

    rec = command(sub, "record", "capture live samples as JSON lines for replay",
                  "Connect every configured source and write each sample as a JSON line "
                  "(the input of 'replay'); progress on stderr when it is a terminal.",
                  ["edge-agent record --config config.yaml --out shift.jsonl --duration 28800"])
    add_config_option(rec)
    rec.add_argument("--out", required=True, type=Path)
    rec.add_argument("--duration", type=float, default=None, help="seconds (default: until "
                     "Ctrl-C)")

    prb = command(sub, "probe", "read every tag of each source once",
                  "Connect each configured source, read every tag once and print value, type, "
                  "quality and timestamp (exit 3 when a source cannot be reached).",
                  ["edge-agent probe --config config.yaml press-plc",
                   "edge-agent probe --config config.yaml --json"])
    add_config_option(prb)
    prb.add_argument("source", nargs="*", help="source id(s) (default: all)")
    prb.add_argument("--timeout", type=float, default=30.0,
                     help="seconds per source (default %(default)s)")
    prb.add_argument("--json", action="store_true", help="the results as JSON")

    brw = command(sub, "browse", "list an OPC UA server's nodes as a tree",
                  "List an OPC UA server's nodes as a tree: browse name, node class, data type "
                  "and the node id to put in a configuration (nsu= form).",
                  ["edge-agent browse --endpoint opc.tcp://10.10.1.40:4840 --depth 3",
                   "edge-agent browse --config config.yaml --source packer-plc --json"])
    where = brw.add_mutually_exclusive_group()
    where.add_argument("--endpoint", help="opc.tcp://HOST:PORT (policy None, anonymous)")
    add_config_option(where, required=False,
                      help="use the endpoint, security and login of an opcua source")
    brw.add_argument("--source", help="with --config: the opcua source id (default: the "
                     "only one)")
    brw.add_argument("--node", default="i=85", help="start node (default: Objects, i=85)")
    brw.add_argument("--depth", type=int, default=2, help="levels (default %(default)s)")
    brw.add_argument("--json", action="store_true", help="the nodes as JSON (depth first)")

    ua_cmd = command(sub, "opcua", "OPC UA helpers", "OPC UA helpers.",
                     ["edge-agent opcua gen-cert --dir pki"])
    ua_sub = ua_cmd.add_subparsers(dest="opcua_command", metavar="ACTION")
    gen = command(ua_sub, "gen-cert", "create this agent's OPC UA certificate",
                  "Create this agent's OPC UA application certificate and key, and print how "
                  "to trust it on the server.",
                  ["edge-agent opcua gen-cert --dir pki --hostname edge-01.plant-a.local"])
    gen.add_argument("--dir", type=Path, default=Path("pki"),
                     help="output directory (default %(default)s)")
    gen.add_argument("--application-uri", default=None,
                     help="application URI (default urn:<hostname>:plant-edge-agent)")
    gen.add_argument("--hostname", action="append", default=None,
                     help="DNS name in the certificate (repeatable; default this host)")
    gen.add_argument("--days", type=int, default=730, help="validity (default %(default)s)")
    gen.add_argument("--force", action="store_true", help="replace existing files")

    st = command(sub, "status", "show a running agent's state as a table",
                 "Show a running agent's /status as a table (exit 0 ready, 1 not ready, "
                 "3 not reachable).",
                 ["edge-agent status --config /etc/edge-agent/config.yaml",
                  "edge-agent status --url http://127.0.0.1:9780 --json"])
    add_config_option(st, required=False,
                      help="take the health address from this file's health.listen")
    st.add_argument("--url", default=None, help="health endpoint, e.g. http://127.0.0.1:9780")
    st.add_argument("--json", action="store_true", help="print the raw JSON document")

    rl = command(sub, "reload", "make a running agent re-read its configuration",
                 "Send SIGHUP to the agent named by the pid file in its data directory "
                 "(checked: owner, start time, agent id) and report the outcome (exit 0 "
                 "applied, 2 rejected or no pid file to trust, 3 not reachable).",
                 ["edge-agent reload --config /etc/edge-agent/config.yaml"])
    add_config_option(rl, required=False,
                      help="the agent's configuration: agent.data_dir holds its pid file, "
                      "health.listen its address")
    rl.add_argument("--pid-file", type=Path, default=None,
                    help="the agent's pid file (default <agent.data_dir>/edge-agent.pid)")
    rl.add_argument("--url", default=None, help="health endpoint, e.g. http://127.0.0.1:9780")
    rl.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the outcome (default %(default)s)")

    from agent import reason_cli

    buffer_cli.add_parser(sub)
    top.add_parser(sub)
    reason_cli.add_parser(sub)
    from agent import upgrade_cli

    upgrade_cli.add_parser(sub)

    demo = command(sub, "demo", "run a simulated plant, the agent and a receiver",
                   "Run a simulated plant (Modbus), the agent and a receiver, and print what "
                   "was delivered.", ["edge-agent demo --duration 120"])
    demo.add_argument("--duration", type=float, default=40.0,
                      help="seconds to run (default %(default)s)")
    demo.add_argument("--keep", type=Path, default=None,
                      help="keep the demo's data in this directory instead of a temporary one")
    demo.add_argument("--sink", choices=["http", "mqtt"], default="http",
                      help="where the demo's events go: the reference receiver (http) or a "
                           "Unified Namespace on the local Mosquitto (mqtt)")
    return p


def _handlers() -> dict[str, Handler]:
    from agent import cli_commands as c

    def config(args: argparse.Namespace) -> int:
        from agent.config_cli import run

        return run(args)

    def receiver(args: argparse.Namespace) -> int:
        from agent.receiver import run_receiver

        return run_receiver(args.listen, args.db, args.echo)

    def status(args: argparse.Namespace) -> int:
        from agent.status_cli import health_url, reload_main, status_main

        base = health_url(args.config, args.url)
        if args.command == "status":
            return status_main(base, args.json)
        return reload_main(base, args.config, args.pid_file, args.timeout)

    def top(args: argparse.Namespace) -> int:
        from agent.top import run

        return run(args)

    def buffer(args: argparse.Namespace) -> int:
        from agent.buffer_cli import run

        return run(args)

    def reason(args: argparse.Namespace) -> int:
        from agent.reason_cli import run

        return run(args)

    def upgrade(args: argparse.Namespace) -> int:
        from agent.upgrade_cli import run

        return run(args)

    def demo(args: argparse.Namespace) -> int:
        from agent.demo import run_demo

        return run_demo(args.duration, args.keep, args.sink)

    def browse(args: argparse.Namespace) -> int:
        if not args.endpoint and args.config is None:
            print("edge-agent browse: give --endpoint URL or --config FILE", file=sys.stderr)
            return EXIT_INVALID
        return c.browse(args)

    return {"run": c.run, "validate": c.validate, "config": config, "receiver": receiver,
            "replay": c.replay, "record": c.record, "probe": c.probe, "browse": browse,
            "opcua": c.gen_cert, "status": status, "reload": status, "top": top,
            "buffer": buffer, "reason": reason, "upgrade": upgrade, "rollback": upgrade,
            "demo": demo}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`| head`): no traceback; stdout now goes nowhere so the
        # interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_CLOSED_PIPE


def _main(argv: list[str] | None) -> int:
    try:
        defaults = global_defaults()
    except ValueError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_INVALID
    parser = _parser(defaults)
    args = parser.parse_args(hoist_global_options(sys.argv[1:] if argv is None else argv))
    setup_logging(args.log_level, args.log_format)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    try:
        code = _handlers()[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler above
        return code
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    except FatalError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _print_config_error(exc: ConfigError) -> None:
    n = len(exc.issues)
    print(f"edge-agent: the configuration has {n} problem{'s' if n != 1 else ''}:",
          file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
