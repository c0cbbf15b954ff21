"""One description per record type: how each field of a run, phase change, excursion,
deviation, incident and audit entry maps to its store column, its JSON key and its InfluxDB
tag or field.

The store's row mapping (`pocd.store.sqlite`), the JSON views (`pocd.records`) and the
InfluxDB points (`pocd.sinks.lineprotocol`: a record's point and its transition points) are
made from these descriptions, so a new field or record type is one edit here (plus its
migration). Samples are the exception: their rows are the store's and the encoder's hot path,
written column by column. Nothing here does I/O or knows SQL beyond column names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any, Final, Generic, Literal, TypeVar

from pocd.model import (
    NS,
    AlarmEvent,
    AlarmPriority,
    AlarmState,
    AlarmTransition,
    AuditEntry,
    Deviation,
    DeviationCause,
    Excursion,
    ExcursionKind,
    Incident,
    IncidentKind,
    PhaseChange,
    Run,
    RunStatus,
    Signature,
    User,
)

__all__ = [
    "ALARM_EVENT",
    "AUDIT_ENTRY",
    "DEVIATION",
    "EXCURSION",
    "INCIDENT",
    "PHASE_CHANGE",
    "RECORD_TYPES",
    "RUN",
    "SIGNATURE",
    "USER",
    "Field",
    "RecordType",
    "digest",
    "iso",
]

R = TypeVar("R")
InfluxRole = Literal["tag", "field", "time"]


def iso(t: int | None) -> str | None:
    """A time (ns since the epoch, UTC) as ISO 8601 with milliseconds and a Z; None for none."""
    if t is None:
        return None
    return (
        datetime.fromtimestamp(t / NS, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a record.

    `attr` is the record's attribute (or property); `column` its store column, None for what
    is derived and not stored; `json` its key in the JSON views, None for none, and a time
    (`time=True`) is written as ISO text under `json` and as nanoseconds under `json_ns`;
    `influx` its role in the line protocol (tag, field or the point's time) under
    `influx_key` (default: `json`). `enum` is the StrEnum its stored text decodes to.
    """

    attr: str
    column: str | None
    json: str | None
    influx: InfluxRole | None = None
    influx_key: str | None = None
    time: bool = False
    enum: type[StrEnum] | None = None
    flag: bool = False  # stored as 0 or 1, read back as a bool
    null_is_nan: bool = False  # SQLite stores NaN as NULL: read back as NaN
    to_column: Callable[[Any], Any] | None = None  # how it is stored, if not as it is
    from_column: Callable[[Any], Any] | None = None  # and read back

    def encode(self) -> Callable[[Any], Any]:
        """What turns the field's value into the stored one."""
        return self.to_column or _plain

    def decode(self) -> Callable[[Any], Any] | None:
        """What turns a stored value back into the field's; None when it reads as stored."""
        if self.from_column is not None:
            return self.from_column
        if self.enum is not None:
            return self.enum
        if self.flag:
            return bool
        if self.null_is_nan:
            return _nan_for_null
        return None


def _nan_for_null(value: Any) -> Any:
    return float("nan") if value is None else value


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


