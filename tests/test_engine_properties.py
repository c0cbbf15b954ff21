"""Properties of the engine over random runs (hypothesis)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pocd.model import Excursion, ExcursionChange, ExcursionEvent, ExcursionKind
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
    st.tuples(st.sampled_from(["bad", "nan", "tick", "down", "up", "phase"])),
)


def run_random(gaps: list[float], actions: list[tuple[Any, ...]]) -> tuple[Any, list[Any]]:
    eng = engine(protocol(PHASES))
    events: list[Any] = list(eng.enter_phase("a", at(0), "op"))
    order = list(PHASES)
    t = 0.0
    for gap, action in zip(gaps, actions, strict=False):
        t += gap
        if action[0] == "phase":
            following = order.index(eng.phase or "a") + 1
            if following >= len(order):
                continue
            events += apply(eng, (t, "phase", order[following]))
        else:
            events += apply(eng, (t, *action))
    events += apply(eng, (t + 1.0, "end"))
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
        elif exc.kind is ExcursionKind.STALE:
            assert limits.stale_after is not None


@settings(max_examples=300, deadline=None)
@random_runs
def test_excursion_durations_sum_to_cumulative_time(
    gaps: list[float], actions: list[tuple[Any, ...]]
) -> None:
    eng, events = run_random(gaps, actions)
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
