"""The alarm layer: tables of inputs (excursions, scopes, commands, ticks; seconds from T0) and
the exact alarm events they must cause; resume, KPIs, and properties over random inputs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pocd.alarms import AlarmError, Alarms, AlarmSettings, default_priority
from pocd.errors import RunError
from pocd.model import (
    AlarmEvent,
    AlarmPriority,
    AlarmState,
    AlarmTransition,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
)
from tests.enginekit import at, secs

KINDS = {"hi": "alert-high", "HI": "action-high", "lo": "alert-low", "stale": "stale"}
DEVICES = {"L": {"x": "dev", "y": "dev", "z": "dev2"}}
HOUR = 3600.0


class Rig:
    """Drives an `Alarms` with plain steps, as the engine and the console would."""

    def __init__(self, table: dict[tuple[str, str], AlarmSettings] | None = None, **kw: Any):
        table = table or {}
        self.alarms = Alarms(
            settings={("L", s, k): v for (s, k), v in table.items()},
            devices=DEVICES,
            max_shelve_s=kw.pop("max_shelve_s", HOUR),
        )
        self.open: dict[tuple[str, str], Excursion] = {}
        self.n = 0
        self.events: list[AlarmEvent] = []

    def excursion(self, change: ExcursionChange, t: int, param: str, kind: str) -> ExcursionEvent:
        if change is ExcursionChange.OPENED:
            self.n += 1
            exc = Excursion(
                id=f"e{self.n}",
                run_id=None,
                parameter=param,
                kind=ExcursionKind(kind),
                protocol_id="P",
                protocol_version="1",
                phase="a",
                limit=None if ExcursionKind(kind).is_data_loss else 10.0,
                start=t,
                worst=11.0,
                line="L",
            )
            self.open[(param, kind)] = exc
        elif change is ExcursionChange.UPDATED:
            exc = self.open[(param, kind)] = Excursion(
                **{**_fields(self.open[(param, kind)]), "worst": 12.0}
            )
        else:
            exc = self.open.pop((param, kind))
        return ExcursionEvent(change, exc, t)

    def step(self, step: tuple[Any, ...]) -> list[AlarmEvent]:
        s, what, *args = step
        t = at(s)
        a = self.alarms
        key = ("L", args[0], KINDS.get(args[1], args[1])) if len(args) > 1 else None
        if what in ("open", "close", "update"):
            change = {"open": "opened", "close": "closed", "update": "updated"}[what]
            got = a.on_excursion(self.excursion(ExcursionChange(change), t, args[0], key[2]))
        elif what in ("comm", "commok"):
            change = ExcursionChange.OPENED if what == "comm" else ExcursionChange.CLOSED
            got = a.on_excursion(self.excursion(change, t, args[0], "comm-loss"))
        elif what == "reopen":  # the engine's phase change: closed and reopened in one batch
            kind = key[2]
            closed = self.excursion(ExcursionChange.CLOSED, t, args[0], kind)
            got = a.on_excursions(
                [closed, self.excursion(ExcursionChange.OPENED, t, *args[:1], kind)]
            )
        elif what == "scope":
            pairs = frozenset((p, KINDS.get(k, k)) for p, k in args[0])
            phase = args[1] if len(args) > 1 else None
            run = "R1" if phase else None
            got = a.set_scope("L", pairs, t, run_id=run, batch_id=run and "B1", phase=phase)
        elif what == "tick":
            got = a.tick(t)
        elif what == "shelve":
            until = None if args[2] is None else at(args[2])
            got = a.shelve(key, t, user="op", comment="maintenance", until=until)
        elif what in ("remove",):
            got = a.remove(key, t, user="op", comment="sensor replaced")
        else:
            command = {"ack": a.acknowledge, "reset": a.reset}.get(what) or getattr(a, what)
            got = command(key, t, user="op", comment="seen")
        self.events += got
        return got


def _fields(exc: Excursion) -> dict[str, Any]:
    return {name: getattr(exc, name) for name in Excursion.__slots__}


def compact(event: AlarmEvent) -> tuple[Any, ...]:
    return (secs(event.t), event.transition.value, event.source, event.state.value)


def play(steps: list[tuple[Any, ...]], table: Any = None, **kw: Any) -> tuple[Rig, list[Any]]:
    rig = Rig(table, **kw)
    return rig, [compact(e) for s in steps for e in rig.step(s)]


LATCH = {("x", "alert-high"): AlarmSettings(latching=True)}
REALARM = {("x", "alert-high"): AlarmSettings(realarm_s=60.0)}
AU, AA, RU, N = "active-unacked", "active-acked", "returned-unacked", "normal"
LA, SH, SUP, OOS = "latched", "shelved", "suppressed", "out-of-service"

# name -> (settings by (source, kind), steps, the events expected)
SCENARIOS: dict[str, tuple[Any, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {
    "activate, acknowledge, return acknowledged": (
        None,
        [(0, "open", "x", "hi"), (1, "ack", "x", "hi"), (2, "close", "x", "hi")],
        [(0, "activate", "x", AU), (1, "acknowledge", "x", AA), (2, "return", "x", N)],
    ),
    "return unacknowledged, then acknowledge": (
        None,
        [(0, "open", "x", "hi"), (1, "close", "x", "hi"), (2, "ack", "x", "hi")],
        [(0, "activate", "x", AU), (1, "return", "x", RU), (2, "acknowledge", "x", N)],
    ),
    "an update refreshes the value only": (
        None,
        [(0, "open", "x", "hi"), (1, "update", "x", "hi")],
        [(0, "activate", "x", AU)],
    ),
    "a returned alarm that comes back is a new activation": (
        None,
        [(0, "open", "x", "hi"), (1, "close", "x", "hi"), (2, "open", "x", "hi")],
        [(0, "activate", "x", AU), (1, "return", "x", RU), (2, "activate", "x", AU)],
    ),
    "latching: held at return until reset": (
        LATCH,
        [
            (0, "open", "x", "hi"),
            (1, "ack", "x", "hi"),
            (2, "close", "x", "hi"),
            (3, "reset", "x", "hi"),
        ],
        [
            (0, "activate", "x", AU),
            (1, "acknowledge", "x", AA),
            (2, "return", "x", LA),
            (3, "reset", "x", N),
        ],
    ),
    "latching: an unacknowledged return latches too": (
        LATCH,
        [(0, "open", "x", "hi"), (1, "close", "x", "hi"), (2, "reset", "x", "hi")],
        [(0, "activate", "x", AU), (1, "return", "x", LA), (2, "reset", "x", N)],
    ),
    "re-alarm: acknowledged but still active after the re-alarm time": (
        REALARM,
        [
            (0, "open", "x", "hi"),
            (10, "ack", "x", "hi"),
            (69, "tick"),
            (70, "tick"),
            (71, "ack", "x", "hi"),
            (130, "tick"),
            (131, "tick"),
            (132, "close", "x", "hi"),
        ],
        [
            (0, "activate", "x", AU),
            (10, "acknowledge", "x", AA),
            (70, "realarm", "x", AU),
            (71, "acknowledge", "x", AA),
            (131, "realarm", "x", AU),
            (132, "return", "x", RU),
        ],
    ),
    "timed shelve expires: an active condition alarms again": (
        None,
        [(0, "open", "x", "hi"), (1, "shelve", "x", "hi", 100), (99, "tick"), (100, "tick")],
        [
            (0, "activate", "x", AU),
            (1, "shelve", "x", SH),
            (100, "unshelve", "x", N),
            (100, "activate", "x", AU),
        ],
    ),
    "timed shelve hides a whole activation": (
        None,
        [
            (0, "scope", [("x", "hi")]),
            (1, "shelve", "x", "hi", 100),
            (10, "open", "x", "hi"),
            (20, "close", "x", "hi"),
            (100, "tick"),
        ],
        [(1, "shelve", "x", SH), (100, "unshelve", "x", N)],
    ),
    "one-shot shelve ends when the condition returns": (
        None,
        [
            (0, "open", "x", "hi"),
            (1, "shelve", "x", "hi", None),
            (5, "close", "x", "hi"),
            (6, "open", "x", "hi"),
        ],
        [
            (0, "activate", "x", AU),
            (1, "shelve", "x", SH),
            (5, "unshelve", "x", N),
            (6, "activate", "x", AU),
        ],
    ),
    "one-shot shelve ends at the maximum too": (
        None,
        [(0, "open", "x", "hi"), (1, "shelve", "x", "hi", None), (3601, "tick")],
        [
            (0, "activate", "x", AU),
            (1, "shelve", "x", SH),
            (3601, "unshelve", "x", N),
            (3601, "activate", "x", AU),
        ],
    ),
    "unshelve by an operator: an active condition alarms": (
        None,
        [(0, "open", "x", "hi"), (1, "shelve", "x", "hi", 100), (2, "unshelve", "x", "hi")],
        [
            (0, "activate", "x", AU),
            (1, "shelve", "x", SH),
            (2, "unshelve", "x", N),
            (2, "activate", "x", AU),
        ],
    ),
    "a command runs the clock first: an expired shelve alarms, then is acknowledged": (
        None,
        [(0, "open", "x", "hi"), (1, "shelve", "x", "hi", 10), (20, "ack", "x", "hi")],
        [
            (0, "activate", "x", AU),
            (1, "shelve", "x", SH),
            (20, "unshelve", "x", N),
            (20, "activate", "x", AU),
            (20, "acknowledge", "x", AA),
        ],
    ),
    "phase change: suppressed out of scope, alarms again back in scope": (
        None,
        [
            (0, "scope", [("x", "hi")], "a"),
            (1, "open", "x", "hi"),
            (5, "scope", [], "b"),
            (9, "scope", [("x", "hi")], "c"),
        ],
        [
            (1, "activate", "x", AU),
            (5, "suppress", "x", SUP),
            (9, "unsuppress", "x", N),
            (9, "activate", "x", AU),
        ],
    ),
    "run start and end: standby scope, run scope, standby again": (
        None,
        [
            (0, "scope", [("x", "hi")]),
            (1, "open", "x", "hi"),
            (2, "scope", [], "a"),
            (3, "close", "x", "hi"),
            (4, "scope", [("x", "hi")]),
        ],
        [(1, "activate", "x", AU), (2, "suppress", "x", SUP), (4, "unsuppress", "x", N)],
    ),
    "a condition first seen out of scope is suppressed at once": (
        None,
        [(0, "scope", [("y", "hi")], "a"), (1, "open", "x", "hi")],
        [(1, "suppress", "x", SUP)],
    ),
    "a phase change that closes and reopens the excursion keeps the alarm": (
        None,
        [(0, "open", "x", "hi"), (5, "reopen", "x", "hi"), (6, "ack", "x", "hi")],
        [(0, "activate", "x", AU), (6, "acknowledge", "x", AA)],
    ),
    "out of service: no activation until restored": (
        None,
        [
            (0, "scope", [("x", "hi")]),
            (0, "shelve", "x", "hi", 10),
            (0, "unshelve", "x", "hi"),
            (1, "remove", "x", "hi"),
            (2, "open", "x", "hi"),
            (3, "close", "x", "hi"),
            (4, "open", "x", "hi"),
            (5, "restore", "x", "hi"),
        ],
        [
            (0, "shelve", "x", SH),
            (0, "unshelve", "x", N),
            (1, "remove", "x", OOS),
            (5, "restore", "x", N),
            (5, "activate", "x", AU),
        ],
    ),
    "out of service while active, restored once normal": (
        None,
        [
            (0, "open", "x", "hi"),
            (1, "remove", "x", "hi"),
            (2, "close", "x", "hi"),
            (3, "restore", "x", "hi"),
        ],
        [(0, "activate", "x", AU), (1, "remove", "x", OOS), (3, "restore", "x", N)],
    ),
    "masks stack: suppressed while shelved, the shelve expiring underneath": (
        None,
        [
            (0, "scope", [("x", "hi")], "a"),
            (1, "open", "x", "hi"),
            (2, "shelve", "x", "hi", 50),
            (3, "scope", [], "b"),
            (50, "tick"),
            (60, "scope", [("x", "hi")], "c"),
        ],
        [
            (1, "activate", "x", AU),
            (2, "shelve", "x", SH),
            (3, "suppress", "x", SUP),
            (50, "unshelve", "x", SUP),
            (60, "unsuppress", "x", N),
            (60, "activate", "x", AU),
        ],
    ),
    "comm-loss: one alarm per device, active while any of its parameters is lost": (
        None,
        [
            (0, "comm", "x"),
            (1, "comm", "y"),
            (2, "comm", "z"),
            (3, "commok", "x"),
            (4, "commok", "y"),
            (5, "commok", "z"),
        ],
        [
            (0, "activate", "dev", AU),
            (2, "activate", "dev2", AU),
            (4, "return", "dev", RU),
            (5, "return", "dev2", RU),
        ],
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(name: str) -> None:
    table, steps, expected = SCENARIOS[name]
    _, got = play(steps, table)
    assert got == expected


# name -> (steps before, the refused command, a part of its message)
REFUSALS: dict[str, tuple[list[tuple[Any, ...]], tuple[Any, ...], str]] = {
    "an unknown condition": ([], (1, "ack", "x", "hi"), "has no alert-high alarm for 'x'"),
    "ack of a normal alarm": (
        [(0, "open", "x", "hi"), (1, "close", "x", "hi"), (2, "ack", "x", "hi")],
        (3, "ack", "x", "hi"),
        "is normal: nothing to acknowledge",
    ),
    "ack of an acknowledged alarm": (
        [(0, "open", "x", "hi"), (1, "ack", "x", "hi")],
        (2, "ack", "x", "hi"),
        "is active-acked",
    ),
    "ack of a latched alarm": (
        [(0, "open", "x", "lo"), (1, "close", "x", "lo")],
        (2, "ack", "x", "lo"),
        "is latched: reset it",
    ),
    "reset of an alarm that is not latched": (
        [(0, "open", "x", "hi")],
        (1, "reset", "x", "hi"),
        "only a latched alarm is reset",
    ),
    "shelve longer than the maximum": (
        [(0, "open", "x", "hi")],
        (1, "shelve", "x", "hi", 3602),
        "at most 3600 s",
    ),
    "shelve into the past": ([(0, "open", "x", "hi")], (5, "shelve", "x", "hi", 5), "for 0 s"),
    "shelve of an out-of-service alarm": (
        [(0, "open", "x", "hi"), (1, "remove", "x", "hi")],
        (2, "shelve", "x", "hi", 10),
        "is out-of-service: it cannot be shelved",
    ),
    "shelve of a shelved alarm": (
        [(0, "open", "x", "hi"), (1, "shelve", "x", "hi", 10)],
        (2, "shelve", "x", "hi", 20),
        "is shelved: it cannot be shelved",
    ),
    "unshelve of an alarm not shelved": (
        [(0, "open", "x", "hi")],
        (1, "unshelve", "x", "hi"),
        "is not shelved",
    ),
    "remove twice": (
        [(0, "open", "x", "hi"), (1, "remove", "x", "hi")],
        (2, "remove", "x", "hi"),
        "out of service already",
    ),
    "restore of an alarm in service": (
        [(0, "open", "x", "hi")],
        (1, "restore", "x", "hi"),
        "is in service",
    ),
    "a refusal undoes the clock it ran: the shelve is still there": (
        [(0, "open", "x", "hi"), (1, "shelve", "x", "hi", 10)],
        (20, "reset", "x", "hi"),
        "only a latched alarm is reset",
    ),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refused_commands_change_nothing(name: str) -> None:
    before, command, message = REFUSALS[name]
    rig, _ = play(before, {("x", "alert-low"): AlarmSettings(latching=True)})
    view, kpis = rig.alarms.view(), rig.alarms.kpis(at(command[0]))
    with pytest.raises(AlarmError, match=message):
        rig.step(command)
    assert rig.alarms.view() == view
    assert rig.alarms.kpis(at(command[0])) == kpis


def test_shelve_needs_a_reason() -> None:
    rig, _ = play([(0, "open", "x", "hi")])
    with pytest.raises(AlarmError, match="without a reason"):
        rig.alarms.shelve(("L", "x", "alert-high"), at(1), user="op", comment=" ", until=at(9))


def test_alarm_error_is_a_run_error_with_its_data() -> None:
    rig, _ = play([(0, "open", "x", "hi")])
    with pytest.raises(AlarmError) as caught:
        rig.step((1, "reset", "x", "hi"))
    assert caught.value.key == ("L", "x", "alert-high")
    assert caught.value.state is AlarmState.ACTIVE_UNACKED
    assert isinstance(caught.value, RunError)


def test_alarm_ids_are_new_per_activation_and_derived_from_the_excursion() -> None:
    rig, _ = play(
        [
            (0, "open", "x", "hi"),
            (1, "shelve", "x", "hi", 5),
            (6, "tick"),
            (7, "close", "x", "hi"),
            (8, "open", "x", "hi"),
        ]
    )
    ids = [e.alarm_id for e in rig.events if e.transition is AlarmTransition.ACTIVATE]
    assert ids == ["e1", "e1.2", "e2"]
    assert [e.alarm_id for e in rig.events] == ["e1", "e1", "e1", "e1.2", "e1.2", "e2"]


def test_an_activation_carries_what_an_operator_needs() -> None:
    rig, _ = play([(0, "scope", [("x", "hi")], "a"), (5, "open", "x", "hi")])
    (event,) = rig.events
    assert (event.run_id, event.batch_id, event.phase) == ("R1", "B1", "a")
    assert (event.device, event.value, event.limit, event.began) == ("dev", 11.0, 10.0, at(5))
    rig.step((6, "update", "x", "hi"))
    (view,) = rig.alarms.view()
    assert (view.value, view.active, view.alarm_id) == (12.0, True, "e1")


# kind -> its default priority
PRIORITIES = {
    "action-high": AlarmPriority.HIGH,
    "action-low": AlarmPriority.HIGH,
    "alert-high": AlarmPriority.MEDIUM,
    "alert-low": AlarmPriority.MEDIUM,
    "rate": AlarmPriority.MEDIUM,
    "stale": AlarmPriority.MEDIUM,
    "bad-quality": AlarmPriority.MEDIUM,
    "comm-loss": AlarmPriority.HIGH,
}


@pytest.mark.parametrize(("kind", "priority"), PRIORITIES.items())
def test_default_priorities(kind: str, priority: AlarmPriority) -> None:
    assert default_priority(kind) is priority
    rig = Rig()
    step = (0, "comm", "x") if kind == "comm-loss" else (0, "open", "x", kind)
    (event,) = rig.step(step)
    assert event.priority is priority


def test_priority_settings_and_the_standby_priority() -> None:
    table = {
        ("x", "alert-high"): AlarmSettings(
            priority=AlarmPriority.CRITICAL, standby_priority=AlarmPriority.LOW
        )
    }
    rig, _ = play([(0, "scope", [("x", "hi")]), (1, "open", "x", "hi"), (2, "close", "x", "hi")])
    assert rig.events[0].priority is AlarmPriority.MEDIUM
    rig, _ = play([(0, "scope", [("x", "hi")]), (1, "open", "x", "hi")], table)
    assert rig.events[0].priority is AlarmPriority.LOW
    rig, _ = play([(0, "scope", [("x", "hi")], "a"), (1, "open", "x", "hi")], table)
    assert rig.events[0].priority is AlarmPriority.CRITICAL


def test_first_out_within_a_group() -> None:
    group = AlarmSettings(group="g")
    table = {("x", "alert-high"): group, ("y", "alert-high"): group, ("z", "alert-high"): group}
    rig, _ = play(
        [
            (0, "open", "y", "hi"),
            (1, "open", "x", "hi"),
            (2, "open", "z", "hi"),
            (3, "close", "y", "hi"),
            (3, "ack", "y", "hi"),
            (4, "close", "x", "hi"),
            (4, "ack", "x", "hi"),
            (5, "ack", "z", "hi"),
            (6, "close", "z", "hi"),
            (7, "open", "x", "hi"),
            (8, "open", "stale", "stale"),
        ],
        table,
    )
    activations = [(e.source, e.first_out) for e in rig.events if e.transition == "activate"]
    assert activations == [("y", True), ("x", False), ("z", False), ("x", True), ("stale", False)]


def test_a_condition_active_at_start_alarms() -> None:
    """A fresh layer, fed the engine's start-up re-judgement, alarms."""
    rig = Rig()
    (event,) = rig.step((0, "open", "x", "HI"))
    assert (event.transition, event.state) == (AlarmTransition.ACTIVATE, AlarmState.ACTIVE_UNACKED)


