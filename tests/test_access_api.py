"""Named users on the control API against the real daemon: every role against every action
of the permission matrix, electronic signatures, browser sessions with CSRF tokens, session
ends, revoked CLI tokens, lockouts, and the audit trail naming who did what."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pocd.access import PERMISSIONS, Action, Role
from pocd.model import AuditEntry, RunStatus, UserChange, now_ns
from pocd.settings import Site, load_site
from pocd.signatures import utc_offset, verify
from pocd.store import Store
from tests.sitekit import PASSWORD, SIGNATURE, add_user, api, running, write_site

NO_DEVICES = ""
ROLE_USERS = {role: f"{role.value}-user" for role in Role}
START = {"protocol": "CART-TCT"}


def audit_of(site: Site, action: str) -> list[AuditEntry]:
    with Store(site.store_path, readonly=True) as store:
        return [a for a in store.audit() if a.action == action]


def site_with_role_users(tmp_path: Path, extra: str = "") -> Site:
    site = load_site(write_site(tmp_path, NO_DEVICES, extra))
    for role, login in ROLE_USERS.items():
        add_user(site.store_path, login, [role.value], f"{role.value.upper()} Person")
    return site


# --- the permission matrix -------------------------------------------------------------------


async def _attempt(site: Site, user: str, action: Action, run: str | None) -> int:
    """One request of `action` by `user`; `run` is a running run it may act on. Returns the
    status; an allowed action is made to succeed."""
    batch = f"B-{user}-{action.value}"
    match action:
        case Action.STATUS_READ:
            return (await api(site, "GET", "/api/status", user=user))[0]
        case Action.LINES_READ:
            return (await api(site, "GET", "/api/lines", user=user))[0]
        case Action.RUNS_READ:
            return (await api(site, "GET", "/api/runs", user=user))[0]
        case Action.SESSION_READ:
            return (await api(site, "GET", "/api/session", user=user))[0]
        case Action.RUN_START:
            status, answer = await api(
                site, "POST", "/api/runs", {**START, "batch_id": batch}, user=user
            )
            if status == 201:
                await api(site, "POST", f"/api/runs/{answer['id']}/stop", {}, user=user)
            return int(status)
        case Action.RUN_PHASE:
            body = {"phase": "activation"}
            return (await api(site, "POST", f"/api/runs/{run}/phase", body, user=user))[0]
        case Action.RUN_PHASE_OVERRIDE:
            body = {"phase": "harvest", "reason": "bench", "signature": True}
            return (await api(site, "POST", f"/api/runs/{run}/phase", body, user=user))[0]
        case Action.RUN_STOP:
            return (await api(site, "POST", f"/api/runs/{run}/stop", {}, user=user))[0]
        case Action.RUN_ABORT:
            body = {"abort": True, "reason": "kit leak", "signature": True}
            return (await api(site, "POST", f"/api/runs/{run}/stop", body, user=user))[0]
        case Action.SITE_STATUS:
            body = {"status": "suspended", "reason": "inspection", "signature": True}
            status = (await api(site, "POST", "/api/site/status", body, user=user))[0]
            if status == 200:
                back = {**body, "status": "active", "reason": "inspection done"}
                assert (await api(site, "POST", "/api/site/status", back, user=user))[0] == 200
            return int(status)
    raise AssertionError(f"{action} is not an action of the API")


API_ACTIONS = (
    Action.STATUS_READ,
    Action.LINES_READ,
    Action.RUNS_READ,
    Action.SESSION_READ,
    Action.RUN_START,
    Action.RUN_PHASE,
    Action.RUN_PHASE_OVERRIDE,
    Action.RUN_STOP,
    Action.RUN_ABORT,
    Action.SITE_STATUS,
)


async def test_every_role_against_every_action_of_the_api(tmp_path: Path) -> None:
    """Allowed: done. Refused: 403 and an `access.denied` entry naming the user and action;
    and nothing done."""
    site = site_with_role_users(tmp_path)
    refused: list[tuple[str, str]] = []
    async with running(site):
        for role, user in ROLE_USERS.items():
            for action in API_ACTIONS:
                run = None
                if action.value.startswith("run.") and action is not Action.RUN_START:
                    # a fresh run to act on, started by a user who may
                    batch = {**START, "batch_id": f"R-{user}-{action.value}"}
                    run = (await api(site, "POST", "/api/runs", batch))[1]["id"]
                status = await _attempt(site, user, action, run)
                if role in PERMISSIONS[action]:
                    assert status in (200, 201), (role, action, status)
                else:
                    assert status == 403, (role, action, status)
                    # an override is first a phase change: refused as one
                    checked = Action.RUN_PHASE if action is Action.RUN_PHASE_OVERRIDE else action
                    refused.append((user, checked.value))
                if run is not None:
                    _, state = await api(site, "GET", f"/api/runs/{run}")
                    if state["status"] == "running":
                        await api(site, "POST", f"/api/runs/{run}/stop", {})
    denied = [(a.actor, a.target) for a in audit_of(site, "access.denied")]
    assert denied == refused
    assert all(a.reason.startswith(f"user '{a.actor}'") for a in audit_of(site, "access.denied"))
    # the admin, who manages users, acts on no batch
    assert (ROLE_USERS[Role.ADMIN], "run.start") in refused
    # every action in the record is attributed to a named user (or the daemon itself)
    with Store(site.store_path, readonly=True) as store:
        logins = {u.login for u in store.users()}
        actors = {a.actor for a in store.audit()}
        assert actors <= logins | {"system"}, actors - logins
        runs = store.runs()
    assert {r.operator for r in runs} <= logins
    by_role = {r.batch_id: r for r in runs}
    assert by_role["B-operator-user-run.start"].operator == "operator-user"


# --- electronic signatures --------------------------------------------------------------------


async def test_a_wrong_signature_password_refuses_the_abort_and_leaves_nothing_done(
    tmp_path: Path,
) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    async with running(site):
        _, run = await api(site, "POST", "/api/runs", {**START, "batch_id": "B-1"})
        abort = {"abort": True, "reason": "kit leak"}
        status, body = await api(site, "POST", "/api/run/stop", abort)
        assert (status, body["fields"]) == (428, ["signature"])
        wrong = {**abort, "signature": {"password": "not my password", "meaning": "performed"}}
        status, body = await api(site, "POST", "/api/run/stop", wrong)
        assert status == 403
        assert "wrong password" in body["error"]
        released = {**abort, "signature": {"password": PASSWORD, "meaning": "released"}}
        status, body = await api(site, "POST", "/api/run/stop", released)
        assert (status, body["fields"]) == (400, ["signature.meaning"])
        _, state = await api(site, "GET", f"/api/runs/{run['id']}")
        assert state["status"] == "running"
        assert state["signatures"] == []
    assert audit_of(site, "run.abort") == []
    assert [a.actor for a in audit_of(site, "signature.failed")] == ["op"]
    with Store(site.store_path, readonly=True) as store:
        assert store.signatures() == []
        assert store.runs()[0].status is RunStatus.RUNNING


async def test_a_signature_binds_the_exact_record_and_a_later_change_breaks_it(
    tmp_path: Path,
) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    async with running(site):
        _, run = await api(site, "POST", "/api/runs", {**START, "batch_id": "B-1"})
        override = {
            "phase": "harvest",
            "reason": "bench",
            "signature": {**SIGNATURE, "meaning": "approved"},
        }
        status, change = await api(site, "POST", "/api/run/phase", override)
        assert (status, change["in_order"]) == (200, False)
        abort = {"abort": True, "reason": "kit leak", "signature": True}
        assert (await api(site, "POST", "/api/run/stop", abort))[0] == 200
        status, _ = await api(
            site,
            "POST",
            "/api/site/status",
            {"status": "suspended", "reason": "r", "signature": True},
        )
        assert status == 200
        _, detail = await api(site, "GET", f"/api/runs/{run['id']}")
    phase_sig, abort_sig = detail["signatures"]
    assert (phase_sig["action"], phase_sig["meaning"], phase_sig["name"]) == (
        "run.phase.override",
        "approved",
        "Olive Operator",
    )
    assert abort_sig["action"] == "run.abort"
    assert abort_sig["record"] == f"run:{run['id']}"
    # the site's offset at the time of signing (Europe/London: +00:00 or +01:00)
    assert abort_sig["utc_offset"] == utc_offset(abort_sig["t_ns"], "Europe/London")
    assert all(s["intact"] for s in detail["signatures"])
    assert [a.target for a in audit_of(site, "signature")] == [
        phase_sig["record"],
        abort_sig["record"],
        f"audit:site.status:{audit_of(site, 'site.status')[0].t}",
    ]
    with Store(site.store_path, readonly=True) as store:
        signatures = store.signatures()
        assert [verify(store, s) for s in signatures] == [True, True, True]
    # someone with the file edits the records the signatures bind to
    db = sqlite3.connect(site.store_path)
    triggers = db.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'").fetchall()
    for (name,) in triggers:  # what keeps the records append-only, gone
        db.execute(f"DROP TRIGGER {name}")
    db.execute("UPDATE runs SET end_reason = 'routine end' WHERE id = ?", (run["id"],))
    db.execute("UPDATE phases SET reason = 'as planned' WHERE phase = 'harvest'")
    db.execute("UPDATE audit SET reason = 'routine' WHERE action = 'site.status'")
    db.commit()
    db.close()
    with Store(site.store_path, readonly=True) as store:
        assert [verify(store, s) for s in store.signatures()] == [False, False, False]


# --- browser sessions, CSRF, session ends, revocation, lockout ---------------------------------


def _browser() -> aiohttp.ClientSession:
    # the API listens on an address: a cookie jar takes cookies of addresses only when unsafe
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _browser_login(http: aiohttp.ClientSession, base: str, user: str = "op") -> str:
    async with http.post(f"{base}/api/login", json={"login": user, "password": PASSWORD}) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Secure" not in cookie, "plain HTTP: a Secure cookie would never be sent back"
        assert "token" not in answer, "a browser gets a cookie, not a bearer token"
        csrf: str = answer["csrf"]
        return csrf


async def test_a_browser_session_needs_its_csrf_token_and_a_cross_site_form_is_refused(
    tmp_path: Path,
) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    base = f"http://{site.config.api.listen}"
    start = {**START, "batch_id": "B-1"}
    async with running(site), _browser() as http:
        csrf = await _browser_login(http, base)
        async with http.get(f"{base}/api/session") as resp:
            assert (resp.status, (await resp.json())["client"]) == (200, "browser")
        for headers in ({}, {"X-CSRF-Token": "guessed"}):
            async with http.post(f"{base}/api/runs", json=start, headers=headers) as resp:
                assert resp.status == 403, headers
                assert "X-CSRF-Token" in (await resp.json())["error"]
        # a page of another site posts a form to the API: the browser sends the cookie along
        form = {"batch_id": "B-1", "protocol": "CART-TCT"}
        evil = {"Origin": "https://evil.example"}
        async with http.post(f"{base}/api/runs", data=form, headers=evil) as resp:
            assert resp.status == 403
        async with http.post(f"{base}/api/runs", data=form) as resp:
            assert resp.status == 415
        async with http.post(
            f"{base}/api/runs", json=start, headers={"X-CSRF-Token": csrf}
        ) as resp:
            assert (resp.status, (await resp.json())["operator"]) == (201, "op")
        async with http.post(f"{base}/api/logout", json={}, headers={"X-CSRF-Token": csrf}) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/api/runs") as resp:
            assert resp.status == 401
    with Store(site.store_path, readonly=True) as store:
        assert [r.batch_id for r in store.runs()] == ["B-1"]
    assert [a.target for a in audit_of(site, "access.denied")] == ["csrf", "csrf"]


async def test_a_session_ends_when_idle_and_at_its_maximum_age(tmp_path: Path) -> None:
    extra = '[access]\nsession_idle = "1s"\nsession_max = "3s"\n'
    site = load_site(write_site(tmp_path, NO_DEVICES, extra))
    async with running(site):
        token = await _cli_login(site)
        assert (await _with_token(site, token, "GET", "/api/session"))[0] == 200
        await asyncio.sleep(1.3)
        status, body = await _with_token(site, token, "GET", "/api/session")
        assert status == 401
        assert "idle" in body["error"]
        # kept busy, a session still ends at its maximum age
        token = await _cli_login(site)
        for _ in range(6):
            status, body = await _with_token(site, token, "GET", "/api/session")
            if status == 401:
                break
            await asyncio.sleep(0.6)
        assert status == 401
        assert "maximum age" in body["error"]


async def _cli_login(site: Site, user: str = "op", password: str = PASSWORD) -> str:
    body = {"login": user, "password": password, "client": "cli"}
    status, answer = await api(site, "POST", "/api/login", body, user=None)
    assert status == 200, answer
    token: str = answer["token"]
    return token


async def _with_token(
    site: Site, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    url = f"http://{site.config.api.listen}{path}"
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_revoked_cli_token_and_a_disabled_user_are_refused(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    async with running(site):
        token = await _cli_login(site)
        assert (await _with_token(site, token, "GET", "/api/session"))[0] == 200
        assert (await _with_token(site, token, "POST", "/api/logout", {}))[0] == 200
        status, body = await _with_token(
            site, token, "POST", "/api/runs", {**START, "batch_id": "B"}
        )
        assert status == 401
        assert "log in again" in body["error"]
        # an admin disables the user (pocd user disable): their next request is refused
        token = await _cli_login(site)
        with Store(site.store_path) as store:
            user = store.user("op")
            assert user is not None
            store.write([UserChange(replace(user, disabled=True))])
        status, body = await _with_token(site, token, "GET", "/api/status")
        assert (status, body["error"]) == (401, "the account is disabled")
        status, _ = await api(
            site, "POST", "/api/login", {"login": "op", "password": PASSWORD}, user=None
        )
        assert status == 401
    assert [a.actor for a in audit_of(site, "logout")] == ["op"]
    assert [a.reason for a in audit_of(site, "login.failed")] == ["disabled"]


async def test_failed_logins_lock_the_user_out_until_an_admin_unlocks(tmp_path: Path) -> None:
    extra = "[access]\nlockout_after = 3\n"
    site = load_site(write_site(tmp_path, NO_DEVICES, extra))
    wrong = {"login": "op", "password": "guess", "client": "cli"}
    right = {**wrong, "password": PASSWORD}
    async with running(site):
        for _ in range(3):
            status, body = await api(site, "POST", "/api/login", wrong, user=None)
            assert (status, body["error"]) == (401, "wrong login or password")
        status, body = await api(site, "POST", "/api/login", right, user=None)
        assert status == 429
        assert "locked" in body["error"]
        (lockout,) = audit_of(site, "login.lockout")
        assert lockout.target == "op"
        # `pocd user unlock op --as admin` writes this entry; the daemon honours it
        with Store(site.store_path) as store:
            store.write([AuditEntry(now_ns(), "admin", "user.unlock", "op")])
        status, _ = await api(site, "POST", "/api/login", right, user=None)
        assert status == 200
    failures = audit_of(site, "login.failed")
    assert [a.reason for a in failures][:3] == ["wrong password"] * 3
    assert all(a.target == "127.0.0.1" for a in failures)
    assert [a.actor for a in audit_of(site, "login")] == ["op"]


@pytest.mark.parametrize("path", ["/api/status", "/api/lines", "/api/runs", "/api/session"])
async def test_reads_need_a_login_unless_opened(tmp_path: Path, path: str) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    async with running(site):
        status, body = await api(site, "GET", path, user=None)
        assert status == 401, body
        for open_path in ("/metrics", "/api/health", "/api/openapi.json"):
            url = f"http://{site.config.api.listen}{open_path}"
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                assert resp.status == 200, open_path


async def test_a_read_opened_in_the_config_needs_no_login(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES, 'public = ["status"]'))
    assert site.config.api.public == ["status"]
    async with running(site):
        assert (await api(site, "GET", "/api/status", user=None))[0] == 200
        url = f"http://{site.config.api.listen}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 401, "metrics are closed once public names only status"


async def test_a_burst_of_guesses_is_counted_one_by_one_and_a_lockout_outlives_a_restart(
    tmp_path: Path,
) -> None:
    """Guesses sent at once do not all get checked before the first failure counts; a right
    password sent among them after the lockout is refused; a restart keeps the lock."""
    extra = "[access]\nlockout_after = 3\n"
    site = load_site(write_site(tmp_path, NO_DEVICES, extra))
    guesses = [{"login": "op", "password": f"guess {n}", "client": "cli"} for n in range(12)]
    right = {"login": "op", "password": PASSWORD, "client": "cli"}
    async with running(site):
        answers = await asyncio.gather(
            *(api(site, "POST", "/api/login", body, user=None) for body in [*guesses, right])
        )
        assert [status for status, _ in answers] == [401] * 3 + [429] * 10
    assert len(audit_of(site, "login.failed")) == 3, "only three guesses were checked"
    async with running(site):  # the daemon restarted: its throttle forgot, the trail did not
        status, body = await api(site, "POST", "/api/login", right, user=None)
        assert status == 429
        assert "locked until" in body["error"]


def test_a_request_shows_no_password_or_token_in_its_repr() -> None:
    from pocd.access import SessionKind, Sessions
    from pocd.api.bodies import LoginRequest, PhaseRequest
    from pocd.api.guard import Principal
    from pocd.model import User

    login = LoginRequest.model_validate_json(b'{"login": "op", "password": "hunter2 hunter2"}')
    signed = PhaseRequest.model_validate_json(
        b'{"phase": "p", "signature": {"password": "hunter2 hunter2"}}'
    )
    token, session = Sessions(idle_s=60, max_age_s=60).open("op", SessionKind.CLI, "", 0)
    principal = Principal(User("op", "Op", ("operator",), "$argon2id$..."), session, token)
    for shown in (repr(login), repr(signed), repr(principal), str(principal)):
        assert "hunter2" not in shown
        assert token not in shown
        assert "argon2" not in shown
