"""Account management on the store: add a user, disable or enable them, set their password
or their roles, lift their lockout. `pocd user ...` calls these.

They write the store directly, as the daemon's first open of it does: whoever can write the
store file is the site's local administrator already, so the first admin is added that way
(attributed to `local:<OS user>`), and once an enabled admin exists every change is made as
one (`--as`), their password checked here. Each change is one `Store.write` of the user
record and its audit entry, the old and the new value in it; a password or a hash never is.

Nothing here prompts, prints or talks to the daemon: the CLI asks for the secrets, and the
daemon reads every user again at each request (a disabled user is so at their next one).
"""

from __future__ import annotations

import getpass
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Final

from pocd.access import (
    MAX_LENGTH,
    Action,
    Role,
    check_password,
    hash_password,
    refusal,
    verify_password,
)
from pocd.errors import AccessError, RecordRejected
from pocd.model import AuditEntry, User, UserChange, now_ns
from pocd.store import Store

__all__ = [
    "LOGIN_PATTERN",
    "NAME_MAX",
    "AccountRefused",
    "Admin",
    "add_user",
    "admin_actor",
    "check_new_password",
    "check_new_user",
    "disable_user",
    "enable_user",
    "enabled_admins",
    "set_password",
    "set_roles",
    "unlock_user",
]

LOGIN_PATTERN: Final = re.compile(r"[a-z][a-z0-9._-]{1,63}")
NAME_MAX: Final = 128  # characters of a printed name, as of any identifier the API takes

Clock = Callable[[], int]


class AccountRefused(AccessError):
    """A change of the account `login` was refused; the message says why."""

    def __init__(self, message: str, *, login: str) -> None:
        super().__init__(message)
        self.login = login


@dataclass(frozen=True, slots=True)
class Admin:
    """The admin a change is made as (`--as`), with the password they gave for it."""

    login: str
    password: str = field(repr=False)


def enabled_admins(store: Store) -> list[str]:
    """The logins of the enabled users who hold the admin role."""
    return [u.login for u in store.users() if not u.disabled and Role.ADMIN.value in u.roles]


def check_new_password(login: str, password: str, *, password_min: int) -> None:
    """AccountRefused, saying why, if `password` may not become the password of `login`."""
    # Longer than a login request may carry, it could never be used to log in.
    if len(password) > MAX_LENGTH:
        raise AccountRefused(f"the password is longer than {MAX_LENGTH} characters", login=login)
    try:
        check_password(login, password, min_length=password_min)
    except AccessError as exc:
        raise AccountRefused(str(exc), login=login) from None


def check_new_user(login: str, name: str, roles: Iterable[str]) -> tuple[str, tuple[str, ...]]:
    """The printed name (spaces folded) and the roles (each once, in the matrix's order) of a
    new user; AccountRefused, saying why, for a login, a name or roles that may not be."""
    if LOGIN_PATTERN.fullmatch(login) is None:
        raise AccountRefused(
            f"login {login!r}: a login is 2-64 characters, lower-case letters, digits and "
            "._- , starting with a letter",
            login=login,
        )
    return _printed_name(login, name), _roles(login, roles)


def add_user(
    store: Store,
    login: str,
    name: str,
    roles: Iterable[str],
    password: str,
    *,
    admin: Admin | None,
    password_min: int,
    clock: Clock = now_ns,
) -> User:
    """Add `login`, with their printed `name`, `roles` and `password`. While the store holds
    no enabled admin, the one user that may be added is an admin, by the local
    administrator (`admin` None); after that only as an enabled admin."""
    name, held = check_new_user(login, name, roles)
    check_new_password(login, password, password_min=password_min)
    t = clock()
    actor = _actor(store, admin, Action.USER_MANAGE, login, t, bootstrap=Role.ADMIN.value in held)
    taken = store.user(login)
    if taken is not None:
        raise AccountRefused(_taken(taken), login=login)
    user = User(login, name, held, hash_password(password), False, t, t)
    entry = _entry(t, actor, "user.add", login, None, _account(user))
    try:
        store.write([user, entry])
    except RecordRejected:  # added by someone else since the check above
        raise AccountRefused(
            f"login {login!r} is taken: logins are never reused", login=login
        ) from None
    return user


