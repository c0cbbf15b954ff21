"""The answers of the control API as models: what the OpenAPI schema says each endpoint
returns (pocd.api.openapi), and so what the schema fuzzing test holds the answers to.

Answers are made as JSON-ready dicts (pocd.records) from the records' descriptions; these
models describe them, field for field where the answer is small and fixed, and as an open
object where it is the live status or a run's record (their shape is pocd.records' and
pocd.status'). Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, RootModel

__all__ = [
    "AlarmAnswer",
    "ErrorAnswer",
    "HealthAnswer",
    "LinesAnswer",
    "LogoutAnswer",
    "ObjectAnswer",
    "PhaseAnswer",
    "RunAnswer",
    "RunsAnswer",
    "SessionAnswer",
    "SiteStatusAnswer",
]


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorAnswer(_Answer):
    """Every refusal: what is wrong, and the fields of the request it is about."""

    error: str
    fields: list[str] | None = None


class HealthAnswer(_Answer):
    status: str


class SessionAnswer(_Answer):
    """Who is logged in. At login, a browser's answer holds the CSRF token to send back as
    X-CSRF-Token, and the CLI's the bearer token (each given only then)."""

    login: str
    name: str
    roles: list[str]
    client: str
    session: str  # the session's public id, as the audit trail names it
    expires: str  # when the session ends at the latest (ISO 8601, UTC)
    idle_timeout_s: float
    csrf: str | None = None
    token: str | None = None


class LogoutAnswer(_Answer):
    logged_out: str


class RunAnswer(_Answer):
    """A run's summary (pocd.store.recordtypes.RUN)."""

    id: str
    batch_id: str
    site_id: str
    timezone: str
    protocol_id: str
    protocol_version: str
    protocol_hash: str
    operator: str
    status: str
    started: str
    started_ns: int
    ended: str | None
    ended_ns: int | None
    end_reason: str
    line: str


class RunsAnswer(RootModel[list[RunAnswer]]):
    pass


class PhaseAnswer(_Answer):
    run: str
    phase: str
    previous: str | None
    in_order: bool


class SiteStatusAnswer(_Answer):
    status: str


class AlarmAnswer(_Answer):
    """An alarm condition in its current state (pocd.status)."""

    line: str
    source: str
    kind: str
    state: str
    active: bool
    alarm_id: str
    priority: str
    began: str | None
    first_out: bool
    acknowledged_by: str | None
    acknowledged_at: str | None
    shelved_until: str | None
    one_shot: bool
    device: str
    value: float | None
    limit: float | None
    unit: str
    since: str | None


class DeviationAnswer(_Answer):
    """A step of a deviation's lifecycle, as committed."""

    deviation: str
    state: str
    actor: str
    t: str


class ObjectAnswer(RootModel[dict[str, Any]]):
    """An open object: the live status, a run with its records."""


class LinesAnswer(RootModel[list[dict[str, Any]]]):
    """Each line with its run, or the standby protocol watching it."""
