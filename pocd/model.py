"""The records that flow through pocd: samples, excursions, deviations, incidents, runs, audit.

Every record is immutable: a frozen, slotted dataclass, or for `Sample` a NamedTuple. Times
are integers: nanoseconds since the Unix epoch, UTC. Nothing here does I/O or knows how it is
stored. One module of plain declarations: what every other module shares, in one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import NamedTuple

__all__ = [
    "MAIN_LINE",
    "NS",
    "STALE_REASON",
    "AuditEntry",
    "Checkpoint",
    "CommStatus",
    "Deviation",
    "DeviationCause",
    "DeviationChange",
    "DeviationState",
    "Excursion",
    "ExcursionChange",
    "ExcursionEvent",
    "ExcursionKind",
    "Incident",
    "IncidentKind",
    "LoadedFile",
    "PhaseChange",
    "ProtocolText",
    "Quality",
    "Run",
    "RunStatus",
    "Sample",
    "Signature",
    "SiteStatus",
    "User",
    "UserChange",
    "now_ns",
]

NS = 1_000_000_000
# The line of a site config that declares none: it holds every device (see pocd.settings).
MAIN_LINE = "main"
# The reason of a BAD sample a transport makes when a device's value stopped being fresh (its
# source timestamp no longer moves): the engine records it as stale data, not bad quality.
STALE_REASON = "stale"


# Wall-clock UTC time in nanoseconds (the function itself: every reading is stamped with it).
now_ns = time.time_ns


class Quality(IntEnum):
    """OPC UA style quality. Only GOOD and UNCERTAIN values are compared with limits."""

    GOOD = 0
    UNCERTAIN = 1
    BAD = 2


class _SampleFields(NamedTuple):
    device: str
    point: str
    t: int  # receive time
    value: float
    quality: Quality = Quality.GOOD
    device_t: int | None = None  # the device's own timestamp, where it gives one
    reason: str = ""  # why the quality is not GOOD, e.g. "nan", "overload", "status 256"


class Sample(_SampleFields):
    """One original reading of one device point.

    `value` is NaN when the device gave no number; such a sample is always BAD quality.
    The one record that is not a dataclass: every reading makes one, and an immutable tuple is
    built in a quarter of the time of a frozen dataclass (0.4 against 1.5 us here).
    """

    __slots__ = ()

    def __new__(
        cls,
        device: str,
        point: str,
        t: int,
        value: float,
        quality: Quality = Quality.GOOD,
        device_t: int | None = None,
        reason: str = "",
    ) -> Sample:
        if value != value:  # NaN  # noqa: PLR0124
            return tuple.__new__(
                cls, (device, point, t, value, Quality.BAD, device_t, reason or "nan")
            )
        return tuple.__new__(cls, (device, point, t, value, quality, device_t, reason))


@dataclass(frozen=True, slots=True)
class CommStatus:
    """A transport's word that a device stopped (ok=False) or resumed (ok=True) answering."""

    device: str
    t: int
    ok: bool
    reason: str = ""


class IncidentKind(StrEnum):
    """Annex 11 s13: software, communication and data errors, kept apart from deviations."""

    COMMUNICATION = "communication"
    DATA = "data"
    SOFTWARE = "software"
    CONFIGURATION = "configuration"
    CLOCK = "clock"


@dataclass(frozen=True, slots=True)
class Incident:
    t: int
    kind: IncidentKind
    code: str  # timeout, crc, unparseable, modbus-exception, config-reload, clock-jump, ...
    source: str  # device id, or the component (daemon, store, sink:<name>)
    message: str
    raw: bytes = b""  # the offending bytes, where there are some


class ExcursionKind(StrEnum):
    ALERT_LOW = "alert-low"
    ALERT_HIGH = "alert-high"
    ACTION_LOW = "action-low"
    ACTION_HIGH = "action-high"
    RATE = "rate"
    STALE = "stale"
    BAD_QUALITY = "bad-quality"
    COMM_LOSS = "comm-loss"

    @property
    def is_action(self) -> bool:
        return self in (ExcursionKind.ACTION_LOW, ExcursionKind.ACTION_HIGH)

    @property
    def is_data_loss(self) -> bool:
        return self in (ExcursionKind.STALE, ExcursionKind.COMM_LOSS, ExcursionKind.BAD_QUALITY)


