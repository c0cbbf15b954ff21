"""The routes of [notify] (pocd.sinks.notify.routing), pure: which alarm events go to which
channels, escalation tiers and what ends them, flood summaries, and that a replay of the same
events answers the same notifications (what makes a restart queue nothing twice)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pocd.model import NS, AlarmEvent, AlarmPriority, AlarmState, AlarmTransition
from pocd.sinks.notify import Notification, Summary
from pocd.sinks.notify.routing import Outgoing, Router
from pocd.sinks.notify.settings import NotifySection

S = AlarmState
T = AlarmTransition
T0 = 1_780_000_200 * NS  # on the 300 s grid of the summary windows


def event(
    transition: T = T.ACTIVATE,
    state: S = S.ACTIVE_UNACKED,
    *,
    t: int = T0,
    alarm_id: str = "a1",
    line: str = "L1",
    source: str = "temperature",
    priority: AlarmPriority = AlarmPriority.HIGH,
    device: str = "incubator",
) -> AlarmEvent:
    return AlarmEvent(
        t=t,
        alarm_id=alarm_id,
        line=line,
        source=source,
        kind="action-high",
        transition=transition,
        state=state,
        priority=priority,
        began=t,
        actor="system",
        comment="",
        device=device,
        value=38.5,
        limit=38.0,
        unit="C",
    )


def router(*routes: dict[str, Any], window: str = "5m") -> Router:
    settings = NotifySection.model_validate({"summary_window": window, "routes": list(routes)})
    return Router("site-a", settings, base_url="https://pocd.example/console")


def sent(out: list[Outgoing]) -> list[tuple[str, int, str]]:
    """(channel, tier, what) of each outgoing item."""
    return [
        (o.channel, o.tier, "summary" if isinstance(o.item, Summary) else o.item.event.alarm_id)
        for o in out
    ]


ROUTE = {"name": "r", "channels": ["hook"]}


@pytest.mark.parametrize(
    ("filters", "ev", "routed"),
    [
        ({}, event(), True),
        ({"priorities": ["high", "critical"]}, event(), True),
        ({"priorities": ["critical"]}, event(), False),
        ({"lines": ["L1"]}, event(), True),
        ({"lines": ["L2"]}, event(), False),
        ({"devices": ["incubator"]}, event(), True),
        ({"devices": ["pump"]}, event(), False),
        ({"sites": ["site-a"]}, event(), True),
        ({"sites": ["site-b"]}, event(), False),
        # transitions: activations and re-alarms by default, others when asked
        ({}, event(T.ACKNOWLEDGE, S.ACTIVE_ACKED), False),
        ({}, event(T.REALARM), True),
        ({"transitions": ["acknowledge"]}, event(T.ACKNOWLEDGE, S.ACTIVE_ACKED), True),
    ],
)
def test_routes_filter_by_priority_site_line_device_and_transition(
    filters: dict[str, Any], ev: AlarmEvent, routed: bool
) -> None:
    out = router({**ROUTE, **filters}).on_event(ev)
    assert sent(out) == ([("hook", 0, "a1")] if routed else [])


def test_a_notification_carries_the_link_and_its_id_is_its_events() -> None:
    (out,) = router(ROUTE).on_event(event())
    assert isinstance(out.item, Notification)
    assert out.item.link == "https://pocd.example/console/alarms/a1"
    assert out.item == Notification.of(
        event(), site="site-a", base_url="https://pocd.example/console"
    )
    assert (out.route, out.t) == ("r", T0)


def test_two_routes_each_send_to_their_channels() -> None:
    r = router(ROUTE, {"name": "crit", "channels": ["mail", "mqtt"], "priorities": ["high"]})
    assert sent(r.on_event(event())) == [("hook", 0, "a1"), ("mail", 0, "a1"), ("mqtt", 0, "a1")]


ESCALATING = {
    **ROUTE,
    "escalate": [{"after": "5m", "channels": ["oncall"]}, {"after": "15m", "channels": ["boss"]}],
}


def test_escalation_tiers_notify_in_turn_while_unacknowledged() -> None:
    r = router(ESCALATING)
    assert sent(r.on_event(event())) == [("hook", 0, "a1")]
    assert r.next_due() == T0 + 300 * NS
    assert r.tick(T0 + 299 * NS) == []
    (tier1,) = r.tick(T0 + 300 * NS)
    assert (tier1.channel, tier1.tier, tier1.t) == ("oncall", 1, T0 + 300 * NS)
    assert isinstance(tier1.item, Notification)
    assert tier1.item.id != Notification.of(event(), site="site-a", base_url="x").id
    assert sent(r.tick(T0 + 3600 * NS)) == [("boss", 2, "a1")]
    assert r.tick(T0 + 7200 * NS) == [] and r.next_due() is None


@pytest.mark.parametrize(
    "ender",
    [
        event(T.ACKNOWLEDGE, S.ACTIVE_ACKED, t=T0 + 60 * NS),
        event(T.RETURN, S.RETURNED_UNACKED, t=T0 + 60 * NS),
        event(T.SHELVE, S.SHELVED, t=T0 + 60 * NS),
        event(T.SUPPRESS, S.SUPPRESSED, t=T0 + 60 * NS),
        event(T.REMOVE, S.OUT_OF_SERVICE, t=T0 + 60 * NS),
    ],
    ids=lambda e: e.transition.value,
)
def test_acknowledge_return_shelve_and_masks_end_the_escalation(ender: AlarmEvent) -> None:
    r = router(ESCALATING)
    r.on_event(event())
    r.on_event(ender)
    assert r.tick(T0 + 3600 * NS) == []
    assert r.pending() == {"escalations": 0, "flood_windows": 0}


def test_a_realarm_escalates_again_from_its_own_time() -> None:
    r = router(ESCALATING)
    r.on_event(event())
    r.on_event(event(T.ACKNOWLEDGE, S.ACTIVE_ACKED, t=T0 + 60 * NS))
    assert sent(r.on_event(event(T.REALARM, t=T0 + 600 * NS))) == [("hook", 0, "a1")]
    assert r.tick(T0 + 899 * NS) == []
    assert sent(r.tick(T0 + 900 * NS)) == [("oncall", 1, "a1")]


def test_a_flood_is_one_summary_per_window_after_the_first_alarms() -> None:
    r = router(ROUTE)
    out: list[Outgoing] = []
    for i in range(14):  # 14 activations in 14 s: a flood from the 11th
        t = T0 + i * NS
        out += r.on_event(event(t=t, alarm_id=f"a{i}", source=f"p{i}"))
    assert sent(out) == [("hook", 0, f"a{i}") for i in range(10)]
    assert r.pending()["flood_windows"] == 1
    assert r.next_due() == T0 + 300 * NS
    (summary,) = r.tick(T0 + 300 * NS)
    assert isinstance(summary.item, Summary)
    assert [a.alarm_id for a in summary.item.alarms] == ["a10", "a11", "a12", "a13"]
    assert (summary.item.start, summary.item.end, summary.t) == (T0, T0 + 300 * NS, T0 + 300 * NS)
    # an MQTT route that keeps each alarm's state does not consolidate
    r = router({**ROUTE, "consolidate": False})
    out = [o for i in range(14) for o in r.on_event(event(t=T0 + i * NS, alarm_id=f"a{i}"))]
    assert len(out) == 14


def test_a_replay_of_the_same_events_answers_the_same_notifications() -> None:
    """What a restart relies on: the outbox keeps one of each, so nothing is queued twice."""
    events = [event(t=T0 + i * NS, alarm_id=f"a{i}", source=f"p{i}") for i in range(12)]
    events.append(
        replace(events[0], transition=T.ACKNOWLEDGE, state=S.ACTIVE_ACKED, t=T0 + 20 * NS)
    )

    def play() -> list[tuple[str, str, int]]:
        r = router(ESCALATING)
        out = [o for e in events for o in r.on_event(e)] + r.tick(T0 + 3600 * NS)
        return [(o.channel, o.item.id, o.t) for o in out]

    first = play()
    assert first == play()
    assert len({(c, i) for c, i, _ in first}) == len(first)  # none twice
    assert ("oncall", 1) not in [
        (o.channel, o.tier) for o in router(ESCALATING).on_event(events[0])
    ]


def test_route_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="must grow"):
        NotifySection.model_validate(
            {
                "routes": [
                    {
                        **ROUTE,
                        "escalate": [
                            {"after": "10m", "channels": ["a"]},
                            {"after": "5m", "channels": ["b"]},
                        ],
                    }
                ]
            }
        )
    with pytest.raises(ValueError, match="one of the route's own channels"):
        NotifySection.model_validate({"routes": [{**ROUTE, "fallback": "hook"}]})
    with pytest.raises(ValueError, match="nothing it sends can escalate"):
        NotifySection.model_validate({"routes": [{**ESCALATING, "transitions": ["acknowledge"]}]})
    with pytest.raises(ValueError, match="unique"):
        NotifySection.model_validate({"routes": [ROUTE, ROUTE]})


def test_an_alarm_stored_after_its_window_was_summarised_goes_in_the_next() -> None:
    r = router(ROUTE)
    for i in range(11):  # a flood from the 11th
        r.on_event(event(t=T0 + i * NS, alarm_id=f"a{i}", source=f"p{i}"))
    (first,) = r.tick(T0 + 300 * NS)
    late = event(t=T0 + 299 * NS, alarm_id="late", source="px")  # its sample came late
    assert r.on_event(late) == []
    (second,) = r.tick(T0 + 600 * NS)
    assert isinstance(first.item, Summary) and isinstance(second.item, Summary)
    assert [a.alarm_id for a in second.item.alarms] == ["late"]
    assert second.item.id != first.item.id


def test_two_routes_consolidating_one_line_have_their_own_summaries() -> None:
    r = router(ROUTE, {"name": "crit", "channels": ["hook"], "priorities": ["high"]})
    for i in range(11):
        r.on_event(event(t=T0 + i * NS, alarm_id=f"a{i}", source=f"p{i}"))
    ward, crit = r.tick(T0 + 300 * NS)
    assert (ward.route, crit.route) == ("r", "crit")
    assert ward.item.id != crit.item.id  # the outbox keeps both
