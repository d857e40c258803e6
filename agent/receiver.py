"""The reference central endpoint: the delivery contract (docs/delivery.md) as running code.

``edge-agent receiver --listen HOST:PORT --db FILE [--print]`` serves it; the demo and the tests
use it, and integrators can read it as the contract's executable example.

- ``POST <any path>`` with ``Content-Type: application/cloudevents+json`` (one event) answers
  ``201`` (new), ``409`` (already have it: the agent settles it as accepted), ``400`` (not a
  valid CloudEvent, with a detail). With ``application/cloudevents-batch+json`` (a JSON array)
  it answers ``207`` with ``{"results": [{"id", "status", "detail"}]}``, one result per item in
  request order. A body that is not JSON is ``400``; another content type is ``415``.
- Events are deduplicated by ``(source, id)`` in the receiver's own SQLite file; every duplicate
  is counted. Each new event is committed before it is answered. The file runs in WAL mode with
  ``synchronous=NORMAL``: a commit survives the receiver process crashing (which is what the
  agent's exactly-once test needs); a power cut may lose the last commits, acceptable for a
  reference receiver, not for a production one.
- A batch is stored in one transaction with one ``executemany`` and each event's own JSON text
  (the array is split, not re-encoded); only a batch that meets a duplicate (already stored, or
  twice in the same array) is redone row by row to tell which items are 409.
- ``GET /events[?source=...]`` lists what arrived (arrival order), ``GET /stats`` gives
  ``{"received": n, "duplicates": n}``.

Limits (a reference receiver faces the same network as a production one): parsing, checking
and storing a POST run in one worker thread, never on the event loop, so a large batch does
not stall other connections; a batch holds at most ``MAX_BATCH_EVENTS`` items (more is 413, and
the agent splits); bodies up to 16 MiB on POST, none on GET; ``requests`` keeps only the last
``KEEP_REQUESTS`` (tests read it; nothing grows forever). An item that cannot be stored as it
is (``time`` not a string, text that is not valid Unicode, an over-long id) gets its own 400
in the 207 answer; the rest of the batch is stored.

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
import re
import signal
import sqlite3
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.httpserver import HttpServer, Request, Response
from config.model import format_time, utcnow

__all__ = ["KEEP_REQUESTS", "MAX_BATCH_EVENTS", "Faults", "Receiver", "SeenRequest",
           "run_receiver", "serve_receiver"]

MAX_BATCH_EVENTS = 10_000
KEEP_REQUESTS = 1000
_MAX_ATTRIBUTE = 1024  # characters of id, source, type and time

CE_SINGLE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_INSERT = ("INSERT OR IGNORE INTO received (source, id, type, time, payload, received_at) "
           "VALUES (?, ?, ?, ?, ?, ?)")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    source TEXT NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, time TEXT,
    payload TEXT NOT NULL, received_at TEXT NOT NULL, PRIMARY KEY (source, id));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('duplicates', 0);
"""


@dataclass
class Faults:
    """Misbehaviour on demand; every field is safe to change while the receiver runs."""

    status: int | None = None  # answer the next ``count`` POSTs with this status
    count: int = 0
    retry_after: str | None = None  # Retry-After header sent with the injected status
    body: str = '{"error":"injected fault"}'
    delay_after_commit: float = 0.0  # commit, then wait this long before answering ...
    delay_count: int = 0  # ... for this many POSTs
    reject_ids: set[str] = field(default_factory=set)  # these event ids get 422
    require_token: str | None = None  # 401 unless "Authorization: Bearer <token>"
    max_batch_events: int | None = None  # a bigger batch gets 413
    max_event_bytes: int | None = None  # a single event bigger than this gets 413
    atomic_batches: bool = False  # any bad item refuses the whole batch (422/400), stores none


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


