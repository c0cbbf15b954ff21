"""A process protocol as the engine sees it: resolved, immutable limits per phase and parameter.

Built from a protocol file by `pocd.settings.load_protocol`; nothing here parses or validates
files. A protocol is identified by the SHA-256 of a canonical form of its content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pocd.model import AlarmPriority

__all__ = [
    "AlarmProperties",
    "Limits",
    "Parameter",
    "Phase",
    "Protocol",
    "ProtocolKind",
    "ProtocolStatus",
    "canonical_hash",
]


class ProtocolKind(StrEnum):
    """What a protocol is for: a batch (a run's limits, phase by phase), or the equipment of
    a line between runs (standby: the limits that apply whenever the line has no run)."""

    BATCH = "batch"
    STANDBY = "standby"


class ProtocolStatus(StrEnum):
    DRAFT = "draft"
    APPROVED = "approved"
    SUPERSEDED = "superseded"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one parameter in one phase. Durations are seconds, rates unit/min.

    Deadband is the hysteresis: a high excursion ends only when the value falls to
    limit - deadband (a low one at limit + deadband). On-delay is how long a breach must last
    before the excursion opens; off-delay how long the value must stay back inside before it
    closes. Both keep the true start and end times.
    """

    monitored: bool = True
    alert_low: float | None = None
    alert_high: float | None = None
    action_low: float | None = None
    action_high: float | None = None
    deadband: float = 0.0
    on_delay: float = 0.0
    off_delay: float = 0.0
    max_rate: float | None = None
    stale_after: float | None = None
    budget: float | None = None  # cumulative seconds outside the action band allowed per phase
    max_data_loss: float | None = None  # stale/comm-loss seconds allowed on a critical parameter


@dataclass(frozen=True, slots=True)
class AlarmProperties:
    """A parameter's alarm properties as its protocol gives them, before any default: None
    and an empty `priorities` leave the kind's default (pocd.runs resolves them). `priority`
    applies to every kind of the parameter's alarms, `priorities` (ExcursionKind values) over
    it to the kinds named; `standby_priority` while the line has no run."""

    priority: AlarmPriority | None = None
    priorities: Mapping[str, AlarmPriority] = field(default_factory=dict)
    standby_priority: AlarmPriority | None = None
    latching: bool = False
    realarm: float | None = None  # seconds an acknowledged alarm may stay active unannounced
    group: str | None = None  # first-out group

    def priority_of(self, kind: str) -> AlarmPriority | None:
        return self.priorities.get(kind, self.priority)


@dataclass(frozen=True, slots=True)
class Parameter:
    id: str
    unit: str
    critical: bool
    description: str = ""
    alarm: AlarmProperties = AlarmProperties()


@dataclass(frozen=True, slots=True)
class Phase:
    id: str
    title: str
    limits: Mapping[str, Limits]  # every parameter of the protocol has an entry
    expected_duration: float | None = None


@dataclass(frozen=True, slots=True)
class Protocol:
    id: str
    version: str
    title: str
    status: ProtocolStatus
    hash: str
    parameters: Mapping[str, Parameter]
    phases: tuple[Phase, ...]
    source: str = ""  # the file it was loaded from
    kind: ProtocolKind = ProtocolKind.BATCH
    # The file's text as loaded: the store keeps it by hash, so a run resumes on the exact
    # protocol it started with whatever becomes of the file (superseded, edited, removed).
    text: str = field(default="", repr=False, compare=False)

    def phase(self, phase_id: str) -> Phase:
        for phase in self.phases:
            if phase.id == phase_id:
                return phase
        raise KeyError(phase_id)

    def phase_index(self, phase_id: str) -> int:
        return [p.id for p in self.phases].index(phase_id)

    @property
    def key(self) -> tuple[str, str]:
        return (self.id, self.version)


def canonical_hash(document: Mapping[str, Any]) -> str:
    """SHA-256 of the document as canonical JSON: sorted keys, no spaces, UTF-8.

    Formatting, comments and key order of the TOML file do not change it; any value does.
    """
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()
