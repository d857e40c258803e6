"""Configuration of the sinks: the HTTP delivery contract's endpoint, auth, TLS and retries.

The sinks' own config piece; the root schema (``agent/wiring/schema.py``) puts the union of
sink types under ``sinks:``.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from config.base import Strict
from config.secrets import Secret
from config.units import Duration

__all__ = ["HttpAuth", "HttpSinkConfig", "OAuth2ClientAuth", "OAuth2Config", "RetryPolicy",
           "SinkConfig", "SinkMode", "TlsConfig", "check_http_url"]


def check_http_url(v: str) -> str:
    """An http:// or https:// URL with a host (shared by every URL field of the agent)."""
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"'{v}' is not an http:// or https:// URL")
    return v


class SinkMode(StrEnum):
    SINGLE = "single"
    BATCH = "batch"


class OAuth2ClientAuth(StrEnum):
    BASIC = "basic"
    POST = "post"


class OAuth2Config(Strict):
    token_url: str = Field(description="OAuth2 token endpoint (client-credentials grant).")
    client_id: str = Field(description="OAuth2 client id.")
    client_secret: Secret = Field(description="OAuth2 client secret, usually "
                                  "${file:/run/credentials/...}.")
    scope: str | None = Field(None, description="Space-separated scopes to ask for.")
    refresh_before: Duration = Field(30.0, description="Fetch a new token this long before "
                                     "the cached one expires.")
    client_auth: OAuth2ClientAuth = Field(OAuth2ClientAuth.BASIC, description="How the "
                                          "client authenticates to the token endpoint: 'basic' "
                                          "(HTTP Basic, the RFC default) or 'post' (id and "
                                          "secret in the form body).")

    @field_validator("token_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v)


class HttpAuth(Strict):
    bearer_token: Secret | None = Field(None, description="Bearer token, usually "
                                        "${file:/run/credentials/...} or ${env:NAME}.")
    oauth2: OAuth2Config | None = Field(None, description="OAuth2 client credentials: the "
                                        "token is fetched, cached and refreshed before expiry; "
                                        "a 401 triggers one refresh.")

    @model_validator(mode="after")
    def _one(self) -> HttpAuth:
        if self.bearer_token is not None and self.oauth2 is not None:
            raise ValueError("give either 'bearer_token' or 'oauth2', not both")
        return self


class TlsConfig(Strict):
    verify: bool = Field(True, description="Verify the server certificate (default true; "
                         "turning it off is for lab tests only).")
    ca_file: Path | None = Field(None, description="PEM file of the CA(s) to trust instead of "
                                 "the system store (a private plant CA).")
    client_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS.")
    client_key: Path | None = Field(None, description="PEM private key of client_cert.")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("'client_key' needs 'client_cert'")
        return self


class RetryPolicy(Strict):
    initial_backoff: Duration = Field(1.0, description="First retry delay.")
    max_backoff: Duration = Field(60.0, description="Longest retry delay (also caps "
                                  "Retry-After).")


class HttpSinkConfig(Strict):
    type: Literal["http"] = Field(description="HTTP(S) endpoint speaking the delivery contract.")
    url: str = Field(description="Endpoint URL.")
    mode: SinkMode = Field(SinkMode.SINGLE, description="'single': one CloudEvent per request; "
                           "'batch': a JSON array per request.")
    batch_max_events: int = Field(100, ge=1, le=10000, description="Events per batch request.")
    max_in_flight: int = Field(4, ge=1, le=64, description="Requests sent at once (each "
                               "carries other machines' events: a machine's event is never "
                               "sent before its earlier ones were accepted or dead-lettered). "
                               "1 sends one request at a time.")
    timeout: Duration = Field(10.0, description="Timeout of one request (connect, read, write).")
    auth: HttpAuth = Field(default_factory=HttpAuth, description="Authentication.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra static headers.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retry backoff.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for https:// URLs: "
                           "custom CA, client certificate (mutual TLS).")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v)


SinkConfig = Annotated[HttpSinkConfig, Field(discriminator="type")]
