"""Bytes on a serial line <-> replies and readings: checksums, framers, reply shapes, points.

Some 550 lines of pure code: framers, checksums, reply shapes and point readers, which the
runner and the simulator share.

Everything here is pure: no port, no clock, no records. A framer cuts a byte stream into
frames (by terminator or STX/ETX) and never loses a byte: what it cannot use comes out as a
frame with a fault ("overlong", "garbage", "partial"). The `Codec` checks a frame's checksum
and matches it against the device's reply shapes; `PointReader` turns a matched reply into
one point's value and quality. Checksums are a registry: `register_checksum` adds one.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, NamedTuple, Protocol

from pocd.model import Quality

if TYPE_CHECKING:
    from pocd.transports.serial.config import ReplyShape, SerialPoint, SerialSettings

__all__ = [
    "ADDRESS",
    "CHECKSUMS",
    "ETX",
    "QUALITY",
    "STX",
    "Checksum",
    "Codec",
    "Frame",
    "Framer",
    "LineFramer",
    "PointReader",
    "Reading",
    "Rejected",
    "Reply",
    "StxEtxFramer",
    "crc8_ccitt",
    "heracell_xor",
    "make_framer",
    "nmea_xor",
    "register_checksum",
    "substitute",
    "sum8",
    "sum16",
]

STX = b"\x02"
ETX = b"\x03"
_GOOD, _UNCERTAIN, _BAD = Quality.GOOD, Quality.UNCERTAIN, Quality.BAD
_NAN = math.nan
# The valid range of a point that sets none: every finite number, so that the one range test
# of the common case also catches an infinity made by the scaling.
_LARGEST = sys.float_info.max
# Named tuples made on the per-frame path skip their Python-level __new__.
_tuple_new = tuple.__new__

ADDRESS = "{address}"
"""Stands for the device's `address` in commands and patterns (e.g. an Alicat unit id)."""

QUALITY: dict[str, Quality] = {
    "good": Quality.GOOD,
    "uncertain": Quality.UNCERTAIN,
    "bad": Quality.BAD,
}


def substitute(text: str, address: str, *, pattern: bool) -> str:
    """`text` with `{address}` replaced (escaped in a pattern). str.format is not used: a
    regular expression is full of braces."""
    return text.replace(ADDRESS, re.escape(address) if pattern else address)


# --- checksums -----------------------------------------------------------------------------


def heracell_xor(data: bytes) -> int:
    """Thermo Heracell: the inverted XOR of every byte before the checksum."""
    return ~reduce(int.__xor__, data, 0) & 0xFF


def sum8(data: bytes) -> int:
    """Vaisala CS2: the sum of the bytes modulo 256."""
    return sum(data) & 0xFF


def sum16(data: bytes) -> int:
    """Vaisala CS4: the sum of the bytes modulo 65536 (FORM command, e.g. PTB220 appendix:
    `1010.09 ` gives 0179)."""
    return sum(data) & 0xFFFF


def nmea_xor(data: bytes) -> int:
    """Vaisala CSX: NMEA XOR of the bytes, where `$` and `*` count as zero."""
    return reduce(int.__xor__, (0 if b in (0x24, 0x2A) else b for b in data), 0)


def crc8_ccitt(data: bytes) -> int:
    """CRC-8, polynomial 0x07, initial value 0, no reflection (Heracell VIOS CR models).
    The initial value is UNCONFIRMED by the manual, which gives only the polynomial."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


@dataclass(frozen=True, slots=True)
class Checksum:
    """A checksum sent as `digits` hex digits after the text it covers."""

    name: str
    digits: int
    compute: Callable[[bytes], int]
    upper: bool = True  # the case the device sends; either case is accepted

    def text(self, data: bytes) -> bytes:
        return format(self.compute(data), f"0{self.digits}{'X' if self.upper else 'x'}").encode()


CHECKSUMS: dict[str, Checksum | None] = {
    "none": None,
    "heracell-xor": Checksum("heracell-xor", 2, heracell_xor, upper=False),
    "heracell-crc8": Checksum("heracell-crc8", 2, crc8_ccitt, upper=False),
    "vaisala-cs2": Checksum("vaisala-cs2", 2, sum8),
    "vaisala-cs4": Checksum("vaisala-cs4", 4, sum16),
    "vaisala-csx": Checksum("vaisala-csx", 2, nmea_xor),
}


def register_checksum(checksum: Checksum) -> None:
    """Make a checksum available to driver files by its name (call before configs load)."""
    CHECKSUMS[checksum.name] = checksum


# --- framers -------------------------------------------------------------------------------


class Frame(NamedTuple):
    """What a framer cut from the stream. `fault` is "" for a whole frame, else why it is
    unusable ("overlong", "garbage", "partial"); `terminated` says whether a terminator (or
    ETX) ended it. (Named tuples here and below: one is made per frame, cheaper than a
    frozen dataclass at thousands of frames a second.)"""

    data: bytes
    fault: str = ""
    terminated: bool = True


class Framer(Protocol):
    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by `data`, in order."""
        ...

    def flush(self) -> Frame | None:
        """The bytes of an unfinished frame, as a "partial" (or "garbage") frame; then empty."""
        ...

    @property
    def pending(self) -> int:
        """Bytes held for an unfinished frame."""
        ...


