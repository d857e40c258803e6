"""Configuration of a Modbus source (``type: modbus``): Modbus TCP, or Modbus RTU on a serial
line or through a serial-to-Ethernet gateway (``transport``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from config.base import Backoff, Strict
from config.units import Duration, DurationOrZero

__all__ = [
    "ByteOrder",
    "ModbusSerialSettings",
    "ModbusSourceConfig",
    "ModbusTable",
    "ModbusTag",
    "ModbusTransport",
    "ModbusType",
    "Parity",
]


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


class ModbusTransport(StrEnum):
    """How requests reach the device(s).

    ``tcp``: Modbus TCP (MBAP header, transaction ids). ``rtu-over-tcp``: RTU frames (unit id,
    PDU, CRC) over a TCP socket to a serial gateway in transparent mode. ``serial``: RTU frames
    on a local serial port (RS-485/RS-232).
    """

    TCP = "tcp"
    RTU_OVER_TCP = "rtu-over-tcp"
    SERIAL = "serial"


class Parity(StrEnum):
    NONE = "none"
    EVEN = "even"
    ODD = "odd"


class ModbusSerialSettings(Strict):
    device: str = Field(description="Serial port, e.g. /dev/ttyUSB0 or "
                        "/dev/serial/by-id/usb-FTDI_...-port0 (stable across reboots).")
    baudrate: int = Field(9600, ge=300, le=4_000_000, description="Bits per second; every "
                          "device on the line must use the same.")
    data_bits: int = Field(8, description="Data bits per character: always 8 (RTU frames are "
                           "binary; 7 data bits is Modbus ASCII, which the agent does not speak).")
    parity: Parity = Field(Parity.EVEN, description="Parity bit; the Modbus default is even. "
                           "Many devices are set to none (then usually with 2 stop bits).")
    stop_bits: Literal[1, 2] = Field(1, description="Stop bits per character.")

    @field_validator("data_bits")
    @classmethod
    def _eight_bits(cls, v: int) -> int:
        if v != 8:
            raise ValueError(f"data_bits {v}: Modbus RTU needs 8 data bits (7 is Modbus ASCII, "
                             "which is not supported)")
        return v

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the wire (start + data + parity + stop bits)."""
        bits = 1 + self.data_bits + (0 if self.parity is Parity.NONE else 1) + self.stop_bits
        return bits / self.baudrate
_INT_BITS = {ModbusType.INT16: 16, ModbusType.UINT16: 16, ModbusType.INT32: 32,
             ModbusType.UINT32: 32, ModbusType.INT64: 64, ModbusType.UINT64: 64}


_REGISTERS = {ModbusType.BOOL: 1, ModbusType.INT16: 1, ModbusType.UINT16: 1,
              ModbusType.INT32: 2, ModbusType.UINT32: 2, ModbusType.FLOAT32: 2,
              ModbusType.INT64: 4, ModbusType.UINT64: 4, ModbusType.FLOAT64: 4}


class ModbusTag(Strict):
    table: ModbusTable = Field(ModbusTable.HOLDING, description="Register table to read.")
    unit_id: int | None = Field(None, ge=1, le=247, description="Unit id of the device that "
                                "holds this tag, on an RTU line with several devices "
                                "(default: the source's unit_id).")
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
    type: Literal["modbus"] = Field(description="Modbus device (TCP) or RTU line.")
    transport: ModbusTransport = Field(ModbusTransport.TCP, description="tcp: Modbus TCP; "
                                       "rtu-over-tcp: RTU frames through a serial gateway at "
                                       "host:port; serial: RTU on a local serial port.")
    host: str | None = Field(None, description="Device or gateway host name or IP address "
                             "(transports tcp and rtu-over-tcp).")
    port: int = Field(502, ge=1, le=65535, description="TCP port.")
    serial: ModbusSerialSettings | None = Field(None, description="Serial port settings (transport "
                                          "serial).")
    unit_id: int = Field(1, ge=0, le=255, description="Modbus unit (slave/device) id; on an RTU "
                         "line the default for tags without their own unit_id.")
    poll_interval: Duration = Field(1.0, description="How often every tag is read.")
    timeout: Duration = Field(1.0, description="Timeout of one read request (one attempt); "
                              "on a serial port the time the request and its answer take on "
                              "the wire at the baud rate is added.")
    retries: int = Field(1, ge=0, le=5, description="RTU transports: further attempts of a "
                         "request that got no good answer before its device counts as silent "
                         "for this poll. A device silent in the last poll gets one attempt.")
    request_gap: DurationOrZero = Field(0.0, description="RTU transports: extra silence "
                                        "between the end of one answer and the next request "
                                        "(slow devices or RS-485 converters). On a serial port "
                                        "at least 3.5 character times are always kept.")
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
    def _transport_settings(self) -> ModbusSourceConfig:
        t = self.transport
        if t is ModbusTransport.SERIAL:
            if self.serial is None:
                raise ValueError("transport serial needs 'serial' (device, baudrate, ...)")
            if self.host is not None:
                raise ValueError("'host' is for transports tcp and rtu-over-tcp, not serial")
        else:
            if self.host is None:
                raise ValueError(f"transport {t.value} needs 'host'")
            if self.serial is not None:
                raise ValueError(f"'serial' is for transport serial, not {t.value}")
        if t is ModbusTransport.TCP:
            if "retries" in self.model_fields_set or "request_gap" in self.model_fields_set:
                raise ValueError("'retries' and 'request_gap' are for the RTU transports "
                                 "(rtu-over-tcp, serial)")
            units = sorted(tag_id for tag_id, tag in self.tags.items()
                           if tag.unit_id is not None and tag.unit_id != self.unit_id)
            if units:
                raise ValueError(f"tag(s) {', '.join(units)} name another unit_id: several "
                                 "devices per source are for RTU lines; on Modbus TCP use one "
                                 "source per unit id")
        elif not 1 <= self.unit_id <= 247:
            raise ValueError(f"unit_id {self.unit_id}: an RTU device address is 1..247")
        return self

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

    @property
    def is_rtu(self) -> bool:
        return self.transport is not ModbusTransport.TCP

    @property
    def where(self) -> str:
        """The line or device address, for messages."""
        if self.serial is not None:
            return self.serial.device
        return f"{self.host}:{self.port}"

    def unit_of(self, tag: ModbusTag) -> int:
        return self.unit_id if tag.unit_id is None else tag.unit_id
    def counter_bits(self, tag: str) -> int | None:
        """Width of an integer tag, for counter rollover (None for other types)."""
        return _INT_BITS.get(self.tags[tag].type)
