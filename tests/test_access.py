"""The pure access core: permission matrix, separation of duties, passwords, sessions, throttle.

Times are plain ints (ns): a fake clock is a number the test moves.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocd.access import (
    MIN_LENGTH,
    PERMISSIONS,
    SIGNED,
    Action,
    LoginThrottle,
    Meaning,
    Role,
    SessionKind,
    SessionRefused,
    Sessions,
    allowed,
    check_password,
    dummy_hash,
    hash_password,
    matrix_markdown,
    needs_rehash,
    refusal,
    separation_conflict,
    verify_password,
)
from pocd.errors import AccessError
from pocd.model import NS

T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z


# --- roles --------------------------------------------------------------------------------


def test_matrix_covers_every_action_and_signed_actions_are_permitted() -> None:
    assert set(PERMISSIONS) == set(Action)
    assert all(PERMISSIONS[a] for a in Action)
    assert set(SIGNED) <= set(PERMISSIONS)
    assert all(SIGNED[a] for a in SIGNED)


def test_admin_holds_no_batch_action() -> None:
    admin = {a for a in Action if allowed([Role.ADMIN], a)}
    assert admin == {
        Action.STATUS_READ,
        Action.RUNS_READ,
        Action.LINES_READ,
        Action.SESSION_READ,
        Action.USER_MANAGE,
        Action.USER_UNLOCK,
    }
    assert not any(a.startswith("run.") for a in admin)
    # ... unless the same user also holds an operational role.
    assert allowed([Role.ADMIN, Role.OPERATOR], Action.RUN_START)


def test_matrix_rows() -> None:
    assert allowed([Role.QP], Action.BATCH_RELEASE)
    assert not allowed([Role.QA], Action.BATCH_RELEASE)
    assert not allowed([Role.OPERATOR], Action.ALARM_SHELVE_CRITICAL)
    assert allowed([Role.SUPERVISOR], Action.ALARM_SHELVE_CRITICAL)
    assert not allowed([], Action.STATUS_READ)
    assert SIGNED[Action.RUN_ABORT] == {Meaning.PERFORMED, Meaning.APPROVED}
    assert SIGNED[Action.BATCH_RELEASE] == {Meaning.RELEASED}
    assert Action.RUN_START not in SIGNED
    assert Meaning.RELEASED.printed == "released by"


def test_refusal_names_user_roles_and_action() -> None:
    assert refusal("bob", [Role.OPERATOR], Action.RUN_START) is None
    assert (
        refusal("bob", [Role.QP, Role.QA], Action.RUN_START)
        == "user 'bob' (qa, qp) may not run.start: it needs operator or supervisor"
    )
    assert (
        refusal("eve", [], Action.SITE_STATUS)
        == "user 'eve' (no role) may not site.status: it needs supervisor, qa or qp"
    )
    assert refusal("root", iter([Role.ADMIN]), Action.BATCH_RELEASE) == (
        "user 'root' (admin) may not batch.release: it needs qp"
    )


def test_separation_of_duties() -> None:
    actors = {
        "run.start": frozenset({"olga"}),
        "run.phase": frozenset({"olga", "sam"}),
        "deviation.raise": frozenset({"sam"}),
        "deviation.assess": frozenset({"quinn"}),
    }
    assert separation_conflict(Action.BATCH_RELEASE, "sam", actors) == (
        "user 'sam' may not release a batch they operated (run.phase)"
    )
    msg = separation_conflict(Action.BATCH_RELEASE, "olga", actors)
    assert msg is not None
    assert "run.phase, run.start" in msg
    assert separation_conflict(Action.BATCH_RELEASE, "quinn", actors) is None
    assert separation_conflict(Action.DEVIATION_CLOSE, "quinn", actors) == (
        "user 'quinn' may not close a deviation they assessed"
    )
    assert separation_conflict(Action.DEVIATION_CLOSE, "sam", actors) == (
        "user 'sam' may not close a deviation they raised"
    )
    assert separation_conflict(Action.DEVIATION_CLOSE, "olga", actors) is None
    assert separation_conflict(Action.RUN_STOP, "olga", actors) is None
    assert separation_conflict(Action.BATCH_RELEASE, "olga", {}) is None


def test_matrix_markdown_reads_back_as_the_matrix() -> None:
    text = matrix_markdown()
    assert text == matrix_markdown()
    assert text.endswith("|\n")
    header, rule, *rows = text.splitlines()
    roles = [c.strip() for c in header.strip("|").split("|")][1:-1]
    assert roles == list(Role)
    assert set(rule) == {"|", "-"}
    assert len(rows) == len(Action)
    for action, row in zip(Action, rows, strict=True):
        name, *cells, meanings = (c.strip() for c in row.strip("|").split("|"))
        assert name == f"`{action}`"
        mark = "signed" if action in SIGNED else "yes"
        assert cells == [mark if r in PERMISSIONS[action] else "" for r in Role]
        assert set(filter(None, meanings.split(", "))) == set(SIGNED.get(action, ()))


# --- passwords ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("login", "password", "why"),
    [
        ("alice", "short-pw", "shorter than 12"),
        ("alice", "x" * 20, "one character repeated"),
        ("alice", "my-ALICE-password", "contains the login 'alice'"),
        ("alice", "ecila-is-my-name", "or it reversed"),
        ("alice", "tab\there-is-long-enough", "control character"),
        ("alice", "nul\x00here-is-long-enough", "control character"),
    ],
)
def test_password_policy_refuses(login: str, password: str, why: str) -> None:
    with pytest.raises(AccessError, match=re.escape(why)) as caught:
        check_password(login, password)
    assert password not in str(caught.value)


def test_password_policy_accepts() -> None:
    check_password("alice", "correct horse battery")
    check_password("al", "pal-is-a-fine-word")  # a 2-letter login is not searched for
    check_password("alice", "a9" * 4, min_length=8)
    assert MIN_LENGTH == 12


def test_hash_verify_roundtrip() -> None:
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "correct horse batterz")
    assert not verify_password("not a hash", "correct horse battery")
    assert not verify_password(stored[:-4], "correct horse battery")
    assert not needs_rehash(stored)
    assert needs_rehash("$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$aGFzaGhhc2g")
    assert needs_rehash("not a hash")


def test_unknown_user_verifies_against_dummy_hash() -> None:
    assert dummy_hash() is dummy_hash()
    assert dummy_hash().startswith("$argon2id$")
    assert not verify_password(None, "anything at all")


# --- sessions -----------------------------------------------------------------------------


def _sessions(**kw: int) -> Sessions:
    return Sessions(idle_s=kw.pop("idle_s", 60), max_age_s=kw.pop("max_age_s", 600), **kw)


def _refused(sessions: Sessions, token: str, now: int) -> str:
    with pytest.raises(SessionRefused) as caught:
        sessions.find(token, now)
    assert isinstance(caught.value, AccessError)
    return caught.value.reason


def test_session_open_find_and_reasons() -> None:
    s = _sessions()
    token, opened = s.open("olga", SessionKind.BROWSER, "10.0.0.5", T0)
    assert re.fullmatch(r"[0-9a-f]{12}", opened.id)
    assert opened.csrf not in repr(opened)
    assert s.find(token, T0 + 30 * NS) == replace(opened, last_seen=T0 + 30 * NS)
    assert _refused(s, "no-such-token", T0) == "unknown"
    assert _refused(s, token, T0 + 91 * NS) == "idle"
    assert len(s) == 0
    assert _refused(s, token, T0 + 91 * NS) == "unknown"


def test_activity_keeps_a_session_alive_until_max_age() -> None:
    s = _sessions()
    token, _ = s.open("olga", SessionKind.CLI, "::1", T0)
    for minute in range(1, 11):  # used every 50 s: never idle, well past idle_s in total
        assert s.find(token, T0 + minute * 50 * NS).last_seen == T0 + minute * 50 * NS
    assert _refused(s, token, T0 + 601 * NS) == "expired"
    assert len(s) == 0


def test_close_close_user_purge_and_limit() -> None:
    s = _sessions(limit_per_user=3)
    tokens = [s.open("olga", SessionKind.BROWSER, "a", T0 + i)[0] for i in range(5)]
    other, _ = s.open("sam", SessionKind.CLI, "b", T0)
    assert len(s) == 4
    for oldest in tokens[:2]:
        assert _refused(s, oldest, T0 + 10) == "unknown"
    closed = s.close(tokens[2])
    assert closed is not None
    assert closed.login == "olga"
    assert s.close(tokens[2]) is None
    assert s.close_user("olga") == 2
    assert s.close_user("olga") == 0
    assert len(s) == 1
    s.open("sam", SessionKind.CLI, "b", T0 + 50 * NS)
    assert s.purge(T0 + 61 * NS) == 1
    assert _refused(s, other, T0 + 61 * NS) == "unknown"


def test_token_not_kept_in_clear() -> None:
    s = _sessions()
    token, session = s.open("olga", SessionKind.BROWSER, "a", T0)
    state = repr([getattr(s, name) for name in Sessions.__slots__])
    assert session.id in state  # the state is there ...
    assert token not in state  # ... but not the token


def test_csrf_matches() -> None:
    s = _sessions()
    _, session = s.open("olga", SessionKind.BROWSER, "a", T0)
    assert s.csrf_matches(session, session.csrf)
    assert not s.csrf_matches(session, None)
    assert not s.csrf_matches(session, "")
    assert not s.csrf_matches(session, session.csrf[:-1] + "é")
    assert not s.csrf_matches(session, "\ud800")
    assert _refused(s, "\ud800", T0) == "unknown"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), min_size=1, max_size=20))
def test_session_lives_while_gaps_stay_within_idle(gaps: list[int]) -> None:
    s = Sessions(idle_s=100, max_age_s=1000)
    token, _ = s.open("olga", SessionKind.CLI, "a", T0)
    now = T0
    for gap in gaps:
        now += gap * NS
        if gap > 100 or now - T0 > 1000 * NS:
            assert _refused(s, token, now) == ("expired" if now - T0 > 1000 * NS else "idle")
            return
        assert s.find(token, now).last_seen == now


# --- throttle -------------------------------------------------------------------------------


def test_lockout_after_n_failures_and_lapse() -> None:
    th = LoginThrottle(lockout_after=3, lockout_s=60, address_limit=100)
    assert [th.failed("bob", "10.0.0.5", T0 + i * NS) for i in range(3)] == [False, False, True]
    until = T0 + 2 * NS + 60 * NS
    assert th.locked_until("bob", T0 + 10 * NS) == until
    msg = th.refusal("bob", "10.0.0.9", T0 + 10 * NS)
    assert msg == (
        "user 'bob' is locked until 2026-01-01T00:01:02Z after 3 failed logins; "
        "an admin can unlock it"
    )
    assert th.refusal("alice", "10.0.0.5", T0 + 10 * NS) is None
    assert not th.failed("bob", "10.0.0.5", T0 + 11 * NS)  # no second lockout while locked
    assert th.lapsed(T0 + 30 * NS) == []
    assert th.locked_until("bob", until) is None
    assert th.lapsed(until) == ["bob"]
    assert th.lapsed(until) == []
    assert th.refusal("bob", "10.0.0.5", until) is None
    # The lock ended with a clean slate: two more failures do not lock again.
    assert not th.failed("bob", "10.0.0.5", until + 1)
    assert not th.failed("bob", "10.0.0.5", until + 2)


def test_refusal_clears_a_timed_out_lock_for_lapsed() -> None:
    th = LoginThrottle(lockout_after=1, lockout_s=60)
    assert th.failed("bob", "a", T0)
    assert th.refusal("bob", "a", T0 + 61 * NS) is None
    assert th.locked_until("bob", T0 + 61 * NS) is None
    assert th.lapsed(T0 + 61 * NS) == ["bob"]


def test_failures_outside_window_do_not_count() -> None:
    th = LoginThrottle(lockout_after=3, window_s=100)
    assert not th.failed("bob", "a", T0)
    assert not th.failed("bob", "a", T0 + 60 * NS)
    assert not th.failed("bob", "a", T0 + 101 * NS)  # the first one has left the window
    assert th.failed("bob", "a", T0 + 102 * NS)


def test_success_clears_login_not_address() -> None:
    th = LoginThrottle(lockout_after=3, address_limit=4)
    th.failed("bob", "10.0.0.5", T0)
    th.failed("bob", "10.0.0.5", T0 + 1)
    th.succeeded("bob", "10.0.0.5")
    assert not th.failed("bob", "10.0.0.5", T0 + 2)
    assert not th.failed("bob", "10.0.0.5", T0 + 3)
    assert th.refusal("carol", "10.0.0.5", T0 + 4) == (
        "too many failed logins from 10.0.0.5; try again later"
    )
    assert th.refusal("carol", "10.0.0.6", T0 + 4) is None
    assert th.refusal("carol", "10.0.0.5", T0 + 900 * NS + 1) is None  # window passed


def test_unlock() -> None:
    th = LoginThrottle(lockout_after=2)
    th.failed("bob", "a", T0)
    assert th.failed("bob", "a", T0 + 1)
    assert th.unlock("bob")
    assert not th.unlock("bob")
    assert th.refusal("bob", "a", T0 + 2) is None
    assert th.lapsed(T0 + 3600 * NS) == []  # an unlock is not a lapse


def test_memory_is_bounded_but_locks_are_kept() -> None:
    th = LoginThrottle(lockout_after=2, address_limit=2, max_tracked=10)
    th.failed("victim", "x", T0)
    assert th.failed("victim", "x", T0 + 1)
    for i in range(100):
        th.failed(f"made-up-{i}", f"10.0.{i}.1", T0 + 2 + i)
    assert len(th._by_login) <= 10
    assert len(th._by_address) <= 10
    assert th.locked_until("victim", T0 + 200) is not None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), max_size=30))
def test_locked_exactly_when_n_failures_fit_in_window(gaps: list[int]) -> None:
    th = LoginThrottle(lockout_after=3, lockout_s=50, window_s=100, address_limit=1000)
    now, since_lock = T0, []
    for gap in gaps:
        now += gap * NS
        if th.locked_until("bob", now) is not None:
            continue
        th.refusal("bob", "a", now)
        since_lock.append(now)
        expect = len(since_lock) >= 3 and since_lock[-1] - since_lock[-3] < 100 * NS
        assert th.failed("bob", "a", now) == expect
        if expect:
            since_lock = []


def test_the_readme_holds_the_permission_matrix_as_the_code_has_it() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    _, start, rest = readme.partition("<!-- permission matrix -->\n")
    table, end, _ = rest.partition("<!-- end of permission matrix -->")
    assert start and end, "the README lost its permission matrix markers"
    assert table == matrix_markdown()
