"""``edge-agent reason``: classify a stop from a terminal at the line.

    edge-agent reason list MACHINE [--recent N] [--json]
    edge-agent reason set MACHINE [EPISODE] CODE [--text TEXT]

Talks to the running agent's reason-entry endpoint (``agent/reasons_api.py``) on its health
listener; the agent owns the buffer, so the classification commits there with the detector
state, exactly like a detection. Without EPISODE, ``set`` classifies the open (reported)
episode, else the latest ended one, and prints which one it was.

The address comes from ``--url``, else ``health.listen`` in ``--config``, else the default
(as ``edge-agent status``). The token from ``--token-file``, else the environment variable
``EDGE_AGENT_REASON_TOKEN``, else the ``health.reason_entry.bearer_token`` reference in
``--config`` (``${env:...}``/``${file:...}``, resolved by this command).

Exit codes (the CLI's conventions): 0 done (also when the episode already had exactly this
classification), 1 the agent failed (5xx, e.g. the commit did not finish in time), 2 refused
(wrong token, unknown machine, episode or code; the agent's reason is printed, with the known
codes for an unknown code), 3 no agent answers at the address.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

__all__ = ["TOKEN_ENV", "add_parser", "run"]

TOKEN_ENV = "EDGE_AGENT_REASON_TOKEN"
_TIMEOUT = 10.0


def add_parser(sub: Any) -> None:
    """Register ``reason`` and its actions on the CLI's subparsers."""
    from agent.cli_conventions import add_config_option, command

    rsn = command(sub, "reason", "list a machine's stops or give one its reason "
                  "(talks to the running agent)",
                  "List a machine's open and recent stops, or give one its reason, through "
                  "the running agent's reason entry endpoint.",
                  ["edge-agent reason list press-3 --config /etc/edge-agent/config.yaml"])
    actions = rsn.add_subparsers(dest="reason_command", metavar="ACTION")
    lst = command(actions, "list", "the open and recent stops of a machine",
                  "The open and recent stops of a machine, with their reasons.",
                  ["edge-agent reason list press-3 --recent 20 --json"])
    lst.add_argument("machine")
    lst.add_argument("--recent", type=int, default=10, help="ended stops (default %(default)s)")
    lst.add_argument("--json", action="store_true", help="print the raw JSON")
    st = command(actions, "set", "classify a stop: MACHINE [EPISODE] CODE",
                 "Give a stop its reason code (default: the open stop, else the latest).",
                 ["edge-agent reason set press-3 7 --text 'die change'"])
    st.add_argument("machine")
    st.add_argument("what", nargs="+", metavar="[EPISODE] CODE",
                    help="the episode id (default: the open stop, else the latest) and code")
    st.add_argument("--text", default=None, help="free text (what the operator says)")
    st.add_argument("--by", default="operator", choices=["operator", "api"],
                    help="who classifies (default %(default)s)")
    for p in (lst, st):
        add_config_option(p, required=False,
                          help="take the address and token reference from this file")
        p.add_argument("--url", default=None, help="health endpoint, e.g. "
                       "http://127.0.0.1:9780")
        p.add_argument("--token-file", type=Path, default=None,
                       help=f"file with the bearer token (else ${TOKEN_ENV}, else --config)")