@dataclass(frozen=True, slots=True)
class Excursion:
    """A snapshot of one excursion: the limit breached, its span, worst value and integral.

    `limit` is the threshold that was crossed (None for stale, bad-quality and comm-loss);
    `integral` is the time integral of the distance beyond the limit, in unit*s. For a rate
    excursion both are in unit/min. It belongs to a run of `line`, or (`run_id` None) to the
    line itself: an equipment excursion, judged by the line's standby protocol between runs.
    """

    id: str
    run_id: str | None
    parameter: str
    kind: ExcursionKind
    protocol_id: str
    protocol_version: str
    phase: str
    limit: float | None
    start: int
    end: int | None = None
    worst: float | None = None
    integral: float = 0.0
    line: str = MAIN_LINE

    @property
    def duration_s(self) -> float | None:
        return None if self.end is None else (self.end - self.start) / NS


class ExcursionChange(StrEnum):
    OPENED = "opened"
    UPDATED = "updated"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ExcursionEvent:
    """One transition of an excursion, with its snapshot after it. `t` is when the engine
    made it (at or after the excursion's start; an opening waits for the on-delay, a closing
    for the off-delay); None only for events rebuilt from a store that did not keep them."""

    change: ExcursionChange
    excursion: Excursion
    t: int | None = None


class DeviationCause(StrEnum):
    ACTION_LIMIT = "action-limit"
    BUDGET_SPENT = "budget-spent"
    PHASE_ORDER = "phase-order"
    DATA_LOSS = "data-loss"
    PROTOCOL_MISSING = "protocol-missing"  # a running run's protocol can no longer be found


@dataclass(frozen=True, slots=True)
class Deviation:
    """A process deviation that QA must investigate. Disposition is recorded later, by people.
    It belongs to a run of `line`, or (`run_id` None) to the line's equipment between runs."""

    id: str
    run_id: str | None
    t: int
    cause: DeviationCause
    phase: str
    description: str
    parameter: str | None = None
    excursion_id: str | None = None
    line: str = MAIN_LINE


class DeviationState(StrEnum):
    """A deviation's lifecycle: open when raised; assessed (its impact noted); closed (a
    disposition with the reason and root cause, signed by QA)."""

    OPEN = "open"
    ASSESSED = "assessed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class DeviationChange:
    """One step of a deviation's lifecycle, by a person. Never changed or deleted: a
    deviation's state is its latest change's (none: open)."""

    deviation_id: str
    t: int
    actor: str
    state: DeviationState
    note: str  # the impact assessment, or the reason of the disposition
    disposition: str = ""  # closed: what was decided (no impact, impact accepted, rejected)
    root_cause: str = ""  # closed: why it happened


