"""The alarm layer in the daemon: excursions become alarms on the record, a run's start, phase
and end move the line's design scope, and the alarms' state comes back after a restart."""

from __future__ import annotations

from pathlib import Path

from pocd.model import AlarmState, AlarmTransition, Sample, now_ns
from pocd.settings import Site, load_site
from pocd.store import Store
from tests.sitekit import api, running, until, write_site

NS = 1_000_000_000
# Limits with no delays, a phase that watches temperature and one that does not.
QUICK = """
id = "QUICK"
version = "1"
title = "Quick limits"
status = "approved"

[parameters.temperature]
unit = "C"
critical = false
limits = { alert_high = 37.5 }

[[phases]]
id = "warm"

[[phases]]
id = "rest"
limits.temperature = { monitored = false }
"""
INCUBATOR = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 3600 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }
"""


def quick_site(tmp_path: Path) -> Site:
    config = write_site(tmp_path, INCUBATOR)
    (tmp_path / "protocols" / "quick.toml").write_text(QUICK)
    return load_site(config)


def transitions(site: Site) -> list[tuple[str, str, str]]:
    with Store(site.store_path, readonly=True) as store:
        return [
            (e.kind, e.transition.value, e.state.value)
            for e in store.alarm_events()
            if e.source == "temperature"
        ]


def state_of(daemon: object, kind: str) -> AlarmState | None:
    views = daemon.lines.alarms.view()  # type: ignore[attr-defined]
    found = [v.state for v in views if v.source == "temperature" and v.kind == kind]
    return found[0] if found else None


async def test_an_excursion_is_an_alarm_on_the_record_and_its_scope_follows_the_run(
    tmp_path: Path,
) -> None:
    site = quick_site(tmp_path)
    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        # between runs the equipment watch sets no limit: temperature's is out of scope
        status, run = await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "QUICK"})
        assert status == 201, run
        t = now_ns()
        await daemon.inbox.put(Sample("incubator", "temperature", t, 37.9))
        await until(lambda: state_of(daemon, "alert-high") is AlarmState.ACTIVE_UNACKED)
        await daemon.inbox.put(Sample("incubator", "temperature", t + NS // 10, 37.0))
        await until(lambda: state_of(daemon, "alert-high") is AlarmState.RETURNED_UNACKED)
        # the next phase does not watch temperature: its alarm is suppressed by design
        assert (await api(site, "POST", "/api/run/phase", {"phase": "rest"}))[0] == 200
        assert state_of(daemon, "alert-high") is AlarmState.SUPPRESSED
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
    assert [(k, tr) for k, tr, _ in transitions(site) if k == "alert-high"] == [
        ("alert-high", "activate"),
        ("alert-high", "return"),
        ("alert-high", "suppress"),
    ]
    with Store(site.store_path, readonly=True) as store:
        (raised,) = [e for e in store.alarm_events() if e.transition is AlarmTransition.ACTIVATE]
        assert (raised.run_id, raised.batch_id, raised.line, raised.phase) == (
            run["id"],
            "B",
            "main",
            "warm",
        )
        assert (raised.value, raised.limit, raised.device) == (37.9, 37.5, "incubator")


async def test_the_alarms_state_comes_back_after_a_restart(tmp_path: Path) -> None:
    site = quick_site(tmp_path)
    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "QUICK"})
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), 37.9))
        await until(lambda: state_of(daemon, "alert-high") is AlarmState.ACTIVE_UNACKED)
        (before,) = [v for v in daemon.lines.alarms.view() if v.kind == "alert-high"]
    async with running(site) as daemon:
        (after,) = [v for v in daemon.lines.alarms.view() if v.kind == "alert-high"]
        # The same alarm, still not acknowledged: the run resumed, its excursion ended at the
        # last data (the device reads 37.0 now), so the alarm returned, awaiting an operator.
        assert (after.alarm_id, after.state) == (before.alarm_id, AlarmState.RETURNED_UNACKED)
    assert [(k, tr) for k, tr, _ in transitions(site) if k == "alert-high"] == [
        ("alert-high", "activate"),
        ("alert-high", "return"),
    ]


async def test_operators_acknowledge_shelve_and_take_alarms_out_of_service_through_the_api(
    tmp_path: Path,
) -> None:
    from tests.sitekit import add_user

    site = quick_site(tmp_path)
    add_user(site.store_path, "olive", ["operator"], "Olive Operator")
    key = {"source": "temperature", "kind": "alert-high"}
    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "QUICK"})
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), 37.9))
        await until(lambda: state_of(daemon, "alert-high") is AlarmState.ACTIVE_UNACKED)
        status, alarms = await api(site, "GET", "/api/alarms")
        assert status == 200
        (shown,) = [a for a in alarms["alarms"] if a["kind"] == "alert-high"]
        assert (shown["state"], shown["priority"], shown["value"]) == (
            "active-unacked",
            "medium",
            37.9,
        )
        assert alarms["kpis"]["main"]["per_10_min"] >= 1

        body = {**key, "comment": "door opened for a sample"}
        status, acked = await api(site, "POST", "/api/alarms/acknowledge", body, user="olive")
        assert (status, acked["state"], acked["acknowledged_by"]) == (200, "active-acked", "olive")
        status, body2 = await api(site, "POST", "/api/alarms/acknowledge", body, user="olive")
        assert status == 409, body2  # acknowledged already
        shelve = {**key, "comment": "probe being changed", "minutes": 30}
        status, shelved = await api(site, "POST", "/api/alarms/shelve", shelve, user="olive")
        assert (status, shelved["state"]) == (200, "shelved")
        assert shelved["shelved_until"] is not None
        # out of service: a supervisor's, signed
        remove = {**key, "comment": "probe replaced"}
        status, _ = await api(site, "POST", "/api/alarms/remove", remove, user="olive")
        assert status == 403
        status, body3 = await api(site, "POST", "/api/alarms/remove", remove)
        assert (status, body3["fields"]) == (428, ["signature"])
        status, removed = await api(
            site, "POST", "/api/alarms/remove", {**remove, "signature": True}
        )
        assert (status, removed["state"]) == (200, "out-of-service")
    with Store(site.store_path, readonly=True) as store:
        commands = [
            (a.actor, a.action, a.old, a.new)
            for a in store.audit()
            if a.action.startswith("alarm.")
        ]
        signatures = store.signatures()
    assert commands == [
        ("olive", "alarm.acknowledge", "active-unacked", "active-acked"),
        ("olive", "alarm.shelve", "active-acked", "shelved"),
        ("op", "alarm.remove", "shelved", "out-of-service"),
    ]
    assert [(s.action, s.login) for s in signatures] == [("alarm.out_of_service", "op")]


async def test_the_cli_lists_acknowledges_and_takes_alarms_out_of_service(tmp_path: Path) -> None:
    import asyncio

    from tests.sitekit import PASSWORD, cli_as, cli_env, cli_login

    site = quick_site(tmp_path)
    env = cli_env(tmp_path)
    c = ("-c", str(site.path))

    async def pocd(*args: str, stdin: str = "") -> tuple[int, str, str]:
        done = await asyncio.to_thread(cli_as, env, *args, *c, stdin=stdin)
        return done.returncode, done.stdout, done.stderr

    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        await asyncio.to_thread(cli_login, site.path, env)
        assert (await pocd("run", "start", "--batch", "B", "--protocol", "QUICK"))[0] == 0
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), 37.9))
        await until(lambda: state_of(daemon, "alert-high") is AlarmState.ACTIVE_UNACKED)
        code, out, err = await pocd("alarm", "list")
        assert code == 0, err
        (line,) = [x for x in out.splitlines() if "alert-high" in x]
        assert "active-unacked" in line and "value 37.9" in line
        code, out, err = await pocd(
            "alarm", "acknowledge", "temperature", "alert-high", "--comment", "seen"
        )
        assert (code, "active-acked" in out, "acked by op" in out) == (0, True, True), err
        code, out, err = await pocd(
            "alarm", "remove", "temperature", "alert-high", "--comment", "probe swap",
            stdin=f"{PASSWORD}\n",
        )  # fmt: skip
        assert (code, "out-of-service" in out) == (0, True), err
    with Store(site.store_path, readonly=True) as store:
        (signed,) = store.signatures()
    assert (signed.action, signed.login) == ("alarm.out_of_service", "op")
