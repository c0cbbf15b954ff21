"""Alarm properties from the protocol (`[parameters.<name>.alarm]`) and the site's `[alarms]`
section: how they parse, one malformed table per way to be wrong, and what they make the
alarms do in the real daemon (latching, re-alarm, first-out, priorities, notes, KPIs, units)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pocd.errors import ConfigError
from pocd.model import (
    AlarmEvent,
    AlarmPriority,
    AlarmState,
    AlarmTransition,
    CommStatus,
    Quality,
    Sample,
    now_ns,
)
from pocd.protocol import AlarmProperties
from pocd.settings import AlarmsSection, Site, load_protocol, load_site
from pocd.store import Store
from tests.sitekit import api, running, until, write_site

NS = 1_000_000_000
P = AlarmPriority
S = AlarmState

# --- protocol files -------------------------------------------------------------------------

# Alert and action limits, no delays; `{temperature}` and `{co2}` are each parameter's alarm
# table (its keys, or nothing), `{rate}` temperature's rate limit (or nothing).
PROTOCOL = """\
id = "PROPS"
version = "1"
title = "Alarm properties"
status = "approved"

[parameters.temperature]
unit = "C"
critical = true
limits = {{ alert_high = 37.5, action_high = 38.0{rate} }}
alarm = {{ {temperature} }}

[parameters.co2]
unit = "%"
limits = {{ alert_high = 5.5 }}
alarm = {{ {co2} }}

[[phases]]
id = "culture"
"""


def protocol(temperature: str = "", co2: str = "", *, rate: bool = False) -> str:
    """PROTOCOL with these alarm tables; `rate`: temperature's rate limit is 20 C/min (a test
    without it is not troubled by the jump from the device's last reading to its own)."""
    return PROTOCOL.format(
        temperature=temperature, co2=co2, rate=", max_rate = 20.0" if rate else ""
    )


PARSED: dict[str, tuple[str, AlarmProperties]] = {
    "no-keys": ("", AlarmProperties()),
    "every-key": (
        'priority = "high", priorities = { alert-high = "low", rate = "medium" }, '
        'standby_priority = "low", latching = true, realarm = "5m", group = "chamber"',
        AlarmProperties(
            priority=P.HIGH,
            priorities={"alert-high": P.LOW, "rate": P.MEDIUM},
            standby_priority=P.LOW,
            latching=True,
            realarm=300.0,
            group="chamber",
        ),
    ),
    "realarm-in-seconds": ("realarm = 90", AlarmProperties(realarm=90.0)),
}


@pytest.mark.parametrize(("table", "expected"), PARSED.values(), ids=PARSED.keys())
def test_the_alarm_table_of_a_parameter_is_read(
    table: str, expected: AlarmProperties, tmp_path: Path
) -> None:
    path = tmp_path / "props.toml"
    path.write_text(protocol(temperature=table))
    proto = load_protocol(path)
    assert proto.parameters["temperature"].alarm == expected
    assert proto.parameters["co2"].alarm == AlarmProperties()


T = "parameters.temperature.alarm"
PRIORITY_RULE = "must be one of 'low', 'medium', 'high', 'critical'"
# temperature's alarm table, and the problem's key (below T) and part of its message
MALFORMED: dict[str, tuple[str, str, str]] = {
    "bad-priority": ('priority = "urgent"', "priority", f"{PRIORITY_RULE} (got 'urgent')"),
    "bad-kind-priority": (
        'priorities = { action-high = "top" }',
        "priorities.action-high",
        f"{PRIORITY_RULE} (got 'top')",
    ),
    "unknown-kind": (
        'priorities = { action_high = "low" }',
        "priorities",
        "unknown alarm kind 'action_high' (did you mean 'action-high'? kinds: alert-low, ",
    ),
    "comm-loss-is-the-devices": (
        'priorities = { comm-loss = "low" }',
        "priorities",
        "comm-loss is an alarm of the device, not of a parameter: set its priority in the "
        "site config's [alarms] comm_loss_priority",
    ),
    "bad-standby-priority": (
        'standby_priority = "off"',
        "standby_priority",
        f"{PRIORITY_RULE} (got 'off')",
    ),
    "latching-not-a-bool": ('latching = "yes"', "latching", "must be true or false"),
    "realarm-zero": ("realarm = 0", "realarm", "must be greater than 0"),
    "realarm-not-a-duration": ('realarm = "soon"', "realarm", "'soon' is not a duration"),
    "group-not-an-id": ('group = "the chamber"', "group", "must start with a letter or digit"),
    "unknown-key": ("latched = true", "latched", "unknown key (did you mean 'latching'?)"),
}