def test_restart_keeps_acknowledgements_and_raises_what_became_active() -> None:
    before, _ = play([(0, "open", "x", "hi"), (1, "ack", "x", "hi"), (2, "scope", [], "a")])
    before.step((3, "scope", [("x", "hi"), ("y", "hi")], "b"))
    # the daemon restarts: the stored events, no excursion carried over; the engine re-judges
    after = Rig()
    after.alarms.resume(before.events, scopes=before.alarms.scopes())
    assert after.step((10, "open", "y", "hi"))[0].transition is AlarmTransition.ACTIVATE
    before2, _ = play([(0, "open", "x", "hi"), (1, "ack", "x", "hi")])
    after2 = Rig()
    after2.alarms.resume(before2.events)
    assert after2.step((10, "open", "x", "hi")) == []  # the same alarm goes on, acknowledged
    assert after2.alarms.view()[0].state is AlarmState.ACTIVE_ACKED


@pytest.mark.parametrize("name", SCENARIOS)
def test_resume_gives_the_same_view_and_the_same_next_transitions(name: str) -> None:
    table, steps, _ = SCENARIOS[name]
    for split in range(len(steps) + 1):
        live = Rig(table)
        for step in steps[:split]:
            live.step(step)
        again = Rig(table)
        again.alarms.resume(
            live.events,
            open_excursions=live.alarms.open_excursions(),
            scopes=live.alarms.scopes(),
        )
        again.open, again.n = dict(live.open), live.n
        assert again.alarms.view() == live.alarms.view()
        for step in steps[split:]:
            assert again.step(step) == live.step(step)
        t = at(steps[-1][0])
        assert again.alarms.kpis(t) == live.alarms.kpis(t)


