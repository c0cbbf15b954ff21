"""The routes of `[notify]`: which alarm events become which notifications on which channels,
when an unacknowledged alarm escalates to the next tier, and, during a flood on a line, one
summary per window instead of one notification per alarm.

Pure like the alarm layer: no I/O and no clock of its own; it is fed the alarm events in the
order they were stored and the time (`tick`). What it answers (`Outgoing`) is a function of
those alone, ids included (see pocd.sinks.notify.message): replaying the stored events after
a restart answers the same notifications again, and the outbox, which keeps each once per
channel, takes only those it did not have. That is how pending escalations and an open flood
window come back after a restart, and why nothing is queued twice.

Must not: send, store or read anything; decide how a channel delivers (the channels do) or
fall back (the notifier does that, from what the channels did not deliver).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pocd.alarms.kpis import AlarmKey, Rates
from pocd.model import NS, AlarmEvent, AlarmState, AlarmTransition
from pocd.sinks.notify.message import Item, Notification, Summary, SummaryAlarm
from pocd.sinks.notify.settings import NotifySection, RouteSettings

__all__ = ["Outgoing", "Router"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One item for one channel, as a route made it at `t` (ns)."""

    channel: str
    item: Item
    route: str
    tier: int
    t: int


@dataclass(slots=True)
class _Escalation:
    """The tiers still to notify about one activation (or re-alarm) left unacknowledged."""

    event: AlarmEvent
    due: list[tuple[int, RouteSettings, int]]  # (when, route, tier number from 1)


@dataclass(slots=True)
class _Window:
    """The alarms one route consolidates for one line in one window of a flood."""

    route: RouteSettings
    line: str
    start: int
    alarms: dict[str, SummaryAlarm] = field(default_factory=dict)  # by alarm id, latest


class Router:
    """The routes of one site (see the module docstring)."""

    def __init__(self, site: str, settings: NotifySection, *, base_url: str) -> None:
        self.site = site
        self.routes: Sequence[RouteSettings] = settings.routes
        self.window = round(settings.summary_window * NS)
        self.base_url = base_url
        self._rates = Rates()  # the activations, for the flood state of each line
        self._escalations: dict[AlarmKey, _Escalation] = {}
        self._windows: dict[tuple[str, str, int], _Window] = {}
        self._now = 0  # the latest time ticked: windows that ended by it are closed

    def on_event(self, event: AlarmEvent) -> list[Outgoing]:
        """The notifications of one stored alarm event, after what fell due before it."""
        out = self.tick(event.t)
        key = (event.line, event.source, event.kind)
        if event.transition is AlarmTransition.ACTIVATE:
            self._rates.add(key, event.t)
        routes = [r for r in self.routes if self._matches(r, event)]
        if event.state is AlarmState.ACTIVE_UNACKED and event.transition in (
            AlarmTransition.ACTIVATE,
            AlarmTransition.REALARM,
        ):
            due = [
                (event.t + round(tier.after * NS), route, n)
                for route in routes
                if event.transition in route.transitions
                for n, tier in enumerate(route.escalate, start=1)
            ]
            self._escalations[key] = _Escalation(event, sorted(due, key=lambda d: (d[0], d[2])))
        elif event.state is not AlarmState.ACTIVE_UNACKED:
            # acknowledged, returned to normal, shelved, suppressed, out of service: no one
            # else needs telling
            self._escalations.pop(key, None)
        flood = self._rates.flood(event.line, event.t)
        for route in routes:
            if flood and route.consolidate and event.transition in route.transitions:
                self._consolidate(route, event)
            elif event.transition in route.transitions:
                item = Notification.of(event, site=self.site, base_url=self.base_url)
                out += [Outgoing(c, item, route.name, 0, event.t) for c in route.channels]
        return out

    def tick(self, t: int) -> list[Outgoing]:
        """The escalations and flood summaries due by `t`."""
        self._now = max(self._now, t)
        out: list[Outgoing] = []
        for key, esc in list(self._escalations.items()):
            while esc.due and esc.due[0][0] <= t:
                when, route, tier = esc.due.pop(0)
                item = Notification.of(esc.event, site=self.site, base_url=self.base_url, tier=tier)
                channels = route.escalate[tier - 1].channels
                out += [Outgoing(c, item, route.name, tier, when) for c in channels]
            if not esc.due:
                del self._escalations[key]
        for wkey, win in list(self._windows.items()):
            end = win.start + self.window
            if end <= t:
                del self._windows[wkey]
                summary = Summary.of(
                    route=win.route.name,
                    site=self.site,
                    line=win.line,
                    start=win.start,
                    end=end,
                    alarms=tuple(win.alarms.values()),
                    base_url=self.base_url,
                )
                out += [Outgoing(c, summary, win.route.name, 0, end) for c in win.route.channels]
        self._rates.prune(t)
        return out

    def next_due(self) -> int | None:
        """When the next escalation or summary falls due (ns), None if none is pending."""
        times = [esc.due[0][0] for esc in self._escalations.values() if esc.due]
        times += [win.start + self.window for win in self._windows.values()]
        return min(times, default=None)

    def pending(self) -> dict[str, int]:
        """What waits on the clock, for status."""
        return {
            "escalations": sum(len(e.due) for e in self._escalations.values()),
            "flood_windows": len(self._windows),
        }

    def _consolidate(self, route: RouteSettings, event: AlarmEvent) -> None:
        # Windows on a fixed grid, so that replays agree. An alarm stored after its window was
        # summarised (its sample came late) goes in the window open now.
        t = event.t if event.t - event.t % self.window + self.window > self._now else self._now
        start = t - t % self.window
        win = self._windows.setdefault(
            (route.name, event.line, start), _Window(route, event.line, start)
        )
        win.alarms[event.alarm_id] = SummaryAlarm.of(event)

    def _matches(self, route: RouteSettings, event: AlarmEvent) -> bool:
        return (
            (not route.priorities or event.priority in route.priorities)
            and (not route.sites or self.site in route.sites)
            and (not route.lines or event.line in route.lines)
            and (not route.devices or event.device in route.devices)
        )
