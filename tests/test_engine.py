"""Engine scenarios: a table of steps and the exact events they must cause."""

from __future__ import annotations

from typing import Any

import pytest

from pocd.errors import RunError
from pocd.model import NS, ExcursionKind
from pocd.protocol import Limits, ProtocolStatus
from tests.enginekit import apply, at, compact, engine, protocol

HIGH = Limits(alert_high=10.0)

# name -> (phase limits, steps after entering the first phase at t=0, expected events)
SCENARIOS: dict[str, tuple[dict[str, Limits], list[tuple[Any, ...]], list[tuple[Any, ...]]]] = {
    "deadband holds an excursion open until limit - deadband": (
        {"a": Limits(alert_high=10.0, deadband=1.0)},
        [(0, "v", 9), (1, "v", 10.5), (2, "v", 9.5), (3, "v", 11), (4, "v", 9.1), (5, "v", 8.9)],
        [
            ("opened", "alert-high", 1.0),
            ("updated", "alert-high", 11.0),
            ("closed", "alert-high", 1.0, 5.0),
        ],
    ),
    "value equal to the limit is inside": (
        {"a": HIGH},
        [(0, "v", 10), (1, "v", 10.0)],
        [],
    ),
    "on-delay: a broken breach opens nothing, a held one opens at its true start": (
        {"a": Limits(alert_high=10.0, on_delay=5.0)},
        [(1, "v", 11), (3, "v", 11), (4, "v", 9), (5, "v", 11), (8, "v", 11), (10, "v", 11)],
        [("opened", "alert-high", 5.0)],
    ),
    "on-delay: a breach pending across a phase change keeps its start and opens in the new phase": (
        {"a": Limits(alert_high=10.0, on_delay=5.0), "b": Limits(alert_high=10.0, on_delay=5.0)},
        [(1, "v", 12), (3, "phase", "b"), (4, "v", 12), (6, "tick")],
        [("phase", "b", True), ("opened", "alert-high", 3.0)],
    ),
    "a transport's stale marker is a stale excursion, closed by the next fresh value": (
        {"a": HIGH},
        [(0, "v", 5), (2, "stale"), (3, "stale"), (5, "v", 5)],
        [("opened", "stale", 2.0), ("closed", "stale", 2.0, 5.0)],
    ),
    "on-delay elapses on a clock tick": (
        {"a": Limits(alert_high=10.0, on_delay=5.0)},
        [(1, "v", 12), (4, "tick"), (6, "tick")],
        [("opened", "alert-high", 1.0)],
    ),
    "off-delay: an interrupted return keeps it open, the end is when it came back": (
        {"a": Limits(alert_high=10.0, off_delay=3.0)},
        [(1, "v", 11), (2, "v", 9), (3, "v", 11), (4, "v", 9), (6, "v", 9), (7, "v", 9)],
        [("opened", "alert-high", 1.0), ("closed", "alert-high", 1.0, 4.0)],
    ),
    "alert and action are separate excursions; action opens a deviation": (
        {"a": Limits(alert_high=10.0, action_high=12.0)},
        [(0, "v", 11), (1, "v", 13), (2, "v", 11), (3, "v", 9)],
        [
            ("opened", "alert-high", 0.0),
            ("opened", "action-high", 1.0),
            ("deviation", "action-limit", "x", 1.0),
            ("updated", "alert-high", 13.0),
            ("closed", "action-high", 1.0, 2.0),
            ("closed", "alert-high", 0.0, 3.0),
        ],
    ),
    "action deviation is raised when the on-delay has elapsed": (
        {"a": Limits(action_low=5.0, on_delay=2.0)},
        [(0, "v", 6), (1, "v", 4), (2, "v", 3), (3, "v", 3.5), (4, "v", 6)],
        [
            ("opened", "action-low", 1.0),
            ("deviation", "action-limit", "x", 3.0),
            ("closed", "action-low", 1.0, 4.0),
        ],
    ),
    "rate of change above max_rate per minute": (
        {"a": Limits(max_rate=1.0)},
        [(0, "v", 10), (60, "v", 10.5), (61, "v", 12), (62, "v", 12)],
        [("opened", "rate", 61.0), ("closed", "rate", 61.0, 62.0)],
    ),
    "stale after silence, closed by the next sample": (
        {"a": Limits(stale_after=10.0)},
        [(0, "v", 5), (5, "tick"), (10, "tick"), (11, "tick"), (12, "v", 5)],
        [("opened", "stale", 10.0), ("closed", "stale", 10.0, 12.0)],
    ),
    "a parameter that never reports goes stale from the phase start": (
        {"a": Limits(stale_after=10.0)},
        [(11, "tick")],
        [("opened", "stale", 10.0)],
    ),
    "NaN is a bad-quality excursion, not a gap": (
        {"a": HIGH},
        [(0, "v", 5), (1, "nan"), (2, "nan"), (3, "v", 5)],
        [("opened", "bad-quality", 1.0), ("closed", "bad-quality", 1.0, 3.0)],
    ),
    "bad quality hides the value: limits are not judged on it": (
        {"a": HIGH},
        [(0, "v", 5), (1, "bad"), (2, "v", 11)],
        [
            ("opened", "bad-quality", 1.0),
            ("closed", "bad-quality", 1.0, 2.0),
            ("opened", "alert-high", 2.0),
        ],
    ),
    "uncertain values are judged against the limits": (
        {"a": HIGH},
        [(0, "uncertain", 11)],
        [("opened", "alert-high", 0.0)],
    ),
    "comm-loss from the transport, closed when the device is back": (
        {"a": Limits(stale_after=5.0)},
        [(0, "v", 5), (1, "down"), (20, "tick"), (21, "up"), (22, "v", 5)],
        [("opened", "comm-loss", 1.0), ("closed", "comm-loss", 1.0, 21.0)],
    ),
    "BAD readings while the device is lost belong to the comm-loss": (
        {"a": HIGH},
        [(0, "v", 5), (1, "down"), (2, "bad"), (3, "bad"), (4, "up"), (5, "bad"), (6, "v", 5)],
        [
            ("opened", "comm-loss", 1.0),
            ("closed", "comm-loss", 1.0, 4.0),
            ("opened", "bad-quality", 5.0),
            ("closed", "bad-quality", 5.0, 6.0),
        ],
    ),
    "a valid reading ends a comm-loss the transport did not close": (
        {"a": HIGH},
        [(0, "v", 5), (1, "down"), (2, "bad"), (3, "v", 5)],
        [("opened", "comm-loss", 1.0), ("closed", "comm-loss", 1.0, 3.0)],
    ),
    "critical data loss beyond max_data_loss opens a deviation": (
        {"a": Limits(max_data_loss=10.0, stale_after=2.0)},
        [(0, "v", 5), (1, "down"), (5, "tick"), (12, "tick"), (20, "tick"), (21, "v", 5)],
        [
            ("opened", "comm-loss", 1.0),
            ("deviation", "data-loss", "x", 12.0),
            ("closed", "comm-loss", 1.0, 21.0),
        ],
    ),
    "an excursion spanning a phase change closes there and reopens under new limits": (
        {"a": HIGH, "b": Limits(alert_high=10.5), "c": Limits(alert_high=20.0)},
        [(1, "v", 11), (5, "phase", "b"), (6, "v", 11.2), (8, "phase", "c"), (9, "v", 11)],
        [
            ("opened", "alert-high", 1.0),
            ("phase", "b", True),
            ("closed", "alert-high", 1.0, 5.0),
            ("opened", "alert-high", 5.0),
            ("updated", "alert-high", 11.2),
            ("phase", "c", True),
            ("closed", "alert-high", 5.0, 8.0),
        ],
    ),
    "a breach carried into a phase does not raise a second action deviation": (
        {"a": Limits(action_high=10.0), "b": Limits(action_high=10.0)},
        [(1, "v", 11), (5, "phase", "b"), (6, "v", 9)],
        [
            ("opened", "action-high", 1.0),
            ("deviation", "action-limit", "x", 1.0),
            ("phase", "b", True),
            ("closed", "action-high", 1.0, 5.0),
            ("opened", "action-high", 5.0),
            ("closed", "action-high", 5.0, 6.0),
        ],
    ),
    "not monitored in this phase: suppressed by design": (
        {"a": Limits(monitored=False), "b": HIGH},
        [(1, "v", 50), (2, "nan"), (3, "v", 50), (4, "phase", "b")],
        [("phase", "b", True), ("opened", "alert-high", 4.0)],
    ),
    "a spent excursion budget opens a deviation once per phase": (
        {"a": Limits(action_high=10.0, budget=5.0)},
        [
            (0, "v", 11),
            (3, "v", 9),
            (4, "v", 11),
            (6, "v", 9),
            (7, "v", 11),
            (9, "tick"),
            (20, "tick"),
        ],
        [
            ("opened", "action-high", 0.0),
            ("deviation", "action-limit", "x", 0.0),
            ("closed", "action-high", 0.0, 3.0),
            ("opened", "action-high", 4.0),
            ("deviation", "action-limit", "x", 4.0),
            ("closed", "action-high", 4.0, 6.0),
            ("opened", "action-high", 7.0),
            ("deviation", "action-limit", "x", 7.0),
            ("deviation", "budget-spent", "x", 9.0),
        ],
    ),
    "an out-of-order phase with a reason is a deviation": (
        {"a": HIGH, "b": HIGH, "c": HIGH},
        [(1, "phase", "c", "step b done on another system")],
        [("phase", "c", False), ("deviation", "phase-order", None, 1.0)],
    ),
    "finishing a run closes every open excursion and drops pending ones": (
        {"a": Limits(alert_high=10.0, alert_low=0.0, on_delay=5.0, stale_after=30.0)},
        [(0, "v", 11), (6, "v", 11), (7, "nan"), (8, "end")],
        [
            ("opened", "alert-high", 0.0),
            ("opened", "bad-quality", 7.0),
            ("closed", "alert-high", 0.0, 8.0),
            ("closed", "bad-quality", 7.0, 8.0),
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    phases, steps, expected = SCENARIOS[name]
    eng = engine(protocol(phases))
    first = eng.enter_phase(next(iter(phases)), at(0), "op")
    assert [compact(e) for e in first][0] == ("phase", next(iter(phases)), True)
    got = [compact(e) for step in steps for e in apply(eng, step)]
    assert got == expected


def test_out_of_order_phase_needs_a_reason() -> None:
    eng = engine(protocol({"a": HIGH, "b": HIGH, "c": HIGH}))
    eng.enter_phase("a", at(0), "op")
    with pytest.raises(RunError, match="out of protocol order"):
        eng.enter_phase("c", at(1), "op")
    with pytest.raises(RunError, match="unknown phase"):
        eng.enter_phase("zz", at(1), "op")
    with pytest.raises(RunError, match="already in phase"):
        eng.enter_phase("a", at(1), "op")


@pytest.mark.parametrize("status", [ProtocolStatus.DRAFT, ProtocolStatus.SUPERSEDED])
def test_run_cannot_start_on_unapproved_protocol(status: ProtocolStatus) -> None:
    with pytest.raises(RunError, match=status.value):
        engine(protocol({"a": HIGH}, status=status))


def test_excursion_carries_limit_identity_worst_and_integral() -> None:
    eng = engine(protocol({"a": Limits(alert_high=10.0)}))
    eng.enter_phase("a", at(0), "op")
    events = [e for step in [(0, "v", 12), (2, "v", 14), (4, "v", 9)] for e in apply(eng, step)]
    closed = events[-1]
    exc = closed.excursion  # type: ignore[union-attr]
    assert (exc.protocol_id, exc.protocol_version, exc.phase, exc.limit) == ("P", "1", "a", 10.0)
    assert exc.worst == 14.0
    assert exc.duration_s == 4.0
    # sample-and-hold: 2 units for 2 s, then 4 units for 2 s
    assert exc.integral == pytest.approx(12.0)


def test_cumulative_time_per_parameter_phase_and_run() -> None:
    eng = engine(protocol({"a": HIGH, "b": HIGH}))
    eng.enter_phase("a", at(0), "op")
    for step in [(0, "v", 11), (3, "v", 9), (4, "phase", "b"), (5, "v", 11), (7, "v", 9)]:
        apply(eng, step)
    assert eng.cumulative("x", "a") == pytest.approx(3.0)
    assert eng.cumulative("x", "b") == pytest.approx(2.0)
    assert eng.cumulative("x") == pytest.approx(5.0)
    assert eng.cumulative(kinds=[ExcursionKind.ACTION_HIGH]) == 0.0


def test_resume_records_the_gap_as_comm_loss() -> None:
    eng = engine(protocol({"a": Limits(alert_high=10.0, max_data_loss=60.0)}))
    events = eng.resume("a", at(0), at(100), last_seen={"x": at(30)})
    assert [compact(e) for e in events] == [
        ("opened", "comm-loss", 30.0),
        ("deviation", "data-loss", "x", 100.0),
    ]
    assert [compact(e) for e in apply(eng, (101, "v", 5))] == [("closed", "comm-loss", 30.0, 101.0)]


def test_view_shows_open_and_pending_excursions() -> None:
    eng = engine(protocol({"a": Limits(alert_high=10.0, action_high=12.0, on_delay=5.0)}))
    eng.enter_phase("a", at(0), "op")
    apply(eng, (0, "v", 13))
    (view,) = eng.view()
    assert view.open == ()
    assert set(view.pending) == {ExcursionKind.ALERT_HIGH, ExcursionKind.ACTION_HIGH}
    apply(eng, (6, "tick"))
    (view,) = eng.view()
    assert set(view.open) == {ExcursionKind.ALERT_HIGH, ExcursionKind.ACTION_HIGH}
    assert view.pending == ()
    assert view.value == 13.0


def test_a_phase_change_stamped_before_a_breach_began_never_closes_it_before_its_start() -> None:
    eng = engine(protocol({"a": HIGH, "b": HIGH}))
    eng.enter_phase("a", at(0), "op")
    apply(eng, (10, "v", 12))
    events = apply(eng, (4, "phase", "b"))  # a device's phase value, stamped earlier
    change, closed, reopened = events
    assert compact(change) == ("phase", "b", True)
    assert compact(closed) == ("closed", "alert-high", 10.0, 10.0)
    assert compact(reopened) == ("opened", "alert-high", 10.0)
    assert eng.cumulative("x", "a") == 0.0
    apply(eng, (12, "v", 5))
    assert eng.cumulative("x", "b") == pytest.approx(2.0)


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_a_wall_clock_jump_is_neither_a_gap_nor_negative_time(jump: float) -> None:
    limits = Limits(alert_high=10.0, stale_after=5.0, max_data_loss=30.0, on_delay=4.0)
    eng = engine(protocol({"a": limits}))
    eng.enter_phase("a", at(0), "op")
    events = []
    for s in range(10):  # a breach from 8 s, its on-delay running
        events += apply(eng, (s, "v", 12 if s >= 8 else 5))
    eng.shift(round(jump * NS))  # what the daemon does when it sees the jump
    for s in range(10, 20):
        events += apply(eng, (s + jump, "v", 12 if s < 15 else 5))
    events += apply(eng, (20 + jump, "end"))
    kinds = [compact(e)[:2] for e in events]
    assert kinds == [("opened", "alert-high"), ("closed", "alert-high")], kinds
    _, closed = events
    # It opened after the jump: its true start, told on the clock of its records (the new one)
    assert compact(closed)[2:] == (8.0 + jump, 15.0 + jump)
    # 8 s to 15 s on the monotonic clock, whatever the wall clock did
    assert eng.cumulative("x", "a", [ExcursionKind.ALERT_HIGH]) == pytest.approx(7.0)


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
def test_an_excursion_open_across_a_clock_jump_counts_monotonic_time(jump: float) -> None:
    eng = engine(protocol({"a": HIGH}))
    eng.enter_phase("a", at(0), "op")
    apply(eng, (2, "v", 12))
    eng.shift(round(jump * NS))
    (closed,) = apply(eng, (15 + jump, "v", 5))
    start, end = compact(closed)[2:]
    assert start == 2.0
    assert end == max(start, 15.0 + jump)  # a record never ends before it began
    assert eng.cumulative("x", "a") == pytest.approx(13.0)


def test_a_comm_loss_stamped_before_the_last_reading_counts_no_negative_time() -> None:
    eng = engine(protocol({"a": HIGH}))
    eng.enter_phase("a", at(0), "op")
    apply(eng, (10, "v", 5))
    apply(eng, (9, "down"))  # a transport's word, stamped before the reading already judged
    apply(eng, (9.5, "up"))
    assert eng.cumulative("x", "a", [ExcursionKind.COMM_LOSS]) >= 0.0