def flood_steps(times: list[float]) -> list[tuple[Any, ...]]:
    """One activation (and return) at each time, spread over parameters."""
    steps: list[tuple[Any, ...]] = []
    for i, s in enumerate(times):
        p = f"p{i % 7}"
        steps += [(s, "open", p, "hi"), (s + 0.5, "close", p, "hi")]
    return steps


def test_flood_starts_above_10_in_10_minutes_and_ends_below_5() -> None:
    # 11 activations 30 s apart: the 11th (at 300 s) starts the flood
    rig, _ = play(flood_steps([30.0 * i for i in range(10)]))
    kpi = rig.alarms.kpis
    assert (kpi(at(299))["L"].per_10_min, kpi(at(299))["L"].flood) == (10, False)
    rig.step((300, "open", "q", "hi"))
    assert kpi(at(300))["L"].flood
    assert kpi(at(300))["L"].per_10_min == 11
    # the window drops them one by one: 10..5 left is still a flood, 4 is not
    assert kpi(at(600 + 30 * 5 + 1))["L"].per_10_min == 5
    assert kpi(at(600 + 30 * 5 + 1))["L"].flood
    assert not kpi(at(600 + 30 * 6 + 1))["L"].flood
    # a new activation after the flood ended with 4 left does not restart it
    rig.step((781, "open", "q", "hi"))
    assert not kpi(at(781))["L"].flood


