"""InfluxDB line protocol: the one encoder behind both write paths (v1 /write, v2 /api/v2/write).

Some 430 lines: the sample encoder and the timelines that place a sample in its line's run
and phase are one hot path, read together.

Pure: store rows and records in, lines out; no I/O, no clock, no decision about what to send
or when (that is the forwarder's). The schema it writes is documented in README.md
("InfluxDB"); every point's timestamp is a time from the store, in nanoseconds, and its tags
are derived from stored data that never changes once the sample is committed (the parameter
is its channel's, the run, batch and phase follow from its rowid: see `Timeline`), so sending
a point again overwrites it instead of adding a second one.

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

import base64
import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

from pocd.model import (
    AlarmEvent,
    AuditEntry,
    Checkpoint,
    Deviation,
    Excursion,
    ExcursionEvent,
    PhaseChange,
    Quality,
    Run,
    RunStatus,
)
from pocd.store import SAMPLE_KEY_BITS, Change, Channel, Event, SampleRow
from pocd.store.recordtypes import RECORD_TYPES

__all__ = [
    "MEASUREMENTS",
    "SampleEncoder",
    "Segment",
    "Timeline",
    "Timelines",
    "encode_change",
    "encode_event",
    "field_string",
    "tag_value",
]

MEASUREMENTS = {
    "sample": "pocd_sample",
    "run": "pocd_run",
    "phase": "pocd_phase",
    "excursion": "pocd_excursion",
    "deviation": "pocd_deviation",
    "excursion_event": "pocd_excursion_event",
    "run_event": "pocd_run_event",
    "alarm_event": "pocd_alarm_event",
    "checkpoint": "pocd_checkpoint",
}
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
    """`k=v,...` for the fields that have a value; a NaN float and an empty text are left out
    like None."""
    out = []
    for key, value in fields.items():
        if value is None or value == "":
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


# --- runs, batches and phases by commit order -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """The run, batch and phase of a stretch of consecutive sample rowids."""

    run: str
    batch: str
    phase: str


_V = TypeVar("_V")

# At one mark: a run's end, then a run's start, then phase changes (in the order stored).
_END, _START, _PHASE = 0, 1, 2


class Timeline:
    """Which run, batch and phase each sample belongs to, by its rowid.

    Built from the store's commit marks (`Store.commit_marks`): a run or phase change applies
    from the first sample committed after it, which is the order the engine judged the
    samples in. A record committed later has a later mark, so it cannot change the segment
    of a sample already committed (and perhaps sent). A run lasts from its start mark to its
    end mark; if a crash left a run running when the next one started, the later run takes
    over from its start. A phase change of a run that is not the current one changes nothing.
    Samples outside every run belong to no segment (None).
    """

    def __init__(
        self,
        runs: Iterable[tuple[Run, int, int | None]],
        phases: Iterable[tuple[PhaseChange, int]],
    ) -> None:
        steps: list[tuple[int, int, int, str, str]] = []  # mark, order, seq, run, phase
        self.batches: dict[str, str] = {}
        for seq, (run, first, end) in enumerate(runs):
            self.batches[run.id] = run.batch_id
            if end is not None and end <= first:
                continue  # stored already ended: it holds no sample
            steps.append((first, _START, seq, run.id, ""))
            if end is not None:
                steps.append((end, _END, seq, run.id, ""))
        for seq, (change, first) in enumerate(phases):
            steps.append((first, _PHASE, seq, change.run_id, change.phase))
        steps.sort()
        starts: list[int] = []
        segments: list[Segment | None] = []
        current: Segment | None = None
        for mark, order, _, run_id, phase in steps:
            if order == _START:
                current = Segment(run_id, self.batches[run_id], "")
            elif current is None or current.run != run_id:
                continue  # the end or a phase of a run that is not the current one
            elif order == _END:
                current = None
            else:
                current = Segment(run_id, current.batch, phase)
            if starts and starts[-1] == mark:
                segments[-1] = current  # several records before the same sample: the last
            else:
                starts.append(mark)
                segments.append(current)
        self._starts = starts
        self._segments = segments

    @property
    def starts(self) -> list[int]:
        return list(self._starts)

    def at(self, rowid: int) -> Segment | None:
        i = bisect.bisect_right(self._starts, rowid) - 1
        return self._segments[i] if i >= 0 else None

    def spans(self, first: int, last: int) -> list[tuple[int, int, Segment | None]]:
        """[(from rowid, to rowid inclusive, segment)] covering first..last, in order."""
        return _spans(self._starts, self._segments, None, first, last)


def _spans(
    starts: list[int], values: list[_V], before: _V, first: int, last: int
) -> list[tuple[int, int, _V]]:
    """The stretches of first..last over which the value that holds from each start (and
    `before` the first start) stays the same."""
    i = bisect.bisect_right(starts, first) - 1
    found = []
    low = first
    while True:
        value = values[i] if i >= 0 else before
        following = starts[i + 1] if i + 1 < len(starts) else None
        if following is None or following > last:
            found.append((low, last, value))
            return found
        found.append((low, following - 1, value))
        low = following
        i += 1


# Which segment each line is in at a stretch of rowids: (line, segment) pairs, by line.
Assignment: TypeAlias = tuple[tuple[str, Segment | None], ...]


class Timelines:
    """The runs, batches and phases of every line by sample rowid: one `Timeline` per line,
    fed the line's runs and their phase changes, so that runs on several lines at once each
    keep their own segments. A sample is placed by the line its channel belonged to alone
    (a point in several lines, or in none, belongs to no run)."""

    def __init__(
        self,
        runs: Iterable[tuple[Run, int, int | None]],
        phases: Iterable[tuple[PhaseChange, int]],
    ) -> None:
        runs_of: dict[str, list[tuple[Run, int, int | None]]] = {}
        line_of: dict[str, str] = {}
        for marked in runs:
            runs_of.setdefault(marked[0].line, []).append(marked)
            line_of[marked[0].id] = marked[0].line
        phases_of: dict[str, list[tuple[PhaseChange, int]]] = {}
        for change in phases:
            line = line_of.get(change[0].run_id)
            if line is not None:
                phases_of.setdefault(line, []).append(change)
        self.lines = {
            line: Timeline(marked, phases_of.get(line, ())) for line, marked in runs_of.items()
        }
        self.batches = {run: b for t in self.lines.values() for run, b in t.batches.items()}
        starts = sorted({start for t in self.lines.values() for start in t.starts})
        self._starts = starts
        self._assignments = [self._at(start) for start in starts]

    def _at(self, rowid: int) -> Assignment:
        return tuple((line, t.at(rowid)) for line, t in sorted(self.lines.items()))

    def at(self, rowid: int) -> Assignment:
        i = bisect.bisect_right(self._starts, rowid) - 1
        return self._assignments[i] if i >= 0 else ()

    def spans(self, first: int, last: int) -> list[tuple[int, int, Assignment]]:
        """[(from rowid, to rowid inclusive, assignment)] covering first..last, in order."""
        return _spans(self._starts, self._assignments, (), first, last)


# --- samples ----------------------------------------------------------------------------------


class _Heads(dict[int, str]):
    """Sample key -> the line up to its value (or its time, `bare`), for one assignment of
    run segments to lines.

    Made on first use of a key: the channels times the qualities seen could be many, the
    pairs that occur are few.
    """

    __slots__ = ("bare", "encoder", "segments")

    def __init__(self, encoder: SampleEncoder, segments: Assignment, *, bare: bool) -> None:
        super().__init__()
        self.encoder, self.segments, self.bare = encoder, dict(segments), bare

    def __missing__(self, key: int) -> str:
        head = self.encoder.head(key, self.segments, bare=self.bare)
        self[key] = head
        return head


class SampleEncoder:
    """Sample rows from the store (see `Store.sample_rows`) -> `pocd_sample` lines.

    `channels` and `qualities` are the store's interned codes (`Store.sample_codes`): a
    channel holds the parameter its point fed, so the tag is what was recorded, whatever the
    config says now. KeyError from `encode` means a code unknown here: refresh with
    `set_codes` and retry.
    """

    def __init__(self, site: str) -> None:
        self.site = site
        self.timeline = Timelines((), ())
        self._channels: dict[int, Channel] = {}
        self._fields: dict[int, str] = {}  # quality code -> "quality=..i[,reason=..]"
        self._heads: dict[tuple[Assignment, bool], _Heads] = {}

    def set_codes(
        self,
        channels: Mapping[int, Channel],
        qualities: Mapping[int, tuple[Quality, str]],
    ) -> None:
        self._channels = dict(channels)
        self._fields = {
            code: f"quality={int(quality)}i" + (f",reason={field_string(reason)}" if reason else "")
            for code, (quality, reason) in qualities.items()
        }
        self._heads.clear()

    def set_timeline(self, timeline: Timelines) -> None:
        self.timeline = timeline
        self._heads.clear()

    def head(self, key: int, segments: Mapping[str, Segment | None], *, bare: bool) -> str:
        """The line of a sample up to its value, or (`bare`: no value) up to its time; its
        run, batch and phase are its line's segment in `segments`."""
        device, point, parameter, line = self._channels[key >> SAMPLE_KEY_BITS]
        segment = segments.get(line) if line else None
        fields = self._fields[key & _QUALITY_MASK]
        tags = {"site": self.site, "device": device, "point": point, "parameter": parameter}
        if line:  # the point belonged to one line alone (a shared one: see README, InfluxDB)
            tags["line"] = line
        if segment is not None:
            tags |= {"run": segment.run, "batch": segment.batch, "phase": segment.phase}
        return f"{_tags(MEASUREMENTS['sample'], tags)} {fields}" + ("" if bare else ",value=")

    def _heads_of(self, segments: Assignment) -> tuple[_Heads, _Heads]:
        found = self._heads.get((segments, False))
        if found is None:
            found = self._heads[(segments, False)] = _Heads(self, segments, bare=False)
            self._heads[(segments, True)] = _Heads(self, segments, bare=True)
        return found, self._heads[(segments, True)]

    def encode(self, rows: Sequence[SampleRow], first: int) -> list[str]:
        """One line per row, in order; `first` is the rowid of the first row (row i has rowid
        first + i, see `Store.sample_rows`)."""
        spans = self.timeline.spans(first, first + len(rows) - 1) if rows else []
        if len(spans) == 1:
            return self._lines(rows, spans[0][2])
        # The batch crosses a run or phase boundary: each stretch with its own tags.
        lines: list[str] = []
        for low, high, segments in spans:
            lines += self._lines(rows[low - first : high - first + 1], segments)
        return lines

    def _lines(self, rows: Sequence[SampleRow], segments: Assignment) -> list[str]:
        valued, bare = self._heads_of(segments)
        return [
            f"{valued[key]}{v!r} {t}" if v is not None else f"{bare[key]} {t}" for key, v, t in rows
        ]