class LineFramer:
    """Frames end with a terminator (CR, CRLF or any byte string)."""

    __slots__ = ("_buf", "_max", "_term")

    def __init__(self, terminator: bytes, max_frame: int) -> None:
        if not terminator:
            raise ValueError("a line framer needs a terminator")
        self._term = terminator
        self._max = max_frame
        self._buf = b""

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf + data if self._buf else data
        term, limit = self._term, self._max
        end = buf.find(term)
        if 0 <= end == len(buf) - len(term) and end <= limit:  # the usual case: one whole line
            self._buf = b""
            return [_tuple_new(Frame, (buf[:end], "", True))]
        frames: list[Frame] = []
        start = 0
        while end >= 0:
            line = buf[start:end]
            frames.append(Frame(line, "overlong") if len(line) > limit else Frame(line))
            start = end + len(term)
            end = buf.find(term, start)
        rest = buf[start:]
        if len(rest) > limit + len(term):
            # No terminator in sight: give the bytes up now rather than hold them unbounded.
            # (The margin keeps a terminator split across two reads from being cut in half.)
            frames.append(Frame(rest, "overlong", terminated=False))
            rest = b""
        self._buf = rest
        return frames

    def flush(self) -> Frame | None:
        rest, self._buf = self._buf, b""
        return Frame(rest, "partial", terminated=False) if rest else None


class StxEtxFramer:
    """Frames are the bytes between STX (0x02) and ETX (0x03). Bytes outside a frame are
    "garbage"; a frame cut short by a new STX is "partial"."""

    __slots__ = ("_buf", "_inside", "_junk", "_max")

    def __init__(self, max_frame: int) -> None:
        self._max = max_frame
        self._buf = b""
        self._junk = b""
        self._inside = False

    @property
    def pending(self) -> int:
        return len(self._buf) + len(self._junk) + self._inside

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        pos, size = 0, len(data)
        while pos < size:
            if not self._inside:
                start = data.find(STX, pos)
                junk = self._junk + data[pos : size if start < 0 else start]
                if start < 0:
                    self._junk = junk
                    if len(junk) > self._max:
                        frames.append(Frame(junk, "garbage", terminated=False))
                        self._junk = b""
                    break
                if junk:
                    frames.append(Frame(junk, "garbage", terminated=False))
                self._junk = b""
                self._inside = True
                pos = start + 1
                continue
            end = data.find(ETX, pos)
            restart = data.find(STX, pos)
            if restart >= 0 and (end < 0 or restart < end):
                frames.append(Frame(self._buf + data[pos:restart], "partial", terminated=False))
                self._buf = b""
                pos = restart + 1
            elif end >= 0:
                body = self._buf + data[pos:end]
                frames.append(Frame(body, "overlong") if len(body) > self._max else Frame(body))
                self._buf = b""
                self._inside = False
                pos = end + 1
            else:
                self._buf += data[pos:]
                if len(self._buf) > self._max:
                    frames.append(Frame(self._buf, "overlong", terminated=False))
                    self._buf = b""
                    self._inside = False
                break
        return frames

    def flush(self) -> Frame | None:
        if self._inside:
            frame = Frame(self._buf, "partial", terminated=False)
        elif self._junk:
            frame = Frame(self._junk, "garbage", terminated=False)
        else:
            return None
        self._buf, self._junk, self._inside = b"", b"", False
        return frame


def make_framer(framing: str, terminator: bytes, max_frame: int) -> Framer:
    if framing == "stx-etx":
        return StxEtxFramer(max_frame)
    return LineFramer(terminator, max_frame)


# --- replies -------------------------------------------------------------------------------


