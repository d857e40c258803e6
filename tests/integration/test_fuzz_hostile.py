"""Fuzzing the two parsers that face untrusted input (issue 11): HTTP requests on a real socket
and configuration YAML built to nest and expand. Bounded in examples and time; every input is
answered or refused, never a traceback, and memory stays bounded."""

from __future__ import annotations

import asyncio
import logging
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.httpserver import HttpServer, Request, Response
from agent.wiring.load import load_config_text
from config.errors import ConfigError

# --------------------------------------------------------------------------- HTTP

TOKENS = [b"GET", b"POST", b"HEAD", b"PUT", b" ", b"/", b"/healthz", b"?a=1&b", b"%ff", b"%",
          b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.9", b"HTTP/2", b"\r\n", b"\n", b"\r", b":",
          b"Host: x", b"Content-Length: ", b"Transfer-Encoding: chunked", b"Connection: close",
          b"0", b"5", b"-1", b"99999999999999999999", "²".encode(), b"\x00", b"\xff", b"\t",
          b"hello", b"\r\n\r\n", b"X-A: " + b"a" * 100]

requests = st.one_of(
    st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
    st.binary(max_size=300),
    st.builds(lambda method, target, headers, body: method + b" " + target + b" HTTP/1.1\r\n"
              + b"".join(headers) + b"\r\n" + body,
              st.sampled_from([b"GET", b"POST", b"DELETE", b"G\x00T"]),
              st.sampled_from([b"/", b"/x?y=%zz", b"*", b"http://h/p", b"/\xc3\xa9"]),
              st.lists(st.sampled_from([b"Host: x\r\n", b"Content-Length: 3\r\n",
                                        b"Content-Length: 3, 4\r\n", b"Bad Header\r\n",
                                        b"Connection: close\r\n", b" folded\r\n"]),
                       max_size=5),
              st.binary(max_size=8)),
)


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        writer.write_eof()  # the request is all there is: the server sees the end
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=requests)
def test_any_request_bytes_get_an_answer_or_a_close(raw: bytes) -> None:
    async def handler(req: Request) -> Response:
        return Response.json({"path": req.path, "len": len(req.body)})

    async def scenario() -> bytes:
        server = HttpServer(handler, "127.0.0.1", 0, header_timeout=1.0, max_body_bytes=1000)
        port = await server.start()
        try:
            return await _exchange(port, raw)
        finally:
            await server.aclose()

    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("agent.httpserver")
    logger.addHandler(catcher)
    try:
        answer = asyncio.run(scenario())
    finally:
        logger.removeHandler(catcher)
    assert not records, [r.getMessage() for r in records]
    if answer:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line[:9] == b"HTTP/1.1 " and status_line[9:12].isdigit(), answer[:100]
        assert status_line[9:12] != b"500", answer[:200]


# --------------------------------------------------------------------------- YAML

def _nested(depth: int, flow: bool) -> str:
    if flow:
        return "agent: " + "[" * depth + "]" * depth + "\n"
    return "".join("  " * i + f"k{i}:\n" for i in range(depth)) + "  " * depth + "v: 1\n"


def _aliases(levels: int, width: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


hostile = st.one_of(
    st.builds(_nested, st.integers(1, 400), st.booleans()),
    st.builds(_aliases, st.integers(1, 12), st.integers(1, 12)),
    st.builds(lambda a, b: a + b, st.builds(_aliases, st.integers(1, 8), st.integers(1, 9)),
              st.builds(_nested, st.integers(1, 100), st.booleans())),
)


@pytest.mark.slow  # an expansion to the limit is walked under tracemalloc: ~1 s each
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=hostile)
def test_hostile_yaml_is_refused_in_bounded_memory(text: str) -> None:
    tracemalloc.start()
    try:
        try:
            load_config_text(text, "fuzz.yaml")
        except ConfigError as exc:
            assert exc.issues and all(str(i) for i in exc.issues)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MiB for {len(text)} bytes of YAML"


@pytest.mark.parametrize("text", [_aliases(9, 9), _nested(1000, True), _nested(1000, False)])
def test_the_worst_cases_are_located_errors(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, "fuzz.yaml")
    issue: Any = caught.value.issues[0]
    assert issue.line is not None and ("nested" in issue.message
                                       or "expands" in issue.message)
