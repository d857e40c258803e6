"""The root configuration schema: the one place that knows every component type.

Each part owns its config piece (``protocols/<name>/config.py``, ``agent/detect/config.py``,
``agent/sinks/config.py``, ``buffer/config.py``); this module puts them together under
``agent:``, ``health:``, ``sources:``, ``machines:``, ``sinks:``, ``buffer:`` and ``fleet:``.

Strict on purpose: unknown keys are errors, every field has a description (exported as JSON
Schema for editors), enums instead of booleans, a discriminated union on ``type`` for sources
and sinks. Validation does no I/O beyond resolving secrets (validate early, connect late).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from agent.detect.config import MachineConfig
from agent.sinks.config import HttpAuth, HttpTarget, SinkConfig, TlsConfig
from buffer.config import BufferConfig
from config.base import ComponentId, Strict, check_id
from config.secrets import Secret
from config.units import Duration, SizeOrZero
from protocols.modbus.config import ModbusSourceConfig
from protocols.mqtt.config import MqttSourceConfig
from protocols.opcua.config import OpcuaSourceConfig

__all__ = ["AgentSettings", "Config", "FleetConfig", "HealthConfig", "LoopImpl",
           "ReasonEntryConfig", "SourceConfig"]


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


class ReasonEntryConfig(Strict):
    bearer_token: Secret = Field(description="Token that operator terminals and `edge-agent "
                                 "reason` send as 'Authorization: Bearer ...'; usually "
                                 "${file:/run/credentials/...} or ${env:NAME}.")


class HealthConfig(Strict):
    listen: str = Field("127.0.0.1:9780", description="HOST:PORT of the health endpoint "
                        "(/healthz /readyz /status). Keep it on loopback unless a firewall "
                        "protects it; port 0 picks a free port.")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not (port.isascii() and port.isdigit()) \
                or not 0 <= int(port) <= 65535:
            raise ValueError(f"'{v}' is not HOST:PORT (for example 127.0.0.1:9780)")
        return v

    max_pending_age: Duration = Field(3600.0, description="/readyz degrades when a sink's "
                                      "oldest undelivered event is older than this.")
    min_disk_free: SizeOrZero = Field(100 * 2**20, description="/readyz degrades when the file "
                                    "system of the data directory has less free space.")
    buffer_full_ratio: float = Field(0.9, gt=0, le=1, description="/readyz degrades when the "
                                     "buffer file reaches this fraction of buffer.max_size.")
    reason_entry: ReasonEntryConfig | None = Field(None, description="Reason entry on this "
                                                   "listener (/machines/{machine}/episodes); "
                                                   "off unless given.")


SourceConfig = Annotated[ModbusSourceConfig | OpcuaSourceConfig | MqttSourceConfig,
                         Field(discriminator="type")]


class FleetConfig(HttpTarget):
    url: str = Field(description="Central URL that receives a heartbeat POST (agent id, site, "
                     "version, config hash, uptime, buffer stats, component states).")
    interval: Duration = Field(60.0, description="Time between heartbeats.")
    timeout: Duration = Field(10.0, description="Timeout of one heartbeat request.")
    auth: HttpAuth = Field(default_factory=HttpAuth, description="Authentication.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for https:// URLs.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra static headers.")


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