class _TooMany(Exception):
    pass


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
        self._db: sqlite3.Connection | None = None  # the worker's: parse, check, store
        self._reader: sqlite3.Connection | None = None  # queries (WAL: committed rows only)
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._reads: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        # The connections move between threads (one at a time): the worker thread stores,
        # the reader serves GETs in its own thread and the caller's queries.
        self._db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # see the module docstring
        self._db.executescript(_SCHEMA)
        self._reader = sqlite3.connect(self.db_path, isolation_level=None,
                                       check_same_thread=False)
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
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None

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

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("receiver is not started")
        return self._db

    def _read_conn(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError("receiver is not started")
        return self._reader

    def stats(self) -> dict[str, int]:
        db = self._read_conn()
        received = db.execute("SELECT count(*) FROM received").fetchone()[0]
        dups = db.execute("SELECT value FROM counters WHERE name='duplicates'").fetchone()[0]
        return {"received": int(received), "duplicates": int(dups)}

    def events(self, source: str | None = None) -> list[dict[str, Any]]:
        """Received CloudEvents (parsed), in arrival order."""
        sql = "SELECT payload FROM received"
        args: tuple[str, ...] = ()
        if source is not None:
            sql, args = sql + " WHERE source = ?", (source,)
        rows = self._read_conn().execute(sql + " ORDER BY rowid", args).fetchall()
        return [json.loads(r[0]) for r in rows]

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
            items = _split_array(body, MAX_BATCH_EVENTS) if ctype == CE_BATCH else None
        except _TooMany:
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
        event_id = doc.get("id") if _text(doc.get("id")) else None
        ids = [event_id] if event_id else []
        limit = self.faults.max_event_bytes
        if limit is not None and size > limit:
            return Response.json({"id": event_id, "status": 413,
                                  "detail": f"event larger than {limit} bytes"}, 413), ids
        status, detail = self._verdict(doc)
        if status == 201:
            status, detail = self._store([doc], [_compact(doc)])[0]
        return Response.json({"id": event_id, "status": status, "detail": detail}, status), ids

    def _batch(self, doc: Any, texts: list[str] | None = None) -> tuple[Response, list[str]]:
        """``texts``: each item's JSON text when the array was split (else re-encoded)."""
        if not isinstance(doc, list) or not doc:
            return Response.json({"error": "expected a non-empty JSON array of CloudEvents"},
                                 400), []
        ids = [d["id"] for d in doc if isinstance(d, dict) and _text(d.get("id"))]
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
        stored = iter(self._store([d for d, _ in good], [t or _compact(d) for d, t in good]))
        results = []
        for item, verdict in zip(doc, verdicts, strict=True):
            status, detail = next(stored) if verdict[0] == 201 else verdict
            item_id = item.get("id") if isinstance(item, dict) else None
            results.append({"id": item_id if _text(item_id) else None,
                            "status": status, "detail": detail})
        return Response.json({"results": results}, 207), ids

    def _verdict(self, doc: Any) -> tuple[int, str]:
        """(201, "") for an acceptable CloudEvent, else (4xx, why)."""
        if not isinstance(doc, dict):
            return 400, "not a JSON object"
        if doc.get("specversion") != "1.0":
            return 400, "specversion must be \"1.0\""
        for attr in ("id", "source", "type"):
            if not isinstance(doc.get(attr), str) or not doc[attr]:
                return 400, f"missing or empty '{attr}'"
            if not _text(doc[attr]):
                return 400, f"'{attr}' is not valid Unicode text of at most {_MAX_ATTRIBUTE} " \
                    "characters"
        t = doc.get("time")
        if t is not None and not _text(t):
            return 400, f"'time' must be an RFC 3339 string of at most {_MAX_ATTRIBUTE} " \
                "characters"
        if doc["id"] in self.faults.reject_ids:
            return 422, f"event {doc['id']} refused by the receiver (reject_ids)"
        return 201, ""

    def _store(self, docs: list[dict[str, Any]], texts: list[str]) -> list[tuple[int, str]]:
        """Insert in one transaction; (201, "") new or (409, ...) duplicate for each.

        ``texts[i]`` is the JSON text stored for ``docs[i]``. The common case (all new) is one
        ``executemany``; if fewer rows went in than were offered, that attempt is rolled back
        and the batch is redone row by row, so each item gets its own verdict."""
        db = self._conn()
        now = format_time(utcnow())
        rows = [(d["source"], d["id"], d["type"], d.get("time"), t, now)
                for d, t in zip(docs, texts, strict=True)]
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            db.executemany(_INSERT, rows)
            if db.total_changes - before == len(rows):
                out = [(201, "")] * len(rows)
                new = docs
            else:
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                out, new = self._store_each(db, docs, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if self._echo is not None:
            for doc in new:
                self._echo(doc)
        return out

    @staticmethod
    def _store_each(db: sqlite3.Connection, docs: list[dict[str, Any]],
                    rows: list[tuple[Any, ...]]) -> tuple[list[tuple[int, str]],
                                                          list[dict[str, Any]]]:
        out: list[tuple[int, str]] = []
        new: list[dict[str, Any]] = []
        for doc, row in zip(docs, rows, strict=True):
            if db.execute(_INSERT, row).rowcount == 1:
                out.append((201, ""))
                new.append(doc)
            else:
                db.execute("UPDATE counters SET value = value + 1 WHERE name='duplicates'")
                out.append((409, "already received"))
        return out, new


def _text(value: Any) -> bool:
    """A string SQLite can store as text: valid Unicode (no lone surrogate), not too long."""
    if not isinstance(value, str) or not value or len(value) > _MAX_ATTRIBUTE:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _split_array(body: bytes, limit: int) -> list[tuple[Any, str]] | None:
    """The items of a JSON array body, each with its own JSON text; None when the body is not
    a well-formed non-empty array (the caller then parses it whole, for the error message).
    More than ``limit`` items raises ``_TooMany`` (before parsing the rest).

    Storing each item's text as sent saves re-encoding every event: the payload is JSON all
    the same, and ``events()`` parses it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pos = _SPACE.match(text).end()  # type: ignore[union-attr]  # matches the empty string
    if not text.startswith("[", pos):
        return None
    items: list[tuple[Any, str]] = []
    pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
    try:
        while True:
            doc, end = _DECODER.raw_decode(text, pos)
            items.append((doc, text[pos:end]))
            if len(items) > limit:
                raise _TooMany()
            pos = _SPACE.match(text, end).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = _SPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
            elif text.startswith("]", pos):
                break
            else:
                return None
    except (ValueError, RecursionError):
        return None
    if _SPACE.match(text, pos + 1).end() != len(text):  # type: ignore[union-attr]
        return None
    return items


def _print_event(doc: dict[str, Any]) -> None:
    print(json.dumps(doc, separators=(",", ":")), flush=True)


async def serve_receiver(listen: str, db: Path, echo: bool,
                         stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set or SIGINT/SIGTERM arrives."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"'{listen}' is not HOST:PORT (for example 127.0.0.1:8080)")
    stop = stop or asyncio.Event()
    receiver = Receiver(db, host.strip("[]"), int(port_text),
                        echo=_print_event if echo else None)
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread: the caller stops us through ``stop``
    try:
        port = await receiver.start()
        print(f"receiver listening on http://{host}:{port}/ (database {db})",
              file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await receiver.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_receiver(listen: str, db: Path, echo: bool) -> int:
    """Entry point for ``edge-agent receiver``: serve until SIGINT/SIGTERM; the exit code."""
    try:
        asyncio.run(serve_receiver(listen, db, echo))
    except ValueError as exc:
        print(f"edge-agent receiver: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-agent receiver: cannot serve on {listen} with {db}: {exc}",
              file=sys.stderr)
        return 1
    return 0
