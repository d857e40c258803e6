"""Reason entry at the edge: list a machine's episodes and classify one, on the health listener.

Off unless ``health.reason_entry.bearer_token`` is configured (then every request needs
``Authorization: Bearer <token>``; the secret is re-read on each request, so a rotated token
file works at once)::

    GET  /machines/{machine}/episodes?open=1&recent=N
         -> 200 {"machine", "episodes": [{episode_id, open, category, started_at, ended_at,
                 duration_seconds, reason_code, reason, order_id, classified_by, ...}]}
            newest first; open=0 leaves the open episode out; recent (default 10) ended ones
    POST /machines/{machine}/episodes/{episode_id}/reason
         {"code": "7", "text": "free text (optional)", "by": "operator" | "api" (default api)}
         -> 201 {"event_id", "episode_id", "reason_code", "created": true}   a new event
            200 {..., "created": false}   the same as the episode's latest classification
            (the same request twice gives one event and the same answer)
         Header ``Idempotency-Key`` (optional, 1-255 visible ASCII characters): a retry with
         the same key answers as the first request did, even after someone else classified
         the episode since; the same key with another request is refused (422).

Errors: 401 missing or wrong token (checked first, so machine names do not leak); 404 unknown
machine or episode (or reason entry off); 422 a code not in the machine's ``reasons`` map
(with ``known_codes``), or a malformed field; 400 a body that is not a JSON object; 413 a body
over the health listener's limit (64 KiB); 503 the token cannot be read or is empty
(everyone is refused), or the commit did not finish in time (the classification is queued and
commits; repeating the request is safe and answers 200 once it has).

Durability: the answer is sent only after the ``plantedge.downtime.classified`` event is
committed together with the detector state that knows about it (``Runtime.commit_now``), so a
kill -9 right after a 2xx still delivers it once after the restart, and a repeat of the request
after the restart finds it and makes no second event.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from agent.detect.classify import RECENT, EpisodeNotFound, KeyReused, UnknownCode
from agent.httpserver import Request, Response
from agent.runtime import Runtime
from config.model import utcnow
from config.redaction import add_secret_values
from config.secrets import SecretResolutionError

__all__ = ["COMMIT_TIMEOUT", "answer"]

log = logging.getLogger(__name__)

COMMIT_TIMEOUT = 5.0
_BY = ("operator", "api")
_MAX_CODE, _MAX_TEXT = 64, 500


async def answer(runtime: Runtime, req: Request) -> Response:
    """Serve a request under ``/machines/``."""
    settings = runtime.config.health.reason_entry
    if settings is None:
        return Response.json({"error": "reason entry is off (configure "
                                       "health.reason_entry.bearer_token to turn it on)"}, 404)
    try:
        token = settings.bearer_token.reveal()
    except SecretResolutionError as exc:
        log.error("reason entry: the bearer token cannot be read: %s", exc)
        return Response.json({"error": "the agent cannot read its reason-entry token"}, 503)
    if not token.strip():
        # An empty token (an empty file, a file caught mid-rotation, an empty variable) would
        # match "Authorization: Bearer" with nothing after it: refuse everyone instead.
        log.error("reason entry: the bearer token is empty (%s); every request is refused",
                  settings.bearer_token.reference)
        return Response.json({"error": "the agent's reason-entry token is empty"}, 503)
    add_secret_values([token])  # a rotated token is hidden from logs like the configured one
    given = req.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                              token.strip().encode()):
        return Response.json({"error": "missing or wrong bearer token"}, 401,
                             {"WWW-Authenticate": 'Bearer realm="edge-agent"'})
    parts = req.path.strip("/").split("/")
    # machines/{m}/episodes  or  machines/{m}/episodes/{id}/reason
    if len(parts) == 3 and parts[2] == "episodes":
        if req.method not in ("GET", "HEAD"):
            return Response.json({"error": "use GET"}, 405, {"Allow": "GET"})
        return _list(runtime, parts[1], req.query)
    if len(parts) == 5 and parts[2] == "episodes" and parts[4] == "reason":
        if req.method != "POST":
            return Response.json({"error": "use POST"}, 405, {"Allow": "POST"})
        return await _classify(runtime, parts[1], parts[3], req.body,
                               req.headers.get("idempotency-key"))
    return Response.json({"error": "not found", "endpoints": [
        "GET /machines/{machine}/episodes?open=1&recent=N",
        "POST /machines/{machine}/episodes/{episode_id}/reason"]}, 404)


def _list(runtime: Runtime, machine: str, query: dict[str, str]) -> Response:
    det = runtime.detectors.get(machine)
    if det is None:
        return _no_machine(runtime, machine)
    try:
        recent = int(query.get("recent", "10"))
    except ValueError:
        return Response.json({"error": "recent must be a whole number"}, 422)
    include_open = query.get("open", "1") not in ("0", "false", "no")
    episodes = det.episodes(max(0, min(recent, RECENT)))
    if not include_open:
        episodes = [e for e in episodes if not e["open"]]
    return Response.json({"machine": machine, "episodes": episodes,
                          "known_codes": det.cfg.downtime.reasons})


async def _classify(runtime: Runtime, machine: str, episode_id: str, body: bytes,
                    key: str | None) -> Response:
    det = runtime.detectors.get(machine)
    if det is None:
        return _no_machine(runtime, machine)
    if key is not None and not _valid_key(key):
        return Response.json({"error": "Idempotency-Key must be 1 to 255 visible ASCII "
                                       "characters"}, 400)
    fields = _fields(body)
    if isinstance(fields, Response):
        return fields
    code, text, by = fields
    try:
        result, events = det.classify(episode_id, code, text, by, utcnow(), key)
    except EpisodeNotFound as exc:
        return Response.json({"error": str(exc)}, 404)
    except UnknownCode as exc:
        return Response.json({"error": str(exc), "known_codes": exc.known}, 422)
    except KeyReused as exc:
        return Response.json({"error": str(exc)}, 422)
    if result.created:
        log.info("machine %s: episode %s classified %r by %s (event %s)", machine,
                 result.episode_id, code, by, result.event_id,
                 extra={"event_id": result.event_id, "episode_id": result.episode_id})
    committed = await runtime.commit_now(det, events, result.event_id, COMMIT_TIMEOUT)
    doc: dict[str, Any] = {"event_id": result.event_id, "episode_id": result.episode_id,
                           "reason_code": result.reason_code, "created": result.created}
    if not committed:
        return Response.json({**doc, "error": "not committed yet (buffer busy or full); the "
                              "classification is queued, repeating this request is safe"}, 503)
    return Response.json(doc, 201 if result.created else 200)


def _fields(body: bytes) -> tuple[str, str | None, str] | Response:
    try:
        doc = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        return Response.json({"error": f"body is not JSON: {exc}"}, 400)
    except RecursionError:  # [[[[...]]]]: the parser's stack, not a crash of the request
        return Response.json({"error": "body is not a reason: JSON nested too deeply"}, 400)
    if not isinstance(doc, dict):
        return Response.json({"error": "body must be a JSON object with 'code'"}, 400)
    raw = doc.get("code")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return Response.json({"error": "'code' is required: the reason code (text or number)"},
                             422)
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        return Response.json({"error": "'code' must be text or a whole number, not "
                              f"{json.dumps(raw)[:40]}"}, 422)
    code = str(raw).strip()
    text = doc.get("text")
    by = doc.get("by", "api")
    unknown = sorted(set(doc) - {"code", "text", "by"})
    problems = []
    if len(code) > _MAX_CODE:
        problems.append(f"'code' is longer than {_MAX_CODE} characters")
    if text is not None and (not isinstance(text, str) or len(text) > _MAX_TEXT):
        problems.append(f"'text' must be a string of at most {_MAX_TEXT} characters")
    if not all(_encodable(v) for v in (code, text) if isinstance(v, str)):
        # A lone surrogate (a "\\ud800" escape) is valid JSON but no text: strict parsers
        # at the receiving end refuse the event, which would then be a dead letter.
        problems.append("'code' and 'text' must be valid Unicode text (no lone surrogates)")
    if by not in _BY:
        problems.append(f"'by' must be one of {', '.join(_BY)}")
    if unknown:
        problems.append(f"unknown field(s): {', '.join(unknown)}")
    if problems:
        return Response.json({"error": "; ".join(problems)}, 422)
    return code, (text.strip() or None) if isinstance(text, str) else None, str(by)


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= 255 and all("!" <= c <= "~" for c in key)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_machine(runtime: Runtime, machine: str) -> Response:
    return Response.json({"error": f"no machine {machine!r}",
                          "machines": sorted(runtime.detectors)}, 404)
