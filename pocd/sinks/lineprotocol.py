"""InfluxDB line protocol: the one encoder behind both write paths (v1 /write, v2 /api/v2/write).

Pure: store rows and records in, lines out; no I/O, no clock, no decision about what to send
or when (that is the forwarder's). The schema it writes is documented in README.md
("InfluxDB"); every point's timestamp is a time from the store, in nanoseconds, and its tags
are derived from stored data only, so sending a point again overwrites it instead of adding a
second one.

Samples are the hot path: each line is one f-string over a tag prefix made once per channel
and run segment and a field prefix made once per quality code. A NaN value (NULL in the
store) leaves out the `value` field. An infinite value is written as `inf`, which InfluxDB
refuses; the forwarder then quarantines that one point with an incident, and the store keeps
the reading.

Tag values are identifiers; line protocol cannot carry a newline or a trailing backslash in
one, so control characters become spaces and a backslash becomes '/'. String fields keep
their text, with newlines written as the two characters `\\n`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pocd.model import NS, Deviation, Excursion, PhaseChange, Quality, Run
from pocd.store import SAMPLE_KEY_BITS, Change, SampleRow

__all__ = [
    "MEASUREMENTS",
    "SampleEncoder",
    "Segment",
    "Timeline",
    "encode_change",
    "field_string",
    "tag_value",
]

MEASUREMENTS = {
    "sample": "pocd_sample",
    "run": "pocd_run",
    "phase": "pocd_phase",
    "excursion": "pocd_excursion",
    "deviation": "pocd_deviation",
}
_FOREVER = 2**63 - 1
_QUALITY_MASK = (1 << SAMPLE_KEY_BITS) - 1

_TAG_TABLE = str.maketrans(
    {
        "\\": "/",
        ",": "\\,",
        "=": "\\=",
        " ": "\\ ",
        **{chr(c): "\\ " for c in [*range(32), 0x7F]},
    }
)
_STRING_TABLE = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def tag_value(text: str) -> str:
    """A tag key or value, escaped (see the module docstring)."""
    return text.translate(_TAG_TABLE)


def field_string(text: str) -> str:
    """A string field value, quoted and escaped."""
    return f'"{text.translate(_STRING_TABLE)}"'


def _tags(measurement: str, tags: Mapping[str, str | None]) -> str:
    """`measurement,k=v,...` with keys sorted (InfluxDB's order, cheaper for it to ingest)
    and empty values left out (line protocol has no empty tag value)."""
    parts = [measurement]
    parts += [f"{k}={tag_value(v)}" for k, v in sorted(tags.items()) if v]
    return ",".join(parts)


def _fields(fields: Mapping[str, str | int | float | bool | None]) -> str:
    """`k=v,...` for the fields that have a value; a NaN float is left out like None."""
    out = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int):
            out.append(f"{key}={value}i")
        elif isinstance(value, float):
            if not math.isnan(value):
                out.append(f"{key}={value!r}")
        else:
            out.append(f"{key}={field_string(value)}")
    return ",".join(out)


# --- runs, batches and phases by time ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of time in one run and one phase: [start, end)."""

    start: int
    end: int
    run: str
    batch: str
    phase: str


class Timeline:
    """Which run, batch and phase each instant belongs to, from the stored runs and phases.

    A run covers [started, ended); if a crash left a run running when the next one started,
    the later run wins from its start. Within a run, a phase lasts from its change to the
    next one. Instants outside every run belong to no segment.
    """

    def __init__(self, runs: Iterable[Run], phases: Iterable[PhaseChange]) -> None:
        by_run: dict[str, list[PhaseChange]] = {}
        for change in phases:
            by_run.setdefault(change.run_id, []).append(change)
        ordered = sorted(runs, key=lambda r: (r.started, r.id))
        self.batches = {run.id: run.batch_id for run in ordered}
        segments: list[Segment] = []
        for i, run in enumerate(ordered):
            end = _FOREVER if run.ended is None else run.ended
            if i + 1 < len(ordered):
                end = min(end, ordered[i + 1].started)
            changes = sorted(by_run.get(run.id, []), key=lambda c: c.t)
            starts = [run.started] + [max(c.t, run.started) for c in changes]
            names = [""] + [c.phase for c in changes]
            for j, start in enumerate(starts):
                stop = min(end, starts[j + 1]) if j + 1 < len(starts) else end
                if start < stop:
                    segments.append(Segment(start, stop, run.id, run.batch_id, names[j]))
        self.segments = segments
        self._starts = [s.start for s in segments]

    def at(self, t: int) -> Segment | None:
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0 and t < self.segments[i].end:
            return self.segments[i]
        return None

    def covering(self, low: int, high: int) -> tuple[bool, Segment | None]:
        """(True, the segment) if [low, high] lies in one segment or in one gap between
        segments (then None); (False, None) if it crosses a boundary."""
        i = bisect.bisect_right(self._starts, low) - 1
        inside = i >= 0 and low < self.segments[i].end
        if inside:
            return (True, self.segments[i]) if high < self.segments[i].end else (False, None)
        following = self._starts[i + 1] if i + 1 < len(self._starts) else _FOREVER
        return (high < following, None)


# --- samples ----------------------------------------------------------------------------------


class _Heads(dict[int, str]):
    """Sample key -> the line up to its value (or its time, `bare`), for one run segment.

    Made on first use of a key: the channels times the qualities seen could be many, the
    pairs that occur are few.
    """

    __slots__ = ("bare", "encoder", "segment")

    def __init__(self, encoder: SampleEncoder, segment: Segment | None, *, bare: bool) -> None:
        super().__init__()
        self.encoder, self.segment, self.bare = encoder, segment, bare

    def __missing__(self, key: int) -> str:
        head = self.encoder.head(key, self.segment, bare=self.bare)
        self[key] = head
        return head


class SampleEncoder:
    """Sample rows from the store (see `Store.sample_rows`) -> `pocd_sample` lines.

    `channels` and `qualities` are the store's interned codes (`Store.sample_codes`);
    `parameters` maps (device, point) to the protocol parameter the point feeds.
    KeyError from `encode` means a code unknown here: refresh with `set_codes` and retry.
    """

    def __init__(self, site: str, parameters: Mapping[tuple[str, str], str]) -> None:
        self.site = site
        self.parameters = dict(parameters)
        self.timeline = Timeline((), ())
        self._channels: dict[int, tuple[str, str]] = {}
        self._fields: dict[int, str] = {}  # quality code -> "quality=..i[,reason=..]"
        self._heads: dict[tuple[Segment | None, bool], _Heads] = {}

    def set_codes(
        self,
        channels: Mapping[int, tuple[str, str]],
        qualities: Mapping[int, tuple[Quality, str]],
    ) -> None:
        self._channels = dict(channels)
        self._fields = {
            code: f"quality={int(quality)}i" + (f",reason={field_string(reason)}" if reason else "")
            for code, (quality, reason) in qualities.items()
        }
        self._heads.clear()

    def set_timeline(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._heads.clear()

    def head(self, key: int, segment: Segment | None, *, bare: bool) -> str:
        """The line of a sample up to its value, or (`bare`: no value) up to its time."""
        device, point = self._channels[key >> SAMPLE_KEY_BITS]
        fields = self._fields[key & _QUALITY_MASK]
        tags = {
            "site": self.site,
            "device": device,
            "point": point,
            "parameter": self.parameters.get((device, point)),
        }
        if segment is not None:
            tags |= {"run": segment.run, "batch": segment.batch, "phase": segment.phase}
        return f"{_tags(MEASUREMENTS['sample'], tags)} {fields}" + ("" if bare else ",value=")

    def _heads_of(self, segment: Segment | None) -> tuple[_Heads, _Heads]:
        found = self._heads.get((segment, False))
        if found is None:
            found = self._heads[(segment, False)] = _Heads(self, segment, bare=False)
            self._heads[(segment, True)] = _Heads(self, segment, bare=True)
        return found, self._heads[(segment, True)]

    def encode(self, rows: Sequence[SampleRow], times: tuple[int, int]) -> list[str]:
        """One line per row, in order. `times` is (min, max) of the rows' times."""
        single, segment = self.timeline.covering(*times)
        if single:
            valued, bare = self._heads_of(segment)
            return [
                f"{valued[key]}{v!r} {t}" if v is not None else f"{bare[key]} {t}"
                for key, v, t in rows
            ]
        # The batch crosses a run or phase boundary: look each row's segment up.
        at, heads_of = self.timeline.at, self._heads_of
        return [
            f"{heads_of(at(int(t)))[0][key]}{v!r} {t}"
            if v is not None
            else f"{heads_of(at(int(t)))[1][key]} {t}"
            for key, v, t in rows
        ]


# --- runs, phases, excursions, deviations -----------------------------------------------------


def encode_change(site: str, change: Change, batches: Mapping[str, str]) -> str:
    """The line of a run, phase change, excursion or deviation in its current state.

    Its tags are what identifies it and never changes, and its timestamp is when it began, so
    each later state overwrites the same point. `batches` maps run ids to batch ids.
    """
    if isinstance(change, Run):
        tags: dict[str, str | None] = {
            "site": site,
            "run": change.id,
            "batch": change.batch_id,
            "protocol": change.protocol_id,
            "protocol_version": change.protocol_version,
        }
        fields: dict[str, str | int | float | bool | None] = {
            "status": change.status.value,
            "operator": change.operator,
            "protocol_hash": change.protocol_hash,
            "timezone": change.timezone,
            "ended": change.ended,
            "end_reason": change.end_reason or None,
        }
        return f"{_tags(MEASUREMENTS['run'], tags)} {_fields(fields)} {change.started}"
    if isinstance(change, PhaseChange):
        tags = {
            "site": site,
            "run": change.run_id,
            "batch": batches.get(change.run_id),
            "phase": change.phase,
        }
        fields = {
            "previous": change.previous,
            "actor": change.actor,
            "in_order": change.in_order,
            "reason": change.reason or None,
        }
        return f"{_tags(MEASUREMENTS['phase'], tags)} {_fields(fields)} {change.t}"
    if isinstance(change, Excursion):
        tags = {
            "site": site,
            "run": change.run_id,
            "batch": batches.get(change.run_id),
            "parameter": change.parameter,
            "kind": change.kind.value,
            "phase": change.phase,
        }
        fields = {
            "id": change.id,
            "open": change.end is None,
            "end": change.end,
            "duration_s": None if change.end is None else (change.end - change.start) / NS,
            "limit": change.limit,
            "worst": change.worst,
            "integral": change.integral,
            "protocol": change.protocol_id,
            "protocol_version": change.protocol_version,
        }
        return f"{_tags(MEASUREMENTS['excursion'], tags)} {_fields(fields)} {change.start}"
    if isinstance(change, Deviation):
        tags = {
            "site": site,
            "run": change.run_id,
            "batch": batches.get(change.run_id),
            "cause": change.cause.value,
            "phase": change.phase,
            "parameter": change.parameter,
        }
        fields = {
            "id": change.id,
            # pocd records no disposition yet: every deviation stays open until a later
            # release writes its state to this same point.
            "status": "open",
            "description": change.description,
            "excursion_id": change.excursion_id,
        }
        return f"{_tags(MEASUREMENTS['deviation'], tags)} {_fields(fields)} {change.t}"
    raise TypeError(f"cannot encode a {type(change).__name__}")
