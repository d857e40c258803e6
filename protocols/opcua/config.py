"""Configuration of an OPC UA source (``type: opcua``); see docs/configuration.md.

Validation does no I/O: node ids are checked for syntax only (namespace URIs are resolved to
indexes on every connect), certificate files are opened when a session starts.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from config.base import Backoff, Strict
from config.secrets import Secret
from config.units import Duration, DurationOrZero
from protocols.opcua.nodeids import parse_node_id

__all__ = [
    "Deadband",
    "DeadbandType",
    "OpcuaHistory",
    "OpcuaMode",
    "OpcuaSecurity",
    "OpcuaSourceConfig",
    "OpcuaTag",
    "OpcuaValueType",
    "SecurityMode",
    "SecurityPolicy",
    "TagKind",
    "TimestampChoice",
]


class OpcuaMode(StrEnum):
    SUBSCRIBE = "subscribe"
    POLL = "poll"


class TimestampChoice(StrEnum):
    SOURCE = "source"
    SERVER = "server"
    AGENT = "agent"


class SecurityPolicy(StrEnum):
    NONE = "None"
    BASIC256SHA256 = "Basic256Sha256"
    AES128_SHA256_RSAOAEP = "Aes128_Sha256_RsaOaep"
    AES256_SHA256_RSAPSS = "Aes256_Sha256_RsaPss"


class SecurityMode(StrEnum):
    SIGN = "Sign"
    SIGN_AND_ENCRYPT = "SignAndEncrypt"


class OpcuaValueType(StrEnum):
    """What a tag's value must be; a node delivering something else makes the tag bad."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STRING = "string"


class TagKind(StrEnum):
    """What a tag carries: the node's value, or the Alarms & Conditions events of a notifier."""

    VALUE = "value"
    ALARMS = "alarms"


# Event queue of an alarm tag unless configured: never 0 (a server may revise 0 to 1 and keep
# only the last event of a publishing interval).
DEFAULT_ALARM_QUEUE = 1000


class DeadbandType(StrEnum):
    ABSOLUTE = "absolute"
    PERCENT = "percent"


class Deadband(Strict):
    type: DeadbandType = Field(DeadbandType.ABSOLUTE, description="'absolute': in the value's "
                               "units; 'percent': of the node's EURange (needs server support).")
    value: float = Field(ge=0, description="Changes smaller than this are not reported.")


class OpcuaSecurity(Strict):
    policy: SecurityPolicy = Field(description="Security policy. Exactly this policy is used; "
                                   "the agent never falls back to a weaker one.")
    mode: SecurityMode = Field(SecurityMode.SIGN_AND_ENCRYPT,
                               description="Message security mode.")
    certificate: Path | None = Field(None, description="This agent's application certificate "
                                     "(DER or PEM); make one with 'edge-agent opcua gen-cert'.")
    private_key: Path | None = Field(None, description="The certificate's private key (PEM).")
    trust: Path | None = Field(None, description="Directory of trusted server certificates "
                               "(DER or PEM). A server whose certificate is not there is "
                               "refused with its fingerprint.")
    application_uri: str | None = Field(None, description="This agent's application URI "
                                        "(default: the URI in the certificate).")

    @model_validator(mode="after")
    def _complete(self) -> OpcuaSecurity:
        if self.policy is SecurityPolicy.NONE:
            given = [n for n in ("certificate", "private_key", "trust")
                     if getattr(self, n) is not None]
            if given:
                raise ValueError(f"policy None uses no certificates; remove {', '.join(given)}")
            return self
        missing = [n for n in ("certificate", "private_key", "trust") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"policy {self.policy.value} needs {', '.join(missing)}")
        return self


class OpcuaHistory(Strict):
    """History backfill after a (re)connect, for tags the server historizes."""

    max_span: Duration = Field(8 * 3600.0, description="Read at most this far back: a longer "
                               "gap is backfilled for its last max_span only (reported on "
                               "/status).")
    max_values: int = Field(50_000, ge=1, le=10_000_000, description="At most this many "
                            "values per node and backfill; more are left unread (reported).")
    margin: Duration = Field(60.0, description="Read from this long before the gap: servers "
                             "may ignore the start bound, and the value at the gap's start is "
                             "needed.")
    page_size: int = Field(1000, ge=10, le=100_000, description="Values asked for per history "
                           "request (continuation points page through the rest).")


