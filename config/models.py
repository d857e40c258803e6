"""The configuration schema (DESIGN section 6).

Strict on purpose: unknown keys are errors, every field has a description (exported as JSON
Schema for editors), enums instead of booleans, a discriminated union on ``type`` for sources
and sinks. Validation does no I/O beyond resolving secrets (style rule 4: validate early,
connect late).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from config.base import ComponentId, Strict, check_id
from config.secrets import Secret
from config.units import ByteSize, Duration
from protocols.modbus.config import ModbusSourceConfig
from protocols.mqtt.config import MqttSourceConfig
from protocols.opcua.config import OpcuaSourceConfig

__all__ = [
    "AgentSettings",
    "BufferConfig",
    "Config",
    "DowntimeRule",
    "FleetConfig",
    "HealthConfig",
    "HttpAuth",
    "HttpSinkConfig",
    "MachineConfig",
    "OAuth2Config",
    "ScrapRule",
    "SinkConfig",
    "SourceConfig",
    "StateRule",
    "TlsConfig",
    "WhenFull",
]

# --------------------------------------------------------------------------- agent / health


class LoopImpl(StrEnum):
    AUTO = "auto"
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class AgentSettings(Strict):
    id: str = Field(description="This agent's id; sent on every event as the 'agentid' attribute.")
    site: str = Field(description="Plant/site id; part of every event's source "
                      "(/sites/{site}/lines/{line}/machines/{machine}).")
    data_dir: Path = Field(Path("/var/lib/edge-agent"),
                           description="Directory for the buffer database and other state.")
    stop_timeout: Duration = Field(10.0, description="How long a stop may take to flush "
                                   "detections and finish in-flight deliveries.")
    clock_jump_threshold: Duration = Field(2.0, description="A step of the system clock larger "
                                           "than this is reported in /status and flags open "
                                           "episodes and windows clock_adjusted.")
    event_loop: LoopImpl = Field(LoopImpl.AUTO, description="'auto' uses uvloop when installed; "
                                 "'asyncio' turns it off.")

    @field_validator("id", "site")
    @classmethod
    def _ids(cls, v: str) -> str:
        return check_id(v, "id")


class HealthConfig(Strict):
    listen: str = Field("127.0.0.1:9780", description="HOST:PORT of the health endpoint "
                        "(/healthz /readyz /status). Keep it on loopback unless a firewall "
                        "protects it; port 0 picks a free port.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"'{v}' is not HOST:PORT (for example 127.0.0.1:9780)")
        return v

    max_pending_age: Duration = Field(3600.0, description="/readyz degrades when a sink's "
                                      "oldest undelivered event is older than this.")
    min_disk_free: ByteSize = Field(100 * 2**20, description="/readyz degrades when the file "
                                    "system of the data directory has less free space.")
    buffer_full_ratio: float = Field(0.9, gt=0, le=1, description="/readyz degrades when the "
                                     "buffer file reaches this fraction of buffer.max_size.")


# --------------------------------------------------------------------------- sources


SourceConfig = Annotated[ModbusSourceConfig | OpcuaSourceConfig | MqttSourceConfig,
                         Field(discriminator="type")]

# --------------------------------------------------------------------------- machines


class StateName(StrEnum):
    RUNNING = "running"
    IDLE = "idle"
    DOWN = "down"
    PLANNED = "planned"


class StateRule(Strict):
    tag: str | None = Field(None, description="Tag that gives the machine state (may be left "
                            "out when only a production counter's stall rule decides).")
    map: dict[str, StateName] | None = Field(None, description="Tag value -> running / idle / "
                                             "down / planned. Keys are compared as text, so 1 "
                                             "and '1' are the same.")
    default: StateName | None = Field(None, description="State for a value not in 'map' "
                                      "(without it an unmapped value leaves the state unknown).")
    running_above: float | None = Field(None, description="Numeric tag: running when the value "
                                        "is above this, otherwise down.")
    running_below: float | None = Field(None, description="Numeric tag: running when the value "
                                        "is below this, otherwise down.")
    production_counter: str | None = Field(None, description="Counter of good output; with "
                                           "'stalled_after' a running machine whose counter "
                                           "does not increase is down (reason 'no-output').")
    stalled_after: Duration | None = Field(None, description="How long without an increase of "
                                           "'production_counter' counts as a stall.")

    @field_validator("map", mode="before")
    @classmethod
    def _keys_as_text(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k).strip(): s for k, s in v.items()}
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> StateRule:
        rules = [r for r in ("map", "running_above", "running_below")
                 if getattr(self, r) is not None]
        if (self.production_counter is None) != (self.stalled_after is None):
            raise ValueError("'production_counter' and 'stalled_after' go together")
        if self.tag is None:
            if rules:
                raise ValueError(f"'{rules[0]}' needs 'tag'")
            if self.production_counter is None:
                raise ValueError("give 'tag' with one of 'map', 'running_above' or "
                                 "'running_below', or a 'production_counter' with "
                                 "'stalled_after'")
        elif len(rules) != 1:
            raise ValueError("give exactly one of 'map', 'running_above' or 'running_below'")
        if self.default is not None and self.map is None:
            raise ValueError("'default' goes with 'map'")
        return self


class DowntimeRule(Strict):
    min_duration: Duration = Field(0.0, description="Stops shorter than this are not reported "
                                   "as downtime episodes.")
    reason_tag: str | None = Field(None, description="Tag with the stop reason code; the first "
                                   "non-zero code seen during the stop is reported.")
    reasons: dict[str, str] = Field(default_factory=dict, description="Reason code -> text.")
    max_duration: Duration | None = Field(None, description="Split longer episodes: one ends "
                                          "and the next starts (continued_from) every "
                                          "max_duration, so long stops show up in reports "
                                          "before they end.")

    @field_validator("reasons", mode="before")
    @classmethod
    def _keys_as_text(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k).strip(): str(t) for k, t in v.items()}
        return v


class ScrapRule(Strict):
    counter: str | None = Field(None, description="Monotonic scrap counter tag (rollover at "
                                "the type's width and resets to zero are handled).")
    quantity_tag: str | None = Field(None, description="Tag whose every sample is a scrap "
                                     "quantity (reject messages).")
    window: Duration = Field(60.0, description="Scrap is summed over this window into one "
                             "scrap.recorded event.")
    counter_bits: int | None = Field(None, description="Counter width in bits for rollover "
                                     "(default: from the tag's type, else 32).")
    max_step: int | None = Field(None, ge=1, description="An increase larger than this in one "
                                 "sample is implausible: reported in /status, not posted as "
                                 "scrap.")
    total_counter: str | None = Field(None, description="Counter of all parts made; with "
                                      "'good_counter', scrap = total increase - good increase.")
    good_counter: str | None = Field(None, description="Counter of good parts (goes with "
                                     "'total_counter').")
    reason_tag: str | None = Field(None, description="Tag with the scrap reason code; the first "
                                   "non-zero code in a window is reported.")

    @model_validator(mode="after")
    def _one(self) -> ScrapRule:
        if (self.total_counter is None) != (self.good_counter is None):
            raise ValueError("'total_counter' and 'good_counter' go together")
        given = [r for r in ("counter", "quantity_tag", "total_counter")
                 if getattr(self, r) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'counter', 'quantity_tag' or "
                             "'total_counter' + 'good_counter'")
        return self


class MachineConfig(Strict):
    line: str = Field(description="Line id; part of the event source.")
    state: StateRule = Field(description="How the machine state is derived.")
    downtime: DowntimeRule = Field(default_factory=DowntimeRule, description="Downtime rules.")
    scrap: ScrapRule | None = Field(None, description="Scrap counting (optional).")
    order_tag: str | None = Field(None, description="Tag with the active production order id.")
    stale_after: Duration | None = Field(None, description="The state is unknown when its tag "
                                         "has no sample for this long (default: the source's "
                                         "stale limit).")

    @field_validator("line")
    @classmethod
    def _line(cls, v: str) -> str:
        return check_id(v, "line")

    def tag_refs(self) -> list[tuple[str, str]]:
        """(key path inside the machine, tag id) of every tag this machine reads."""
        refs: list[tuple[str, str]] = []
        if self.state.tag:
            refs.append(("state.tag", self.state.tag))
        if self.state.production_counter:
            refs.append(("state.production_counter", self.state.production_counter))
        if self.downtime.reason_tag:
            refs.append(("downtime.reason_tag", self.downtime.reason_tag))
        if self.scrap and self.scrap.counter:
            refs.append(("scrap.counter", self.scrap.counter))
        if self.scrap:
            for key in ("quantity_tag", "total_counter", "good_counter", "reason_tag"):
                if getattr(self.scrap, key):
                    refs.append((f"scrap.{key}", getattr(self.scrap, key)))
        if self.order_tag:
            refs.append(("order_tag", self.order_tag))
        return refs


# --------------------------------------------------------------------------- sinks


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
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"'{v}' is not an http:// or https:// URL")
        return v


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
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"'{v}' is not an http:// or https:// URL")
        return v


SinkConfig = Annotated[HttpSinkConfig, Field(discriminator="type")]

# --------------------------------------------------------------------------- buffer


class WhenFull(StrEnum):
    DROP_OLDEST = "drop_oldest"
    REJECT_NEW = "reject_new"


class Synchronous(StrEnum):
    FULL = "FULL"
    NORMAL = "NORMAL"


class BufferConfig(Strict):
    path: Path | None = Field(None, description="Buffer database file (default: "
                              "<data_dir>/buffer.db).")
    max_size: ByteSize = Field(2 * 2**30, description="Largest size of the buffer file.")
    when_full: WhenFull = Field(WhenFull.DROP_OLDEST, description="What to drop when max_size "
                                "is reached; either way a plantedge.data.gap event says what.")
    synchronous: Synchronous = Field(Synchronous.FULL, description="SQLite synchronous mode; "
                                     "FULL survives power cuts, NORMAL may lose the last "
                                     "commits on power loss (never on a crash).")
    commit_interval: Duration = Field(0.05, description="Group commit window: events detected "
                                      "within it share one transaction and one fsync.")
    lease_timeout: Duration = Field(60.0, description="A leased batch not settled within this "
                                    "is offered again.")


# --------------------------------------------------------------------------- fleet


class FleetConfig(Strict):
    url: str = Field(description="Central URL that receives a heartbeat POST (agent id, site, "
                     "version, config hash, uptime, buffer stats, component states).")
    interval: Duration = Field(60.0, description="Time between heartbeats.")
    timeout: Duration = Field(10.0, description="Timeout of one heartbeat request.")
    auth: HttpAuth = Field(default_factory=HttpAuth, description="Authentication.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for https:// URLs.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra static headers.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"'{v}' is not an http:// or https:// URL")
        return v


# --------------------------------------------------------------------------- root


class Config(Strict):
    agent: AgentSettings = Field(description="This agent.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health endpoint.")
    sources: dict[ComponentId, SourceConfig] = Field(
        default_factory=dict, description="Devices and brokers to read, by id.")
    machines: dict[ComponentId, MachineConfig] = Field(
        default_factory=dict, description="Machines to watch, by id.")
    sinks: dict[ComponentId, SinkConfig] = Field(
        default_factory=dict, description="Where events go, by id.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Durable buffer.")
    fleet: FleetConfig | None = Field(None, description="Optional fleet heartbeat to a central "
                                      "URL; its failures never affect event delivery.")

    @property
    def buffer_path(self) -> Path:
        return self.buffer.path or self.agent.data_dir / "buffer.db"

    def tag_index(self) -> dict[str, str]:
        """tag id -> source id."""
        return {tag: sid for sid, src in self.sources.items() for tag in src.tags}
