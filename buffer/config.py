"""Configuration of the durable buffer: file, capacity policy, durability, group commit."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field

from config.base import Strict
from config.units import ByteSize, Duration, DurationOrZero

__all__ = ["BufferConfig", "Synchronous", "WhenFull"]


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
    commit_interval: DurationOrZero = Field(0.05, description="Group commit window: events "
                                            "detected within it share one transaction and one "
                                            "fsync.")
    lease_timeout: Duration = Field(60.0, description="A leased batch not settled within this "
                                    "is offered again.")