@dataclass(frozen=True, slots=True)
class RecordType(Generic[R]):
    """A record type: its class, its store table and its fields, in the order of the JSON
    views (the store's columns follow the same order, the key first)."""

    record: Callable[..., R]
    table: str
    fields: tuple[Field, ...]
    stored: tuple[Field, ...] = dataclass_field(init=False)
    _encoders: tuple[tuple[str, Callable[[Any], Any]], ...] = dataclass_field(init=False)
    _decoders: tuple[Callable[[Any], Any] | None, ...] = dataclass_field(init=False)

    def __post_init__(self) -> None:
        stored = tuple(f for f in self.fields if f.column is not None)
        object.__setattr__(self, "stored", stored)
        object.__setattr__(self, "_encoders", tuple((f.attr, f.encode()) for f in stored))
        object.__setattr__(self, "_decoders", tuple(f.decode() for f in stored))

    @property
    def columns(self) -> str:
        """The stored columns, comma separated, for INSERT and SELECT."""
        return ", ".join(str(f.column) for f in self.stored)

    def row(self, record: R) -> tuple[Any, ...]:
        """The stored values of a record, in the order of `columns`."""
        return tuple(encode(getattr(record, attr)) for attr, encode in self._encoders)

    def from_row(self, row: tuple[Any, ...] | list[Any]) -> R:
        """The record of a row of `columns`."""
        return self.record(
            **{
                f.attr: value if decode is None else decode(value)
                for f, decode, value in zip(self.stored, self._decoders, row, strict=True)
            }
        )

    def json(self, record: R) -> dict[str, Any]:
        """The record as a JSON-ready dict, keys in the order of `fields`."""
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.json is None:
                continue
            value = _plain(getattr(record, f.attr))
            if f.time:
                out[f.json] = iso(value)
                out[f.json + "_ns"] = value
            else:
                out[f.json] = value
        return out

    def influx(self, record: R) -> tuple[dict[str, Any], dict[str, Any], int]:
        """The record's InfluxDB tags and fields (key -> value, enums as their text) and the
        point's time, as its fields' roles say."""
        tags: dict[str, Any] = {}
        fields: dict[str, Any] = {}
        time = 0
        for f in self.fields:
            if f.influx is None:
                continue
            value = _plain(getattr(record, f.attr))
            if f.influx == "time":
                time = value
            else:
                (tags if f.influx == "tag" else fields)[f.influx_key or f.json or f.attr] = value
        return tags, fields, time

    def influx_keys(self, role: InfluxRole) -> dict[str, str]:
        """attribute -> line-protocol key of the fields that have `role`."""
        return {f.attr: f.influx_key or f.json or f.attr for f in self.fields if f.influx == role}


RUN: Final = RecordType(
    Run,
    "runs",
    (
        Field("id", "id", "id", "tag", "run"),
        Field("batch_id", "batch_id", "batch_id", "tag", "batch"),
        Field("site_id", "site_id", "site_id"),
        Field("timezone", "timezone", "timezone", "field"),
        Field("protocol_id", "protocol_id", "protocol_id", "tag", "protocol"),
        Field("protocol_version", "protocol_version", "protocol_version", "tag"),
        Field("protocol_hash", "protocol_hash", "protocol_hash", "field"),
        Field("operator", "operator", "operator", "field"),
        Field("status", "status", "status", "field", enum=RunStatus),
        Field("started", "started", "started", "time", time=True),
        Field("ended", "ended", "ended", "field", time=True),
        Field("end_reason", "end_reason", "end_reason", "field"),
        Field("line", "line", "line", influx="tag"),
    ),
)
PHASE_CHANGE: Final = RecordType(
    PhaseChange,
    "phases",
    (
        Field("run_id", "run_id", None, "tag", "run"),
        Field("phase", "phase", "phase", "tag"),
        Field("previous", "previous", "previous", "field"),
        Field("t", "t", "t", "time", time=True),
        Field("actor", "actor", "actor", "field"),
        Field("in_order", "in_order", "in_order", "field", flag=True),
        Field("reason", "reason", "reason", "field"),
    ),
)
EXCURSION: Final = RecordType(
    Excursion,
    "excursions",
    (
        Field("id", "id", "id", "field"),
        Field("parameter", "parameter", "parameter", "tag"),
        Field("kind", "kind", "kind", "tag", enum=ExcursionKind),
        Field("phase", "phase", "phase", "tag"),
        Field("protocol_id", "protocol_id", "protocol_id", "field", "protocol"),
        Field("protocol_version", "protocol_version", "protocol_version", "field"),
        Field("limit", "limit_value", "limit", "field"),
        Field("start", "start_t", "start", "time", time=True),
        Field("end", "end_t", "end", "field", time=True),
        Field("duration_s", None, "duration_s", "field"),
        Field("worst", "worst", "worst", "field"),
        Field("integral", "integral", "integral", "field", null_is_nan=True),
        Field("run_id", "run_id", "run_id", "tag", "run"),
        Field("line", "line", "line", influx="tag"),
    ),
)
DEVIATION: Final = RecordType(
    Deviation,
    "deviations",
    (
        Field("id", "id", "id", "field"),
        Field("t", "t", "t", "time", time=True),
        Field("cause", "cause", "cause", "tag", enum=DeviationCause),
        Field("phase", "phase", "phase", "tag"),
        Field("parameter", "parameter", "parameter", "tag"),
        Field("excursion_id", "excursion_id", "excursion_id", "field"),
        Field("description", "description", "description", "field"),
        Field("run_id", "run_id", "run_id", "tag", "run"),
        Field("line", "line", "line", influx="tag"),
    ),
)
INCIDENT: Final = RecordType(
    Incident,
    "incidents",
    (
        Field("t", "t", "t", time=True),
        Field("kind", "kind", "kind", enum=IncidentKind),
        Field("code", "code", "code"),
        Field("source", "source", "source"),
        Field("message", "message", "message"),
        Field("raw", "raw", None, to_column=bytes, from_column=bytes),
    ),
)
AUDIT_ENTRY: Final = RecordType(
    AuditEntry,
    "audit",
    (
        Field("t", "t", "t", time=True),
        Field("actor", "actor", "actor"),
        Field("action", "action", "action"),
        Field("target", "target", "target"),
        Field("reason", "reason", "reason"),
        Field("old", "old_value", "old"),
        Field("new", "new_value", "new"),
        Field(
            "details",
            "details",
            "details",
            to_column=lambda details: json.dumps(details, sort_keys=True, ensure_ascii=False),
            from_column=json.loads,
        ),
    ),
)