def disable_user(store: Store, login: str, *, admin: Admin | None, clock: Clock = now_ns) -> User:
    """Disable `login`: they can no longer log in, and their sessions end at their next
    request. The last enabled admin is kept."""
    t = clock()
    actor = _actor(store, admin, Action.USER_MANAGE, login, t)
    user = _existing(store, login)
    if user.disabled:
        raise AccountRefused(f"user {login!r} is disabled already", login=login)
    changed = replace(user, disabled=True, changed=t)
    _keep_an_admin(store, user, changed, "disable them")
    store.write(
        [UserChange(changed), _entry(t, actor, "user.disable", login, "enabled", "disabled")]
    )
    return changed


def enable_user(store: Store, login: str, *, admin: Admin | None, clock: Clock = now_ns) -> User:
    t = clock()
    actor = _actor(store, admin, Action.USER_MANAGE, login, t)
    user = _existing(store, login)
    if not user.disabled:
        raise AccountRefused(f"user {login!r} is enabled already", login=login)
    changed = replace(user, disabled=False, changed=t)
    store.write(
        [UserChange(changed), _entry(t, actor, "user.enable", login, "disabled", "enabled")]
    )
    return changed


def set_password(
    store: Store,
    login: str,
    password: str,
    *,
    admin: Admin | None,
    password_min: int,
    clock: Clock = now_ns,
) -> User:
    """Give `login` a new password. Its audit entry says that it changed, not what to:
    neither value may be kept."""
    check_new_password(login, password, password_min=password_min)
    t = clock()
    actor = _actor(store, admin, Action.USER_MANAGE, login, t)
    user = _existing(store, login)
    if verify_password(user.password_hash, password):
        raise AccountRefused(f"that is the password {login!r} has already", login=login)
    changed = replace(user, password_hash=hash_password(password), changed=t)
    entry = _entry(t, actor, "user.password", login, None, None, changed="password")
    store.write([UserChange(changed), entry])
    return changed


def set_roles(
    store: Store, login: str, roles: Iterable[str], *, admin: Admin | None, clock: Clock = now_ns
) -> User:
    """Give `login` exactly `roles` (at least one). The last enabled admin keeps admin."""
    held = _roles(login, roles)
    t = clock()
    actor = _actor(store, admin, Action.USER_MANAGE, login, t)
    user = _existing(store, login)
    if held == user.roles:
        raise AccountRefused(f"user {login!r} has these roles already", login=login)
    changed = replace(user, roles=held, changed=t)
    _keep_an_admin(store, user, changed, "take the admin role from them")
    entry = _entry(t, actor, "user.roles", login, ", ".join(user.roles), ", ".join(held))
    store.write([UserChange(changed), entry])
    return changed


def unlock_user(
    store: Store, login: str, *, admin: Admin | None, clock: Clock = now_ns
) -> AuditEntry:
    """Lift the lockout of `login`: the daemon keeps lockouts in memory and lifts one when it
    finds this audit entry, written after the lock began, at the user's next login."""
    t = clock()
    actor = _actor(store, admin, Action.USER_UNLOCK, login, t)
    _existing(store, login)
    entry = _entry(t, actor, "user.unlock", login, None, None)
    store.write([entry])
    return entry


# --- the rules ----------------------------------------------------------------------------


