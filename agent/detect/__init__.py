"""Detection: pure, synchronous state machines per machine (samples in, events out)."""

from agent.detect.machine import MachineDetector

__all__ = ["MachineDetector"]