class Reply(NamedTuple):
    """A frame that matched reply shape number `shape_index`."""

    shape_index: int
    shape: ReplyShape
    groups: dict[str, str | None]
    text: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame that cannot be used: `code` is "checksum", "unparseable", or a framing fault."""

    code: str
    message: str
    raw: bytes


_FRAMING_FAULTS = {
    "overlong": "frame longer than max_frame without a terminator",
    "garbage": "bytes outside STX/ETX",
    "partial": "incomplete frame",
}


class Codec:
    """One device's way of writing commands and reading frames."""

    def __init__(self, settings: SerialSettings) -> None:
        self.settings = settings
        self.address = settings.address
        self.checksum = CHECKSUMS[settings.checksum]
        self._separator = settings.checksum_separator.encode("latin-1")
        self._shapes = [
            (shape, re.compile(substitute(shape.pattern, settings.address, pattern=True)))
            for shape in settings.replies
        ]
        self._indexed = [(i, shape, pattern) for i, (shape, pattern) in enumerate(self._shapes)]
        self._ignore = [
            re.compile(substitute(p, settings.address, pattern=True)) for p in settings.ignore
        ]
        self._stx = settings.framing == "stx-etx"
        self._end = settings.request_terminator

    @property
    def shapes(self) -> list[ReplyShape]:
        return [shape for shape, _ in self._shapes]

    def groups(self, index: int) -> Mapping[str, int]:
        return self._shapes[index][1].groupindex

    def encode(self, command: str) -> bytes:
        """The bytes that send `command`: address filled in, checksum and framing added."""
        body = substitute(command, self.address, pattern=False).encode("latin-1")
        if self.settings.checksum_commands and self.checksum is not None:
            body += self._separator
            body += self.checksum.text(body)
        return STX + body + ETX if self._stx else body + self._end

    def seal(self, text: str) -> bytes:
        """A reply as the device would send it: checksum (if any) added, framed."""
        body = text.encode("latin-1")
        if self.checksum is not None:
            body += self._separator
            body += self.checksum.text(body)
        if self._stx:
            return STX + body + ETX
        return body + self.settings.reply_terminator

    def decode(self, frame: Frame) -> Reply | Rejected | None:
        """The reply in a frame; None for a blank frame or one the driver says to ignore."""
        raw = frame.data
        if frame.fault:
            return Rejected(frame.fault, _FRAMING_FAULTS.get(frame.fault, frame.fault), raw)
        if not raw:
            return None
        text = raw.decode("latin-1")  # every byte maps to one character: never fails
        for ignore in self._ignore:
            if ignore.fullmatch(text):
                return None
        if self.checksum is not None:
            checked = self._verify(raw)
            if isinstance(checked, Rejected):
                return checked
            text = checked
        for index, shape, pattern in self._indexed:
            found = pattern.fullmatch(text)
            if found is not None:
                return _tuple_new(Reply, (index, shape, found.groupdict(), text, raw))
        return Rejected("unparseable", "no reply shape matches", raw)

    def _verify(self, raw: bytes) -> str | Rejected:
        checksum = self.checksum
        assert checksum is not None
        digits, sep = checksum.digits, self._separator
        body, sent = raw[:-digits], raw[-digits:]
        if len(raw) < digits + len(sep) or not body.endswith(sep):
            return Rejected("checksum", "no checksum at the end of the frame", raw)
        expected = checksum.text(body)
        if sent.upper() != expected.upper():
            return Rejected("checksum", f"checksum {sent!r}, expected {expected!r}", raw)
        return body[: len(body) - len(sep)].decode("latin-1")


# --- points --------------------------------------------------------------------------------


class Reading(NamedTuple):
    """One point's value from one reply. `reason` is a short code, never text of the device
    (that goes into the incident `fault` asks for): "not-a-number", "unknown-code", "unit",
    "out-of-range", "overflow", "<group> unknown-word", or the driver's own reasons."""

    value: float
    quality: Quality
    reason: str = ""
    fault: str = ""


@dataclass(frozen=True, slots=True)
class _Words:
    """The status-word rules of one shape that concern one point, by group then word.
    `fine` holds, per group, the words that leave the quality alone: a group holding just
    one of them (a balance's `S`, the usual case) is passed with one look-up."""

    rules: dict[str, dict[str, tuple[Quality, str]]]
    unknown: Quality
    fine: dict[str, frozenset[str]]


