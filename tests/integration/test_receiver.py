"""The tiny HTTP server and the reference receiver, over real loopback sockets."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from agent.httpserver import HttpServer, Request, Response
from agent.receiver import CE_BATCH, CE_SINGLE, Receiver, serve_receiver

REPO = Path(__file__).resolve().parents[2]


def ce(i, source="/sites/s/lines/l/machines/m1", **extra):
    doc = {"specversion": "1.0", "id": f"ev-{i}", "source": source,
           "type": "plantedge.scrap.recorded", "time": "2026-01-01T00:00:00.000Z",
           "datacontenttype": "application/json", "data": {"quantity": i}}
    doc.update(extra)
    return doc


async def raw_exchange(port, data, read_timeout=5.0):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


# ---------------------------------------------------------------------------- HttpServer


@pytest.fixture
async def echo_server():
    seen = []

    async def handler(req: Request) -> Response:
        seen.append(req)
        if req.path == "/boom":
            raise RuntimeError("handler bug")
        return Response.json({"method": req.method, "path": req.path, "query": req.query,
                              "len": len(req.body), "ua": req.headers.get("user-agent")})

    server = HttpServer(handler, "127.0.0.1", 0, max_body_bytes=1000, header_timeout=0.5)
    port = await server.start()
    assert server.port == port and port > 0
    yield server, seen
    await server.aclose()


async def test_server_keeps_the_connection_alive_and_parses_requests(echo_server):
    server, seen = echo_server
    peers = set()
    async with httpx.AsyncClient() as client:
        for i in range(3):
            r = await client.post(f"http://127.0.0.1:{server.port}/a%20b?x=1&y=2",
                                  content=b"x" * i)
            assert r.status_code == 200
            assert r.json() == {"method": "POST", "path": "/a b", "query": {"x": "1", "y": "2"},
                                "len": i, "ua": client.headers["user-agent"]}
            peers.add(r.extensions["network_stream"].get_extra_info("client_addr"))
    assert None not in peers
    assert len(seen) == 3
    assert len(peers) == 1  # one keep-alive connection served all three


async def test_handler_exception_is_500_and_server_survives(echo_server, caplog):
    server, _ = echo_server
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{server.port}/boom")
        assert r.status_code == 500
        r = await client.get(f"http://127.0.0.1:{server.port}/fine")
        assert r.status_code == 200
    assert "handler bug" in caplog.text


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", b"411"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", b"413"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
])
async def test_bad_requests_get_a_clear_status_and_close(echo_server, raw, status):
    server, seen = echo_server
    answer = await raw_exchange(server.port, raw)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in answer
    assert seen == []


async def test_slow_request_head_times_out_with_408(echo_server):
    server, _ = echo_server
    answer = await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert answer.startswith(b"HTTP/1.1 408")


async def test_http10_closes_and_head_has_no_body(echo_server):
    server, _ = echo_server
    answer = await raw_exchange(server.port, b"HEAD /x HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in head
    assert body == b""


async def test_aclose_is_idempotent_and_closes_idle_connections():
    async def handler(req):
        return Response.text("ok")

    server = HttpServer(handler, "127.0.0.1", 0)
    port = await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
    await server.aclose()
    await server.aclose()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed the idle connection
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# ---------------------------------------------------------------------------- Receiver


@pytest.fixture
async def receiver(tmp_path):
    echoed = []
    rx = Receiver(tmp_path / "rx.db", "127.0.0.1", 0, echo=echoed.append)
    await rx.start()
    rx.echoed = echoed
    yield rx
    await rx.aclose()


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=5) as c:
        yield c


async def post(client, rx, body, ctype, **headers):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(rx.url, content=content,
                             headers={"Content-Type": ctype, **headers})


async def test_single_event_201_then_409_and_echo_only_once(receiver, client):
    r = await post(client, receiver, ce(1), CE_SINGLE)
    assert r.status_code == 201
    assert r.json()["id"] == "ev-1"
    r = await post(client, receiver, ce(1), CE_SINGLE)
    assert r.status_code == 409
    assert receiver.stats() == {"received": 1, "duplicates": 1}
    assert [e["id"] for e in receiver.echoed] == ["ev-1"]


async def test_same_id_from_another_source_is_a_different_event(receiver, client):
    await post(client, receiver, ce(1), CE_SINGLE)
    r = await post(client, receiver, ce(1, source="/sites/s/lines/l/machines/m2"), CE_SINGLE)
    assert r.status_code == 201
    r = await client.get(f"http://127.0.0.1:{receiver.port}/events",
                         params={"source": "/sites/s/lines/l/machines/m2"})
    assert [(e["id"], e["source"]) for e in r.json()] == \
        [("ev-1", "/sites/s/lines/l/machines/m2")]


async def test_batch_answers_207_per_item_in_request_order(receiver, client):
    await post(client, receiver, ce(2), CE_SINGLE)
    bad = ce(3)
    del bad["source"]
    receiver.faults.reject_ids = {"ev-4"}
    body = [ce(1), ce(2), bad, ce(4), {"specversion": "0.3", "id": "ev-5"}, "not an object"]
    r = await post(client, receiver, body, CE_BATCH)
    assert r.status_code == 207
    results = r.json()["results"]
    assert [(x["id"], x["status"]) for x in results] == [
        ("ev-1", 201), ("ev-2", 409), ("ev-3", 400), ("ev-4", 422), ("ev-5", 400), (None, 400)]
    assert "source" in results[2]["detail"]
    assert "specversion" in results[4]["detail"]
    stats = (await client.get(f"http://127.0.0.1:{receiver.port}/stats")).json()
    assert stats == {"received": 2, "duplicates": 1}
    assert [e["id"] for e in receiver.echoed] == ["ev-2", "ev-1"]


async def test_batch_duplicates_within_and_across_batches_each_get_409(receiver, client):
    # Pretty-printed on purpose: each item is stored as sent and read back as the same event.
    body = json.dumps([ce(1), ce(2)], indent=2).encode()
    r = await post(client, receiver, body, CE_BATCH)
    assert [(x["id"], x["status"]) for x in r.json()["results"]] == [("ev-1", 201), ("ev-2", 201)]
    r = await post(client, receiver, [ce(3), ce(2), ce(3), ce(4)], CE_BATCH)
    assert [(x["id"], x["status"]) for x in r.json()["results"]] == [
        ("ev-3", 201), ("ev-2", 409), ("ev-3", 409), ("ev-4", 201)]
    assert receiver.stats() == {"received": 4, "duplicates": 2}
    assert receiver.events() == [ce(1), ce(2), ce(3), ce(4)]
    assert [e["id"] for e in receiver.echoed] == ["ev-1", "ev-2", "ev-3", "ev-4"]


async def test_atomic_batches_refuse_the_whole_batch(receiver, client):
    receiver.faults.atomic_batches = True
    receiver.faults.reject_ids = {"ev-2"}
    r = await post(client, receiver, [ce(1), ce(2), ce(3)], CE_BATCH)
    assert r.status_code == 422
    assert "ev-2" in r.json()["error"]
    assert receiver.stats()["received"] == 0


@pytest.mark.parametrize(("body", "ctype", "status"), [
    (b"{not json", CE_SINGLE, 400),
    (b"[1, 2", CE_BATCH, 400),
    (b"[]", CE_BATCH, 400),
    (b"[" + json.dumps(ce(1)).encode() + b"] trailing", CE_BATCH, 400),
    (b"[" + json.dumps(ce(1)).encode() + b",]", CE_BATCH, 400),
    (b"\xff[]", CE_BATCH, 400),
    (json.dumps(ce(1)).encode(), CE_BATCH, 400),  # a batch must be an array
    (json.dumps([ce(1)]).encode(), CE_SINGLE, 400),  # a single event must be an object
    (json.dumps(ce(1)).encode(), "text/plain", 415),
])
async def test_bad_bodies_are_refused_and_store_nothing(receiver, client, body, ctype, status):
    r = await post(client, receiver, body, ctype)
    assert r.status_code == status
    assert "error" in r.json() or r.json().get("status") == status
    assert receiver.stats()["received"] == 0


async def test_injected_faults(receiver, client):
    receiver.inject(503, count=2, retry_after="7")
    for _ in range(2):
        r = await post(client, receiver, ce(1), CE_SINGLE)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "7"
    assert (await post(client, receiver, ce(1), CE_SINGLE)).status_code == 201

    receiver.faults.require_token = "s3cret"
    assert (await post(client, receiver, ce(2), CE_SINGLE)).status_code == 401
    r = await post(client, receiver, ce(2), CE_SINGLE, Authorization="Bearer s3cret")
    assert r.status_code == 201

    receiver.faults.max_batch_events = 2
    r = await post(client, receiver, [ce(3), ce(4), ce(5)], CE_BATCH,
                   Authorization="Bearer s3cret")
    assert r.status_code == 413
    assert receiver.stats()["received"] == 2
    assert [x.status for x in receiver.requests] == [503, 503, 201, 401, 201, 413]
    assert receiver.requests[-1].ids == ["ev-3", "ev-4", "ev-5"]


async def test_commit_then_delay_commits_before_answering(receiver):
    receiver.inject_commit_then_delay(2.0)
    async with httpx.AsyncClient(timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            await post(c, receiver, ce(1), CE_SINGLE)
        # The event is stored although the client never saw the answer.
        assert receiver.stats()["received"] == 1
        r = await post(c, receiver, ce(1), CE_SINGLE)
        assert r.status_code == 409
    assert receiver.stats() == {"received": 1, "duplicates": 1}


async def test_dedup_survives_a_restart(tmp_path, client):
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    assert (await post(client, rx, ce(1), CE_SINGLE)).status_code == 201
    await rx.aclose()
    rx = Receiver(tmp_path / "rx.db")
    await rx.start()
    try:
        assert (await post(client, rx, ce(1), CE_SINGLE)).status_code == 409
        assert rx.stats() == {"received": 1, "duplicates": 1}
    finally:
        await rx.aclose()


async def test_unknown_routes_and_methods(receiver, client):
    base = f"http://127.0.0.1:{receiver.port}"
    assert (await client.get(f"{base}/nope")).status_code == 404
    assert (await client.delete(f"{base}/events")).status_code == 405


async def test_serve_receiver_until_stopped(tmp_path, capsys):
    # Find a free port, then serve on it through the CLI entry's coroutine.
    probe = HttpServer(lambda r: None, "127.0.0.1", 0)  # type: ignore[arg-type]
    port = await probe.start()
    await probe.aclose()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_receiver(f"127.0.0.1:{port}", tmp_path / "r.db", True, stop))
    async with httpx.AsyncClient(timeout=5) as c:
        for _ in range(200):
            try:
                r = await c.post(f"http://127.0.0.1:{port}/x", content=json.dumps(ce(9)),
                                 headers={"Content-Type": CE_SINGLE})
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
        assert r.status_code == 201
    stop.set()
    await asyncio.wait_for(task, 5)
    out = capsys.readouterr()
    assert json.loads(out.out.strip())["id"] == "ev-9"  # --print echoes new events
    assert f"127.0.0.1:{port}" in out.err


async def test_serve_receiver_refuses_a_bad_listen_address(tmp_path):
    with pytest.raises(ValueError, match="HOST:PORT"):
        await serve_receiver("nonsense", tmp_path / "r.db", False, asyncio.Event())


async def test_run_receiver_process_stops_cleanly_on_sigterm(tmp_path):
    import signal
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; from pathlib import Path; from agent.receiver import run_receiver; "
            f"sys.exit(run_receiver('127.0.0.1:{port}', Path(sys.argv[1]), True))")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(tmp_path / "r.db"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=REPO)
    try:
        banner = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert f"127.0.0.1:{port}".encode() in banner
        async with httpx.AsyncClient(timeout=5) as c:
            r = await c.post(f"http://127.0.0.1:{port}/", content=json.dumps(ce(3)),
                             headers={"Content-Type": CE_SINGLE})
            assert r.status_code == 201
        line = await asyncio.wait_for(proc.stdout.readline(), 5)
        assert json.loads(line)["id"] == "ev-3"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_run_receiver_reports_a_port_in_use(tmp_path, capsys):
    import socket

    from agent.receiver import run_receiver

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert run_receiver(f"127.0.0.1:{port}", tmp_path / "r.db", False) == 1
    assert "cannot serve" in capsys.readouterr().err