def test_chattering_standing_unacknowledged_shelved_out_of_service() -> None:
    steps = [(0, "open", "p0", "hi"), (1, "close", "p0", "hi"), (20, "open", "p0", "hi")]
    steps += [(21, "close", "p0", "hi"), (40, "open", "p0", "hi")]
    steps += [(41, "open", "y", "hi"), (42, "shelve", "y", "hi", 500), (43, "remove", "z", "hi")]
    rig, _ = play([(0, "open", "z", "hi"), *steps])
    kpis = rig.alarms.kpis(at(59), standing_s=45.0, unacked_s=50.0)["L"]  # 0, 20, 40 in 60 s
    assert kpis.chattering == (("L", "p0", "alert-high"),)
    assert rig.alarms.kpis(at(101))["L"].chattering == ()
    assert (kpis.shelved, kpis.out_of_service, kpis.suppressed) == (1, 1, 0)
    assert kpis.standing == ()
    later = rig.alarms.kpis(at(100), standing_s=45.0, unacked_s=50.0)["L"]
    assert later.standing == (("L", "p0", "alert-high"),)
    assert later.unacknowledged == (("L", "p0", "alert-high"),)
    rig.step((101, "ack", "p0", "hi"))
    after = rig.alarms.kpis(at(120), standing_s=45.0, unacked_s=50.0)["L"]
    assert (after.standing, after.unacknowledged) == ((("L", "p0", "alert-high"),), ())


