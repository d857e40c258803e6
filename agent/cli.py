"""``edge-agent``: the command-line face of the agent.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent.logs import setup_logging
from config.errors import ConfigError, FatalError

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

    prb = sub.add_parser("probe", help="connect each configured source, read every tag once "
                         "and print value, type, quality and timestamp")
    prb.add_argument("--config", "-c", required=True, type=Path)
    prb.add_argument("source", nargs="*", help="source id(s) (default: all)")
    prb.add_argument("--timeout", type=float, default=30.0,
                     help="seconds per source (default %(default)s)")

    brw = sub.add_parser("browse", help="list an OPC UA server's nodes (browse name, node id, "
                         "data type)")
    where = brw.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="opc.tcp://HOST:PORT (policy None, anonymous)")
    where.add_argument("--config", "-c", type=Path,
                       help="use the endpoint, security and login of an opcua source")
    brw.add_argument("--source", help="with --config: the opcua source id (default: the "
                     "only one)")
    brw.add_argument("--node", default="i=85", help="start node (default: Objects, i=85)")
    brw.add_argument("--depth", type=int, default=2, help="levels (default %(default)s)")

    ua_cmd = sub.add_parser("opcua", help="OPC UA helpers")
    ua_sub = ua_cmd.add_subparsers(dest="opcua_command", metavar="ACTION")
    gen = ua_sub.add_parser("gen-cert", help="create this agent's OPC UA application "
                            "certificate and key, and print how to trust it")
    gen.add_argument("--dir", type=Path, default=Path("pki"),
                     help="output directory (default %(default)s)")
    gen.add_argument("--application-uri", default=None,
                     help="application URI (default urn:<hostname>:plant-edge-agent)")
    gen.add_argument("--hostname", action="append", default=None,
                     help="DNS name in the certificate (repeatable; default this host)")
    gen.add_argument("--days", type=int, default=730, help="validity (default %(default)s)")
    gen.add_argument("--force", action="store_true", help="replace existing files")

    st = sub.add_parser("status", help="show a running agent's /status as a table "
                        "(exit 0 ready, 1 not ready or not reachable)")
    st.add_argument("--config", "-c", type=Path, default=None,
                    help="take the health address from this file's health.listen")
    st.add_argument("--url", default=None, help="health endpoint, e.g. http://127.0.0.1:9780")
    st.add_argument("--json", action="store_true", help="print the raw JSON document")

    rl = sub.add_parser("reload", help="make a running agent re-read its configuration "
                        "(SIGHUP) and report the outcome (exit 0 applied, 2 rejected)")
    rl.add_argument("--config", "-c", type=Path, default=None,
                    help="take the health address from this file's health.listen")
    rl.add_argument("--url", default=None, help="health endpoint, e.g. http://127.0.0.1:9780")
    rl.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for the outcome (default %(default)s)")

    from agent import buffer_cli

    buffer_cli.add_parser(sub)

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
            from agent.wiring.jsonschema import json_schema

            print(json.dumps(json_schema(), indent=2))
            return EXIT_OK
        if args.command == "receiver":
            from agent.receiver import run_receiver

            return run_receiver(args.listen, args.db, args.echo)
        if args.command == "replay":
            return _replay(args.config, args.samples, args.end)
        if args.command == "record":
            return _record(args.config, args.out, args.duration)
        if args.command == "probe":
            return _probe(args.config, args.source, args.timeout)
        if args.command == "browse":
            return _browse(args)
        if args.command == "opcua":
            if args.opcua_command != "gen-cert":
                print("usage: edge-agent opcua gen-cert [--dir DIR]", file=sys.stderr)
                return EXIT_INVALID
            return _gen_cert(args)
        if args.command in ("status", "reload"):
            from agent.status_cli import health_url, reload_main, status_main

            base = health_url(args.config, args.url)
            if args.command == "status":
                return status_main(base, args.json)
            return reload_main(base, args.timeout)
        if args.command == "buffer":
            from agent.buffer_cli import run as run_buffer

            return run_buffer(args)
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
    from agent.wiring.load import load_config

    config = load_config(path)
    print(f"{path}: valid ({len(config.sources)} source(s), {len(config.machines)} machine(s), "
          f"{len(config.sinks)} sink(s))")
    return EXIT_OK


def _replay(config_path: Path, samples: Path, end: str | None) -> int:
    from agent.replay import SampleFileError, read_samples, replay
    from agent.wiring.load import load_config
    from config.model import parse_time

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
    from agent.wiring.load import load_config

    config = load_config(config_path)
    with out.open("w", encoding="utf-8") as f:
        async def main() -> int:
            return await record(config, f, duration)

        count = run_async(main, config.agent.event_loop)
    print(f"recorded {count} sample(s) to {out}", file=sys.stderr)
    return EXIT_OK


def _run(path: Path) -> int:
    from agent.app import run_agent
    from agent.wiring.load import config_hash, load_config

    config = load_config(path)
    return run_agent(config, config_hash(config), path)


def _probe(path: Path, only: list[str], timeout: float) -> int:
    import asyncio

    from agent.probe import format_results, probe_sources
    from agent.wiring.load import load_config

    config = load_config(path)
    try:
        results = asyncio.run(probe_sources(config, only or None, timeout))
    except KeyError as exc:
        print(f"edge-agent: no source {exc} in {path} (sources: "
              f"{', '.join(config.sources) or 'none'})", file=sys.stderr)
        return EXIT_INVALID
    print(format_results(results))
    return EXIT_FAILURE if any(r.error for r in results) else EXIT_OK


def _browse(args: argparse.Namespace) -> int:
    import asyncio

    from config.errors import RetryableError
    from protocols.opcua.browse import browse, endpoint_config
    from protocols.opcua.config import OpcuaSourceConfig

    if args.endpoint:
        try:
            cfg = endpoint_config(args.endpoint)
        except ValueError as exc:
            print(f"edge-agent: {exc}", file=sys.stderr)
            return EXIT_INVALID
    else:
        from agent.wiring.load import load_config

        config = load_config(args.config)
        ua_sources = {n: s for n, s in config.sources.items() if isinstance(s, OpcuaSourceConfig)}
        name = args.source or (next(iter(ua_sources)) if len(ua_sources) == 1 else None)
        if name not in ua_sources:
            print(f"edge-agent: name an opcua source with --source (opcua sources: "
                  f"{', '.join(ua_sources) or 'none'})", file=sys.stderr)
            return EXIT_INVALID
        cfg = ua_sources[name]
    try:
        rows = asyncio.run(browse(cfg, args.node, args.depth))
    except ValueError as exc:
        print(f"edge-agent: --node: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except RetryableError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    width = max([len("  " * r.depth + r.browse_name) for r in rows] + [11])
    print(f"{'BROWSE NAME'.ljust(width)}  {'CLASS':<8}  {'DATA TYPE':<14}  NODE ID")
    for r in rows:
        print(f"{('  ' * r.depth + r.browse_name).ljust(width)}  {r.node_class:<8}  "
              f"{r.data_type:<14}  {r.node_id}")
    return EXIT_OK


def _gen_cert(args: argparse.Namespace) -> int:
    import socket

    from protocols.opcua.security import generate_certificate

    host = socket.gethostname()
    uri = args.application_uri or f"urn:{host}:plant-edge-agent"
    files = generate_certificate(args.dir, uri, hostnames=args.hostname or [host],
                                 days=args.days, overwrite=args.force)
    print(f"""certificate: {files.certificate}
private key: {files.private_key} (keep it secret: readable by the agent's user only)
application URI: {files.application_uri}
SHA-256 fingerprint: {files.fingerprint}

In the source's configuration:
    security: {{policy: Basic256Sha256, mode: SignAndEncrypt,
               certificate: {files.certificate}, private_key: {files.private_key},
               trust: {args.dir / "trusted"}/}}

On the OPC UA server, trust this certificate: copy {files.certificate.name} into the server's
trusted client certificates (often pki/trusted/certs/), or connect once and move it from the
server's rejected list to the trusted list; check the fingerprint above.
Put the server's own certificate into {args.dir / "trusted"}/ so the agent trusts the server.""")
    (args.dir / "trusted").mkdir(parents=True, exist_ok=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
