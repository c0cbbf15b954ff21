"""Failed logins: lock a login after repeated failures, slow an address that guesses many.

Pure: no I/O, no clock (every call takes `now`, wall time in ns) and no audit; the caller
records what the return values say (a lockout began, a lockout ended). A login is tracked
whether or not such a user exists, so a lockout message does not tell which logins are real.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime

from pocd.model import NS

__all__ = ["LoginThrottle"]


def _utc(t: int) -> str:
    return datetime.fromtimestamp(t // NS, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LoginThrottle:
    """Failures count within a sliding `window_s`. `lockout_after` of them lock a login for
    `lockout_s` (or until an admin unlocks it); `address_limit` of them from one address
    refuse every login from it until the oldest leaves the window.

    Memory is bounded: each tracked login or address keeps at most its last few failure times,
    and at most `max_tracked` logins and `max_tracked` addresses are tracked; past that the one
    that failed least recently is forgotten. Locks are never forgotten early (else a flood of
    made-up logins would unlock an account); each ends after `lockout_s`.
    """

    __slots__ = (
        "_address_limit",
        "_by_address",
        "_by_login",
        "_ended",
        "_lockout",
        "_lockout_after",
        "_locks",
        "_max_tracked",
        "_window",
    )

    def __init__(
        self,
        *,
        lockout_after: int = 5,
        lockout_s: float = 900,
        address_limit: int = 20,
        window_s: float = 900,
        max_tracked: int = 10_000,
    ) -> None:
        self._lockout_after = lockout_after
        self._lockout = int(lockout_s * NS)
        self._address_limit = address_limit
        self._window = int(window_s * NS)
        self._max_tracked = max_tracked
        self._by_login: dict[str, deque[int]] = {}
        self._by_address: dict[str, deque[int]] = {}
        self._locks: dict[str, int] = {}  # login -> locked until (ns)
        self._ended: list[str] = []  # locks that ran out, not yet handed out by `lapsed`

    def _recent(self, times: deque[int] | None, now: int) -> int:
        return 0 if times is None else sum(t > now - self._window for t in times)

    def locked_until(self, login: str, now: int) -> int | None:
        until = self._locks.get(login)
        return until if until is not None and until > now else None

    def refusal(self, login: str, address: str, now: int) -> str | None:
        """Why a login attempt may not go ahead now, or None if it may."""
        until = self._locks.get(login)
        if until is not None and until <= now:
            del self._locks[login]
            self._ended.append(login)
        elif until is not None:
            return (
                f"user {login!r} is locked until {_utc(until)} after {self._lockout_after}"
                " failed logins; an admin can unlock it"
            )
        if self._recent(self._by_address.get(address), now) >= self._address_limit:
            return f"too many failed logins from {address}; try again later"
        return None

    def _note(self, table: dict[str, deque[int]], key: str, keep: int, now: int) -> deque[int]:
        # Re-inserted on every failure, so the first key is the one that failed least recently.
        times = table.pop(key, None)
        if times is None:
            times = deque(maxlen=keep)
            if len(table) >= self._max_tracked:
                del table[next(iter(table))]
        times.append(now)
        table[key] = times
        return times

    def failed(self, login: str, address: str, now: int) -> bool:
        """Count a failed login; True if it locks `login` (the caller audits the lockout)."""
        self._note(self._by_address, address, self._address_limit, now)
        if self.locked_until(login, now) is not None:
            return False
        times = self._note(self._by_login, login, self._lockout_after, now)
        if self._recent(times, now) < self._lockout_after:
            return False
        self._locks[login] = now + self._lockout
        # The lock ends with a clean slate: the user has `lockout_after` tries again.
        del self._by_login[login]
        return True

    def succeeded(self, login: str, address: str) -> None:
        """A good login clears the login's failures; the address keeps its count, so an
        attacker who knows one password cannot reset the count for guessing others."""
        self._by_login.pop(login, None)

    def unlock(self, login: str) -> bool:
        """An admin's unlock; True if the login was locked."""
        self._by_login.pop(login, None)
        return self._locks.pop(login, None) is not None

    def lapsed(self, now: int) -> list[str]:
        """The logins whose lock ran out since the last call (to audit "lockout ended")."""
        for login, until in list(self._locks.items()):
            if until <= now:
                del self._locks[login]
                self._ended.append(login)
        ended, self._ended = self._ended, []
        return ended
