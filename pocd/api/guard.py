"""Who is asking, and may they: the API's logins, sessions, permission check and signature
check, in one place (21 CFR 11.10(d), (g), 11.200, 11.300; Annex 11 s12).

- A login checks the password against the user's argon2id hash (one thread of its own, so
  logins neither stall the event loop nor run many 64 MiB hashes at once) and opens a
  session: a cookie for a browser, a bearer token for the CLI. Failures are audited and
  throttled per user and per address; too many lock the user out (audited) until the lock
  lapses or an admin unlocks them (`pocd user unlock`, an audit entry this reads).
- Every request of a session reads its user from the store again: a user disabled, or given
  other roles, is so at their next request.
- A browser session's state-changing request carries its CSRF token (X-CSRF-Token).
- The permission matrix (pocd.access.roles) is applied by `authorize` and nowhere else; a
  refusal is a 403 and an audit entry.
- A signature is the signer's password given again with its meaning: checked here, before
  anything is done, so a wrong one leaves nothing half-done.

Sessions live in the daemon's memory: a restart ends them (the CLI logs in again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import structlog

from pocd.access import (
    SIGNED,
    Action,
    LoginThrottle,
    Role,
    Session,
    SessionKind,
    SessionRefused,
    Sessions,
    dummy_hash,
    refusal,
    verify_password,
)
from pocd.errors import PocdError
from pocd.model import NS, AuditEntry, User, now_ns
from pocd.signatures import Signer
from pocd.store import Record
from pocd.store.recordtypes import iso

if TYPE_CHECKING:
    from pocd.api.bodies import SignatureBody
    from pocd.api.reader import StoreReader
    from pocd.settings import AccessSection

__all__ = ["Guard", "Principal", "Recorder", "Refusal"]

log = structlog.get_logger("pocd.api.guard")


class Refusal(Exception):
    """A request refused; becomes {"error": message} with `status` (and `headers`)."""

    def __init__(
        self,
        status: int,
        message: str,
        fields: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields
        self.headers = headers


class Recorder(Protocol):
    """Commits records (the guard's audit entries) through the daemon's store writer."""

    async def record(self, records: Sequence[Record]) -> None: ...


@dataclass(frozen=True, slots=True)
class Principal:
    """The user a request comes from, as the store has them now, and their session."""

    user: User
    session: Session
    token: str = field(repr=False)
    via: Literal["cookie", "bearer"] = "bearer"

    @property
    def login(self) -> str:
        return self.user.login

    @property
    def roles(self) -> frozenset[Role]:
        return frozenset(Role(r) for r in self.user.roles if r in _ROLES)


_ROLES = frozenset(r.value for r in Role)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pocd"'}
_WRONG = "wrong login or password"


class Guard:
    def __init__(
        self,
        access: AccessSection,
        *,
        reader: StoreReader,
        recorder: Recorder,
        clock: Callable[[], int] = now_ns,
    ) -> None:
        self.access = access
        self.sessions = Sessions(idle_s=access.session_idle, max_age_s=access.session_max)
        self.throttle = LoginThrottle(
            lockout_after=access.lockout_after,
            lockout_s=access.lockout,
            address_limit=access.address_limit,
            window_s=access.window,
        )
        self._reader = reader
        self._recorder = recorder
        self._clock = clock
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="pocd-api-password")
        self._attempts = asyncio.Lock()
        dummy_hash()  # made now: the first login of an unknown user must not take longer

    def close(self) -> None:
        self._hashing.shutdown(wait=True)

    # --- logins -----------------------------------------------------------------------------

    async def login(
        self, login: str, password: str, client: SessionKind, address: str
    ) -> tuple[str, Session, User]:
        """A new session of `login`, and its token; Refusal 401 (wrong login or password,
        or a disabled account: the answer does not tell which) or 429 (locked out, or too
        many failures from `address`)."""
        # One attempt at a time (the hashes take one thread anyway): a burst of guesses is
        # counted one by one, each seeing the lockout the ones before it caused.
        async with self._attempts:
            now = self._clock()
            await self._lapsed(now)
            held = await self._held(login, address, now)
            if held is not None:
                # not audited: the failures that caused it were, and a flood of refused
                # attempts must not fill the trail (the log counts them)
                log.debug("login refused", login=login, address=address, why=held)
                raise Refusal(429, held)
            user = await self._user(login)
            ok = await self._password_matches(user, password)
            if not ok or user is None or user.disabled:
                why = (
                    "unknown login" if user is None else "wrong password" if not ok else "disabled"
                )
                await self._failed(login, address, now, "login.failed", why)
                raise Refusal(401, _WRONG, headers=_CHALLENGE)
            self.throttle.succeeded(login, address)
            token, session = self.sessions.open(login, client, address, now)
        entry = AuditEntry(
            now, login, "login", address, details={"client": client, "session": session.id}
        )
        await self._audit([entry])
        return token, session, user

    async def logout(self, principal: Principal) -> None:
        self.sessions.close(principal.token)
        entry = AuditEntry(
            self._clock(),
            principal.login,
            "logout",
            principal.session.address,
            details={"client": principal.session.kind, "session": principal.session.id},
        )
        await self._audit([entry])

    async def _held(self, login: str, address: str, now: int) -> str | None:
        """Why a login may not even be tried now, or None. A lock an admin lifted since it
        began (their `user.unlock` audit entry) is lifted here too, and a lock the trail
        holds is kept across a restart of the daemon (whose throttle forgot it)."""
        lockout_ns = int(self.access.lockout * NS)
        until = self.throttle.locked_until(login, now)
        since = now - lockout_ns if until is None else until - lockout_ns
        locks, unlocks = await self._reader.read(
            lambda s: (
                s.audit_of("login.lockout", login, after=since),
                s.audit_of("user.unlock", login, after=since),
            )
        )
        if unlocks and (not locks or unlocks[-1].t >= locks[-1].t):
            self.throttle.unlock(login)
        elif until is None and locks:
            return (
                f"user {login!r} is locked until {iso(locks[-1].t + lockout_ns)} after failed "
                "logins; an admin can unlock it"
            )
        return self.throttle.refusal(login, address, now)

    async def _lapsed(self, now: int) -> None:
        ended = self.throttle.lapsed(now)
        if ended:
            await self._audit(
                [AuditEntry(now, "system", "login.lockout.ended", login) for login in ended]
            )

    async def _failed(self, login: str, address: str, now: int, action: str, why: str) -> None:
        """A wrong password (at a login or a signature): audited, counted, maybe a lockout.
        A lockout by signatures also ends the user's sessions (someone holding one is
        guessing the password); one by logins does not, or anyone could end anyone's."""
        entries = [AuditEntry(now, login, action, address, why)]
        if self.throttle.failed(login, address, now):
            until = self.throttle.locked_until(login, now)
            closed = self.sessions.close_user(login) if action == "signature.failed" else 0
            entries.append(
                AuditEntry(
                    now,
                    "system",
                    "login.lockout",
                    login,
                    f"{self.access.lockout_after} failed logins or signatures",
                    new=iso(until),
                    details={"address": address, "sessions_closed": str(closed)},
                )
            )
            log.warning("user locked out", login=login, address=address)
        await self._audit(entries)

    # --- sessions ---------------------------------------------------------------------------

    async def principal(
        self, token: str | None, via: Literal["cookie", "bearer"], *, csrf: str | bool | None
    ) -> Principal:
        """The user of a session token; Refusal 401 without a live session, 403 when a
        browser's state-changing request lacks its CSRF token (`csrf` is the header offered,
        or False where none is needed)."""
        if token is None:
            raise Refusal(
                401, "log in first: POST /api/login (the CLI: pocd login)", headers=_CHALLENGE
            )
        now = self._clock()
        try:
            session = self.sessions.find(token, now)
        except SessionRefused as exc:
            raise Refusal(401, _ENDED[exc.reason], headers=_CHALLENGE) from None
        user = await self._user(session.login)
        if user is None or user.disabled:
            self.sessions.close(token)
            raise Refusal(401, "the account is disabled", headers=_CHALLENGE)
        if user.changed > session.created:
            self.sessions.close(token)
            raise Refusal(
                401,
                "the account changed since this session began (its password, roles or state): "
                "log in again",
                headers=_CHALLENGE,
            )
        principal = Principal(user, session, token, via)
        if via == "cookie" and csrf is not False:
            offered = csrf if isinstance(csrf, str) else None
            if not self.sessions.csrf_matches(session, offered):
                message = "a state-changing request of a browser session needs its X-CSRF-Token"
                await self._denied(principal, "csrf", message, "")
                raise Refusal(403, message, ["X-CSRF-Token"])
        return principal

    # --- permissions and signatures ---------------------------------------------------------

    async def authorize(self, principal: Principal, action: Action, path: str) -> None:
        """Refusal 403 (and an audit entry) unless the user's roles allow `action`."""
        why = refusal(principal.login, principal.roles, action)
        if why is not None:
            await self._denied(principal, action.value, why, path)
            raise Refusal(403, why)

    async def sign(
        self, principal: Principal, action: Action, signature: SignatureBody, address: str
    ) -> Signer:
        """The signer of `action`, once their password is checked again; Refusal 400 for an
        action that is not signed (completing a run) or a meaning it is not signed with, 403
        for a wrong password (audited, counted towards a lockout)."""
        meanings = SIGNED.get(action)
        if meanings is None:
            raise Refusal(400, f"signature: {action.value} is not signed; send none", ["signature"])
        if signature.meaning not in meanings:
            allowed = ", ".join(sorted(m.value for m in meanings))
            raise Refusal(
                400,
                f"signature.meaning: {action.value} is signed as {allowed}",
                ["signature.meaning"],
            )
        await self.authorize(principal, action, "")
        user = principal.user
        async with self._attempts:  # counted one by one, as logins are
            now = self._clock()
            held = self.throttle.refusal(user.login, address, now)
            if held is not None:
                raise Refusal(429, held)
            password = signature.password.get_secret_value()
            if not await self._password_matches(user, password):
                await self._failed(user.login, address, now, "signature.failed", action.value)
                raise Refusal(403, "signature refused: wrong password; nothing was done")
        return Signer(user.login, user.name, signature.meaning.value)

    async def _denied(self, principal: Principal, action: str, why: str, path: str) -> None:
        entry = AuditEntry(
            self._clock(), principal.login, "access.denied", action, why, details={"path": path}
        )
        await self._audit([entry])

    # --- the store ----------------------------------------------------------------------------

    async def _user(self, login: str) -> User | None:
        return await self._reader.read(lambda s: s.user(login))

    async def _password_matches(self, user: User | None, password: str) -> bool:
        """Whether `password` is the user's; for no user, as long to find out as for one."""
        stored = user.password_hash if user is not None else dummy_hash()
        loop = asyncio.get_running_loop()
        matches = await loop.run_in_executor(self._hashing, verify_password, stored, password)
        return matches and user is not None

    async def _audit(self, entries: list[AuditEntry]) -> None:
        """Commit audit entries of the guard's own. A store that does not commit in time
        keeps them queued (the writer loses nothing); the refusal stands either way."""
        try:
            await self._recorder.record(entries)
        except PocdError as exc:
            log.error("audit entry not committed in time", error=str(exc))


_ENDED = {
    "unknown": "no such session (logged out, or the daemon restarted): log in again",
    "idle": "the session ended after being idle too long: log in again",
    "expired": "the session reached its maximum age: log in again",
}
