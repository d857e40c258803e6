"""The reference receiver's HTTP side: routes, fault injection, and the answer per request.

- ``POST <any path>`` with ``Content-Type: application/cloudevents+json`` (one event) answers
  ``201`` (new), ``409`` (already have it: the agent settles it as accepted), ``400`` (not a
  valid CloudEvent, with a detail). With ``application/cloudevents-batch+json`` (a JSON array)
  it answers ``207`` with ``{"results": [{"id", "status", "detail"}]}``, one result per item in
  request order. A body that is not JSON is ``400``; another content type is ``415``.
- ``GET /events[?source=...]`` lists what arrived (arrival order), ``GET /stats`` gives
  ``{"received": n, "duplicates": n}``.

Limits (a reference receiver faces the same network as a production one): parsing, checking
and storing a POST run in one worker thread, never on the event loop, so a large batch does
not stall other connections (queries run in a second thread); a batch holds at most
``MAX_BATCH_EVENTS`` items (more is 413, and the agent splits); bodies up to 16 MiB on POST,
none on GET; ``requests`` keeps only the last ``KEEP_REQUESTS`` (tests read it; nothing grows
forever). An item that cannot be stored as it is (``time`` not a string, text that is not valid
Unicode, an over-long id) gets its own 400 in the 207 answer; the rest of the batch is stored.
New events are passed to ``echo`` (if given) after their commit, in the worker thread.

Fault injection (``receiver.faults``), so tests and integrators can exercise the whole contract
against a real socket: answer N requests with a status and a Retry-After, commit and then answer
too late (client timeout, then a deduplicated retry), refuse given ids with 422, demand a bearer
token (401), refuse batches over a size (413), or refuse a whole batch when one item is bad
(``atomic_batches``, the all-or-nothing style that makes the agent bisect).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.httpserver import HttpServer, Request, Response
from agent.receiver.contract import (
    CE_BATCH,
    CE_SINGLE,
    MAX_BATCH_EVENTS,
    Faults,
    TooMany,
    compact,
    is_text,
    split_array,
    verdict,
)
from agent.receiver.store import EventStore

__all__ = ["KEEP_REQUESTS", "Receiver", "SeenRequest"]

KEEP_REQUESTS = 1000


@dataclass(frozen=True, slots=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    ids: list[str]  # event ids in the body, in order (empty when unreadable)
    status: int  # what we answered
    at: float  # time.monotonic() when the request arrived


class _Recent(list[SeenRequest]):
    """A list that keeps only the most recent ``KEEP_REQUESTS`` items (trimmed in steps, so
    appending stays cheap)."""

    def append(self, item: SeenRequest) -> None:
        super().append(item)
        if len(self) >= 2 * KEEP_REQUESTS:
            del self[:len(self) - KEEP_REQUESTS]


class Receiver:
    """``await start()`` opens the database and binds (port 0 is fine) and returns the port."""

    def __init__(self, db_path: Path, host: str = "127.0.0.1", port: int = 0, *,
                 echo: Callable[[dict[str, Any]], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.db_path = Path(db_path)
        self._echo = echo
        self.faults = Faults()
        self.requests: list[SeenRequest] = _Recent()
        self._scheme = "https" if ssl_context is not None else "http"
        self._server = HttpServer(self._handle, host, port, ssl=ssl_context,
                                  max_body_bytes=16 * 2**20)
        self._store = EventStore(self.db_path)
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._reads: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        # The store's connections move between threads (one at a time): the worker thread
        # stores, the reader serves GETs in its own thread and the caller's queries.
        self._store.open()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, "receiver-store")
        self._reads = concurrent.futures.ThreadPoolExecutor(1, "receiver-read")
        try:
            return await self._server.start()
        except OSError:
            self._close_db()
            raise

    async def aclose(self) -> None:
        await self._server.aclose()
        self._close_db()

    def _close_db(self) -> None:
        for pool in (self._worker, self._reads):
            if pool is not None:
                pool.shutdown(wait=True)
        self._worker = self._reads = None
        self._store.close()

    @property
    def port(self) -> int | None:
        return self._server.port

    @property
    def url(self) -> str:
        return f"{self._scheme}://{self._server.host}:{self._server.port}/events"

    # ------------------------------------------------------------------ fault helpers

    def inject(self, status: int, count: int = 1, retry_after: str | None = None,
               body: str | None = None) -> None:
        self.faults.status, self.faults.count, self.faults.retry_after = status, count, retry_after
        if body is not None:
            self.faults.body = body

    def inject_commit_then_delay(self, seconds: float, count: int = 1) -> None:
        self.faults.delay_after_commit, self.faults.delay_count = seconds, count

    # ------------------------------------------------------------------ queries

    def stats(self) -> dict[str, int]:
        return self._store.stats()

    def events(self, source: str | None = None) -> list[dict[str, Any]]:
        """Received CloudEvents (parsed), in arrival order."""
        return self._store.events(source)

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: Request) -> Response:
        if request.method in ("GET", "HEAD"):
            loop = asyncio.get_running_loop()
            if request.path.rstrip("/") == "/events":
                return Response.json(await loop.run_in_executor(
                    self._reads, self.events, request.query.get("source")))
            if request.path.rstrip("/") == "/stats":
                return Response.json(await loop.run_in_executor(self._reads, self.stats))
            return Response.json({"error": "not found"}, 404)
        if request.method != "POST":
            return Response.json({"error": "use POST to deliver, GET /events or /stats"}, 405,
                                 {"Allow": "GET, POST"})
        arrived = time.monotonic()
        response, ids = await self._post(request)
        self.requests.append(SeenRequest(request.method, request.path, dict(request.headers),
                                         ids, response.status, arrived))
        return response

    async def _post(self, request: Request) -> tuple[Response, list[str]]:
        f = self.faults
        if f.require_token is not None and \
                request.headers.get("authorization") != f"Bearer {f.require_token}":
            return Response.json({"error": "missing or wrong bearer token"}, 401), []
        if f.status is not None and f.count > 0:
            f.count -= 1
            headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
            return Response(f.status, f.body.encode(), headers), []
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (CE_SINGLE, CE_BATCH):
            return Response.json({"error": f"content type must be {CE_SINGLE} or {CE_BATCH}"},
                                 415), []
        response, ids = await asyncio.get_running_loop().run_in_executor(
            self._worker, self._ingest, ctype, request.body)
        if f.delay_after_commit > 0 and f.delay_count > 0:
            f.delay_count -= 1
            await asyncio.sleep(f.delay_after_commit)  # committed already: the client times out
        return response, ids

    def _ingest(self, ctype: str, body: bytes) -> tuple[Response, list[str]]:
        """Parse, check and store one POST body (in the worker thread)."""
        try:
            items = split_array(body, MAX_BATCH_EVENTS) if ctype == CE_BATCH else None
        except TooMany:
            return Response.json({"error": f"at most {MAX_BATCH_EVENTS} events per batch"},
                                 413), []
        if items is not None:
            return self._batch([d for d, _ in items], [t for _, t in items])
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return Response.json({"error": f"body is not JSON: {type(exc).__name__}"}, 400), []
        if ctype == CE_SINGLE:
            return self._single(doc, len(body))
        if isinstance(doc, list) and len(doc) > MAX_BATCH_EVENTS:
            return Response.json({"error": f"at most {MAX_BATCH_EVENTS} events per batch"},
                                 413), []
        return self._batch(doc)

    def _single(self, doc: Any, size: int) -> tuple[Response, list[str]]:
        if not isinstance(doc, dict):
            return Response.json({"error": "expected one CloudEvent (a JSON object)"}, 400), []
        event_id = doc.get("id") if is_text(doc.get("id")) else None
        ids = [event_id] if event_id else []
        limit = self.faults.max_event_bytes
        if limit is not None and size > limit:
            return Response.json({"id": event_id, "status": 413,
                                  "detail": f"event larger than {limit} bytes"}, 413), ids
        status, detail = self._verdict(doc)
        if status == 201:
            status, detail = self._commit([doc], [compact(doc)])[0]
        return Response.json({"id": event_id, "status": status, "detail": detail}, status), ids

    def _batch(self, doc: Any, texts: list[str] | None = None) -> tuple[Response, list[str]]:
        """``texts``: each item's JSON text when the array was split (else re-encoded)."""
        if not isinstance(doc, list) or not doc:
            return Response.json({"error": "expected a non-empty JSON array of CloudEvents"},
                                 400), []
        ids = [d["id"] for d in doc if isinstance(d, dict) and is_text(d.get("id"))]
        limit = self.faults.max_batch_events
        if limit is not None and len(doc) > limit:
            return Response.json({"error": f"at most {limit} events per batch"}, 413), ids
        verdicts = [self._verdict(d) for d in doc]
        if self.faults.atomic_batches:
            bad = [(d, v) for d, v in zip(doc, verdicts, strict=True) if v[0] != 201]
            if bad:
                item, (status, detail) = bad[0]
                where = item.get("id") if isinstance(item, dict) else None
                return Response.json({"error": f"event {where}: {detail}"}, status), ids
        texts = texts if texts is not None else [""] * len(doc)
        good = [(d, t) for d, t, v in zip(doc, texts, verdicts, strict=True) if v[0] == 201]
        stored = iter(self._commit([d for d, _ in good], [t or compact(d) for d, t in good]))
        results = []
        for item, given in zip(doc, verdicts, strict=True):
            status, detail = next(stored) if given[0] == 201 else given
            item_id = item.get("id") if isinstance(item, dict) else None
            results.append({"id": item_id if is_text(item_id) else None,
                            "status": status, "detail": detail})
        return Response.json({"results": results}, 207), ids

    def _verdict(self, doc: Any) -> tuple[int, str]:
        """(201, "") for an acceptable CloudEvent, else (4xx, why); a hook for test receivers
        that refuse more (``_post`` is the other one)."""
        return verdict(doc, self.faults.reject_ids)

    def _commit(self, docs: list[dict[str, Any]], texts: list[str]) -> list[tuple[int, str]]:
        """Store (committed on return), echo the new events; the verdict of each."""
        out, new = self._store.store(docs, texts)
        if self._echo is not None:
            for doc in new:
                self._echo(doc)
        return out
