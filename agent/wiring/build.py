"""Which class serves which ``type:``: the one place that builds sources, sinks and detectors.

Everything below the wiring (protocols, detection, the buffer, the sinks) knows only its own
config piece; here a source config answers the questions detection has about a tag (how many
bits a counter has, when its samples go stale), so detection never asks a protocol.
"""

from __future__ import annotations

from agent.detect.machine import MachineDetector
from agent.sinks.base import Sink
from agent.sinks.config import SinkConfig
from agent.sinks.http import HttpSink
from agent.wiring.schema import Config, SourceConfig
from protocols.base import Source

__all__ = ["build_detectors", "build_sink", "build_source"]

_DEFAULT_COUNTER_BITS = 32


def build_source(name: str, config: SourceConfig) -> Source:
    """A Source for one validated source config (no I/O: connecting happens in ``run``)."""
    if config.type == "modbus":
        if config.is_rtu:
            from protocols.modbus.line import ModbusLineSource

            return ModbusLineSource(name, config)
        from protocols.modbus.source import ModbusSource

        return ModbusSource(name, config)
    if config.type == "opcua":
        from protocols.opcua.source import OpcuaSource

        return OpcuaSource(name, config)
    if config.type == "mqtt":
        from protocols.mqtt.source import MqttSource

        return MqttSource(name, config)
    raise ValueError(f"source {name}: no implementation for type {config.type!r}")


def build_sink(name: str, config: SinkConfig, agent_id: str = "edge-agent") -> Sink:
    """A Sink for one validated sink config (no I/O until the first delivery). ``agent_id``
    names the broker sinks' client (MQTT client id, NATS connection name)."""
    if config.type == "http":
        return HttpSink(name, config)
    # The broker sinks are imported when configured, like the sources: their client libraries
    # (nats-py, paho) are ~9 MiB of resident memory that an agent posting over HTTP never uses.
    if config.type == "mqtt":
        from agent.sinks.mqtt import MqttSink

        return MqttSink(name, config, agent_id=agent_id)
    if config.type == "nats":
        from agent.sinks.nats import NatsSink

        return NatsSink(name, config, agent_id=agent_id)
    raise ValueError(f"sink {name}: no implementation for type {config.type!r}")


def build_detectors(config: Config) -> dict[str, MachineDetector]:
    """A detector per configured machine (shared by the runtime, reload and ``replay``)."""
    tag_source = config.tag_index()
    out: dict[str, MachineDetector] = {}
    for mid, mcfg in config.machines.items():
        signal_tag = mcfg.state.tag or mcfg.state.production_counter
        src_name = tag_source.get(signal_tag or "")
        stale = None
        if src_name is not None:
            stale = config.sources[src_name].effective_stale_after
        bits = _DEFAULT_COUNTER_BITS
        if mcfg.scrap:
            counter = mcfg.scrap.counter or mcfg.scrap.total_counter
            if counter and counter in tag_source:
                bits = (config.sources[tag_source[counter]].counter_bits(counter)
                        or _DEFAULT_COUNTER_BITS)
        out[mid] = MachineDetector(mid, mcfg, config.agent.site, counter_bits=bits,
                                   stale_after=stale)
    return out
