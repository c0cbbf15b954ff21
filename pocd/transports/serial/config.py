"""What a serial driver file and a site config may say: line settings, framing, replies, points.

Validated once, at load, by pydantic (unknown keys are errors): every pattern compiles, every
group a status rule names exists in its pattern, the checksum is known. Checks that need the
whole device (a port is set, every point's field is a group of some reply) are
`runner.check_device`, and those across the devices of one port `runner.bus_use`: the site
loader runs both, because a driver file's defaults are validated apart from its points.
Nothing here opens a port.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pocd.configtypes import DevicePath, Duration, StrictModel
from pocd.model import IncidentKind
from pocd.transports import PointSettings, TransportSettings
from pocd.transports.serial.codec import CHECKSUMS, substitute

__all__ = [
    "QualityName",
    "ReplyShape",
    "SerialPoint",
    "SerialSettings",
    "SimReply",
    "SimSignal",
    "SimStream",
    "SimulatorModel",
    "WordRule",
]

QualityName = Literal["good", "uncertain", "bad"]
IncidentKindName = Literal["communication", "data", "software", "configuration"]


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        # Compiled with a sample address, so that a pattern using {address} is checked too.
        return re.compile(substitute(pattern, "A", pattern=True))
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None


class WordRule(StrictModel):
    """A status word in a reply group that lowers the quality of some points.

    The group is split on whitespace, so one group may carry several words (Alicat appends
    `MOV`, `HLD`, ... after the gas) or exactly one (the `S`/`D` of an MT-SICS weight).
    """

    word: str = Field(min_length=1)
    quality: QualityName
    group: str = "status"
    reason: str = ""  # default: "<group> <word>"
    points: list[str] = []  # default: every point the reply carries


class ReplyShape(StrictModel):
    """One form a reply (or a streamed line) can take. Shapes are tried in order; the first
    whose pattern matches the whole frame (checksum removed) decides.

    A shape with named groups carries values; one without (an error reply such as MT-SICS
    `S +`) leaves the points of the request without a value: they get a BAD sample with
    `reason`. `incident` makes the reply a counted Incident as well (MT-SICS `ES`, `ET`, `EL`).
    """

    pattern: str
    quality: QualityName = "good"
    reason: str = ""
    incident: str | None = Field(default=None, min_length=1)
    incident_kind: IncidentKindName = "communication"
    retry: bool = False  # ask again, as after a timeout (e.g. a transmission error)
    words: list[WordRule] = []
    unknown_words: QualityName = "good"  # quality for a word of a rule's group that no rule names

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        _compile(value)
        return value

    @model_validator(mode="after")
    def _groups_exist(self) -> ReplyShape:
        groups = _compile(self.pattern).groupindex
        for rule in self.words:
            if rule.group not in groups:
                raise ValueError(
                    f"status word {rule.word!r}: the pattern has no group {rule.group!r}"
                )
        if self.quality != "good" and not self.reason:
            raise ValueError("a shape of lowered quality needs a reason (e.g. 'overload')")
        return self

    @property
    def kind(self) -> IncidentKind:
        return IncidentKind(self.incident_kind)


class SimSignal(StrictModel):
    """Values the simulator serves for a point: base + sine + noise. Ignored by the transport."""

    base: float = 0.0
    amplitude: float = 0.0
    period: Duration = Field(default=60.0, gt=0)
    noise: float = Field(default=0.0, ge=0)  # standard deviation


class SimReply(StrictModel):
    """How the simulator answers one command: an exact `command` or a `pattern` whose named
    groups the reply template may use. The template is `str.format`ted with the points'
    values (a point with `codes` gives its text), `address`, `command` and the `vars`."""

    command: str | None = None
    pattern: str | None = None
    reply: str  # "" answers nothing (a command without a reply)

    @model_validator(mode="after")
    def _one_key(self) -> SimReply:
        if (self.command is None) == (self.pattern is None):
            raise ValueError("a simulated reply needs either command or pattern")
        if self.pattern is not None:
            _compile(self.pattern)
        return self


class SimStream(StrictModel):
    """Continuous output: started by a command (or at power-up), stopped by another."""

    start: list[str] = []  # commands that start it; empty: the device streams from power-up
    stop: list[str] = []
    template: str
    period: Duration = Field(default=0.25, gt=0)


class SimulatorModel(StrictModel):
    """What `pocd simulate` serves for this driver. Ignored by the transport."""

    replies: list[SimReply] = []
    unknown: str = ""  # reply to a command it does not know ("" answers nothing)
    bad_checksum: str | None = None  # reply to a command with a wrong checksum (default: unknown)
    errors: list[str] = []  # replies the `error` fault sends (first by default)
    vars: dict[str, str] = {}  # more template values, e.g. status = "S"
    stream: SimStream | None = None


class SerialSettings(TransportSettings):
    """One serial device: its port and line, how frames are cut and checked, what it says."""

    port: DevicePath | None = None  # e.g. /dev/serial/by-id/usb-FTDI_...; in the site config
    baudrate: int = Field(default=9600, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = 1  # 1, 1.5 or 2
    xonxoff: bool = False
    rtscts: bool = False
    address: str = ""  # replaces {address} in commands and patterns (Alicat unit id "A")
    mode: Literal["poll", "stream"] = "poll"
    command: str | None = None  # the request of points that name none
    # poll: how long a reply may take; stream: the longest silence before comm-loss.
    timeout: Duration = Field(default=1.0, gt=0)
    retries: int = Field(default=1, ge=0, le=10)  # further attempts after a failed one
    gap: Duration = 0.0  # quiet time on the port after a reply, before the next command
    framing: Literal["line", "stx-etx"] = "line"
    terminator: str = Field(default="\r\n", min_length=1)  # ends a reply line
    command_terminator: str | None = None  # ends a command; default: `terminator`
    max_frame: int = Field(default=1024, ge=16, le=65536)  # longer: rejected as overlong
    checksum: str = "none"
    checksum_separator: str = ""  # between text and checksum, and summed with the text
    checksum_commands: bool = False  # commands carry the checksum too (Heracell)
    replies: list[ReplyShape] = []
    ignore: list[str] = []  # patterns of frames to pass over: echoes, prompts
    stream_start: list[str] = []  # sent after opening, and again after a silence (stream mode)
    stream_stop: list[str] = []  # sent when the runner stops (stream mode)
    backoff_max: Duration = Field(default=30.0, gt=0)  # longest wait before reopening / asking
    sim: SimulatorModel | None = None

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, value: float) -> float:
        if value not in (1, 1.5, 2):
            raise ValueError(f"stop bits are 1, 1.5 or 2 (got {value:g})")
        return value

    @field_validator("checksum")
    @classmethod
    def _known_checksum(cls, value: str) -> str:
        if value not in CHECKSUMS:
            raise ValueError(f"unknown checksum {value!r} (known: {', '.join(CHECKSUMS)})")
        return value

    @field_validator("ignore")
    @classmethod
    def _ignore_compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            _compile(pattern)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SerialSettings:
        if self.checksum == "none" and (self.checksum_separator or self.checksum_commands):
            raise ValueError("checksum_separator and checksum_commands need a checksum")
        return self

    @property
    def reply_terminator(self) -> bytes:
        return self.terminator.encode("latin-1")

    @property
    def request_terminator(self) -> bytes:
        text = self.terminator if self.command_terminator is None else self.command_terminator
        return text.encode("latin-1")


class SerialPoint(PointSettings):
    """One value of a device: which request carries it, which group of the reply, how to
    scale it and when to distrust it."""

    command: str | None = None  # poll mode; default: the device's `command`
    field: str | None = Field(default=None, min_length=1)  # named group; default: point name
    match: dict[str, str] = {}  # groups that must read so for the reply to be this point's
    scale: float = 1.0  # value = number * scale + offset
    offset: float = 0.0
    codes: dict[str, float] = {}  # texts the field may hold, recorded as these numbers
    unit_field: str | None = None  # a group holding the unit the device sent
    units: dict[str, float] = {}  # units it may send, with the factor to `unit`; {}: `unit` only
    valid_min: float | None = None  # a value outside [valid_min, valid_max] is BAD
    valid_max: float | None = None
    sim: SimSignal | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SerialPoint:
        if (
            self.valid_min is not None
            and self.valid_max is not None
            and self.valid_min >= self.valid_max
        ):
            raise ValueError("valid_min must be below valid_max")
        if self.units and self.unit_field is None:
            raise ValueError("units need unit_field: the group that holds the unit")
        if self.codes and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError("a point with codes records the code's number: no scale or offset")
        return self
