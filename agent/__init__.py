"""plant-edge-agent: the runtime (model, detection, sinks, runtime, health, CLI)."""

__version__ = "0.1.0"
