"""Configuration of the sinks: the HTTP delivery contract's endpoint, auth, TLS and retries,
and the broker sinks (MQTT Unified Namespace, NATS JetStream).

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
from config.units import Duration, DurationOrZero

__all__ = ["HttpAuth", "HttpSinkConfig", "HttpTarget", "MqttSinkConfig", "NatsSinkConfig",
           "OAuth2ClientAuth", "OAuth2Config", "RetryPolicy", "SinkConfig", "SinkMode", "TlsConfig",
           "check_headers", "check_http_url"]


def check_http_url(v: str) -> str:
    """An http:// or https:// URL with a host (shared by every URL field of the agent), with
    no space or control character anywhere (a ``${env:...}`` value with a line break made a
    URL that every request then failed on, retried forever)."""
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"'{v}' is not an http:// or https:// URL")
    if _UNSAFE.search(v):
        raise ValueError("the URL contains a space, line break or control character (from a "
                         "${env:...} or ${file:...} value?); percent-encode it")
    return v


_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")
# RFC 9110: a field name is a token; a value has no control character but tab and no
# leading or trailing whitespace (a line break in it would be header injection; httpx
# refuses it at every request instead), and httpx sends values as ASCII.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")


def check_headers(headers: dict[str, str]) -> dict[str, str]:
    """Static headers: valid names and values; the message names the header, never the value
    (it may be a secret)."""
    for name, value in headers.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP field name")
        if not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"the value of header {name!r} is not a valid HTTP header value "
                             "(a line break, control or non-ASCII character, or a leading or "
                             "trailing space)")
    return headers


class HttpTarget(Strict):
    """Checks shared by every model that posts to an HTTP endpoint: its ``url`` and static
    ``headers`` fields (declared by each subclass, with its own description and order)."""

    @field_validator("url", check_fields=False)
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v)

    @field_validator("headers", check_fields=False)
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return check_headers(v)


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
    refresh_before: DurationOrZero = Field(30.0, description="Fetch a new token this long before "
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


class HttpSinkConfig(HttpTarget):
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


# --------------------------------------------------------------------------- brokers

_BROKER_URL = re.compile(r"^(?P<scheme>[a-z]+)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+)"
                         r"(?::(?P<port>[0-9]{1,5}))?/?$")
_TEMPLATE_KEYS = ("site", "line", "machine", "type", "agent")


def _broker_url(url: str, plain: str, secure: str) -> re.Match[str]:
    """``url`` parsed as scheme://host[:port] with one of the two schemes given, and no
    credentials in it."""
    m = _BROKER_URL.match(url)
    if not m or m["scheme"] not in (plain, secure):
        raise ValueError(f"'{url}' is not {plain}://host[:port] or {secure}://host[:port]")
    if "@" in m["host"]:
        # nats-py would take it as a token or user:password, and the URL is in every
        # error message, log line and /status: credentials have their own keys.
        raise ValueError(f"'{url.split('@')[-1]}' carries credentials before '@': give them "
                         "as username/password or token (from a secret), not in the URL")
    return m


def _check_template(v: str, what: str) -> str:
    """A topic/subject template: only the known ``{placeholders}``, no wildcards."""
    keys = re.findall(r"{([^{}]*)}", v)
    unknown = [k for k in keys if k not in _TEMPLATE_KEYS]
    if unknown:
        raise ValueError(f"unknown placeholder '{{{unknown[0]}}}' in {what} '{v}'; use "
                         + ", ".join("{" + k + "}" for k in _TEMPLATE_KEYS))
    if any(c in v for c in "+#*>") or not v:
        raise ValueError(f"{what} '{v}' must not be empty or contain wildcards (+ # * >)")
    return v


class MqttSinkConfig(Strict):
    type: Literal["mqtt"] = Field(description="MQTT broker (Unified Namespace): one QoS 1 "
                                  "publish per event, settled on the PUBACK.")
    url: str = Field(description="mqtt://host[:port] (default port 1883) or mqtts://host[:port] "
                     "(TLS, default port 8883).")
    protocol: Literal["3.1.1", "5"] = Field("5", description="MQTT protocol version. With 5 "
                                            "the event id also travels as the user property "
                                            "'id', the content type is set, and a refused "
                                            "publish comes back with a reason code.")
    client_id: str | None = Field(None, min_length=1, max_length=128, description="Client id; "
                                  "stable across restarts for the persistent session (default: "
                                  "<agent id>-<sink id>).")
    username: str | None = Field(None, description="User name, if the broker wants one.")
    password: Secret | None = Field(None, description="Password: ${env:NAME} or ${file:/path}.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for mqtts:// URLs: "
                           "private CA, client certificate (mutual TLS).")
    topic: str = Field("{site}/{line}/{machine}/events/{type}", description="Topic of each "
                       "event. Placeholders: {site} {line} {machine} from the event source, "
                       "{type} the event type without 'plantedge.' (e.g. downtime.started), "
                       "{agent} the agent id. Agent events (data gaps) use line '_agent' and "
                       "the agent id as machine.")
    state_topic: str | None = Field(None, description="Optional retained state topic per "
                                    "machine, e.g. '{site}/{line}/{machine}/state': current "
                                    "state, open downtime and order, derived from the events "
                                    "delivered.")
    session: Literal["persistent", "clean"] = Field("persistent", description="'persistent': "
                                                    "the broker keeps the session (MQTT 5 "
                                                    "clean_start false + session_expiry; 3.1.1 "
                                                    "clean_session false).")
    session_expiry: Duration = Field(86400.0, description="MQTT 5: how long the broker keeps "
                                     "the session after a disconnect.")
    keep_alive: Duration = Field(30.0, description="Keep-alive interval.")
    connect_timeout: Duration = Field(10.0, description="Time allowed for TCP, TLS and "
                                      "CONNACK.")
    ack_timeout: Duration = Field(30.0, description="Time allowed for the PUBACKs of one "
                                  "attempt; unacknowledged events are sent again.")
    batch_max_events: int = Field(500, ge=1, le=10000, description="Events published (in "
                                  "flight) per attempt.")
    max_in_flight: int = Field(2, ge=1, le=64, description="Attempts out at once on the one "
                               "connection (each carries other machines' events: a machine's "
                               "event is never sent before its earlier ones were accepted or "
                               "dead-lettered). 1 waits for every PUBACK of a batch before the "
                               "next.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retry backoff.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        m = _broker_url(v, "mqtt", "mqtts")
        if m["port"] and not 0 < int(m["port"]) < 65536:
            raise ValueError(f"port {m['port']} of '{v}' is out of range")
        return v

    @field_validator("topic", "state_topic")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return None if v is None else _check_template(v, "topic")

    @property
    def use_tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        m = _BROKER_URL.match(self.url)
        assert m is not None
        return m["host"].strip("[]")

    @property
    def port(self) -> int:
        m = _BROKER_URL.match(self.url)
        assert m is not None
        return int(m["port"]) if m["port"] else (8883 if self.use_tls else 1883)


class NatsSinkConfig(Strict):
    type: Literal["nats"] = Field(description="NATS JetStream: one publish per event with "
                                  "header Nats-Msg-Id = event id, settled on the stream's "
                                  "acknowledgement.")
    servers: list[str] = Field(min_length=1, description="Server URLs: nats://host:port or "
                               "tls://host:port (TLS).")
    subject: str = Field("plantedge.{site}.{line}.{machine}.{type}", description="Subject of "
                         "each event; placeholders as for the MQTT topic. A stream must cover "
                         "it (for instance subjects 'plantedge.>').")
    stream: str | None = Field(None, description="The stream expected to store the events; "
                               "when given, an acknowledgement from another stream holds the "
                               "sink.")
    token: Secret | None = Field(None, description="Authentication token.")
    username: str | None = Field(None, description="User name (with 'password').")
    password: Secret | None = Field(None, description="Password: ${env:NAME} or ${file:/path}.")
    credentials_file: Path | None = Field(None, description="NATS credentials file (.creds: "
                                          "user JWT and NKey seed).")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for tls:// URLs: "
                           "private CA, client certificate (mutual TLS).")
    connect_timeout: Duration = Field(10.0, description="Time allowed to connect.")
    ack_timeout: Duration = Field(30.0, description="Time allowed for the acknowledgements of "
                                  "one attempt; unacknowledged events are sent again.")
    batch_max_events: int = Field(500, ge=1, le=10000, description="Events published (in "
                                  "flight) per attempt.")
    max_in_flight: int = Field(2, ge=1, le=64, description="Attempts out at once on the one "
                               "connection (each carries other machines' events: a machine's "
                               "event is never sent before its earlier ones were accepted or "
                               "dead-lettered). 1 waits for every acknowledgement of a batch "
                               "before the next.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="Retry backoff.")

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for url in v:
            _broker_url(url, "nats", "tls")
        return v

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        if " " in v or ".." in v or v.startswith(".") or v.endswith("."):
            raise ValueError(f"subject '{v}' has an empty token or a space")
        return _check_template(v, "subject")

    @model_validator(mode="after")
    def _auth(self) -> NatsSinkConfig:
        given = [k for k in ("token", "username", "credentials_file")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of 'token', 'username'/'password' or "
                             f"'credentials_file', not {' and '.join(given)}")
        if (self.username is None) != (self.password is None):
            raise ValueError("'username' and 'password' go together")
        return self


SinkConfig = Annotated[HttpSinkConfig | MqttSinkConfig | NatsSinkConfig,
                       Field(discriminator="type")]