@pytest.mark.parametrize(("table", "key", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_alarm_table_names_the_file_the_parameter_and_the_key(
    table: str, key: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "props.toml"
    path.write_text(protocol(temperature=table))
    with pytest.raises(ConfigError) as exc:
        load_protocol(path)
    ((file, where, text),) = [(p.file, p.key, p.message) for p in exc.value.problems]
    assert (file, where) == (str(path), f"{T}.{key}")
    assert message in text


# --- the site's [alarms] section --------------------------------------------------------------

# One device with both parameters; it reads once at the start (hourly after), so the test's
# own samples are what the engine judges.
CHAMBER = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 3600 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }
points.co2 = { parameter = "co2", unit = "%", base = 5.0 }
"""


def props_site(
    tmp_path: Path, *, temperature: str = "", co2: str = "", rate: bool = False, alarms: str = ""
) -> Site:
    """A site of one line on CHAMBER with the PROPS protocol; `alarms` is its [alarms] body."""
    extra = f"\n[alarms]\n{alarms}\n" if alarms else ""
    config = write_site(tmp_path, CHAMBER, extra=extra)
    (tmp_path / "protocols" / "props.toml").write_text(protocol(temperature, co2, rate=rate))
    return load_site(config)


def test_the_alarms_section_has_defaults() -> None:
    assert AlarmsSection() == AlarmsSection(
        max_shelve=8 * 3600.0,
        note_required=[P.CRITICAL],
        unacknowledged_after=600.0,
        standing_after=1800.0,
        comm_loss_priority=P.HIGH,
    )


def test_the_alarms_section_is_read(tmp_path: Path) -> None:
    site = props_site(
        tmp_path,
        alarms='max_shelve = "2h"\nnote_required = ["high", "critical"]\n'
        'unacknowledged_after = "5m"\nstanding_after = 900\ncomm_loss_priority = "critical"',
    )
    assert site.config.alarms == AlarmsSection(
        max_shelve=7200.0,
        note_required=[P.HIGH, P.CRITICAL],
        unacknowledged_after=300.0,
        standing_after=900.0,
        comm_loss_priority=P.CRITICAL,
    )


BAD_SECTIONS: dict[str, tuple[str, str, str]] = {
    "max-shelve-zero": ("max_shelve = 0", "alarms.max_shelve", "must be greater than 0"),
    "max-shelve-text": ('max_shelve = "a shift"', "alarms.max_shelve", "is not a duration"),
    "note-for-a-bad-priority": (
        'note_required = ["critical", "urgent"]',
        "alarms.note_required[1]",
        "must be one of 'low', 'medium', 'high', 'critical' (got 'urgent')",
    ),
    "note-not-a-list": ('note_required = "critical"', "alarms.note_required", "must be an array"),
    "unacknowledged-zero": ("unacknowledged_after = 0", "alarms.unacknowledged_after", "than 0"),
    "standing-negative": ("standing_after = -5", "alarms.standing_after", "cannot be negative"),
    "comm-loss-priority": (
        'comm_loss_priority = "loud"',
        "alarms.comm_loss_priority",
        "must be one of 'low', 'medium', 'high', 'critical' (got 'loud')",
    ),
    "unknown-key": ('max_shelf = "1h"', "alarms.max_shelf", "did you mean 'max_shelve'?"),
}


@pytest.mark.parametrize(("body", "key", "message"), BAD_SECTIONS.values(), ids=BAD_SECTIONS.keys())
def test_a_malformed_alarms_section_names_the_file_and_the_key(
    body: str, key: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as exc:
        props_site(tmp_path, alarms=body)
    ((file, where, text),) = [(p.file, p.key, p.message) for p in exc.value.problems]
    assert (file, where) == (str(tmp_path / "pocd.toml"), key)
    assert message in text


# --- in the daemon ------------------------------------------------------------------------------


def condition(daemon: Any, source: str, kind: str) -> Any:
    """The alarm view of one condition of the site's only line, None before it exists."""
    views = daemon.lines.alarms.view()
    found = [v for v in views if (v.source, v.kind) == (source, kind)]
    return found[0] if found else None


def state(daemon: Any, source: str, kind: str) -> AlarmState | None:
    view = condition(daemon, source, kind)
    return None if view is None else view.state


async def read(daemon: Any, point: str, value: float) -> None:
    await daemon.inbox.put(Sample("incubator", point, now_ns(), value))


async def start_run(daemon: Any, site: Site) -> None:
    await until(lambda: ("incubator", "co2") in daemon.latest)
    status, body = await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "PROPS"})
    assert status == 201, body