class PointReader:
    """Reads one point out of replies. Built once per point; `read` is on the hot path, so
    what it needs from the point's settings is taken out once, here."""

    __slots__ = (
        "_base",
        "_codes",
        "_match",
        "_max",
        "_min",
        "_offset",
        "_scale",
        "_unit",
        "_unit_group",
        "_units",
        "_words",
        "group",
        "name",
        "point",
    )

    def __init__(self, name: str, point: SerialPoint) -> None:
        self.name = name
        self.point = point
        self.group = point.field or name  # the named group holding the value
        self._match = tuple(point.match.items())
        self._codes = point.codes
        self._unit_group = point.unit_field
        self._units = point.units
        self._unit = point.unit
        self._scale = point.scale
        self._offset = point.offset
        self._min = -_LARGEST if point.valid_min is None else point.valid_min
        self._max = _LARGEST if point.valid_max is None else point.valid_max
        self._words: dict[int, _Words] = {}
        self._base: list[tuple[Quality, str]] = []  # each shape's own quality and reason

    def prepare(self, shapes: Sequence[ReplyShape]) -> None:
        """Pick out, once, the status-word rules of each shape that apply to this point."""
        self._base = [(QUALITY[shape.quality], shape.reason) for shape in shapes]
        for index, shape in enumerate(shapes):
            rules: dict[str, dict[str, tuple[Quality, str]]] = {}
            for rule in shape.words:  # a word some rule names is known, even if not ours
                rules.setdefault(rule.group, {}).setdefault(rule.word, (Quality.GOOD, ""))
            for rule in shape.words:
                if rule.points and self.name not in rule.points:
                    continue
                known = rules[rule.group][rule.word]
                quality = QUALITY[rule.quality]
                if quality >= known[0]:
                    reason = rule.reason or f"{rule.group} {rule.word}"
                    rules[rule.group][rule.word] = (quality, reason)
            if rules:
                fine = {
                    group: frozenset(word for word, (q, _) in words.items() if q is _GOOD)
                    for group, words in rules.items()
                }
                self._words[index] = _Words(rules, QUALITY[shape.unknown_words], fine)

    def carried_by(self, reply: Reply) -> bool:
        """Whether the reply holds this point's value (its field, and the `match` groups)."""
        groups = reply.groups
        if groups.get(self.group) is None:
            return False
        if not self._match:
            return True
        return all(groups.get(key) == want for key, want in self._match)

    def read(self, reply: Reply) -> Reading:
        """The point's reading from a reply that carries it (see `carried_by`)."""
        reading = self.take(reply)
        if reading is None:
            raise ValueError(f"the reply does not carry point {self.name!r}: {reply.text!r}")
        return reading

    def take(self, reply: Reply) -> Reading | None:
        """The point's reading from the reply, or None if the reply does not carry it."""
        groups = reply.groups
        text = groups.get(self.group)
        if text is None or (self._match and not self.carried_by(reply)):
            return None
        if self._codes:
            number = self._codes.get(text.strip())
            if number is None:
                return Reading(_NAN, _BAD, "unknown-code", "unknown-code")
        else:
            try:
                number = float(text)  # (float() ignores surrounding blanks)
            except ValueError:
                number = _NAN
            if number - number != 0.0:  # NaN or infinite, faster than math.isfinite here
                return Reading(_NAN, _BAD, "not-a-number", "not-a-number")
        if self._unit_group is not None:
            unit = (groups.get(self._unit_group) or "").strip()
            if self._units:
                factor = self._units.get(unit)
                if factor is None:
                    return Reading(_NAN, _BAD, "unit", "unit")
                number *= factor
            elif unit != self._unit:
                return Reading(_NAN, _BAD, "unit", "unit")
        value = number * self._scale + self._offset
        quality, reason = self._base[reply.shape_index]
        fault = ""
        if not self._min <= value <= self._max:  # (False for an infinity too)
            if value - value != 0.0:  # the scaling overflowed: no number to record
                value, fault = _NAN, "overflow"
            else:
                fault = "out-of-range"
            quality = _BAD
            reason = f"{reason}; {fault}" if reason else fault
        words = self._words.get(reply.shape_index)
        if words is not None:
            for group, rules in words.rules.items():
                said = groups.get(group) or ""
                if said in words.fine[group]:
                    continue
                for word in said.split():
                    judged = rules.get(word)
                    if judged is None:
                        if words.unknown is _GOOD:
                            continue
                        # The word itself is the device's: the incident keeps it (the reply).
                        judged = (words.unknown, f"{group} unknown-word")
                        fault = fault or "unknown-word"
                    elif judged[0] is _GOOD:
                        continue
                    quality = max(quality, judged[0])
                    if judged[1] not in reason.split("; "):  # once each: a bounded set
                        reason = f"{reason}; {judged[1]}" if reason else judged[1]
        return _tuple_new(Reading, (value, quality, reason, fault))
