"""The deviation lifecycle against the real daemon: open -> assessed -> closed, each step by a
named person over the API, closing signed by QA and by someone other than the assessor; every
step an audit entry with old and new states, chained; nothing deleted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pocd.model import DeviationState
from pocd.settings import Site, load_site
from pocd.store import Store
from tests.sitekit import PASSWORD, add_user, api, running, write_site

START = {"protocol": "CART-TCT", "batch_id": "B-DEV"}
SKIP = {"phase": "harvest", "reason": "expansion done on the bench", "signature": True}


async def _deviation(site: Site) -> str:
    """The id of a phase-order deviation of a new run."""
    status, run = await api(site, "POST", "/api/runs", START)
    assert status == 201
    status, _ = await api(site, "POST", "/api/run/phase", SKIP)
    assert status == 200
    _, detail = await api(site, "GET", f"/api/runs/{run['id']}")
    (deviation,) = detail["deviations"]
    assert (deviation["state"], deviation["changes"]) == ("open", [])
    return str(deviation["id"])


def _site(tmp_path: Path) -> Site:
    site = load_site(write_site(tmp_path, ""))
    add_user(site.store_path, "sam", ["supervisor"], "Sam Supervisor")
    add_user(site.store_path, "quinn", ["qa"], "Quinn Quality")
    return site


CLOSE = {
    "disposition": "impact accepted",
    "reason": "the cells met the expansion target on the bench",
    "root_cause": "the bioreactor was booked for another batch",
}
APPROVED = {"password": PASSWORD, "meaning": "approved"}


async def test_a_deviation_is_assessed_then_closed_signed_by_a_second_person(
    tmp_path: Path,
) -> None:
    site = _site(tmp_path)
    async with running(site):
        deviation = await _deviation(site)
        path = f"/api/deviations/{deviation}"
        # out of order, unsigned, by a role that may not: refused, and nothing done
        status, body = await api(site, "POST", f"{path}/close", {**CLOSE, "signature": APPROVED})
        assert status == 409
        assert "is open: it can only be assessed next" in body["error"]
        status, body = await api(site, "POST", f"{path}/assess", {"note": "x"}, user=None)
        assert status == 401
        status, body = await api(site, "POST", "/api/deviations/nope/assess", {"note": "x"})
        assert (status, "no deviation 'nope'" in body["error"]) == (409, True)

        status, step = await api(site, "POST", f"{path}/assess", {"note": "no impact"}, user="sam")
        assert (status, step["state"], step["actor"]) == (200, "assessed", "sam")
        status, body = await api(site, "POST", f"{path}/assess", {"note": "again"}, user="sam")
        assert status == 409

        status, body = await api(site, "POST", f"{path}/close", CLOSE, user="quinn")
        assert (status, body["fields"]) == (428, ["signature"])
        status, body = await api(site, "POST", f"{path}/close", {**CLOSE, "signature": APPROVED})
        assert status == 200  # op holds qa too, and did not assess it
        status, body = await api(site, "POST", f"{path}/close", {**CLOSE, "signature": APPROVED})
        assert (status, "closed for good" in body["error"]) == (409, True)

        _, runs = await api(site, "GET", "/api/runs")
        _, detail = await api(site, "GET", f"/api/runs/{runs[0]['id']}")
    (shown,) = detail["deviations"]
    assert shown["state"] == "closed"
    assert [(c["state"], c["actor"]) for c in shown["changes"]] == [
        ("assessed", "sam"),
        ("closed", "op"),
    ]
    assert shown["changes"][1]["root_cause"] == CLOSE["root_cause"]
    assert any(s["action"] == "deviation.close" and s["intact"] for s in detail["signatures"])

    with Store(site.store_path, readonly=True) as store:
        steps = [a for a in store.audit() if a.action.startswith("deviation.")]
        assert [(a.action, a.actor, a.old, a.new) for a in steps] == [
            ("deviation.assessed", "sam", "open", "assessed"),
            ("deviation.closed", "op", "assessed", "closed"),
        ]
        assert steps[1].details["disposition"] == "impact accepted"
        assert [c.state for c in store.deviation_changes(deviation)] == [
            DeviationState.ASSESSED,
            DeviationState.CLOSED,
        ]
        report = store.verify_chain()
        assert report.problems == []
        assert report.records >= 4  # the deviation, its two steps and their audit entries
    db = sqlite3.connect(site.store_path)
    for sql in ("DELETE FROM deviation_changes", "DELETE FROM deviations"):
        with pytest.raises(sqlite3.DatabaseError):
            db.execute(sql)
    db.close()


async def test_whoever_assessed_a_deviation_may_not_close_it(tmp_path: Path) -> None:
    site = _site(tmp_path)
    add_user(site.store_path, "dana", ["supervisor", "qa"], "Dana Both")
    async with running(site):
        deviation = await _deviation(site)
        path = f"/api/deviations/{deviation}"
        assert (await api(site, "POST", f"{path}/assess", {"note": "ok"}, user="dana"))[0] == 200
        status, body = await api(
            site, "POST", f"{path}/close", {**CLOSE, "signature": APPROVED}, user="dana"
        )
        assert status == 409
        assert "may not close a deviation they assessed" in body["error"]
        # a supervisor may assess but not close
        status, _ = await api(
            site, "POST", f"{path}/close", {**CLOSE, "signature": APPROVED}, user="sam"
        )
        assert status == 403
        status, _ = await api(
            site, "POST", f"{path}/close", {**CLOSE, "signature": APPROVED}, user="quinn"
        )
        assert status == 200
    with Store(site.store_path, readonly=True) as store:
        assert [c.actor for c in store.deviation_changes(deviation)] == ["dana", "quinn"]