def events(site: Site, source: str, kind: str) -> list[AlarmEvent]:
    with Store(site.store_path, readonly=True) as store:
        return [e for e in store.alarm_events() if (e.source, e.kind) == (source, kind)]


def key(source: str, kind: str) -> dict[str, str]:
    return {"source": source, "kind": kind}


async def test_a_latching_alarm_from_the_protocol_waits_for_a_reset(tmp_path: Path) -> None:
    site = props_site(tmp_path, temperature="latching = true")
    async with running(site) as daemon:
        await start_run(daemon, site)
        await read(daemon, "temperature", 37.9)
        await until(lambda: state(daemon, "temperature", "alert-high") is S.ACTIVE_UNACKED)
        await read(daemon, "temperature", 37.0)
        await until(lambda: state(daemon, "temperature", "alert-high") is S.LATCHED)
        # co2 has no table: it does not latch
        await read(daemon, "co2", 5.8)
        await until(lambda: state(daemon, "co2", "alert-high") is S.ACTIVE_UNACKED)
        await read(daemon, "co2", 5.0)
        await until(lambda: state(daemon, "co2", "alert-high") is S.RETURNED_UNACKED)
        body = {**key("temperature", "alert-high"), "comment": "chamber door was open"}
        status, reset = await api(site, "POST", "/api/alarms/reset", body)
        assert (status, reset["state"]) == (200, "normal")


async def test_an_acknowledged_alarm_realarms_after_the_protocols_realarm_time(
    tmp_path: Path,
) -> None:
    site = props_site(tmp_path, temperature='realarm = "1s"')
    async with running(site) as daemon:
        await start_run(daemon, site)
        await read(daemon, "temperature", 37.9)
        await until(lambda: state(daemon, "temperature", "alert-high") is S.ACTIVE_UNACKED)
        body = {**key("temperature", "alert-high"), "comment": "seen"}
        status, acked = await api(site, "POST", "/api/alarms/acknowledge", body)
        assert (status, acked["state"]) == (200, "active-acked")
        # the daemon's clock ticks the alarms (Alarms.tick) once a second
        await until(lambda: state(daemon, "temperature", "alert-high") is S.ACTIVE_UNACKED)
    found = events(site, "temperature", "alert-high")
    assert [e.transition for e in found] == [
        AlarmTransition.ACTIVATE,
        AlarmTransition.ACKNOWLEDGE,
        AlarmTransition.REALARM,
    ]
    assert found[2].t - found[1].t >= NS
    assert found[2].comment == "still active after 1 s"


