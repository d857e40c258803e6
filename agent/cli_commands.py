"""The handlers of ``edge-agent`` commands that work on a configuration file or a device:
validate, run, replay, record, probe, browse, opcua gen-cert (``agent/cli.py`` builds the
parser and dispatches; exit codes as ``agent/cli_conventions.py`` says)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.cli_conventions import EXIT_INVALID, EXIT_OK, EXIT_UNREACHABLE, Progress

__all__ = ["browse", "gen_cert", "probe", "record", "replay", "run", "validate"]


def _dump(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def validate(args: argparse.Namespace) -> int:
    from agent.wiring.load import load_config
    from config.errors import ConfigError

    checked = not args.no_secrets
    name = "<stdin>" if str(args.config) == "-" else str(args.config)
    try:
        config = load_config(args.config, check_references=checked)
    except ConfigError as exc:
        if args.json:  # a pipeline reading stdout gets the verdict there too
            _dump({"file": name, "valid": False, "secrets_checked": checked,
                   "issues": [{"message": str(i), "path": i.path, "line": i.line,
                               "column": i.column} for i in exc.issues]})
            return EXIT_INVALID
        n = len(exc.issues)
        print(f"edge-agent: the configuration has {n} problem{'s' if n != 1 else ''}:",
              file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        if checked and any("environment variable" in i.message or "secret file" in i.message
                           for i in exc.issues):
            print("(to check the file without its secrets at hand: edge-agent validate "
                  "--no-secrets)", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        _dump({"file": name, "valid": True, "secrets_checked": checked,
               "sources": list(config.sources), "machines": list(config.machines),
               "sinks": list(config.sinks)})
        return EXIT_OK
    note = "" if checked else "; ${env:...}/${file:...} references not resolved"
    print(f"{name}: valid ({len(config.sources)} source(s), {len(config.machines)} machine(s), "
          f"{len(config.sinks)} sink(s){note})")
    return EXIT_OK


def replay(args: argparse.Namespace) -> int:
    from agent.replay import SampleFileError, read_samples
    from agent.replay import replay as run_replay
    from agent.wiring.load import load_config
    from config.model import parse_time

    samples: Path = args.samples
    end: str | None = args.end
    config = load_config(args.config)
    try:
        end_time = parse_time(end) if end else None
    except ValueError:
        print(f"edge-agent replay: --end {end!r} is not an RFC 3339 time", file=sys.stderr)
        return EXIT_INVALID
    progress = Progress("replayed; events")
    try:
        for event in run_replay(config, read_samples(samples), end_time):
            print(json.dumps(event, separators=(",", ":"), sort_keys=True))
            progress.step()
        progress.finish()
    except SampleFileError as exc:
        print(f"edge-agent replay: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:
        raise  # the reader of stdout went away: main() ends quietly
    except OSError as exc:
        print(f"edge-agent replay: cannot read {samples}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def record(args: argparse.Namespace) -> int:
    from agent.app import run_async
    from agent.replay import record as run_record
    from agent.wiring.load import load_config

    out: Path = args.out
    duration: float | None = args.duration
    config = load_config(args.config)
    progress = Progress("recorded; samples")

    def show(count: int, elapsed: float) -> None:
        progress.done = count
        left = f", {max(0.0, duration - elapsed):.0f}s left" if duration else ""
        progress.show(f" ({elapsed:.0f}s{left}; Ctrl-C stops)")

    with out.open("w", encoding="utf-8") as f:
        async def main() -> int:
            return await run_record(config, f, duration, on_progress=show)

        count = run_async(main, config.agent.event_loop)
    progress.finish()
    print(f"recorded {count} sample(s) to {out}", file=sys.stderr)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from agent.app import run_agent
    from agent.wiring.load import config_hash, load_config

    path: Path = args.config
    config = load_config(path)
    if str(path) == "-":
        import logging

        logging.getLogger(__name__).warning(
            "configuration read from standard input: SIGHUP cannot re-read it (no live reload)")
        return run_agent(config, config_hash(config), None)
    return run_agent(config, config_hash(config), path)


def probe(args: argparse.Namespace) -> int:
    import asyncio

    from agent.probe import format_results, probe_sources
    from agent.wiring.load import load_config

    path: Path = args.config
    only: list[str] = args.source
    config = load_config(path)
    try:
        results = asyncio.run(probe_sources(config, only or None, args.timeout))
    except KeyError as exc:
        print(f"edge-agent: no source {exc} in {path} (sources: "
              f"{', '.join(config.sources) or 'none'})", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        from config.model import format_time

        _dump([{"source": r.source, "error": r.error, "tags": [
            {"tag": s.tag, "value": s.value, "quality": s.quality.value, "detail": s.detail,
             "time": format_time(s.time)} for s in r.samples]} for r in results])
    else:
        print(format_results(results))
    return EXIT_UNREACHABLE if any(r.error for r in results) else EXIT_OK


def browse(args: argparse.Namespace) -> int:
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
        return EXIT_UNREACHABLE
    if args.json:
        _dump([{"depth": r.depth, "browse_name": r.browse_name, "node_class": r.node_class,
                "data_type": r.data_type, "flags": list(r.flags), "node_id": r.node_id}
               for r in rows])
        return EXIT_OK
    width = max([len("  " * r.depth + r.browse_name) for r in rows] + [11])
    flags = [",".join(r.flags) or "-" for r in rows]
    fw = max([len(f) for f in flags] + [5])
    print(f"{'BROWSE NAME'.ljust(width)}  {'CLASS':<8}  {'DATA TYPE':<14}  {'FLAGS'.ljust(fw)}"
          "  NODE ID")
    for r, f in zip(rows, flags, strict=True):
        print(f"{('  ' * r.depth + r.browse_name).ljust(width)}  {r.node_class:<8}  "
              f"{r.data_type:<14}  {f.ljust(fw)}  {r.node_id}")
    return EXIT_OK


def gen_cert(args: argparse.Namespace) -> int:
    if getattr(args, "opcua_command", None) != "gen-cert":
        print("usage: edge-agent opcua gen-cert [--dir DIR]", file=sys.stderr)
        return EXIT_INVALID
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
