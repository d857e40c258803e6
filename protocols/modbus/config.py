"""Configuration of a Modbus TCP source (``type: modbus``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from config.base import Backoff, Strict
from config.units import Duration

__all__ = ["ByteOrder", "ModbusSourceConfig", "ModbusTable", "ModbusTag", "ModbusType"]


class ModbusTable(StrEnum):
    HOLDING = "holding"
    INPUT = "input"
    COIL = "coil"
    DISCRETE = "discrete"


class ModbusType(StrEnum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "string"


class ByteOrder(StrEnum):
    """Order of the bytes of a multi-register value, A being the most significant byte.

    ABCD big-endian (Modbus standard), DCBA little-endian, BADC bytes swapped in each word,
    CDAB words swapped (common on PLCs that store 32-bit values low word first).
    """

    ABCD = "ABCD"
    DCBA = "DCBA"
    BADC = "BADC"
    CDAB = "CDAB"


_INT_BITS = {ModbusType.INT16: 16, ModbusType.UINT16: 16, ModbusType.INT32: 32,
             ModbusType.UINT32: 32, ModbusType.INT64: 64, ModbusType.UINT64: 64}


_REGISTERS = {ModbusType.BOOL: 1, ModbusType.INT16: 1, ModbusType.UINT16: 1,
              ModbusType.INT32: 2, ModbusType.UINT32: 2, ModbusType.FLOAT32: 2,
              ModbusType.INT64: 4, ModbusType.UINT64: 4, ModbusType.FLOAT64: 4}


class ModbusTag(Strict):
    table: ModbusTable = Field(ModbusTable.HOLDING, description="Register table to read.")
    address: int = Field(ge=0, le=65535, description="0-based protocol address (register 40011 "
                         "in 1-based Modicon notation is holding address 10).")
    type: ModbusType = Field(ModbusType.UINT16, description="Value type; fixes how many "
                             "registers are read.")
    byte_order: ByteOrder = Field(ByteOrder.ABCD, description="Byte order for multi-byte values.")
    length: int | None = Field(None, ge=1, le=250, description="For type string: number of "
                               "characters (two per register).")
    scale: float | None = Field(None, description="Multiply the raw value by this (numbers only).")
    offset: float | None = Field(None, description="Add this after scaling (numbers only).")

    @model_validator(mode="after")
    def _shape(self) -> ModbusTag:
        bit_table = self.table in (ModbusTable.COIL, ModbusTable.DISCRETE)
        if bit_table and self.type is not ModbusType.BOOL:
            raise ValueError(f"{self.table.value} tables hold single bits: type must be bool")
        if self.type is ModbusType.STRING and self.length is None:
            raise ValueError("type string needs 'length' (number of characters)")
        if self.type is not ModbusType.STRING and self.length is not None:
            raise ValueError("'length' is only for type string")
        if self.type in (ModbusType.STRING, ModbusType.BOOL) and (
                self.scale is not None or self.offset is not None):
            raise ValueError("'scale'/'offset' apply to numeric types only")
        if self.address + self.register_count > 65536:
            raise ValueError(f"address {self.address} + {self.register_count} register(s) of "
                             f"{self.type.value} runs past the last address 65535")
        return self

    @property
    def register_count(self) -> int:
        """Registers (or bits, for coil/discrete tables) this tag occupies."""
        if self.type is ModbusType.STRING:
            assert self.length is not None
            return (self.length + 1) // 2
        return _REGISTERS[self.type]  # read on every decode: a constant, not a new dict


class ModbusSourceConfig(Strict):
    type: Literal["modbus"] = Field(description="Modbus TCP device.")
    host: str = Field(description="Device host name or IP address.")
    port: int = Field(502, ge=1, le=65535, description="TCP port.")
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (slave/device) id.")
    poll_interval: Duration = Field(1.0, description="How often every tag is read.")
    timeout: Duration = Field(1.0, description="Timeout of one read request.")
    max_registers_per_read: int = Field(125, ge=1, le=125, description="Upper bound for "
                                        "coalesced reads; lower it for devices with small "
                                        "request limits.")
    max_gap: int = Field(8, ge=0, le=100, description="Unused registers a coalesced read may "
                         "span between two tags.")
    stale_after: Duration | None = Field(None, description="A tag with no good sample for this "
                                         "long is stale (default: 3 x poll_interval + timeout).")
    backoff: Backoff = Field(default_factory=Backoff, description="Reconnect backoff.")
    tags: dict[str, ModbusTag] = Field(description="Tags by id.", min_length=1)

    @model_validator(mode="after")
    def _tags_fit_one_read(self) -> ModbusSourceConfig:
        # A tag is always read in one request so its registers are never torn between reads.
        too_wide = sorted(tag_id for tag_id, tag in self.tags.items()
                          if tag.table in (ModbusTable.HOLDING, ModbusTable.INPUT)
                          and tag.register_count > self.max_registers_per_read)
        if too_wide:
            raise ValueError(f"tag(s) {', '.join(too_wide)} need more registers than "
                             f"max_registers_per_read ({self.max_registers_per_read})")
        return self

    @property
    def effective_stale_after(self) -> float:
        return self.stale_after or (3 * self.poll_interval + self.timeout)

    def counter_bits(self, tag: str) -> int | None:
        """Width of an integer tag, for counter rollover (None for other types)."""
        return _INT_BITS.get(self.tags[tag].type)
