"""From an OPC UA DataValue to a pocd reading: number, quality, reason, device time.

Pure functions and per-point bookkeeping, without I/O, so they are tested with plain values:
status codes to quality (Bad_* is BAD, Uncertain_* is UNCERTAIN, the status name is the
reason), values to numbers (booleans, enumerations, mapped text), SourceTimestamp to
nanoseconds, the repeat filter that keeps one sample per (point, source time), and staleness
of a SourceTimestamp that stops advancing. Nothing here knows asyncua's client or the inbox.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from asyncua import ua
from asyncua.ua import status_codes
from asyncua.ua.status_codes import StatusCodes

from pocd.model import Quality, Sample

__all__ = [
    "FROZEN_REASON",
    "NODE_FAULTS",
    "STALE_REASON",
    "PointTrack",
    "Reading",
    "judge_status",
    "reading_of",
    "source_ns",
    "status_name",
    "to_number",
]

STALE_REASON = "stale source timestamp"
FROZEN_REASON = "source timestamp did not advance"
_NAN = math.nan
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# OPC UA's null DateTime is 1601-01-01 (asyncua decodes 0 to it); anything before 1971 is no
# real device clock either.
_NO_TIME = datetime(1971, 1, 1, tzinfo=UTC)
_REPEATS_KEPT = 64  # source times remembered per point: more than a server's queue replays

# Status codes that say the node itself is wrong (a configuration problem), not its value.
NODE_FAULTS = frozenset(
    {
        StatusCodes.BadNodeIdUnknown,
        StatusCodes.BadNodeIdInvalid,
        StatusCodes.BadAttributeIdInvalid,
        StatusCodes.BadNotReadable,
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadNoMatch,
        StatusCodes.BadBrowseNameInvalid,
        StatusCodes.BadMonitoredItemFilterUnsupported,
        StatusCodes.BadFilterNotAllowed,
        StatusCodes.BadDeadbandFilterInvalid,
    }
)


def status_name(code: int) -> str:
    """`BadCommunicationError`, or the code in hex for one this asyncua does not know."""
    name, _ = status_codes.get_name_and_doc(code & 0xFFFF0000)
    if getattr(StatusCodes, name, None) == code & 0xFFFF0000:
        return name
    return f"0x{code:08X}"


def judge_status(code: int) -> tuple[Quality, str]:
    """Quality from the severity bits of a status code; the reason is the status name."""
    severity = code >> 30
    if severity == 0:
        return Quality.GOOD, ""
    return (Quality.UNCERTAIN if severity == 1 else Quality.BAD), status_name(code)


def to_number(raw: object, values: Mapping[str, float]) -> tuple[float, str]:
    """A number for a value, or NaN and why not. Text goes through the point's `values` map."""
    if isinstance(raw, bool):
        return (1.0 if raw else 0.0), ""
    if isinstance(raw, int | float):  # enumerations arrive as int subclasses
        number = float(raw)
        if math.isfinite(number):
            return number, ""
        return _NAN, ("nan" if math.isnan(number) else "infinite")
    if isinstance(raw, ua.LocalizedText):
        raw = raw.Text or ""
    if isinstance(raw, str):
        if raw in values:
            return values[raw], ""
        # pocd samples are numbers: a text with no number keeps its text in the reason.
        return _NAN, (f"unmapped text {raw!r}" if values else f"text {raw!r}")
    if raw is None:
        return _NAN, "no value"
    return _NAN, f"unsupported type {type(raw).__name__}"


def source_ns(stamp: datetime | None) -> int | None:
    """A SourceTimestamp in ns since the epoch; None when the server gave none."""
    if stamp is None or stamp < _NO_TIME:
        return None
    return ((stamp - _EPOCH) // _US) * 1000


@dataclass(frozen=True, slots=True)
class Reading:
    value: float
    quality: Quality
    reason: str
    device_t: int | None
    status: int  # the OPC UA status code, 0 when good


def reading_of(
    data: ua.DataValue,
    values: Mapping[str, float],
    eu_range: tuple[float, float] | None = None,
) -> Reading:
    """Judge one DataValue. A Bad status drops the value: OPC UA says it is not to be used."""
    status = data.StatusCode.value if data.StatusCode is not None else 0
    quality, reason = judge_status(status) if status else (Quality.GOOD, "")
    device_t = source_ns(data.SourceTimestamp)
    if quality is Quality.BAD:
        return Reading(_NAN, quality, reason, device_t, status)
    variant = data.Value
    value, why_not = to_number(variant.Value if variant is not None else None, values)
    if why_not:
        return Reading(_NAN, Quality.BAD, why_not, device_t, status)
    if eu_range is not None and quality is Quality.GOOD and not eu_range[0] <= value <= eu_range[1]:
        quality, reason = Quality.UNCERTAIN, f"outside EURange [{eu_range[0]:g}, {eu_range[1]:g}]"
    return Reading(value, quality, reason, device_t, status)


@dataclass(slots=True)
class PointTrack:
    """What one point has delivered: for the repeat filter, staleness and status changes.

    One sample per (point, source time): a value seen again with the same SourceTimestamp (a
    poll of an unchanged node, the first notification of a recreated monitored item, a
    server's replay) is a repeat and is dropped. A different value under a source time already
    used means the device's clock did not move: it is kept, without a device time, as
    UNCERTAIN, or as BAD once the point is stale.
    """

    stale_after: float | None = None
    seen: OrderedDict[int, tuple[float, Quality, str]] = field(default_factory=OrderedDict)
    newest: int | None = None  # newest source time seen
    advanced_at: float | None = None  # monotonic time the source time last moved forward
    stale: bool = False
    last_untimed: tuple[Quality, str] | None = None  # last sample without a source time
    status: int = 0  # last status code, for incidents on change

    def restart(self, now: float) -> None:
        """A new session: staleness counts from now, not from before the outage."""
        self.advanced_at = now

    def take(self, device: str, point: str, t: int, reading: Reading, now: float) -> Sample | None:
        """The sample to record for a reading, or None for a repeat."""
        stamp = reading.device_t
        value, quality, reason = reading.value, reading.quality, reading.reason
        if stamp is None:
            # Without a source time every reading is new, except a repeated fault.
            key = (quality, reason)
            if quality is Quality.BAD and key == self.last_untimed:
                return None
            self.last_untimed = key
            return Sample(device, point, t, value, quality, None, reason)
        self.last_untimed = None
        known = self.seen.get(stamp)
        if known is not None:
            same = known[0] == value or (math.isnan(value) and math.isnan(known[0]))
            if same and known[1:] == (quality, reason):
                return None
            if self.stale:
                return Sample(device, point, t, value, Quality.BAD, None, STALE_REASON)
            if quality is Quality.GOOD:
                quality, reason = Quality.UNCERTAIN, FROZEN_REASON
            return Sample(device, point, t, value, quality, None, reason)
        self.seen[stamp] = (value, quality, reason)
        if len(self.seen) > _REPEATS_KEPT:
            self.seen.popitem(last=False)
        if self.newest is None or stamp > self.newest:
            self.newest = stamp
            self.advanced_at = now
            self.stale = False
        return Sample(device, point, t, value, quality, stamp, reason)

    def check_stale(self, device: str, point: str, t: int, now: float) -> Sample | None:
        """The stale marker, once, when the source time has not moved for `stale_after`."""
        if self.stale_after is None or self.stale or self.advanced_at is None:
            return None
        if now - self.advanced_at <= self.stale_after:
            return None
        self.stale = True
        return Sample(device, point, t, _NAN, Quality.BAD, None, STALE_REASON)