async def test_the_first_alarm_of_a_first_out_group_is_marked(tmp_path: Path) -> None:
    site = props_site(tmp_path, temperature='group = "chamber"', co2='group = "chamber"')
    async with running(site) as daemon:
        await start_run(daemon, site)
        await read(daemon, "co2", 5.8)
        await until(lambda: state(daemon, "co2", "alert-high") is S.ACTIVE_UNACKED)
        await read(daemon, "temperature", 37.9)
        await until(lambda: state(daemon, "temperature", "alert-high") is S.ACTIVE_UNACKED)
        status, listed = await api(site, "GET", "/api/alarms")
    assert status == 200
    first = {(a["source"], a["kind"]): a["first_out"] for a in listed["alarms"] if a["active"]}
    assert first == {("co2", "alert-high"): True, ("temperature", "alert-high"): False}


# temperature is critical: its action limit's alarm is critical unless the protocol says not
PRIORITIES: dict[str, tuple[str, dict[str, AlarmPriority]]] = {
    "defaults": ("", {"alert-high": P.MEDIUM, "action-high": P.CRITICAL, "rate": P.MEDIUM}),
    "one-kind": (
        'priorities = { alert-high = "low" }',
        {"alert-high": P.LOW, "action-high": P.CRITICAL, "rate": P.MEDIUM},
    ),
    "every-kind": (
        'priority = "high"',
        {"alert-high": P.HIGH, "action-high": P.HIGH, "rate": P.HIGH},
    ),
    "every-kind-and-one-over-it": (
        'priority = "low", priorities = { action-high = "critical", rate = "high" }',
        {"alert-high": P.LOW, "action-high": P.CRITICAL, "rate": P.HIGH},
    ),
}


@pytest.mark.parametrize(("table", "expected"), PRIORITIES.values(), ids=PRIORITIES.keys())
async def test_each_kind_takes_the_protocols_priority(
    table: str, expected: dict[str, AlarmPriority], tmp_path: Path
) -> None:
    site = props_site(tmp_path, temperature=table, rate=True)
    async with running(site) as daemon:
        await start_run(daemon, site)
        await read(daemon, "temperature", 38.5)  # above the action limit, far faster than 20/min
        await until(
            lambda: all(state(daemon, "temperature", k) is S.ACTIVE_UNACKED for k in expected)
        )
        got = {kind: condition(daemon, "temperature", kind).priority for kind in expected}
    assert got == expected


async def test_between_runs_the_batch_protocols_standby_priority_applies(tmp_path: Path) -> None:
    """The equipment watch has no alarm properties: a line that names no standby protocol
    takes them from the approved batch protocol that gives the parameter some (PROPS, not the
    example CART-TCT beside it), at its standby priority between runs."""
    site = props_site(tmp_path, temperature='priority = "high", standby_priority = "low"')
    async with running(site) as daemon:
        await until(lambda: ("incubator", "co2") in daemon.latest)
        bad = Sample("incubator", "temperature", now_ns(), 37.0, Quality.BAD, reason="probe")
        await daemon.inbox.put(bad)
        await until(lambda: state(daemon, "temperature", "bad-quality") is S.ACTIVE_UNACKED)
        assert condition(daemon, "temperature", "bad-quality").priority is P.LOW
        await read(daemon, "temperature", 37.0)
        await until(lambda: state(daemon, "temperature", "bad-quality") is S.RETURNED_UNACKED)
        await start_run(daemon, site)
        await daemon.inbox.put(bad._replace(t=now_ns()))
        await until(lambda: state(daemon, "temperature", "bad-quality") is S.ACTIVE_UNACKED)
        assert condition(daemon, "temperature", "bad-quality").priority is P.HIGH