def test_memory_is_bounded_to_the_kpi_window() -> None:
    rig, _ = play(flood_steps([float(i) for i in range(50)]))
    rig.step((5000, "tick"))
    assert rig.alarms.kpis(at(5000))["L"].per_10_min == 0
    assert not rig.alarms._rates._recent["L"]


# --- properties --------------------------------------------------------------------------------

B = [AlarmState.NORMAL, AlarmState.ACTIVE_UNACKED, AlarmState.ACTIVE_ACKED]
B += [AlarmState.RETURNED_UNACKED, AlarmState.LATCHED]
_S = AlarmState
LEGAL: dict[AlarmTransition, set[tuple[AlarmState, AlarmState]]] = {
    AlarmTransition.ACTIVATE: {(b, _S.ACTIVE_UNACKED) for b in (B[0], B[3], B[4])},
    AlarmTransition.ACKNOWLEDGE: {(B[1], B[2]), (B[3], B[0])},
    AlarmTransition.RETURN: {(B[1], B[3]), (B[1], B[4]), (B[2], B[0]), (B[2], B[4])},
    AlarmTransition.RESET: {(B[4], B[0])},
    AlarmTransition.REALARM: {(B[2], B[1])},
    AlarmTransition.SHELVE: {(b, _S.SHELVED) for b in B},
    AlarmTransition.UNSHELVE: {
        (_S.SHELVED, B[0]),
        (_S.SUPPRESSED, _S.SUPPRESSED),
        (_S.OUT_OF_SERVICE, _S.OUT_OF_SERVICE),
    },
    AlarmTransition.SUPPRESS: {(b, _S.SUPPRESSED) for b in [*B, _S.SHELVED]}
    | {(_S.OUT_OF_SERVICE, _S.OUT_OF_SERVICE)},
    AlarmTransition.UNSUPPRESS: {
        (_S.SUPPRESSED, _S.SHELVED),
        (_S.SUPPRESSED, B[0]),
        (_S.OUT_OF_SERVICE, _S.OUT_OF_SERVICE),
    },
    AlarmTransition.REMOVE: {(b, _S.OUT_OF_SERVICE) for b in [*B, _S.SHELVED, _S.SUPPRESSED]},
    AlarmTransition.RESTORE: {(_S.OUT_OF_SERVICE, s) for s in (B[0], _S.SHELVED, _S.SUPPRESSED)},
}

