"""Properties of the engine over random runs (hypothesis)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pocd.model import NS, Excursion, ExcursionChange, ExcursionEvent, ExcursionKind
from pocd.protocol import Limits
from tests.enginekit import apply, at, engine, protocol

PHASES = {
    "a": Limits(alert_low=4.0, alert_high=6.0, action_low=3.0, action_high=7.0, deadband=0.2),
    "b": Limits(
        alert_low=4.5,
        alert_high=5.5,
        action_high=8.0,
        deadband=0.1,
        on_delay=3.0,
        off_delay=2.0,
        max_rate=30.0,
        stale_after=15.0,
        budget=20.0,
        max_data_loss=25.0,
    ),
    "c": Limits(monitored=False),
    "d": Limits(alert_high=6.5, action_high=7.5, off_delay=4.0, stale_after=10.0, max_rate=60.0),
}

step = st.one_of(
    st.tuples(st.just("v"), st.floats(min_value=0.0, max_value=10.0)),
    st.tuples(st.just("v"), st.floats(min_value=4.6, max_value=5.4)),
    st.tuples(st.sampled_from(["bad", "nan", "stale", "tick", "down", "up", "phase"])),
    # a device's phase value stamped up to 5 s before the engine's latest time
    st.tuples(st.just("late-phase"), st.floats(min_value=0.0, max_value=5.0)),
    # the wall clock steps (NTP, a manual change) and the daemon tells the engine
    st.tuples(st.just("jump"), st.sampled_from([-7200.0, -30.0, 30.0, 7200.0])),
)


def run_random(
    gaps: list[float], actions: list[tuple[Any, ...]], *, jumps: bool = True
) -> tuple[Any, list[Any]]:
    """Apply the actions at the gaps; with `jumps` False the clock jumps are left out (the
    run then sees the same monotonic time without them)."""
    eng = engine(protocol(PHASES))
    events: list[Any] = list(eng.enter_phase("a", at(0), "op"))
    order = list(PHASES)
    t = 0.0
    offset = 0.0  # the wall clock's jumps so far
    for gap, action in zip(gaps, actions, strict=False):
        t += gap
        if action[0] in ("phase", "late-phase"):
            following = order.index(eng.phase or "a") + 1
            if following >= len(order):
                continue
            back = action[1] if action[0] == "late-phase" else 0.0
            events += apply(eng, (t + offset - back, "phase", order[following]))
        elif action[0] == "jump":
            if jumps:
                offset += action[1]
                eng.shift(round(action[1] * NS))
        else:
            events += apply(eng, (t + offset, *action))
    events += apply(eng, (t + offset + 1.0, "end"))
    return eng, events


def excursions(events: list[Any]) -> tuple[dict[str, Excursion], dict[str, Excursion]]:
    opened: dict[str, Excursion] = {}
    closed: dict[str, Excursion] = {}
    for event in events:
        if isinstance(event, ExcursionEvent):
            exc = event.excursion
            if event.change is ExcursionChange.OPENED:
                assert exc.id not in opened, "opened twice"
                opened[exc.id] = exc
            elif event.change is ExcursionChange.CLOSED:
                assert exc.id in opened and exc.id not in closed, "closed without open, or twice"
                closed[exc.id] = exc
    return opened, closed


random_runs = given(
    gaps=st.lists(st.floats(min_value=0.05, max_value=12.0), min_size=1, max_size=80),
    actions=st.lists(step, min_size=1, max_size=80),
)


@settings(max_examples=300, deadline=None)
@random_runs
def test_every_excursion_is_closed_by_the_end_of_the_run(
    gaps: list[float], actions: list[tuple[Any, ...]]
) -> None:
    eng, events = run_random(gaps, actions)
    opened, closed = excursions(events)
    assert opened.keys() == closed.keys()
    assert eng.open_excursions() == []
    for exc in closed.values():
        assert exc.end is not None and exc.end >= exc.start


@settings(max_examples=300, deadline=None)
@random_runs
def test_no_excursion_without_a_breach(gaps: list[float], actions: list[tuple[Any, ...]]) -> None:
    _, events = run_random(gaps, actions)
    _, closed = excursions(events)
    for exc in closed.values():
        limits = PHASES[exc.phase]
        assert limits.monitored, "an excursion in a phase that does not monitor"
        if exc.kind in (ExcursionKind.ALERT_HIGH, ExcursionKind.ACTION_HIGH, ExcursionKind.RATE):
            assert exc.limit is not None and exc.worst is not None and exc.worst > exc.limit
        elif exc.kind in (ExcursionKind.ALERT_LOW, ExcursionKind.ACTION_LOW):
            assert exc.limit is not None and exc.worst is not None and exc.worst < exc.limit
        elif exc.kind is ExcursionKind.STALE:  # the protocol's timeout, or a transport's marker
            assert limits.stale_after is not None or ("stale",) in actions


@settings(max_examples=300, deadline=None)
@random_runs
def test_clock_jumps_change_no_decision_and_no_counted_time(
    gaps: list[float], actions: list[tuple[Any, ...]]
) -> None:
    jumped, jumped_events = run_random(gaps, actions)
    steady, steady_events = run_random(gaps, actions, jumps=False)
    shape = [
        (
            type(e).__name__,
            getattr(getattr(e, "excursion", e), "kind", None),
            getattr(e, "change", None),
        )
        for e in jumped_events
    ]
    assert shape == [
        (
            type(e).__name__,
            getattr(getattr(e, "excursion", e), "kind", None),
            getattr(e, "change", None),
        )
        for e in steady_events
    ]
    for phase in PHASES:
        for kind in ExcursionKind:
            counted = jumped.cumulative("x", phase, [kind])
            assert counted >= 0.0
            assert abs(counted - steady.cumulative("x", phase, [kind])) < 1e-6, (phase, kind)
    _, closed = excursions(jumped_events)
    assert all(exc.end is not None and exc.end >= exc.start for exc in closed.values())


@settings(max_examples=300, deadline=None)
@random_runs
def test_excursion_durations_sum_to_cumulative_time(
    gaps: list[float], actions: list[tuple[Any, ...]]
) -> None:
    # Without jumps: a record's duration is wall-clock time, the count is monotonic time.
    eng, events = run_random(gaps, actions, jumps=False)
    _, closed = excursions(events)
    durations: dict[tuple[str, str, ExcursionKind], float] = defaultdict(float)
    for exc in closed.values():
        assert exc.duration_s is not None
        durations[(exc.parameter, exc.phase, exc.kind)] += exc.duration_s
    for phase in PHASES:
        for kind in ExcursionKind:
            expected = durations.get(("x", phase, kind), 0.0)
            assert abs(eng.cumulative("x", phase, [kind]) - expected) < 1e-6, (phase, kind)
    assert abs(eng.cumulative() - sum(durations.values())) < 1e-6