async def test_the_sites_alarms_section_rules_notes_shelves_kpis_and_comm_loss(
    tmp_path: Path,
) -> None:
    site = props_site(
        tmp_path,
        alarms='note_required = ["medium"]\nmax_shelve = "10m"\nunacknowledged_after = "1s"\n'
        'standing_after = "1s"\ncomm_loss_priority = "critical"',
    )
    alert = key("temperature", "alert-high")
    async with running(site) as daemon:
        await start_run(daemon, site)
        await read(daemon, "temperature", 37.9)
        await until(lambda: state(daemon, "temperature", "alert-high") is S.ACTIVE_UNACKED)

        async def kpi(name: str) -> list[str]:
            status, listed = await api(site, "GET", "/api/alarms")
            assert status == 200
            found: list[str] = listed["kpis"]["main"][name]
            return found

        await until_async(lambda: kpi("unacknowledged"), ["main/temperature/alert-high"])
        await until_async(lambda: kpi("standing"), ["main/temperature/alert-high"])
        # a medium alarm's acknowledgement needs a note at this site
        status, refused = await api(site, "POST", "/api/alarms/acknowledge", alert)
        assert (status, refused["error"]) == (409, "acknowledging a medium alarm needs a note")
        acked = {**alert, "comment": "door opened for a sample"}
        assert (await api(site, "POST", "/api/alarms/acknowledge", acked))[0] == 200
        # a shelve lasts at most 10 min here
        shelve = {**alert, "comment": "probe being changed", "minutes": 30}
        status, refused = await api(site, "POST", "/api/alarms/shelve", shelve)
        assert status == 409
        assert "at most 600 s" in refused["error"]
        status, shelved = await api(site, "POST", "/api/alarms/shelve", {**shelve, "minutes": 5})
        assert (status, shelved["state"]) == (200, "shelved")
        # the device stops answering: its comm-loss alarm takes the site's priority
        await daemon.inbox.put(CommStatus("incubator", now_ns(), ok=False, reason="unplugged"))
        await until(lambda: state(daemon, "incubator", "comm-loss") is S.ACTIVE_UNACKED)
        view = condition(daemon, "incubator", "comm-loss")
        assert (view.priority, view.unit) == (P.CRITICAL, "")


async def until_async(
    answer: Callable[[], Awaitable[object]], expected: object, within: float = 10.0
) -> None:
    """Ask `answer` again until it gives `expected`."""
    deadline = time.monotonic() + within
    while (got := await answer()) != expected:
        assert time.monotonic() < deadline, f"got {got!r}, not {expected!r}"
        await asyncio.sleep(0.1)


async def test_alarm_events_carry_the_parameters_unit_and_a_rate_its_unit_per_minute(
    tmp_path: Path,
) -> None:
    site = props_site(tmp_path, rate=True)
    async with running(site) as daemon:
        await start_run(daemon, site)
        await read(daemon, "temperature", 37.9)  # above the alert limit, far faster than 20/min
        await until(lambda: state(daemon, "temperature", "rate") is S.ACTIVE_UNACKED)
        await until(lambda: state(daemon, "temperature", "alert-high") is S.ACTIVE_UNACKED)
        status, listed = await api(site, "GET", "/api/alarms")
        before = daemon.lines.alarms.view()
    assert status == 200
    shown = {(a["source"], a["kind"]): a["unit"] for a in listed["alarms"] if a["active"]}
    assert shown == {("temperature", "rate"): "C/min", ("temperature", "alert-high"): "C"}
    (rate,) = events(site, "temperature", "rate")
    (alert,) = events(site, "temperature", "alert-high")
    assert (rate.unit, rate.limit) == ("C/min", 20.0)
    assert rate.value is not None and rate.value > 20.0
    assert (alert.unit, alert.value, alert.limit) == ("C", 37.9, 37.5)
    # a restart rebuilds the same conditions from the stored events, units and all
    async with running(site) as daemon:
        after = {(v.source, v.kind): v.unit for v in daemon.lines.alarms.view()}
    assert after == {(v.source, v.kind): v.unit for v in before}