PAIRS = [(p, k) for p in ("x", "y") for k in ("hi", "HI")]
SCOPES = [PAIRS, PAIRS[1:], PAIRS[:3], PAIRS[:2]]
CONDITIONS = [("x", "hi"), ("y", "HI")]  # in one first-out group; both re-alarm, one latches
ACTIONS: list[tuple[Any, ...]] = [
    *[(what, p, k) for what in ("open", "close") for p, k in CONDITIONS] * 3,
    *[(what, p, k) for what in ("update", "reopen") for p, k in CONDITIONS],
    *[(what, p) for what in ("comm", "commok") for p in ("x", "y")] * 2,
    *[(what, p, k) for what in ("ack", "reset") for p, k in CONDITIONS] * 2,
    *[(what, p, k) for what in ("unshelve", "remove", "restore") for p, k in CONDITIONS],
    *[("shelve", p, k, d) for p, k in CONDITIONS for d in (None, 30.0, 600.0, 5000.0)],
    ("unshelve-comm", "x"),
    *[("scope", pairs, phase) for pairs in SCOPES for phase in (None, "a")],
    ("tick",),
]
ACTION = st.sampled_from(ACTIONS)
TABLE = {
    ("x", "alert-high"): AlarmSettings(group="g", realarm_s=40.0),
    ("y", "action-high"): AlarmSettings(realarm_s=20.0, latching=True, group="g"),
}


