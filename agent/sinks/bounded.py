"""POST with an answer of bounded size: a peer cannot make the agent hold more than
``limit`` bytes of its answer in memory.

httpx's ``post`` reads the whole answer, and its read timeout applies per chunk: a central API
or token endpoint (or anything between it and us on a plain-HTTP link) that streams an endless
body would grow the agent until the service's memory limit kills it, again after every restart.
The sinks only ever need a short answer (a 207 verdict list, a token, an error excerpt).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

__all__ = ["AnswerTooLarge", "post_bounded"]


class AnswerTooLarge(Exception):
    """The answer's body was longer than the limit; the connection was dropped unread."""

    def __init__(self, status: int, limit: int) -> None:
        super().__init__(f"HTTP {status} answer larger than {limit} bytes; not read")
        self.status = status


async def post_bounded(http: httpx.AsyncClient, url: str | httpx.URL, limit: int,
                       read_within: float, **kwargs: Any) -> httpx.Response:
    """``http.post(url, **kwargs)`` whose answer body is at most ``limit`` bytes (else
    ``AnswerTooLarge``) and arrives within ``read_within`` seconds of its head (else
    ``httpx.ReadTimeout``: a peer dripping a byte just inside the per-chunk timeout would hold
    the sink for hours); the returned response has its content read."""
    async with http.stream("POST", url, **kwargs) as response:
        declared = response.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise AnswerTooLarge(response.status_code, limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(read_within):
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise AnswerTooLarge(response.status_code, limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise httpx.ReadTimeout(f"answer body not read within {read_within:g}s",
                                    request=response.request) from None
    # The chunks are decoded already: without its content coding (gzip, ...) and framing
    # headers, the new response does not decode them a second time.
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in _DECODED]
    return httpx.Response(response.status_code, headers=headers,
                          content=b"".join(chunks), request=response.request)


_DECODED = ("content-encoding", "content-length", "transfer-encoding")
