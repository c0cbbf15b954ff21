"""Who may do what: roles, actions, the permission matrix, signature meanings, separation of duties.

Pure tables and functions over them. Nothing here knows users, sessions or the store: the
caller passes the roles of the user asking and, for separation of duties, who did what on
the batch. The matrix is also printed (`matrix_markdown`) into the README, so the document
and the code cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeVar

__all__ = [
    "PERMISSIONS",
    "SIGNED",
    "Action",
    "Meaning",
    "Role",
    "allowed",
    "matrix_markdown",
    "refusal",
    "separation_conflict",
]


class Role(StrEnum):
    OPERATOR = "operator"
    SUPERVISOR = "supervisor"
    QA = "qa"
    QP = "qp"  # the Qualified Person, who certifies a batch for release
    ADMIN = "admin"


class Action(StrEnum):
    STATUS_READ = "status.read"
    RUNS_READ = "runs.read"
    LINES_READ = "lines.read"
    SESSION_READ = "session.read"  # who am I
    RUN_START = "run.start"
    RUN_PHASE = "run.phase"
    RUN_PHASE_OVERRIDE = "run.phase.override"  # a phase out of protocol order
    RUN_STOP = "run.stop"
    RUN_ABORT = "run.abort"
    SITE_STATUS = "site.status"
    USER_MANAGE = "user.manage"
    USER_UNLOCK = "user.unlock"
    ALARM_ACK = "alarm.ack"
    ALARM_SHELVE = "alarm.shelve"
    ALARM_SHELVE_CRITICAL = "alarm.shelve.critical"
    ALARM_OUT_OF_SERVICE = "alarm.out_of_service"
    DEVIATION_ASSESS = "deviation.assess"
    DEVIATION_CLOSE = "deviation.close"
    RECORD_REVIEW = "record.review"
    BATCH_RELEASE = "batch.release"


class Meaning(StrEnum):
    """What an electronic signature declares (Part 11 s11.50: printed with the signature)."""

    PERFORMED = "performed"
    REVIEWED = "reviewed"
    APPROVED = "approved"
    RELEASED = "released"

    @property
    def printed(self) -> str:
        return f"{self.value} by"


_ALL = frozenset(Role)
_FLOOR = frozenset({Role.OPERATOR, Role.SUPERVISOR})

# Admin holds no batch action: whoever manages accounts cannot also make the records those
# accounts sign, unless the same user is given an operational role as well.
PERMISSIONS: Final[Mapping[Action, frozenset[Role]]] = MappingProxyType(
    {
        Action.STATUS_READ: _ALL,
        Action.RUNS_READ: _ALL,
        Action.LINES_READ: _ALL,
        Action.SESSION_READ: _ALL,
        Action.RUN_START: _FLOOR,
        Action.RUN_PHASE: _FLOOR,
        Action.RUN_PHASE_OVERRIDE: _FLOOR,
        Action.RUN_STOP: _FLOOR,
        Action.RUN_ABORT: _FLOOR,
        Action.SITE_STATUS: frozenset({Role.SUPERVISOR, Role.QA, Role.QP}),
        Action.USER_MANAGE: frozenset({Role.ADMIN}),
        Action.USER_UNLOCK: frozenset({Role.ADMIN}),
        Action.ALARM_ACK: _FLOOR,
        Action.ALARM_SHELVE: _FLOOR,
        Action.ALARM_SHELVE_CRITICAL: frozenset({Role.SUPERVISOR}),
        Action.ALARM_OUT_OF_SERVICE: frozenset({Role.SUPERVISOR}),
        Action.DEVIATION_ASSESS: frozenset({Role.SUPERVISOR, Role.QA}),
        Action.DEVIATION_CLOSE: frozenset({Role.QA}),
        Action.RECORD_REVIEW: frozenset({Role.QA}),
        Action.BATCH_RELEASE: frozenset({Role.QP}),
    }
)

_DONE_OR_APPROVED = frozenset({Meaning.PERFORMED, Meaning.APPROVED})

# The critical actions: done only with the actor's electronic signature, which carries one of
# these meanings.
SIGNED: Final[Mapping[Action, frozenset[Meaning]]] = MappingProxyType(
    {
        Action.RUN_PHASE_OVERRIDE: _DONE_OR_APPROVED,
        Action.RUN_ABORT: _DONE_OR_APPROVED,
        Action.SITE_STATUS: _DONE_OR_APPROVED,
        Action.ALARM_SHELVE_CRITICAL: _DONE_OR_APPROVED,
        Action.ALARM_OUT_OF_SERVICE: _DONE_OR_APPROVED,
        Action.DEVIATION_CLOSE: frozenset({Meaning.APPROVED}),
        Action.RECORD_REVIEW: frozenset({Meaning.REVIEWED}),
        Action.BATCH_RELEASE: frozenset({Meaning.RELEASED}),
    }
)


_E = TypeVar("_E", Role, Meaning)


def _in_order(members: Iterable[_E], every: type[_E]) -> list[_E]:
    chosen = set(members)
    return [m for m in every if m in chosen]


def _either(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def allowed(roles: Iterable[Role], action: Action) -> bool:
    return not PERMISSIONS[action].isdisjoint(roles)


def refusal(login: str, roles: Iterable[Role], action: Action) -> str | None:
    """None if one of `roles` allows `action`, else the sentence that says why not."""
    held = _in_order(roles, Role)
    if allowed(held, action):
        return None
    needed = _either(_in_order(PERMISSIONS[action], Role))
    return f"user {login!r} ({', '.join(held) or 'no role'}) may not {action}: it needs {needed}"


def separation_conflict(
    action: Action, login: str, batch_actors: Mapping[str, frozenset[str]]
) -> str | None:
    """None if `login` may do `action` given who did what (action value -> logins) before.

    A batch is not released by anyone who ran it (any run.* action), and a deviation is not
    closed by whoever raised or assessed it: each such step needs a second person.
    """
    if action is Action.BATCH_RELEASE:
        done = sorted(a for a, who in batch_actors.items() if a.startswith("run.") and login in who)
        if done:
            return f"user {login!r} may not release a batch they operated ({', '.join(done)})"
    elif action is Action.DEVIATION_CLOSE:
        for key, verb in (("deviation.raise", "raised"), ("deviation.assess", "assessed")):
            if login in batch_actors.get(key, frozenset()):
                return f"user {login!r} may not close a deviation they {verb}"
    return None


def matrix_markdown() -> str:
    """The permission matrix as a Markdown table, one row per action in enum order."""
    lines = [
        "| action | " + " | ".join(Role) + " | meanings |",
        "|---" * (len(Role) + 2) + "|",
    ]
    for action in Action:
        mark = "signed" if action in SIGNED else "yes"
        cells = [mark if role in PERMISSIONS[action] else "" for role in Role]
        meanings = ", ".join(_in_order(SIGNED.get(action, ()), Meaning))
        lines.append(f"| `{action}` | " + " | ".join(cells) + f" | {meanings} |")
    return "\n".join(lines) + "\n"
