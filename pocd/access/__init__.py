"""Access control, pure: roles and what they may do, passwords, sessions, the login throttle.

No I/O, no store, no HTTP and no clock here: the API layer calls these with the time (`now`,
wall time in ns) and records in the audit trail what they decide.
"""

from pocd.access.passwords import (
    MAX_LENGTH,
    MIN_LENGTH,
    check_password,
    dummy_hash,
    hash_password,
    needs_rehash,
    verify_password,
)
from pocd.access.roles import (
    PERMISSIONS,
    SIGNED,
    Action,
    Meaning,
    Role,
    allowed,
    matrix_markdown,
    refusal,
    separation_conflict,
)
from pocd.access.sessions import Session, SessionKind, SessionRefused, Sessions
from pocd.access.throttle import LoginThrottle

__all__ = [
    "MAX_LENGTH",
    "MIN_LENGTH",
    "PERMISSIONS",
    "SIGNED",
    "Action",
    "LoginThrottle",
    "Meaning",
    "Role",
    "Session",
    "SessionKind",
    "SessionRefused",
    "Sessions",
    "allowed",
    "check_password",
    "dummy_hash",
    "hash_password",
    "matrix_markdown",
    "needs_rehash",
    "refusal",
    "separation_conflict",
    "verify_password",
]