@dataclass(frozen=True, slots=True)
class LoadedFile:
    """The text of a site config or driver file as the daemon loaded it, by the hash its load
    was audited with (of the parsed document: a change of layout alone keeps the first
    text). Kept so that an export holds the files in force during a run, as they were."""

    hash: str
    kind: str  # config or driver
    name: str  # the file's name
    text: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed checkpoint of the store's chain (pocd.store.chain): its size (entries), the
    hash of its last entry, the note signed (C2SP checkpoint form) and the site key's
    signature. Forwarded, so the control site holds a witness of the history."""

    t: int
    size: int
    hash: str
    note: bytes
    signature: bytes
    key_id: str


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class Run:
    id: str
    batch_id: str
    site_id: str
    timezone: str
    protocol_id: str
    protocol_version: str
    protocol_hash: str
    operator: str
    started: int
    status: RunStatus = RunStatus.RUNNING
    ended: int | None = None
    end_reason: str = ""
    line: str = MAIN_LINE  # the line (ISA-88 unit) it runs on


@dataclass(frozen=True, slots=True)
class PhaseChange:
    """The run entered `phase` at `t`. `in_order` is False for an override of the protocol order."""

    run_id: str
    t: int
    phase: str
    previous: str | None
    actor: str
    in_order: bool = True
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ProtocolText:
    """The text of a protocol file as it was loaded, by the hash that identifies the protocol.

    Kept in the store so that a run always finds the exact protocol it started with, whatever
    becomes of the file (document control supersedes it, which changes its hash)."""

    hash: str
    id: str
    version: str
    text: str


class SiteStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    CEASED = "ceased"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """Who did what, when and why: every operator action and every config or protocol load."""

    t: int
    actor: str
    action: str  # run.start, run.phase, run.stop, site.status, config.load, protocol.load, ...
    target: str
    reason: str = ""
    old: str | None = None
    new: str | None = None
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class User:
    """A named account. `login` is never reused and a user is never deleted, only disabled,
    so every record that names a login names one person for good. `roles` are
    pocd.access.Role values; `password_hash` an argon2id hash."""

    login: str
    name: str  # the full printed name shown in signatures and records
    roles: tuple[str, ...]
    password_hash: str = field(repr=False)
    disabled: bool = False
    created: int = 0
    changed: int = 0


@dataclass(frozen=True, slots=True)
class UserChange:
    """A user's new name, roles, password or state, stored in place of their current ones
    (the audit entry written with it keeps the old and the new value)."""

    user: User


@dataclass(frozen=True, slots=True)
class Signature:
    """An electronic signature (21 CFR 11.50, 11.70): who signed, when, meaning what, and
    the SHA-256 of the record they signed, so that any later change of that record shows.

    `record` names the record signed (`run:<id>`, `phase:<run>:<t>`, `audit:<action>:<t>`),
    `record_hash` is pocd.store.recordtypes.digest of it. Stored append-only."""

    t: int
    utc_offset: str  # the site's offset from UTC at `t`, as +HH:MM
    login: str
    name: str  # the signer's printed name when they signed
    meaning: str  # pocd.access.Meaning: performed, reviewed, approved, released
    action: str  # the pocd.access.Action signed: run.abort, run.phase.override, site.status
    record: str
    record_hash: str
    run_id: str | None = None


class AlarmState(StrEnum):
    """ISA-18.2 / OPC UA Part 9 states of an alarm condition."""

    NORMAL = "normal"
    ACTIVE_UNACKED = "active-unacked"
    ACTIVE_ACKED = "active-acked"
    RETURNED_UNACKED = "returned-unacked"  # back to normal, not yet acknowledged
    LATCHED = "latched"  # a latching alarm back to normal: kept until an operator resets it
    SHELVED = "shelved"
    SUPPRESSED = "suppressed"  # by design: not monitored in this phase, or on standby
    OUT_OF_SERVICE = "out-of-service"


class AlarmTransition(StrEnum):
    ACTIVATE = "activate"  # a new activation, with a new alarm id
    ACKNOWLEDGE = "acknowledge"
    RETURN = "return"  # the condition cleared
    RESET = "reset"  # a latched alarm reset by an operator
    REALARM = "realarm"  # acknowledged but still active after the re-alarm time
    SHELVE = "shelve"
    UNSHELVE = "unshelve"  # by an operator, at expiry, or (one-shot) when it returns
    SUPPRESS = "suppress"
    UNSUPPRESS = "unsuppress"
    REMOVE = "remove"  # out of service
    RESTORE = "restore"  # back in service


class AlarmPriority(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """One transition of an alarm condition, with what an operator (or a message) needs to
    act on it. A condition is (line, source, kind): the source is a parameter, or a device for
    comm-loss; `kind` an ExcursionKind value. `alarm_id` names one activation: a new one each
    time the condition becomes active (Ignition's event id); transitions of the condition
    between activations (shelving it while normal) carry the last one, or "" if none.
    Append-only: the alarm's current state is its latest event's."""

    t: int
    alarm_id: str
    line: str
    source: str
    kind: str
    transition: AlarmTransition
    state: AlarmState  # after the transition
    priority: AlarmPriority
    began: int | None = None  # when the activation began
    actor: str = "system"
    comment: str = ""  # the acknowledgement's note, the shelve's reason, ...
    until: int | None = None  # when a timed shelve ends
    run_id: str | None = None
    batch_id: str | None = None
    phase: str | None = None
    device: str = ""
    value: float | None = None
    limit: float | None = None
    unit: str = ""
    first_out: bool = False  # the first of its first-out group to activate
