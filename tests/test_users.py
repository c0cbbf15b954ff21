"""Accounts (pocd.users and `pocd user ...`) on a real store: the first admin by the local
administrator, every later change as an enabled admin with their password, the rules of
logins, names, roles and passwords, the last admin kept, the audit trail of each change, and
a running daemon that sees a change at the user's next request."""

from __future__ import annotations

import asyncio
import getpass
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pocd.access import verify_password
from pocd.settings import load_site
from pocd.store import Store
from pocd.users import (
    AccountRefused,
    Admin,
    add_user,
    disable_user,
    enable_user,
    enabled_admins,
    set_password,
    set_roles,
    unlock_user,
)
from tests.sitekit import PASSWORD, cli_as, cli_env, login, running, write_site

ADMIN_PASSWORD = "a long admin passphrase"
OTHER_PASSWORD = "another fine passphrase"
MIN = 12  # the site's access.password_min


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "pocd.sqlite") as opened:
        yield opened


def _bootstrap(store: Store, login: str = "ada") -> Admin:
    add_user(store, login, "Ada Admin", ["admin"], ADMIN_PASSWORD, admin=None, password_min=MIN)
    return Admin(login, ADMIN_PASSWORD)


def _refused(match: str) -> pytest.RaisesContext[AccountRefused]:
    return pytest.raises(AccountRefused, match=match)


# --- the rules, on the store ---------------------------------------------------------------


def test_the_first_change_can_only_add_an_admin_by_the_local_administrator(store: Store) -> None:
    with _refused("no enabled admin yet: the one change allowed is adding the first"):
        add_user(
            store, "olive", "Olive Operator", ["operator"], PASSWORD, admin=None, password_min=MIN
        )
    with _refused("no enabled admin yet"):
        unlock_user(store, "olive", admin=None)
    with _refused("there is no admin 'ada' yet"):
        add_user(
            store,
            "ada",
            "Ada Admin",
            ["admin"],
            ADMIN_PASSWORD,
            admin=Admin("ada", "x"),
            password_min=MIN,
        )
    assert store.users() == [] and store.audit() == []

    user = add_user(
        store,
        "ada",
        "  Ada   Admin ",
        ["admin", "qa", "admin"],
        ADMIN_PASSWORD,
        admin=None,
        password_min=MIN,
    )
    assert (user.name, user.roles, user.disabled) == ("Ada Admin", ("qa", "admin"), False)
    assert store.user("ada") == user
    assert verify_password(user.password_hash, ADMIN_PASSWORD)
    (entry,) = store.audit()
    assert (entry.actor, entry.action, entry.target) == (
        f"local:{getpass.getuser()}",
        "user.add",
        "ada",
    )
    assert (entry.old, entry.new) == (None, "Ada Admin (qa, admin)")


def test_once_an_admin_exists_every_change_is_made_as_one(store: Store) -> None:
    admin = _bootstrap(store)
    with _refused(r"made as an enabled admin \(ada\): give --as ADMIN"):
        add_user(
            store, "olive", "Olive Operator", ["operator"], PASSWORD, admin=None, password_min=MIN
        )
    with _refused("give --as ADMIN"):
        add_user(store, "bob", "Bob Admin", ["admin"], PASSWORD, admin=None, password_min=MIN)

    user = add_user(
        store, "olive", "Olive Operator", ["operator"], PASSWORD, admin=admin, password_min=MIN
    )
    entry = store.audit()[-1]
    assert (entry.actor, entry.action, entry.target, entry.new) == (
        "ada",
        "user.add",
        "olive",
        "Olive Operator (operator)",
    )
    assert user.login == "olive"