class OpcuaTag(Strict):
    node: str = Field(description="Node id in any standard form: 'ns=2;s=Filler.State', "
                      "'nsu=urn:acme:plant;s=Filler.State' (namespace by URI, resolved on every "
                      "connect), 'i=2258', 'ns=1;g=...', 'ns=1;b=...'.")
    kind: TagKind = Field(TagKind.VALUE, description="'value': the node's value; 'alarms': "
                          "the Alarms & Conditions events (AlarmConditionType and subtypes) of "
                          "this event notifier (the Server object is i=2253, or a machine "
                          "object that is a notifier), as JSON samples; subscribe mode only.")
    type: OpcuaValueType | None = Field(None, description="Expected value type; another type "
                                        "makes the tag bad (default: any scalar).")
    sampling_interval: DurationOrZero | None = Field(None, description="Subscribe mode: how often "
                                               "the server samples the node (default: the "
                                               "publishing interval).")
    queue_size: int = Field(1, ge=0, le=100000, description="Subscribe mode: values the "
                            "server queues per publishing interval (1 keeps only the latest). "
                            f"Alarm tags: events queued (default {DEFAULT_ALARM_QUEUE}).")
    deadband: Deadband | None = Field(None, description="Subscribe mode: report a numeric "
                                      "change only when it exceeds this.")

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        parse_node_id(v)
        return v

    @model_validator(mode="after")
    def _alarm_options(self) -> OpcuaTag:
        if self.kind is TagKind.ALARMS:
            wrong = [n for n in ("type", "sampling_interval", "deadband")
                     if getattr(self, n) is not None]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} do not apply to kind: alarms")
            if "queue_size" in self.model_fields_set and self.queue_size < 2:
                raise ValueError("an alarm tag needs a queue_size of at least 2 (1 or 0 lose "
                                 "all but the last event of a publishing interval)")
        return self

    @property
    def effective_queue_size(self) -> int:
        if self.kind is TagKind.ALARMS and "queue_size" not in self.model_fields_set:
            return DEFAULT_ALARM_QUEUE
        return self.queue_size


class OpcuaSourceConfig(Strict):
    type: Literal["opcua"] = Field(description="OPC UA server.")
    endpoint: str = Field(description="Endpoint URL, opc.tcp://HOST:PORT[/path].")
    security: OpcuaSecurity | None = Field(None, description="Without it the agent connects "
                                           "with policy None (and says so once).")
    username: str | None = Field(None, description="User name identity (default: anonymous).")
    password: Secret | None = Field(None, description="Password for 'username' "
                                    "(${env:NAME} or ${file:/path}).")
    mode: OpcuaMode = Field(OpcuaMode.SUBSCRIBE, description="'subscribe': the server reports "
                            "changes; 'poll': the agent reads every tag each poll_interval.")
    publishing_interval: Duration = Field(0.5, description="Subscribe mode: how often the "
                                          "server sends changes.")
    poll_interval: Duration = Field(1.0, description="Poll mode: how often every tag is read.")
    timestamp: TimestampChoice = Field(TimestampChoice.SOURCE, description="Which time "
                                       "detection uses: the device's (source), the server's, "
                                       "or when the agent received it.")
    timeout: Duration = Field(5.0, description="Timeout of every request to the server.")
    keepalive_interval: Duration = Field(2.0, description="How often the server is asked for "
                                         "its state; no answer ends the session.")
    session_timeout: Duration = Field(60.0, description="Session lifetime the server keeps "
                                      "without hearing from the agent.")
    max_nodes_per_call: int | None = Field(None, ge=1, description="Upper bound on nodes per "
                                           "read / monitored-item request (the server's "
                                           "operation limits apply too).")
    stale_after: Duration | None = Field(None, description="A tag with no good sample for "
                                         "this long is stale (default: a few intervals).")
    backoff: Backoff = Field(default_factory=Backoff, description="Reconnect backoff.")
    history: OpcuaHistory | None = Field(None, description="Backfill after a (re)connect: the "
                                         "raw history of the gap is read for the machines' "
                                         "state and reason tags that the server historizes and "
                                         "fed to detection in time order before live values.")
    tags: dict[str, OpcuaTag] = Field(description="Tags by id.", min_length=1)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not v.startswith("opc.tcp://") or len(v) <= len("opc.tcp://"):
            raise ValueError(f"'{v}' is not an opc.tcp:// endpoint URL")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> OpcuaSourceConfig:
        if self.mode is OpcuaMode.POLL and "publishing_interval" in self.model_fields_set:
            raise ValueError("publishing_interval belongs to mode: subscribe "
                             "(use poll_interval with mode: poll)")
        if self.mode is OpcuaMode.SUBSCRIBE and "poll_interval" in self.model_fields_set:
            raise ValueError("poll_interval belongs to mode: poll "
                             "(use publishing_interval with mode: subscribe)")
        if self.password is not None and self.username is None:
            raise ValueError("'password' needs 'username'")
        if self.mode is OpcuaMode.POLL:
            alarms = sorted(t for t, tag in self.tags.items() if tag.kind is TagKind.ALARMS)
            if alarms:
                raise ValueError(f"alarm tags need mode: subscribe (tags {', '.join(alarms)})")
            per_tag = sorted(t for t, tag in self.tags.items()
                             if tag.sampling_interval is not None or tag.deadband is not None
                             or "queue_size" in tag.model_fields_set)
            if per_tag:
                raise ValueError(f"sampling_interval, queue_size and deadband belong to mode: "
                                 f"subscribe (tags {', '.join(per_tag)})")
        return self

    @property
    def interval(self) -> float:
        return (self.publishing_interval if self.mode is OpcuaMode.SUBSCRIBE
                else self.poll_interval)

    @property
    def effective_stale_after(self) -> float:
        if self.stale_after is not None:
            return self.stale_after
        if self.mode is OpcuaMode.POLL:
            return 3 * self.poll_interval + self.timeout
        # A subscription reports only changes: a quiet tag is not stale while the session
        # lives (keep-alives prove it), so only a dead session makes tags stale.
        return max(30.0, 3 * self.keepalive_interval + self.timeout)

    def counter_bits(self, tag: str) -> int | None:
        """Width of a counter tag for rollover; the protocol does not say (None)."""
        return None