def _actor(
    store: Store,
    admin: Admin | None,
    action: Action,
    login: str,
    t: int,
    *,
    bootstrap: bool = False,
) -> str:
    """Who makes a change of `login`: the local administrator while no enabled admin exists
    and the change adds one (`bootstrap`), else `admin` once their password and roles are
    checked. A wrong password or a role that does not allow it is refused and audited."""
    admins = enabled_admins(store)
    if not admins:
        if not bootstrap:
            raise AccountRefused(
                "the store holds no enabled admin yet: the one change allowed is adding the "
                'first, `pocd user add LOGIN --name "Full Name" --role admin`',
                login=login,
            )
        if admin is not None:
            raise AccountRefused(
                f"there is no admin {admin.login!r} yet: add the first admin without --as",
                login=login,
            )
        return f"local:{getpass.getuser()}"
    if admin is None:
        raise AccountRefused(
            f"changes of users are made as an enabled admin ({', '.join(admins)}): "
            "give --as ADMIN, and their password",
            login=login,
        )
    user = store.user(admin.login)
    why: str | None
    if user is None:
        why = f"no user {admin.login!r}"
    elif not verify_password(user.password_hash, admin.password):
        why = f"wrong password for {admin.login!r}"
    elif user.disabled:
        why = f"user {admin.login!r} is disabled"
    else:
        why = refusal(user.login, _roles_of(user), action)
    if why is not None:
        details = {"target": login, "os_user": getpass.getuser(), "via": "pocd user"}
        store.write(
            [AuditEntry(t, admin.login, "access.denied", action.value, why, None, None, details)]
        )
        raise AccountRefused(f"refused: {why}", login=login)
    assert user is not None
    return user.login


def _existing(store: Store, login: str) -> User:
    user = store.user(login)
    if user is None:
        raise AccountRefused(f"no user {login!r}", login=login)
    return user


def _keep_an_admin(store: Store, user: User, changed: User, doing: str) -> None:
    """Refuse a change that would leave the store without an enabled admin: nobody could
    then manage users but by the bootstrap, which anyone with the store file could use."""
    was = not user.disabled and Role.ADMIN.value in user.roles
    stays = not changed.disabled and Role.ADMIN.value in changed.roles
    if was and not stays and enabled_admins(store) == [user.login]:
        raise AccountRefused(
            f"{user.login!r} is the last enabled admin: add or enable another admin before "
            f"you {doing}",
            login=user.login,
        )


def _taken(user: User) -> str:
    state = "a disabled user's" if user.disabled else "taken"
    return (
        f"login {user.login!r} is {state} ({user.name}): logins are never reused, so that a "
        "login in the records names one person for good; choose another"
    )


def _printed_name(login: str, name: str) -> str:
    name = " ".join(name.split())
    if not name:
        raise AccountRefused(
            f"user {login!r} needs their full printed name (--name): signatures show it",
            login=login,
        )
    if len(name) > NAME_MAX or any(unicodedata.category(c)[0] == "C" for c in name):
        raise AccountRefused(
            f"the name of {login!r} must be at most {NAME_MAX} characters, none of them a "
            "control or format character",
            login=login,
        )
    return name


def _roles(login: str, roles: Iterable[str]) -> tuple[str, ...]:
    """`roles`, Role values, each once, in the matrix's order; at least one."""
    given = list(roles)
    known = [r.value for r in Role]
    unknown = [r for r in given if r not in known]
    if unknown:
        raise AccountRefused(
            f"unknown role {unknown[0]!r}: the roles are {', '.join(known)}", login=login
        )
    if not given:
        raise AccountRefused(
            f"user {login!r} needs at least one role (--role): {', '.join(known)}", login=login
        )
    return tuple(r.value for r in Role if r.value in given)


def _roles_of(user: User) -> frozenset[Role]:
    known = {r.value for r in Role}
    return frozenset(Role(r) for r in user.roles if r in known)


def _account(user: User) -> str:
    return f"{user.name} ({', '.join(user.roles)})"


def _entry(
    t: int,
    actor: str,
    action: str,
    login: str,
    old: str | None,
    new: str | None,
    **details: str,
) -> AuditEntry:
    # Which OS account ran the command: an admin's login says who decided, this says where.
    details = {**details, "os_user": getpass.getuser(), "via": "pocd user"}
    return AuditEntry(t, actor, action, login, "", old, new, details)


def admin_actor(store: Store, admin: Admin | None, login: str, t: int) -> str:
    """Who makes a change of what `login` holds beyond the user record (their signing key in
    the site's keyring): an enabled admin, checked as for any change of a user."""
    return _actor(store, admin, Action.USER_MANAGE, login, t)