def test_a_wrong_admin_password_or_a_user_who_is_not_admin_is_refused_and_audited(
    store: Store,
) -> None:
    admin = _bootstrap(store)
    add_user(
        store, "olive", "Olive Operator", ["operator"], PASSWORD, admin=admin, password_min=MIN
    )
    before = len(store.audit())
    with _refused("refused: wrong password for 'ada'"):
        disable_user(store, "olive", admin=Admin("ada", "not the password"))
    with _refused(r"refused: user 'olive' \(operator\) may not user.manage: it needs admin"):
        set_roles(store, "olive", ["admin"], admin=Admin("olive", PASSWORD))
    with _refused(r"refused: user 'olive' \(operator\) may not user.unlock"):
        unlock_user(store, "olive", admin=Admin("olive", PASSWORD))
    with _refused("refused: no user 'mallory'"):
        enable_user(store, "olive", admin=Admin("mallory", PASSWORD))
    denied = store.audit()[before:]
    assert [(e.actor, e.action, e.target) for e in denied] == [
        ("ada", "access.denied", "user.manage"),
        ("olive", "access.denied", "user.manage"),
        ("olive", "access.denied", "user.unlock"),
        ("mallory", "access.denied", "user.manage"),
    ]
    assert denied[0].reason == "wrong password for 'ada'"
    assert denied[0].details["target"] == "olive"
    assert store.user("olive").disabled is False  # type: ignore[union-attr]
    assert store.user("olive").roles == ("operator",)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("login", "name", "roles", "message"),
    [
        ("O", "Olive", ["operator"], "login 'O': a login is 2-64 characters"),
        ("o", "Olive", ["operator"], "login 'o'"),
        ("1olive", "Olive", ["operator"], "starting with a letter"),
        ("olive smith", "Olive", ["operator"], "login 'olive smith'"),
        ("o" * 65, "Olive", ["operator"], "2-64 characters"),
        ("olive", "   ", ["operator"], "needs their full printed name"),
        ("olive", "Olive\u202eSmith", ["operator"], "control or format character"),
        ("olive", "O" * 129, ["operator"], "at most 128 characters"),
        ("olive", "Olive", [], "needs at least one role"),
        ("olive", "Olive", ["operator", "boss"], "unknown role 'boss': the roles are operator"),
    ],
)
def test_a_new_user_needs_a_login_a_printed_name_and_known_roles(
    store: Store, login: str, name: str, roles: list[str], message: str
) -> None:
    admin = _bootstrap(store)
    with _refused(message):
        add_user(store, login, name, roles, PASSWORD, admin=admin, password_min=MIN)
    assert [u.login for u in store.users()] == ["ada"]


def test_logins_are_allowed_as_documented(store: Store) -> None:
    admin = _bootstrap(store)
    for name in ("ol", "o.smith-2", "o_s", "o" * 64):
        add_user(store, name, "Olive Smith", ["operator"], PASSWORD, admin=admin, password_min=MIN)


def test_a_login_is_never_reused_even_a_disabled_users(store: Store) -> None:
    admin = _bootstrap(store)
    add_user(
        store, "olive", "Olive Operator", ["operator"], PASSWORD, admin=admin, password_min=MIN
    )
    with _refused(r"login 'olive' is taken \(Olive Operator\): logins are never reused"):
        add_user(
            store, "olive", "Olive Other", ["qa"], OTHER_PASSWORD, admin=admin, password_min=MIN
        )
    disable_user(store, "olive", admin=admin)
    with _refused(
        r"login 'olive' is a disabled user's \(Olive Operator\): logins are never reused"
    ):
        add_user(
            store, "olive", "Olive Other", ["qa"], OTHER_PASSWORD, admin=admin, password_min=MIN
        )
    assert store.user("olive").name == "Olive Operator"  # type: ignore[union-attr]


def test_the_last_enabled_admin_is_kept(store: Store) -> None:
    admin = _bootstrap(store)
    with _refused(
        "'ada' is the last enabled admin: add or enable another admin before you disable"
    ):
        disable_user(store, "ada", admin=admin)
    with _refused("'ada' is the last enabled admin: .* take the admin role from them"):
        set_roles(store, "ada", ["qa"], admin=admin)
    add_user(store, "bea", "Bea Admin", ["admin"], OTHER_PASSWORD, admin=admin, password_min=MIN)
    disable_user(store, "bea", admin=admin)
    with _refused("last enabled admin"):  # a disabled admin does not count
        disable_user(store, "ada", admin=admin)
    enable_user(store, "bea", admin=admin)
    set_roles(store, "ada", ["qa"], admin=Admin("bea", OTHER_PASSWORD))
    assert enabled_admins(store) == ["bea"]
    with _refused(r"user 'ada' \(qa\) may not user.manage"):  # ada manages no longer
        disable_user(store, "bea", admin=admin)


