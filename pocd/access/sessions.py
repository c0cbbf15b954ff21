"""Login sessions in memory: open one, find one by its token, close one or all of a user's.

Only the SHA-256 of each token is kept, so a memory dump or a log of this state gives no
token that works. A session ends after `idle_s` without use or `max_age_s` after it opened,
whichever comes first. Pure: no I/O, no clock; every call that needs the time takes `now`
(wall time in ns).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from pocd.errors import AccessError
from pocd.model import NS

__all__ = ["Session", "SessionKind", "SessionRefused", "Sessions"]

Reason = Literal["unknown", "idle", "expired"]


class SessionKind(StrEnum):
    BROWSER = "browser"  # a cookie: state-changing requests must carry `csrf`
    CLI = "cli"  # a bearer token


@dataclass(frozen=True, slots=True)
class Session:
    """One user's login. `id` is public (safe in logs and the audit trail); `csrf` is not."""

    login: str
    kind: SessionKind
    csrf: str = field(repr=False)
    created: int
    last_seen: int
    address: str
    id: str


class SessionRefused(AccessError):
    """The token names no live session: none such, unused for too long, or too old."""

    def __init__(self, reason: Reason, message: str = "") -> None:
        self.reason: Reason = reason
        super().__init__(message or f"session {reason}; log in again")


def _bytes(text: str) -> bytes:
    # surrogatepass: a JSON body can hold a lone surrogate ("\ud800"), which plain UTF-8
    # refuses to encode; such a token must be "unknown", not a crash.
    return text.encode("utf-8", "surrogatepass")


def _digest(token: str) -> bytes:
    return hashlib.sha256(_bytes(token)).digest()


class Sessions:
    """The live sessions. At most `limit_per_user` per login: opening one more closes the
    oldest, so a script that logs in in a loop cannot fill memory."""

    __slots__ = ("_idle", "_limit", "_max_age", "_sessions")

    def __init__(self, *, idle_s: float, max_age_s: float, limit_per_user: int = 20) -> None:
        self._idle = int(idle_s * NS)
        self._max_age = int(max_age_s * NS)
        self._limit = limit_per_user
        # Insertion order is creation order: the first of a login's sessions is its oldest.
        self._sessions: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, login: str, kind: SessionKind, address: str, now: int) -> tuple[str, Session]:
        """A new session; its token is returned here once and never again."""
        token = secrets.token_urlsafe(32)
        key = _digest(token)
        session = Session(
            login=login,
            kind=kind,
            csrf=secrets.token_urlsafe(32),
            created=now,
            last_seen=now,
            address=address,
            id=key.hex()[:12],
        )
        self._sessions[key] = session
        mine = [k for k, s in self._sessions.items() if s.login == login]
        for k in mine[: max(0, len(mine) - self._limit)]:
            del self._sessions[k]
        return token, session

    def _refusal(self, session: Session, now: int) -> Reason | None:
        # Max age first: an old session is refused however recently it was used.
        if now - session.created > self._max_age:
            return "expired"
        if now - session.last_seen > self._idle:
            return "idle"
        return None

    def find(self, token: str, now: int) -> Session:
        """The live session of `token`, now marked as used; else SessionRefused (and a dead
        session is removed)."""
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            raise SessionRefused("unknown")
        reason = self._refusal(session, now)
        if reason is not None:
            del self._sessions[key]
            raise SessionRefused(reason)
        session = replace(session, last_seen=max(session.last_seen, now))
        self._sessions[key] = session
        return session

    def close(self, token: str) -> Session | None:
        return self._sessions.pop(_digest(token), None)

    def close_user(self, login: str) -> int:
        """Close every session of `login` (disabled, or a new password); how many there were."""
        keys = [k for k, s in self._sessions.items() if s.login == login]
        for k in keys:
            del self._sessions[k]
        return len(keys)

    def purge(self, now: int) -> int:
        """Remove the sessions that are idle or too old; how many."""
        dead = [k for k, s in self._sessions.items() if self._refusal(s, now) is not None]
        for k in dead:
            del self._sessions[k]
        return len(dead)

    @staticmethod
    def csrf_matches(session: Session, offered: str | None) -> bool:
        """True if `offered` is the session's CSRF token, compared in constant time."""
        # Bytes: compare_digest refuses a str with non-ASCII characters (a TypeError).
        return offered is not None and hmac.compare_digest(_bytes(session.csrf), _bytes(offered))
