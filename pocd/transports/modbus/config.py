"""What a Modbus driver file and a site config may say: device settings, points, status rules.

Validated once, at load, by pydantic (unknown keys are errors). Checks that need the whole
device (a TCP host or a serial port is set) are `runner.check_device`, and those across the
devices of one bus (line settings, unit ids) `runner.bus_use`: the site loader runs both,
because a driver file's defaults are validated on their own and name neither. Nothing here
opens a port.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pocd.configtypes import DevicePath, Duration, StrictModel
from pocd.transports import PointSettings, TransportSettings

__all__ = [
    "REGISTER_COUNT",
    "Block",
    "DataType",
    "Function",
    "ModbusPoint",
    "ModbusSettings",
    "Order",
    "SignalModel",
    "StatusRule",
    "StatusType",
]

Function = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64", "bool", "bit"]
StatusType = Literal["int16", "uint16", "int32", "uint32"]
Order = Literal["big", "little"]

# Registers (or, for coils and discrete inputs, bits) one value occupies on the wire.
REGISTER_COUNT: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
    "bool": 1,
    "bit": 1,
}


class Block(StrictModel):
    """A read the device wants made whole (e.g. a Hamilton channel of 10 registers)."""

    function: Function = "holding"
    address: int = Field(ge=0, le=0xFFFF)
    count: int = Field(ge=1, le=125)


class ModbusSettings(TransportSettings):
    """One Modbus device: where it is (TCP host or serial port), its unit id, and timing."""

    # TCP: a host (and port). RTU: a serial port. Exactly one of host and serial_port is set;
    # the serial line settings below are ignored for TCP.
    host: str | None = None
    port: int = Field(default=502, ge=1, le=65535)
    serial_port: DevicePath | None = None  # a device path, or a pyserial URL: socket://gw:4001
    baudrate: int = Field(default=19200, gt=0)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    unit_id: int = Field(default=1, ge=0, le=255)  # pymodbus calls it device_id
    timeout: Duration = Field(default=1.0, gt=0)  # per request attempt
    retries: int = Field(default=1, ge=0, le=10)  # further attempts after a timeout or CRC error
    # Silence kept between two frames on the link. None: 3.5 character times on a serial line
    # (at least 1.75 ms, as the Modbus serial line spec asks), 0 on TCP.
    frame_pause: Duration | None = None
    max_gap: int = Field(default=8, ge=0, le=123)  # unused registers a merged read may span
    max_registers: int = Field(default=125, ge=1, le=125)  # per read; some devices take fewer
    backoff_max: Duration = Field(default=30.0, gt=0)  # longest wait between retries of a dead unit
    blocks: list[Block] = []

    @model_validator(mode="after")
    def _one_endpoint(self) -> ModbusSettings:
        if self.host is not None and self.serial_port is not None:
            raise ValueError("set either host (Modbus TCP) or serial_port (Modbus RTU), not both")
        return self

    @property
    def is_tcp(self) -> bool:
        return self.host is not None

    @property
    def pause(self) -> float:
        """The pause between frames in seconds, with the default resolved."""
        if self.frame_pause is not None:
            return self.frame_pause
        if self.is_tcp:
            return 0.0
        # 3.5 characters of 11 bits each; fixed at 1.75 ms above 19200 baud (Modbus over
        # serial line, 2.5.1.1).
        return 0.00175 if self.baudrate > 19200 else 38.5 / self.baudrate


class StatusRule(StrictModel):
    """A status register read with the point that sets the quality of the point's value.

    Bits in `bad_mask` (or a value in `bad_values`, or a value other than `expect`) make the
    value BAD; bits in `uncertain_mask` (or a value in `uncertain_values`) make it UNCERTAIN.
    """

    address: int = Field(ge=0, le=0xFFFF)
    function: Literal["holding", "input"] | None = None  # default: the point's own function
    type: StatusType = "uint16"
    word_order: Order = "big"
    byte_order: Order = "big"
    label: str = "status"  # names the register in the sample's reason, e.g. "co2 status 256"
    bad_mask: int = Field(default=0, ge=0)
    uncertain_mask: int = Field(default=0, ge=0)
    bad_values: list[int] = []
    uncertain_values: list[int] = []
    expect: int | None = None  # e.g. the unit code the value must come in

    @model_validator(mode="after")
    def _has_a_rule(self) -> StatusRule:
        if not (
            self.bad_mask
            or self.uncertain_mask
            or self.bad_values
            or self.uncertain_values
            or self.expect is not None
        ):
            raise ValueError(
                "a status rule needs bad_mask, uncertain_mask, bad_values, uncertain_values "
                "or expect"
            )
        return self


class SignalModel(StrictModel):
    """Values the simulator serves for a point: base + sine + noise. Ignored by the transport."""

    base: float = 0.0
    amplitude: float = 0.0
    period: Duration = Field(default=60.0, gt=0)
    noise: float = Field(default=0.0, ge=0)  # standard deviation
    startup: float | None = None  # served while the device is not ready; floats default to NaN


class ModbusPoint(PointSettings):
    """One value of a device: where it is on the wire, how it is encoded, when to distrust it."""

    function: Function = "holding"
    address: int = Field(ge=0, le=0xFFFF)  # 0-based wire address
    type: DataType = "uint16"  # coils and discrete inputs are always "bool"
    bit: int | None = Field(default=None, ge=0, le=15)  # for type "bit": 0 = least significant
    word_order: Order = "big"  # "little": least significant word first
    byte_order: Order = "big"  # "little": the two bytes of each register swapped
    scale: float = 1.0  # value = raw * scale + offset
    offset: float = 0.0
    sentinels: list[float] = []  # raw values that mean "no value", e.g. -32768 for 0x8000
    valid_min: float | None = None  # a scaled value outside [valid_min, valid_max] is BAD
    valid_max: float | None = None
    status: list[StatusRule] = []
    sim: SignalModel | None = None

    @model_validator(mode="before")
    @classmethod
    def _bits_are_bool(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("function") in ("coil", "discrete"):
            return {"type": "bool", **data}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        if self.function in ("coil", "discrete") and self.type != "bool":
            raise ValueError(f"a {self.function} point is type 'bool', not {self.type!r}")
        if self.function in ("coil", "discrete") and self.status:
            raise ValueError("status rules apply to register points only")
        if (self.type == "bit") != (self.bit is not None):
            raise ValueError("type 'bit' needs bit = 0..15, and bit belongs to type 'bit' only")
        if self.address + REGISTER_COUNT[self.type] > 0x10000:
            raise ValueError(f"a {self.type} at address {self.address} runs past 65535")
        if (
            self.valid_min is not None
            and self.valid_max is not None
            and self.valid_min >= self.valid_max
        ):
            raise ValueError("valid_min must be below valid_max")
        return self

    @property
    def count(self) -> int:
        return REGISTER_COUNT[self.type]