def test_each_change_is_one_audit_entry_with_the_old_and_new_value_and_no_secret(
    store: Store,
) -> None:
    admin = _bootstrap(store)
    add_user(
        store, "olive", "Olive Operator", ["operator"], PASSWORD, admin=admin, password_min=MIN
    )
    first = store.user("olive")
    assert first is not None
    with _refused("that is the password 'olive' has already"):
        set_password(store, "olive", PASSWORD, admin=admin, password_min=MIN)
    set_password(store, "olive", OTHER_PASSWORD, admin=admin, password_min=MIN)
    set_roles(store, "olive", ["qa", "operator"], admin=admin)
    with _refused("has these roles already"):
        set_roles(store, "olive", ["operator", "qa"], admin=admin)
    disable_user(store, "olive", admin=admin)
    with _refused("disabled already"):
        disable_user(store, "olive", admin=admin)
    enable_user(store, "olive", admin=admin)
    with _refused("enabled already"):
        enable_user(store, "olive", admin=admin)
    unlock_user(store, "olive", admin=admin)
    with _refused("no user 'nobody'"):
        unlock_user(store, "nobody", admin=admin)

    user = store.user("olive")
    assert user is not None
    assert verify_password(user.password_hash, OTHER_PASSWORD)
    assert (user.roles, user.disabled, user.created) == (("operator", "qa"), False, first.created)
    assert user.changed > first.changed
    entries = [e for e in store.audit() if e.target == "olive"]
    assert [(e.actor, e.action, e.old, e.new) for e in entries] == [
        ("ada", "user.add", None, "Olive Operator (operator)"),
        ("ada", "user.password", None, None),
        ("ada", "user.roles", "operator", "operator, qa"),
        ("ada", "user.disable", "enabled", "disabled"),
        ("ada", "user.enable", "disabled", "enabled"),
        ("ada", "user.unlock", None, None),
    ]
    assert entries[1].details["changed"] == "password"
    text = repr(store.audit())
    for secret in (PASSWORD, OTHER_PASSWORD, ADMIN_PASSWORD, "$argon2"):
        assert secret not in text


# --- pocd user ... --------------------------------------------------------------------------


def _pocd_user(tmp_path: Path, config: Path) -> Callable[..., tuple[int, str, str]]:
    """`pocd user ARGS -c config` with `stdin`: (exit code, stdout, stderr)."""
    env = cli_env(tmp_path)

    def user(*args: str, stdin: str = "") -> tuple[int, str, str]:
        done = cli_as(env, "user", *args, "-c", str(config), stdin=stdin)
        return done.returncode, done.stdout, done.stderr

    return user


def test_pocd_user_add_the_first_admin_then_others_as_an_admin(tmp_path: Path) -> None:
    config = write_site(tmp_path, devices="")
    user = _pocd_user(tmp_path, config)
    code, _, err = user("list")
    assert code == 1 and err.startswith("pocd: no store yet at ")
    code, _, err = user(
        "add", "olive", "--name", "Olive Operator", "--role", "operator", stdin=f"{PASSWORD}\n"
    )
    assert code == 1 and "no enabled admin yet" in err
    code, out, err = user(
        "add", "ada", "--name", "Ada Admin", "--role", "admin", stdin=f"{ADMIN_PASSWORD}\n"
    )
    assert (code, out) == (0, "user ada added: Ada Admin (admin)\n"), err

    add_olive = ("add", "olive", "--name", "Olive Operator", "--role", "operator", "--role", "qa")
    code, _, err = user(*add_olive, stdin=f"{PASSWORD}\n")
    assert code == 1 and "give --as ADMIN" in err
    # the new user's password first, then the admin's
    code, _, err = user(*add_olive, "--as", "ada", stdin=f"{PASSWORD}\nwrong password\n")
    assert (code, err) == (1, "pocd: refused: wrong password for 'ada'\n")
    code, _, err = user(*add_olive, "--as", "ada", stdin=f"{PASSWORD}\n")
    assert code == 1 and "password of admin ada: stdin has no line for it" in err
    code, out, err = user(*add_olive, "--as", "ada", stdin=f"{PASSWORD}\n{ADMIN_PASSWORD}\n")
    assert (code, out) == (0, "user olive added: Olive Operator (operator, qa)\n"), err
    code, _, err = user(*add_olive, "--as", "ada", stdin=f"{OTHER_PASSWORD}\n{ADMIN_PASSWORD}\n")
    assert code == 1 and "login 'olive' is taken" in err and "never reused" in err
    code, _, err = user("add", "bob", "--name", "Bob", "--role", "boss", "--as", "ada")
    assert code == 2 and "invalid choice: 'boss'" in err  # argparse knows the roles

    with Store(load_site(config).store_path, readonly=True) as store:
        entries = store.audit()
    assert [(e.actor, e.action, e.target) for e in entries] == [
        (f"local:{getpass.getuser()}", "user.add", "ada"),
        ("ada", "access.denied", "user.manage"),
        ("ada", "user.add", "olive"),
    ]
    assert entries[1].details == {
        "target": "olive",
        "os_user": getpass.getuser(),
        "via": "pocd user",
    }