# --- runs, phases, excursions, deviations -----------------------------------------------------


def encode_change(site: str, change: Change, batches: Mapping[str, str]) -> str:
    """The line of a run, phase change, excursion or deviation in its current state, as its
    record type's description (pocd.store.recordtypes) says, with the site and the run's batch.

    Its tags are what identifies it and never changes, and its timestamp is when it began, so
    each later state overwrites the same point. `batches` maps run ids to batch ids.
    """
    tags, fields, t = _point(site, change, batches)
    return f"{_tags(MEASUREMENTS[_MEASURED[type(change)]], tags)} {_fields(fields)} {t}"


def encode_event(site: str, event: Event, batches: Mapping[str, str]) -> list[str]:
    """The lines of one event of the store's log (`Store.events`): the record's point in its
    state after the event (overwritten by each later one, as `encode_change`), and for a
    transition of a run or an excursion, a point of the transition itself, which no later one
    overwrites: the record's point with a `change` tag, at the time the change was made (the
    record's own time is then a field). Audit entries are not sent (they stay in the store's
    audit trail)."""
    if isinstance(event, AuditEntry):
        return []
    if isinstance(event, Checkpoint):
        # A witness: enough to check it without the store. Its note is made again from the
        # origin, size and hash (pocd.store.chain.checkpoint_note): a line-protocol string
        # cannot carry the note's newlines.
        witness: dict[str, str | int] = {
            "origin": event.note.split(b"\n", 1)[0].decode(),
            "size": event.size,
            "hash": event.hash,
            "signature": base64.b64encode(event.signature).decode(),
        }
        head = _tags(MEASUREMENTS["checkpoint"], {"site": site, "key_id": event.key_id})
        return [f"{head} {_fields(witness)} {event.t}"]
    if isinstance(event, AlarmEvent):  # a transition only: the alarm's state is its latest
        tags, fields, t = RECORD_TYPES[AlarmEvent].influx(event)
        tags["site"] = site
        return [f"{_tags(MEASUREMENTS['alarm_event'], tags)} {_fields(fields)} {t}"]
    if isinstance(event, ExcursionEvent):
        record: Change = event.excursion
        change = event.change.value
        at = event.t
    elif isinstance(event, Run):
        record = event
        change = "started" if event.status is RunStatus.RUNNING else "ended"
        at = event.started if change == "started" else event.ended
    else:
        return [encode_change(site, event, batches)]
    tags, fields, t = _point(site, record, batches)
    state = f"{_tags(MEASUREMENTS[_MEASURED[type(record)]], tags)} {_fields(fields)} {t}"
    (time_key,) = RECORD_TYPES[type(record)].influx_keys("time").values()
    fields[time_key] = t
    tags["change"] = change
    measurement = MEASUREMENTS[f"{_MEASURED[type(record)]}_event"]
    return [state, f"{_tags(measurement, tags)} {_fields(fields)} {t if at is None else at}"]


_MEASURED: dict[type, str] = {
    Run: "run",
    PhaseChange: "phase",
    Excursion: "excursion",
    Deviation: "deviation",
}


def _point(
    site: str, record: Change, batches: Mapping[str, str]
) -> tuple[dict[str, str | None], dict[str, str | int | float | bool | None], int]:
    """(tags, fields, time) of a record's point: its description's, with the site, the batch
    of its run, and the state it shows (an excursion still open, a deviation not yet
    dispositioned)."""
    kind = RECORD_TYPES.get(type(record))
    if kind is None or type(record) not in _MEASURED:
        raise TypeError(f"cannot encode a {type(record).__name__}")
    tags, fields, t = kind.influx(record)
    tags["site"] = site
    if not isinstance(record, Run):
        tags["batch"] = batches.get(record.run_id or "")
    if isinstance(record, Excursion):
        fields["open"] = record.end is None
    elif isinstance(record, Deviation):
        # pocd records no disposition yet: every deviation stays open until a later release
        # writes its state to this same point.
        fields["status"] = "open"
    return tags, fields, t
