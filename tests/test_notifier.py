"""The notifier (pocd.sinks.notify.sink.Notifier) on a real store, stepped by hand: what it
queues, its cursors, and what a restart queues again (nothing of the past, even under a
changed config; what fell due while it was down)."""

from __future__ import annotations

from pathlib import Path

from pocd.model import NS, AlarmEvent, AlarmPriority, AlarmState, AlarmTransition
from pocd.settings import Site, load_site
from pocd.sinks.notify.sink import Notifier
from pocd.store import Store
from tests.sitekit import write_site

T0 = 1_780_000_200 * NS
CHANNELS = """
[[sinks.webhook]]
name = "hook"
url = "http://127.0.0.1:9/hook"
secret = { env = "UNUSED" }

[[sinks.webhook]]
name = "pager"
url = "http://127.0.0.1:9/pager"
secret = { env = "UNUSED" }
"""
ROUTE = """
[[notify.routes]]
name = "ward"
channels = [{channels}]
escalate = [{{ after = "10m", channels = ["pager"] }}]
"""


def site_with(folder: Path, channels: str = '"hook"') -> Site:
    return load_site(write_site(folder, extra=CHANNELS + ROUTE.format(channels=channels)))


def alarm(
    transition: AlarmTransition = AlarmTransition.ACTIVATE,
    state: AlarmState = AlarmState.ACTIVE_UNACKED,
    t: int = T0,
) -> AlarmEvent:
    return AlarmEvent(
        t=t,
        alarm_id="a1",
        line="main",
        source="temperature",
        kind="action-high",
        transition=transition,
        state=state,
        priority=AlarmPriority.HIGH,
        began=T0,
        actor="system",
        comment="",
        device="incubator",
    )


def queued(store: Store) -> list[tuple[str, int]]:
    return [(q.channel, q.tier) for _, q in store.notifications()]


def test_each_step_queues_once_and_a_restart_queues_nothing_again(tmp_path: Path) -> None:
    site = site_with(tmp_path)
    with Store(site.store_path) as store:
        store.write([alarm()])
        notifier = Notifier(site)
        notifier.resume(store)
        assert notifier.step(store, T0 + NS) == 1
        assert notifier.step(store, T0 + 2 * NS) == 0
        assert store.cursors("notify") == {"alarm_events": 1, "tick": T0 + 2 * NS}
        again = Notifier(site)
        again.resume(store)
        assert again.step(store, T0 + 3 * NS) == 0
        assert queued(store) == [("hook", 0)]


def test_an_escalation_due_while_the_notifier_was_down_is_queued_at_its_start(
    tmp_path: Path,
) -> None:
    site = site_with(tmp_path)
    with Store(site.store_path) as store:
        store.write([alarm()])
        first = Notifier(site)
        first.resume(store)
        first.step(store, T0 + NS)
        # down for an hour: the tier-1 escalation fell due at T0 + 10 min
        later = Notifier(site)
        later.resume(store)
        assert later.step(store, T0 + 3600 * NS) == 1
        assert queued(store) == [("hook", 0), ("pager", 1)]


def test_an_acknowledgement_while_it_was_down_ends_the_escalation(tmp_path: Path) -> None:
    site = site_with(tmp_path)
    with Store(site.store_path) as store:
        store.write([alarm()])
        first = Notifier(site)
        first.resume(store)
        first.step(store, T0 + NS)
        store.write([alarm(AlarmTransition.ACKNOWLEDGE, AlarmState.ACTIVE_ACKED, T0 + 60 * NS)])
        later = Notifier(site)
        later.resume(store)
        later.step(store, T0 + 3600 * NS)
        assert queued(store) == [("hook", 0)]


def test_a_channel_added_to_a_route_is_not_sent_the_past(tmp_path: Path) -> None:
    with Store(site_with(tmp_path).store_path) as store:
        store.write([alarm()])
        first = Notifier(site_with(tmp_path))
        first.resume(store)
        first.step(store, T0 + NS)
        # the route now also sends to the pager: the alarm of the past is not sent there
        changed = Notifier(site_with(tmp_path, '"hook", "pager"'))
        changed.resume(store)
        assert changed.step(store, T0 + 2 * NS) == 0
        store.write([alarm(AlarmTransition.REALARM, t=T0 + 3 * NS)])
        assert changed.step(store, T0 + 4 * NS) == 2
        assert queued(store) == [("hook", 0), ("hook", 0), ("pager", 0)]


def test_notifications_for_a_channel_no_longer_configured_are_reported(tmp_path: Path) -> None:
    site = site_with(tmp_path)
    with Store(site.store_path) as store:
        store.write([alarm()])
        notifier = Notifier(site)
        notifier.resume(store)
        notifier.step(store, T0 + NS)
    renamed = CHANNELS.replace('name = "hook"', 'name = "ward-hook"')
    route = ROUTE.format(channels='"ward-hook"')
    site = load_site(write_site(tmp_path, extra=renamed + route))
    with Store(site.store_path) as store:
        Notifier(site).resume(store)
        (incident,) = [i for _, i in store.incidents_of("notify", "notify-orphaned")]
    assert incident.message.startswith("1 notifications queued for channel 'hook' were never")