def feed(rig: Rig, s: float, action: tuple[Any, ...]) -> None:
    what, *args = action
    if what in ("open", "update", "reopen") and (args[0], KINDS[args[1]]) not in rig.open:
        what = "open"
    elif what == "close" and (args[0], KINDS[args[1]]) not in rig.open:
        return
    if what in ("open",) and (args[0], KINDS[args[1]]) in rig.open:
        return
    if what == "comm" and (args[0], "comm-loss") in rig.open:
        return
    if what == "commok" and (args[0], "comm-loss") not in rig.open:
        return
    if what == "unshelve-comm":
        what, args = "unshelve", [DEVICES["L"][args[0]], "comm-loss"]
    if what == "shelve" and args[2] is not None:
        args[2] = s + args[2]
    if what == "scope":
        args = [[*sorted(args[0]), ("dev", "comm-loss")], *args[1:]]
    view = rig.alarms.view()
    try:
        rig.step((s, what, *args))
    except AlarmError:
        assert rig.alarms.view() == view


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0.0, 1.0, 15.0, 45.0, 700.0]), ACTION), max_size=60),
    st.integers(min_value=0, max_value=60),
)
def test_any_inputs_give_legal_transitions_and_resume_equals_live(
    steps: list[tuple[float, tuple[Any, ...]]], split: int
) -> None:
    live, t = Rig(TABLE), 0.0
    feed(live, 0.0, ("scope", PAIRS, "a"))  # every condition known from the start
    times = []
    for gap, _ in steps:
        t += gap
        times.append(t)
    for s, (_, action) in zip(times[:split], steps[:split], strict=False):
        feed(live, s, action)
    again = Rig(TABLE)
    again.alarms.resume(
        live.events, open_excursions=live.alarms.open_excursions(), scopes=live.alarms.scopes()
    )
    again.open, again.n, again.events = dict(live.open), live.n, list(live.events)
    assert again.alarms.view() == live.alarms.view()
    for s, (_, action) in zip(times[split:], steps[split:], strict=False):
        feed(live, s, action)
        feed(again, s, action)
    assert again.events == live.events
    assert again.alarms.view() == live.alarms.view()
    assert again.alarms.kpis(at(t)) == live.alarms.kpis(at(t))
    state: dict[tuple[str, str, str], AlarmState] = {}
    for event in live.events:
        key = (event.line, event.source, event.kind)
        pair = (state.get(key, AlarmState.NORMAL), event.state)
        assert pair in LEGAL[event.transition], (event.transition, pair)
        state[key] = event.state
    # a condition's state is its latest event's
    for view in live.alarms.view():
        assert state.get((view.line, view.source, view.kind), AlarmState.NORMAL) is view.state