def run(args: argparse.Namespace) -> int:
    """Run one ``reason`` action; the exit code."""
    from agent.cli_conventions import EXIT_UNREACHABLE
    from agent.status_cli import health_url

    action = getattr(args, "reason_command", None)
    if action not in ("list", "set"):
        print("usage: edge-agent reason {list,set} MACHINE ...", file=sys.stderr)
        return 2
    if action == "set" and len(args.what) > 2:
        print("usage: edge-agent reason set MACHINE [EPISODE] CODE [--text TEXT]",
              file=sys.stderr)
        return 2
    try:
        token = _token(args)
    except ValueError as exc:
        print(f"edge-agent reason: {exc}", file=sys.stderr)
        return 2
    base = health_url(args.config, args.url)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=_TIMEOUT) as http:
            return _list(http, args) if action == "list" else _set(http, args)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        print(f"edge-agent reason: no agent answers at {base}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except httpx.HTTPError as exc:  # reached, but the answer went missing: it may have committed
        print(f"edge-agent reason: no answer from the agent at {base} "
              f"({type(exc).__name__}: {exc}); repeating the command makes no second event "
              "unless the stop was classified otherwise since", file=sys.stderr)
        return 1


def _token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            return args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read {args.token_file}: {exc.strerror}") from None
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if args.config is not None:
        from ruamel.yaml import YAML

        from config.secrets import Secret, SecretResolutionError

        try:
            doc = YAML(typ="safe").load(args.config.read_text(encoding="utf-8")) or {}
            ref = ((doc.get("health") or {}).get("reason_entry") or {}).get("bearer_token")
        except Exception as exc:  # the file is the user's: say what, not a traceback
            raise ValueError(f"cannot read {args.config}: {exc}") from None
        if isinstance(ref, str) and ref:
            try:
                return Secret(ref).reveal()
            except SecretResolutionError as exc:
                raise ValueError(f"health.reason_entry.bearer_token: {exc}") from None
    raise ValueError(f"no token: give --token-file, set {TOKEN_ENV}, or --config with "
                     "health.reason_entry.bearer_token")


def _post_with_retries(http: httpx.Client, path: str, body: dict[str, Any],
                       attempts: int = 3) -> tuple[httpx.Response, int]:
    """POST with one idempotency key for every attempt: an answer lost on the way, or a 503
    (not committed in time), is asked again without risking a second classification or undoing
    one made by someone else meanwhile."""
    key = f"edge-agent-cli-{uuid.uuid4()}"
    for attempt in range(1, attempts + 1):
        try:
            r = http.post(path, json=body, headers={"Idempotency-Key": key})
        except (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError):
            if attempt == attempts:
                raise
            continue
        if r.status_code != 503 or attempt == attempts:
            return r, attempt
    raise AssertionError("unreachable")


def _refused(r: httpx.Response) -> int:
    try:
        doc = r.json()
    except ValueError:
        doc = {"error": r.text[:200]}
    print(f"edge-agent reason: HTTP {r.status_code}: {doc.get('error', doc)}", file=sys.stderr)
    known = doc.get("known_codes")
    if known:
        print(f"known codes: {', '.join(known)}", file=sys.stderr)
    return 2 if 400 <= r.status_code < 500 else 1


def _list(http: httpx.Client, args: argparse.Namespace) -> int:
    r = http.get(f"/machines/{args.machine}/episodes",
                 params={"open": "1", "recent": str(args.recent)})
    if r.status_code != 200:
        return _refused(r)
    doc = r.json()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    episodes = doc.get("episodes", [])
    if not episodes:
        print(f"{args.machine}: no reported stops")
        return 0
    print(f"{'EPISODE':<36}  {'STATE':<5}  {'CATEGORY':<9}  {'STARTED':<24}  "
          f"{'DURATION':>9}  REASON")
    for e in episodes:
        duration = "" if e["duration_seconds"] is None else f"{e['duration_seconds']:.0f}s"
        reason = e["reason_code"] or "-"
        if e.get("reason"):
            reason += f" ({e['reason']})"
        if e.get("classified_by"):
            reason += f" by {e['classified_by']}"
        print(f"{e['episode_id']:<36}  {'open' if e['open'] else 'ended':<5}  "
              f"{e['category']:<9}  {e['started_at']:<24}  {duration:>9}  {reason}")
    return 0


def _set(http: httpx.Client, args: argparse.Namespace) -> int:
    episode, code = (args.what if len(args.what) == 2 else (None, args.what[0]))
    if episode is None:
        r = http.get(f"/machines/{args.machine}/episodes", params={"open": "1", "recent": "1"})
        if r.status_code != 200:
            return _refused(r)
        found = r.json().get("episodes", [])
        if not found:
            print(f"edge-agent reason: {args.machine} has no reported stop to classify",
                  file=sys.stderr)
            return 2
        episode = found[0]["episode_id"]
        print(f"{args.machine}: the {'open' if found[0]['open'] else 'latest'} stop is "
              f"{episode} (started {found[0]['started_at']})")
    body: dict[str, Any] = {"code": code, "by": args.by}
    if args.text:
        body["text"] = args.text
    r, attempts = _post_with_retries(http, f"/machines/{args.machine}/episodes/{episode}/reason",
                                     body)
    if r.status_code not in (200, 201):
        return _refused(r)
    doc = r.json()
    # A repeated request answers as a replay ("created": false) even when its first attempt
    # made the event: after a retry, "not created" does not mean "nothing new".
    what = "classified" if doc.get("created") or attempts > 1 \
        else "already classified so; nothing new"
    print(f"{args.machine}: episode {doc['episode_id']} {what}: reason {doc['reason_code']} "
          f"(event {doc['event_id']})")
    return 0