def test_pocd_user_changes_a_user_and_lists_them_without_a_hash(tmp_path: Path) -> None:
    config = write_site(tmp_path, devices="")
    with Store(load_site(config).store_path) as store:
        admin = _bootstrap(store)
        add_user(
            store,
            "olive",
            "Olive Operator",
            ["operator", "qa"],
            PASSWORD,
            admin=admin,
            password_min=MIN,
        )
    user = _pocd_user(tmp_path, config)
    as_ada = ("--as", "ada")
    code, out, err = user(
        "roles", "olive", "--role", "operator", *as_ada, stdin=f"{ADMIN_PASSWORD}\n"
    )
    assert (code, out) == (0, "user olive: operator\n"), err
    code, out, err = user("passwd", "olive", *as_ada, stdin=f"{OTHER_PASSWORD}\n{ADMIN_PASSWORD}\n")
    assert (code, out) == (0, "password of olive set\n"), err
    code, out, err = user("disable", "olive", *as_ada, stdin=f"{ADMIN_PASSWORD}\n")
    assert code == 0 and out.startswith("user olive disabled"), err
    code, out, err = user("enable", "olive", *as_ada, stdin=f"{ADMIN_PASSWORD}\n")
    assert (code, out) == (0, "user olive enabled\n"), err
    code, out, err = user("unlock", "olive", *as_ada, stdin=f"{ADMIN_PASSWORD}\n")
    assert code == 0 and out.startswith("user olive unlocked"), err
    code, _, err = user("disable", "ada", *as_ada, stdin=f"{ADMIN_PASSWORD}\n")
    assert code == 1 and "'ada' is the last enabled admin" in err
    code, _, err = user("enable", "olive", stdin=f"{ADMIN_PASSWORD}\n")
    assert code == 1 and "give --as ADMIN" in err

    code, out, _ = user("list")
    assert code == 0
    assert [line.split()[:5] for line in out.splitlines()] == [
        ["ada", "Ada", "Admin", "admin", "enabled"],
        ["olive", "Olive", "Operator", "operator", "enabled"],
    ]
    code, out, _ = user("list", "--json")
    listed = json.loads(out)
    assert [(u["login"], u["name"], u["roles"], u["disabled"]) for u in listed] == [
        ("ada", "Ada Admin", ["admin"], False),
        ("olive", "Olive Operator", ["operator"], False),
    ]
    assert set(listed[0]) == {"login", "name", "roles", "disabled", "created", "changed"}
    assert "argon2" not in out

    with Store(load_site(config).store_path, readonly=True) as store:
        entries = store.audit()
        olive = store.user("olive")
    assert olive is not None and verify_password(olive.password_hash, OTHER_PASSWORD)
    assert [(e.actor, e.action, e.target) for e in entries[2:]] == [
        ("ada", "user.roles", "olive"),
        ("ada", "user.password", "olive"),
        ("ada", "user.disable", "olive"),
        ("ada", "user.enable", "olive"),
        ("ada", "user.unlock", "olive"),
    ]
    for secret in (PASSWORD, OTHER_PASSWORD, ADMIN_PASSWORD, "$argon2"):
        assert secret not in repr(entries)


@pytest.mark.parametrize(
    ("password", "message"),
    [
        ("short one", "the password is shorter than 16 characters"),
        ("x" * 20, "the password is one character repeated"),
        ("my name is olive, hi", "the password contains the login 'olive' (or it reversed)"),
        ("backwards evilo is it", "the password contains the login 'olive' (or it reversed)"),
        ("a tab\there, long enough", "the password contains a control character"),
        ("y" * 1024 + "z", "the password is longer than 1024 characters"),
    ],
)
def test_pocd_user_says_why_a_password_is_refused(
    tmp_path: Path, password: str, message: str
) -> None:
    config = write_site(tmp_path, devices="", extra="[access]\npassword_min = 16")
    env = cli_env(tmp_path)
    c = ("-c", str(config))
    first = cli_as(
        env,
        "user",
        "add",
        "ada",
        "--name",
        "Ada Admin",
        "--role",
        "admin",
        *c,
        stdin=f"{ADMIN_PASSWORD}\n",
    )
    assert first.returncode == 0, first.stderr
    done = cli_as(
        env,
        "user",
        "add",
        "olive",
        "--name",
        "Olive Operator",
        "--role",
        "operator",
        "--as",
        "ada",
        *c,
        stdin=f"{password}\n{ADMIN_PASSWORD}\n",
    )
    assert (done.returncode, done.stderr) == (1, f"pocd: {message}\n")
    # refused before the admin's password was asked for, and nothing written
    with Store(load_site(config).store_path, readonly=True) as store:
        assert [u.login for u in store.users()] == ["ada"]
        assert [e.action for e in store.audit()] == ["user.add"]