@pytest.mark.parametrize(
    ("reopened", "after"),
    [(True, AlarmState.ACTIVE_ACKED), (False, AlarmState.NORMAL)],
    ids=["still-active", "cleared"],
)
def test_an_excursion_a_restart_ended_holds_its_alarm_until_the_parameter_is_judged(
    reopened: bool, after: AlarmState
) -> None:
    """The daemon restarts: open excursions end at the last data (record keeping), but the
    alarm waits for the engine's next judgement: the same acknowledged alarm if it holds."""
    before, _ = play([(0, "open", "x", "hi"), (1, "ack", "x", "hi")])
    rig = Rig()
    rig.alarms.resume(before.events, open_excursions=before.alarms.open_excursions())
    rig.open = dict(before.open)
    rig.alarms.hold([rig.excursion(ExcursionChange.CLOSED, at(5), "x", "alert-high")])
    assert rig.alarms.holding and rig.alarms.view()[0].state is AlarmState.ACTIVE_ACKED
    got = rig.step((6, "open", "x", "hi")) if reopened else []
    got += rig.alarms.release("L", "x", "dev", at(6))
    assert not rig.alarms.holding
    assert [e.transition for e in got] == ([] if reopened else [AlarmTransition.RETURN])
    assert rig.alarms.view()[0].state is after


def test_a_held_comm_loss_is_released_by_a_reading_of_its_device() -> None:
    before, _ = play([(0, "comm", "x")])
    rig = Rig()
    rig.alarms.resume(before.events, open_excursions=before.alarms.open_excursions())
    rig.open = dict(before.open)
    rig.alarms.hold([rig.excursion(ExcursionChange.CLOSED, at(5), "x", "comm-loss")])
    assert rig.alarms.release("L", "z", "dev2", at(6)) == []  # another device's reading
    (back,) = rig.alarms.release("L", "y", "dev", at(6))  # y is read from the same device
    assert (back.source, back.kind, back.transition) == ("dev", "comm-loss", AlarmTransition.RETURN)
