"""The request bodies of the control API: typed, length-limited models, and how their errors
read.

A body is parsed straight from the request's bytes by pydantic (strict: no value is coerced
between types, unknown fields are errors), so what reaches run control is exactly what the
client sent, or nothing. Nothing here does I/O or knows about HTTP.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    model_validator,
)

from pocd.access import MAX_LENGTH as PASSWORD_MAX
from pocd.access import Meaning
from pocd.configtypes import StrictModel
from pocd.model import SiteStatus

__all__ = [
    "IDENTIFIER_MAX",
    "REASON_MAX",
    "AlarmRequest",
    "LoginRequest",
    "PhaseRequest",
    "RunStartRequest",
    "RunStopRequest",
    "SignatureBody",
    "SiteStatusRequest",
    "explain",
]

IDENTIFIER_MAX = 128  # characters of a batch id, protocol id or version, phase, login
REASON_MAX = 2000  # characters of a reason: a justification of a few paragraphs, not a file


def _identifier(value: str) -> str:
    # Identifiers name people and things in the audit trail: "alice" and "alice " must be the
    # same operator, and a control or format character (a newline, a bidi override, a zero
    # width space) would make two names that look the same differ.
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if any(unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" for c in value):
        raise ValueError("must not contain control or format characters")
    return value


def _text(value: str) -> str:
    # Free text keeps its line breaks and tabs; other control characters (a NUL) are refused.
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in value):
        raise ValueError("must not contain control characters other than tab and line breaks")
    return value


Identifier = Annotated[
    str, StringConstraints(max_length=IDENTIFIER_MAX), AfterValidator(_identifier)
]
Reason = Annotated[str, StringConstraints(max_length=REASON_MAX), AfterValidator(_text)]


# A secret: its repr, and so any log or traceback of a request, shows stars.
Password = Annotated[SecretStr, Field(min_length=1, max_length=PASSWORD_MAX)]


class LoginRequest(StrictModel):
    """POST /api/login: a browser gets a session cookie (and a CSRF token to send back as
    X-CSRF-Token), the CLI (`client: "cli"`) a bearer token."""

    login: Identifier
    password: Password
    client: Literal["browser", "cli"] = "browser"


class SignatureBody(StrictModel):
    """An electronic signature: the signer's password, given again, and what it means."""

    password: Password
    meaning: Meaning = Meaning.PERFORMED


class AlarmRequest(StrictModel):
    """POST /api/alarms/{command}: a command on the alarm condition (`line`, `source`,
    `kind`; a site of one line need not name it) with a note; a shelve lasts `minutes` (none:
    until the alarm next returns to normal). Shelving a critical alarm, and taking one out of
    service or back, are signed."""

    line: Identifier | None = None
    source: Identifier
    kind: Identifier
    comment: Reason = ""
    minutes: Annotated[float, Field(gt=0, le=24 * 60)] | None = None
    signature: SignatureBody | None = None


class DeviationAssessRequest(StrictModel):
    """POST /api/deviations/{id}/assess: the impact assessment of an open deviation."""

    note: Reason


class DeviationCloseRequest(StrictModel):
    """POST /api/deviations/{id}/close: the disposition of an assessed deviation, with its
    reason and root cause; signed by QA."""

    disposition: Reason
    reason: Reason
    root_cause: Reason
    signature: SignatureBody | None = None


class RunStartRequest(StrictModel):
    """POST /api/runs: start a run of `batch_id` on the approved `protocol` (or `version`),
    on `line` (which a site of one line need not name)."""

    line: Identifier | None = None
    batch_id: Identifier
    protocol: Identifier
    version: Identifier | None = None


class PhaseRequest(StrictModel):
    """POST /api/runs/{id}/phase: enter `phase`; out of protocol order it is an override that
    needs a reason and a signature."""

    phase: Identifier
    reason: Reason = ""
    signature: SignatureBody | None = None


class RunStopRequest(StrictModel):
    """POST /api/runs/{id}/stop: complete the run, or abort it (`abort: true`, with a reason
    and a signature)."""

    abort: bool = False
    reason: Reason = ""
    signature: SignatureBody | None = None

    @model_validator(mode="after")
    def _abort_has_a_reason(self) -> Self:
        if self.abort and not self.reason.strip():
            raise ValueError("reason: aborting a run needs a reason")
        return self


class SiteStatusRequest(StrictModel):
    """POST /api/site/status: the control site suspends, ceases or reactivates the site."""

    status: SiteStatus
    reason: Reason
    signature: SignatureBody | None = None

    @model_validator(mode="after")
    def _reason_is_given(self) -> Self:
        if not self.reason.strip():
            raise ValueError("reason: a site status change needs a reason")
        return self


def explain(exc: ValidationError) -> tuple[str, list[str]]:
    """What is wrong with a body, one clause per field, and the fields named (`body` for the
    whole of it), for a 400 answer."""
    clauses: list[str] = []
    fields: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = error["loc"]
        field = ".".join(str(part) for part in loc) if loc else "body"
        kind = error["type"]
        if kind == "json_invalid":
            message = f"not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})"
        elif kind == "model_type":
            message = "must be a JSON object"
        elif kind == "missing":
            message = "is required"
        elif kind == "extra_forbidden":
            message = "is not a field of this request"
        elif kind == "value_error" and not loc:
            # a check across fields: its message starts with the field it is about
            context = error.get("ctx") or {}
            field, _, message = str(context.get("error", error["msg"])).partition(": ")
            if not message:
                field, message = "body", field
        else:
            message = error["msg"].removeprefix("Value error, ")
        clauses.append(f"{field}: {message}")
        if field not in fields:
            fields.append(field)
    return "; ".join(clauses), fields
