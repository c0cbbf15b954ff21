"""From an OPC UA DataValue to a pocd reading: number, quality, reason, device time.

Pure functions and per-point bookkeeping, without I/O, so they are tested with plain values:
status codes to quality (Bad_* is BAD, Uncertain_* is UNCERTAIN, the status name is the
reason), values to numbers (booleans, enumerations, mapped text), SourceTimestamp to
nanoseconds, the repeat filter that keeps one sample per (point, source time), and staleness
of a SourceTimestamp that stops advancing. A reason is always one of a bounded set of codes
(a status name, `nan`, `text`, `stale`, ...): what the server said (a text, an impossible
time) is handed to the runner for an incident, never put into the reason. Nothing here knows
asyncua's client or the inbox.
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

from pocd.model import STALE_REASON, Quality, Sample

__all__ = [
    "FROZEN_REASON",
    "IMPOSSIBLE_TIME",
    "NODE_FAULTS",
    "STALE_REASON",
    "TEXT_REASON",
    "UNMAPPED_TEXT_REASON",
    "PointTrack",
    "Reading",
    "impossible_time",
    "judge_status",
    "reading_of",
    "source_ns",
    "status_name",
    "status_reason",
    "to_number",
]

# The stale marker (model.STALE_REASON), and nothing else: the engine makes a BAD sample of
# this reason a `stale` excursion (no fresh value), not a `bad-quality` one.
FROZEN_REASON = "frozen-time"  # a new value under a SourceTimestamp already used
IMPOSSIBLE_TIME = "impossible-time"  # a SourceTimestamp no clock can give (DateTime.MaxValue)
TEXT_REASON = "text"  # a text, where the point has no `values` to make it a number
UNMAPPED_TEXT_REASON = "unmapped-text"  # a text that is not among the point's `values`
UNKNOWN_STATUS = "unknown-status"  # a status code this asyncua has no name for
_NAN = math.nan
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# OPC UA's null DateTime is 1601-01-01 (asyncua decodes 0 to it); anything before 1971 is no
# real device clock either.
_NO_TIME = datetime(1971, 1, 1, tzinfo=UTC)
# Nanoseconds since 1970 fit a signed 64-bit integer (the store's) until 2262-04-11: a time at
# or past that (OPC UA's DateTime.MaxValue is 9999-12-31) is no device's clock.
_LATEST = datetime(2262, 4, 11, tzinfo=UTC)
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


def status_reason(code: int) -> str:
    """The reason a sample of this status gets: its name, from the bounded set of status codes
    OPC UA defines (a code without a name is `unknown-status`; its number goes to incidents)."""
    name = status_name(code)
    return UNKNOWN_STATUS if name.startswith("0x") else name


def judge_status(code: int) -> tuple[Quality, str]:
    """Quality from the severity bits of a status code; the reason is the status name."""
    severity = code >> 30
    if severity == 0:
        return Quality.GOOD, ""
    return (Quality.UNCERTAIN if severity == 1 else Quality.BAD), status_reason(code)


def to_number(raw: object, values: Mapping[str, float]) -> tuple[float, str]:
    """A number for a value, or NaN and why not (a code). Text goes through the point's
    `values` map; a text it does not hold is `text` (no map) or `unmapped-text`."""
    if isinstance(raw, bool):
        return (1.0 if raw else 0.0), ""
    if isinstance(raw, int | float):  # enumerations arrive as int subclasses
        number = float(raw)
        if math.isfinite(number):
            return number, ""
        return _NAN, ("nan" if math.isnan(number) else "inf")
    if isinstance(raw, ua.LocalizedText):
        raw = raw.Text or ""
    if isinstance(raw, str):
        if raw in values:
            return values[raw], ""
        # pocd samples are numbers: the text itself is kept by the runner, not in the reason.
        return _NAN, (UNMAPPED_TEXT_REASON if values else TEXT_REASON)
    if raw is None:
        return _NAN, "no-value"
    return _NAN, "unsupported-type"


def _text_of(raw: object) -> str | None:
    if isinstance(raw, ua.LocalizedText):
        return raw.Text or ""
    return raw if isinstance(raw, str) else None


def impossible_time(stamp: datetime | None) -> bool:
    """Whether a SourceTimestamp is one no device clock gives: at or past 2262-04-11, beyond
    what nanoseconds since 1970 hold in 64 bits (OPC UA's DateTime.MaxValue among them)."""
    return stamp is not None and stamp >= _LATEST


def source_ns(stamp: datetime | None) -> int | None:
    """A SourceTimestamp in ns since the epoch; None when the server gave none, and for an
    impossible one (see `impossible_time`: `reading_of` makes such a reading BAD)."""
    if stamp is None or stamp < _NO_TIME or stamp >= _LATEST:
        return None
    return ((stamp - _EPOCH) // _US) * 1000


@dataclass(frozen=True, slots=True)
class Reading:
    value: float
    quality: Quality
    reason: str  # a code, never the server's text
    device_t: int | None
    status: int  # the OPC UA status code, 0 when good
    fault: str = ""  # a data fault worth an incident ("nan", "impossible-time", ...)
    detail: str = ""  # what the incident says of it: the value, the time the server gave
    text: str | None = None  # the value, where the server sent a text


def reading_of(
    data: ua.DataValue,
    values: Mapping[str, float],
    eu_range: tuple[float, float] | None = None,
) -> Reading:
    """Judge one DataValue. A Bad status drops the value: OPC UA says it is not to be used.
    An impossible SourceTimestamp makes the reading BAD (its value is kept) and a fault."""
    status = data.StatusCode.value if data.StatusCode is not None else 0
    quality, reason = judge_status(status) if status else (Quality.GOOD, "")
    stamp: datetime | None = data.SourceTimestamp
    fault = detail = ""
    # `source_ns`, inline: this runs for every value.
    if stamp is None or stamp < _NO_TIME:
        device_t = None
    elif stamp < _LATEST:
        device_t = ((stamp - _EPOCH) // _US) * 1000
    else:
        device_t = None
        fault, detail = IMPOSSIBLE_TIME, f"SourceTimestamp {stamp.isoformat()}"
    if quality is Quality.BAD:
        return Reading(_NAN, quality, reason, device_t, status, fault, detail)
    variant = data.Value
    raw = variant.Value if variant is not None else None
    value, why_not = to_number(raw, values)
    if why_not:
        text = _text_of(raw)
        if text is None:  # a number that is none, or no value: a fault of the data
            fault, detail = why_not, f"value {raw!r:.200}"
        return Reading(_NAN, Quality.BAD, why_not, device_t, status, fault, detail, text)
    if fault:
        return Reading(value, Quality.BAD, IMPOSSIBLE_TIME, None, status, fault, detail)
    if eu_range is not None and quality is Quality.GOOD and not eu_range[0] <= value <= eu_range[1]:
        quality, reason = Quality.UNCERTAIN, "outside-eurange"
    # (Only a point with `values` can have had a text that became a number.)
    return Reading(
        value, quality, reason, device_t, status, "", "", _text_of(raw) if values else None
    )


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
    seen: OrderedDict[int, tuple[float, Quality, str, str | None]] = field(
        default_factory=OrderedDict
    )
    newest: int | None = None  # newest source time seen
    advanced_at: float | None = None  # monotonic time the source time last moved forward
    stale: bool = False
    # The last sample without a source time: (quality, reason, text, value or None for NaN).
    last_untimed: tuple[Quality, str, str | None, float | None] | None = None
    status: int = 0  # last status code, for incidents on change

    def restart(self, now: float) -> None:
        """A new session: staleness counts from now, not from before the outage."""
        self.advanced_at = now

    def take(self, device: str, point: str, t: int, reading: Reading, now: float) -> Sample | None:
        """The sample to record for a reading, or None for a repeat."""
        stamp = reading.device_t
        value, quality, reason = reading.value, reading.quality, reading.reason
        if stamp is None:
            # Without a source time every reading is new, except a repeated fault (the same
            # reason, and the same text or value: a changed text is news).
            key = (quality, reason, reading.text, None if math.isnan(value) else value)
            if quality is Quality.BAD and key == self.last_untimed:
                return None
            self.last_untimed = key
            return Sample(device, point, t, value, quality, None, reason)
        self.last_untimed = None
        known = self.seen.get(stamp)
        if known is not None:
            same = known[0] == value or (math.isnan(value) and math.isnan(known[0]))
            if same and known[1:] == (quality, reason, reading.text):
                return None
            if self.stale:
                return Sample(device, point, t, value, Quality.BAD, None, STALE_REASON)
            if quality is Quality.GOOD:
                quality, reason = Quality.UNCERTAIN, FROZEN_REASON
            return Sample(device, point, t, value, quality, None, reason)
        self.seen[stamp] = (value, quality, reason, reading.text)
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