# --- against a running daemon ----------------------------------------------------------------


async def _as(
    listen: str, token: str, method: str, path: str, body: object = None
) -> tuple[int, Any]:
    """(status, answer) of one request with a bearer token, as the CLI sends it."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://{listen}{path}", json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_change_reaches_the_running_daemon_at_the_users_next_request(
    tmp_path: Path,
) -> None:
    config = write_site(tmp_path, devices="", extra="[access]\nlockout_after = 2")
    site = load_site(config)
    listen = site.config.api.listen
    env = cli_env(tmp_path)

    async def pocd(*args: str, stdin: str = f"{ADMIN_PASSWORD}\n") -> None:
        done = await asyncio.to_thread(cli_as, env, "user", *args, "-c", str(config), stdin=stdin)
        assert done.returncode == 0, done.stderr

    await pocd("add", "ada", "--name", "Ada Admin", "--role", "admin")
    async with running(site):  # with its test user "op"
        token = await login(listen, "op")
        assert (await _as(listen, token, "GET", "/api/session"))[0] == 200
        await pocd("disable", "op", "--as", "ada")
        # the session opened before is refused at its next request, and so is a login
        assert await _as(listen, token, "GET", "/api/session") == (
            401,
            {"error": "the account is disabled"},
        )
        with pytest.raises(AssertionError, match="wrong login or password"):
            await login(listen, "op")  # not told apart from a wrong password

        await pocd("enable", "op", "--as", "ada")
        await login(listen, "op")
        await pocd("passwd", "op", "--as", "ada", stdin=f"{OTHER_PASSWORD}\n{ADMIN_PASSWORD}\n")
        for _ in range(2):  # the old password, twice: op is locked out (access.lockout_after)
            with pytest.raises(AssertionError, match="wrong login or password"):
                await login(listen, "op", PASSWORD)
        with pytest.raises(AssertionError, match=r"'op' is locked until .* an admin can unlock"):
            await login(listen, "op", OTHER_PASSWORD)
        await pocd("unlock", "op", "--as", "ada")
        token = await login(listen, "op", OTHER_PASSWORD)

        start = {"batch_id": "B", "protocol": "CART-TCT"}
        await pocd("roles", "op", "--role", "qa", "--as", "ada")
        # a change of the account ends the sessions opened before it
        status, body = await _as(listen, token, "POST", "/api/runs", start)
        assert status == 401
        assert body["error"].startswith("the account changed since this session began")
        token = await login(listen, "op", OTHER_PASSWORD)
        status, body = await _as(listen, token, "POST", "/api/runs", start)
        assert (status, body["error"]) == (
            403,
            "user 'op' (qa) may not run.start: it needs operator or supervisor",
        )
    with Store(site.store_path, readonly=True) as store:
        entries = store.audit()
    of_op = [e for e in entries if "op" in (e.actor, e.target)]
    assert [(e.actor, e.action) for e in of_op] == [
        ("op", "login"),
        ("ada", "user.disable"),
        ("op", "login.failed"),  # disabled
        ("ada", "user.enable"),
        ("op", "login"),
        ("ada", "user.password"),
        ("op", "login.failed"),
        ("op", "login.failed"),
        ("system", "login.lockout"),
        ("ada", "user.unlock"),  # the refused login while locked is not an entry of its own
        ("op", "login"),
        ("ada", "user.roles"),
        ("op", "login"),
        ("op", "access.denied"),  # run.start, as qa
    ]
    assert [e.reason for e in of_op if e.action == "login.failed"][:3] == [
        "disabled",
        "wrong password",
        "wrong password",
    ]