SIGNATURE: Final = RecordType(
    Signature,
    "signatures",
    (
        Field("t", "t", "t", "time", time=True),
        Field("utc_offset", "utc_offset", "utc_offset", "field"),
        Field("login", "login", "login", "tag"),
        Field("name", "name", "name", "field"),
        Field("meaning", "meaning", "meaning", "tag"),
        Field("action", "action", "action", "tag"),
        Field("record", "record", "record", "field"),
        Field("record_hash", "record_hash", "record_hash", "field"),
        Field("run_id", "run_id", "run_id", "tag", "run"),
    ),
)
USER: Final = RecordType(
    User,
    "users",
    (
        Field("login", "login", "login"),
        Field("name", "name", "name"),
        Field(
            "roles",
            "roles",
            "roles",
            to_column=" ".join,
            from_column=lambda text: tuple(text.split()),
        ),
        Field("password_hash", "password_hash", None),  # never in a view
        Field("disabled", "disabled", "disabled", flag=True),
        Field("created", "created", "created", time=True),
        Field("changed", "changed", "changed", time=True),
    ),
)

ALARM_EVENT: Final = RecordType(
    AlarmEvent,
    "alarm_events",
    (
        Field("t", "t", "t", "time", time=True),
        Field("alarm_id", "alarm_id", "alarm_id", "field"),
        Field("line", "line", "line", "tag"),
        Field("source", "source", "source", "tag"),
        Field("kind", "kind", "kind", "tag"),
        Field("transition", "transition", "transition", "tag", enum=AlarmTransition),
        Field("state", "state", "state", "field", enum=AlarmState),
        Field("priority", "priority", "priority", "tag", enum=AlarmPriority),
        Field("began", "began", "began", "field", time=True),
        Field("actor", "actor", "actor", "field"),
        Field("comment", "comment", "comment", "field"),
        Field("until", "until_t", "until", "field", time=True),
        Field("run_id", "run_id", "run_id", "tag", "run"),
        Field("batch_id", "batch_id", "batch_id", "field", "batch_id"),
        Field("phase", "phase", "phase", "field"),
        Field("device", "device", "device", "field"),
        Field("value", "value", "value", "field"),
        Field("limit", "limit_value", "limit", "field"),
        Field("unit", "unit", "unit", "field"),
        Field("first_out", "first_out", "first_out", "field", flag=True),
    ),
)

# The description of each record class.
RECORD_TYPES: Final[dict[type, RecordType[Any]]] = {
    d.record: d  # type: ignore[misc]
    for d in (
        RUN,
        PHASE_CHANGE,
        EXCURSION,
        DEVIATION,
        INCIDENT,
        AUDIT_ENTRY,
        SIGNATURE,
        ALARM_EVENT,
    )
}


def digest(record: Any) -> str:
    """The SHA-256 (hex) of a record's stored content: every stored column by name, as
    canonical JSON. What an electronic signature binds to: the same record read back from the
    store gives the same digest, and any change of a stored value gives another."""
    kind = RECORD_TYPES[type(record)]
    content = dict(zip((str(f.column) for f in kind.stored), kind.row(record), strict=True))
    text = json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(text.encode()).hexdigest()
