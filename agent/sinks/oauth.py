"""OAuth2 client-credentials tokens for HTTP sinks (RFC 6749 section 4.4).

States of the cached token::

    none --token()--> fetching --200--> cached --(expires_in - refresh_before passed)--> none
                         |                 |
                         |                 +--invalidate() (a 401 from the API)--------> none
                         +--400/401/403--> OAuth2RejectedError   (hold: fix the credentials)
                         +--5xx/network--> OAuth2UnavailableError (retry with backoff)

- The client authenticates with HTTP Basic (``client_auth: basic``, the RFC's default) or with
  the id and secret in the form body (``client_auth: post``); ``scope`` is sent when given.
- The secret is read (``Secret.reveal()``) at every fetch, so a rotated credential file is used
  at the next fetch without a restart.
- ``requests`` counts token requests (tests and /status use it); the token itself never appears
  in logs, errors or repr.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import httpx

from agent.sinks.base import is_header_token
from agent.sinks.config import OAuth2ClientAuth, OAuth2Config
from config.errors import PermanentError, RetryableError
from config.redaction import add_secret_values
from config.secrets import SecretResolutionError

__all__ = ["OAuth2Error", "OAuth2RejectedError", "OAuth2Token", "OAuth2UnavailableError"]

log = logging.getLogger(__name__)


class OAuth2Error(Exception):
    """Base of the token errors below (never carries the secret or a token)."""


class OAuth2RejectedError(OAuth2Error, PermanentError):
    """The token endpoint refused our credentials: hold the sink until a person fixes them."""


class OAuth2UnavailableError(OAuth2Error, RetryableError):
    """The token endpoint could not be reached or failed: retry later."""


class OAuth2Token:
    def __init__(self, config: OAuth2Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._token: str | None = None
        self._valid_until: float | None = None
        self.requests = 0

    def __repr__(self) -> str:
        return f"OAuth2Token(token_url={self.config.token_url!r}, cached={self.cached})"

    @property
    def cached(self) -> bool:
        if self._token is None:
            return False
        return self._valid_until is None or self._clock() < self._valid_until

    def invalidate(self) -> None:
        self._token, self._valid_until = None, None

    async def get(self, http: httpx.AsyncClient) -> str:
        """The cached token, or a new one when there is none or it is about to expire."""
        if not self.cached:
            await self.refresh(http)
        assert self._token is not None
        return self._token

    async def refresh(self, http: httpx.AsyncClient) -> None:
        cfg = self.config
        try:
            secret = cfg.client_secret.reveal()
        except SecretResolutionError as exc:
            raise OAuth2RejectedError(f"OAuth2 client secret unavailable: {exc}") from exc
        form = {"grant_type": "client_credentials"}
        if cfg.scope:
            form["scope"] = cfg.scope
        extra: dict[str, Any] = {}
        if cfg.client_auth is OAuth2ClientAuth.POST:
            form.update(client_id=cfg.client_id, client_secret=secret)
        else:
            extra["auth"] = httpx.BasicAuth(cfg.client_id, secret)
        self.requests += 1
        started = self._clock()
        try:
            response = await http.post(cfg.token_url, data=form,
                                        headers={"Accept": "application/json"}, **extra)
        except httpx.HTTPError as exc:
            raise OAuth2UnavailableError(f"OAuth2 token endpoint {cfg.token_url}: "
                                         f"{type(exc).__name__}") from exc
        if response.status_code in (400, 401, 403):
            raise OAuth2RejectedError(f"OAuth2 token endpoint refused the client credentials "
                                      f"(HTTP {response.status_code}"
                                      f"{_error_code(response.content)})")
        if response.status_code != 200:
            raise OAuth2UnavailableError(f"OAuth2 token endpoint answered HTTP "
                                         f"{response.status_code}")
        token, expires_in = _parse(response.content)
        if token is None:
            raise OAuth2UnavailableError("OAuth2 token endpoint answered without access_token")
        add_secret_values([token, secret])
        if not is_header_token(token):
            raise OAuth2RejectedError("OAuth2 token endpoint answered an access_token that is "
                                      "not a valid HTTP header value")
        self._token = token
        self._valid_until = None if expires_in is None else \
            started + max(0.0, expires_in - cfg.refresh_before)
        log.debug("OAuth2 token fetched from %s (expires in %s s)", cfg.token_url, expires_in)


def _parse(content: bytes) -> tuple[str | None, float | None]:
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(doc, dict) or not isinstance(doc.get("access_token"), str):
        return None, None
    expires = doc.get("expires_in")
    # isascii: str.isdigit() is true for '²' and other digits int() refuses.
    if isinstance(expires, str) and expires.isascii() and expires.isdigit():
        expires = int(expires)
    if isinstance(expires, bool) or not isinstance(expires, int | float) \
            or not math.isfinite(expires) or expires <= 0:
        expires = None
    return doc["access_token"], None if expires is None else float(expires)


def _error_code(content: bytes) -> str:
    """The RFC 6749 ``error`` code (a short word, safe to log), if any."""
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return ""
    code = doc.get("error") if isinstance(doc, dict) else None
    return f": {code}" if isinstance(code, str) and code.isascii() and len(code) < 64 else ""
