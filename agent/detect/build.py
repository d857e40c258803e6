"""Detectors for every configured machine (shared by the runtime and ``edge-agent replay``)."""

from __future__ import annotations

from agent.detect.machine import MachineDetector
from config.models import Config
from protocols.registry import counter_bits

__all__ = ["build_detectors"]


def build_detectors(config: Config) -> dict[str, MachineDetector]:
    tag_source = config.tag_index()
    out: dict[str, MachineDetector] = {}
    for mid, mcfg in config.machines.items():
        signal_tag = mcfg.state.tag or mcfg.state.production_counter
        src_name = tag_source.get(signal_tag or "")
        stale = None
        if src_name is not None:
            stale = config.sources[src_name].effective_stale_after
        bits = 32
        if mcfg.scrap:
            counter = mcfg.scrap.counter or mcfg.scrap.total_counter
            if counter and counter in tag_source:
                bits = counter_bits(config.sources[tag_source[counter]], counter)
        out[mid] = MachineDetector(mid, mcfg, config.agent.site, counter_bits=bits,
                                   stale_after=stale)
    return out
