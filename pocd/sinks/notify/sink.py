"""Notifications in the daemon: the notifier, which turns stored alarm events into queued
notifications, and one cursor forwarder per channel, which delivers what is queued for it.

    alarm_events --(Notifier: the routes)--> notifications (the outbox, schema v12)
    notifications of channel C --(ChannelSink C: pocd.sinks.forward)--> the far side

The notifier replays every stored alarm event through the routes (pocd.sinks.notify.routing)
at its start, then follows new ones and the clock. The outbox keeps a notification once per
channel, so the replay queues only what a crash kept from being queued: escalations that fell
due while the daemon was down, a flood window that closed meanwhile. It also fails over: what a
route's channel has not delivered `fallback_after` its queuing is queued for the route's
fallback channel too (a copy with the same id, `via` the channel that did not deliver).

A channel's cursor moves only after the far side took the notification (and is stored at once),
so a restart sends on from the first one not delivered. Every attempt is stored, failures
included (`delivery_attempts`).

Must not: send anything but through a channel; write to the store anything but the outbox, the
attempts and the cursors and incidents the forwarder keeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from pocd.model import NS, Incident, IncidentKind, now_ns
from pocd.sinks import Sink, SinkKind, SinkSettings, witness_channels
from pocd.sinks.forward import FarSide, Forwarder, Stream, Units, Writer
from pocd.sinks.notify import Channel, ChannelWriter, DeliveryResult, Item, Summary, Witness
from pocd.sinks.notify.routing import Outgoing, Router
from pocd.sinks.notify.settings import ChannelSettings
from pocd.store import Attempt, Queued, Store
from pocd.store.writer import Commits

if TYPE_CHECKING:
    from pocd.settings import Site

__all__ = ["ChannelSink", "Notifier", "channel_kind"]

log = structlog.get_logger("pocd.sinks.notify")

# The longest the notifier sleeps without looking at the clock: escalations and fallbacks are
# checked at least this often, besides at the routes' own due times.
_TICK_S: Final = 1.0
_RETRY_S: Final = 5.0  # after the store failed
_RATE_WINDOW_S: Final = 660.0  # the flood rate's 10 minutes, and a minute to spare
_EVENTS: Final = "alarm_events"  # the notifier's cursors
_TICK: Final = "tick"
_CHECKPOINTS: Final = "checkpoints"
_WITNESS: Final = "witness"  # the route name of the checkpoints queued for the witnesses

S = TypeVar("S", bound=ChannelSettings)


# --- a channel ------------------------------------------------------------------------------


class OutboxEncoder:
    """The notifications queued for one channel, by outbox rowid: one unit each, its JSON."""

    stream = Stream.EVENTS

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.backlog = 0  # queued past the channel's cursor, as last read

    def start(self, store: Store) -> None:
        """Nothing to read ahead."""

    def head(self, store: Store) -> int:
        self.backlog = store.notification_backlog(self.channel).get(self.channel, 0)
        return store.notification_head(self.channel)

    def encode(self, store: Store, first: int, last: int) -> Units | None:
        rows = store.notifications(self.channel, after=first - 1, limit=last - first + 1)
        if not rows:
            return None
        refs = [f"notification {q.notification} (tier {q.tier}, route {q.route})" for _, q in rows]
        return Units(rows[-1][0], [q.item for _, q in rows], refs)


class ChannelSink(Forwarder):
    """Delivers the notifications queued for one channel (see the module docstring)."""

    def __init__(
        self,
        site: Site,
        settings: ChannelSettings,
        *,
        kind: str,
        title: str,
        open_channel: Callable[[], tuple[Channel, list[str]]],
    ) -> None:
        self._open_channel = open_channel
        self._outbox = OutboxEncoder(settings.name)
        super().__init__(
            site,
            name=settings.name,
            far=FarSide(kind, title, kind, settings.where(), unit="notification"),
            settings=settings,
            encoders=[self._outbox],
            open_writer=self._open,
            body=_body,
        )

    def status(self) -> dict[str, Any]:
        # The outbox's rowids are shared by every channel: count this one's rows.
        return super().status() | {
            "backlog": self._outbox.backlog,
            "backlog_events": self._outbox.backlog,
        }

    def _open(self) -> tuple[Writer, list[str]]:
        channel, secrets = self._open_channel()
        return ChannelWriter(channel, self._journal), secrets

    async def _journal(self, item: Item, result: DeliveryResult) -> None:
        """Store one attempt; a store that fails loses the attempt's record, not the delivery."""
        store = self._store
        if store is None:
            return
        attempt = Attempt(now_ns(), item.id, self.name, result.delivery.value, result.reason)
        try:
            await asyncio.to_thread(store.add_attempt, attempt)
        except Exception as exc:
            log.error("cannot store a delivery attempt", attempt=attempt, error=str(exc))


def _body(lines: Sequence[str]) -> bytes:
    return "\n".join(lines).encode()


def channel_kind(
    kind: str,
    title: str,
    settings_type: type[S],
    open_channel: Callable[[S, Path], tuple[Channel, list[str]]],
) -> SinkKind:
    """The sink kind of a channel module: `[[sinks.<kind>]]` entries become ChannelSinks."""

    def build(site: Site, settings: SinkSettings) -> Sink:
        if not isinstance(settings, settings_type):
            raise TypeError(f"[sinks.{kind}] takes {settings_type.__name__}")
        opener = partial(open_channel, settings, site.path.parent)
        return ChannelSink(site, settings, kind=kind, title=title, open_channel=opener)

    return SinkKind(name=kind, build=build)


# --- the notifier ---------------------------------------------------------------------------


class Notifier:
    """Queues the notifications the routes make of the stored alarm events (a `Sink`).

    Its cursors (`notify` in the store) say how far it routed: the last alarm event
    (`alarm_events`) and the last time it ticked (`tick`), committed with what it queued. At a
    start it rebuilds the routes' state from the events of the horizon (the longest wait of a
    tier or window, and the 10 minutes of the flood rate) and queues only what fell due after
    the last tick: a route's new channel or tier is not sent the past."""

    name = "notify"

    def __init__(self, site: Site) -> None:
        notify = site.config.notify
        self.site = site
        self.settings = notify
        self.routes = notify.routes
        self.base_url = notify.base_url or f"http://{site.config.api.listen}"
        self.witnesses = witness_channels(site)
        self.router = self._router()
        longest = max((t.after for r in self.routes for t in r.escalate), default=0.0)
        self._horizon = round((longest + notify.summary_window + _RATE_WINDOW_S) * NS)
        self._store_args = (site.store_path, site.point_parameters(), site.point_lines())
        self._commits: Commits | None = None
        self._after = 0  # the last alarm event (rowid) routed
        self._witnessed = 0  # the last checkpoint (rowid) queued for the witnesses
        self._ticked = 0  # the last time ticked, ns
        self._carried: list[Outgoing] = []  # found by a replay, queued with the next step
        self._queued = 0
        self._fallbacks = 0
        self._pending = self.router.pending()
        self._state = "starting"
        self._last_error: str | None = None

    def _router(self) -> Router:
        return Router(self.site.id, self.settings, base_url=self.base_url)

    def follow(self, commits: Commits) -> None:
        self._commits = commits

    async def healthcheck(self) -> str:
        return f"{len(self.routes)} notification routes"

    def status(self) -> dict[str, Any]:
        return {
            "kind": "notify",
            "state": self._state,
            "routes": [r.name for r in self.routes],
            "routed_upto": self._after,
            "queued": self._queued,
            "fallbacks": self._fallbacks,
            "pending": self._pending,
            "last_error": self._last_error,
        }

    async def run(self) -> None:
        path, parameters, lines = self._store_args
        store = await asyncio.to_thread(Store, path, parameters=parameters, lines=lines)
        try:
            while True:
                try:
                    await asyncio.to_thread(self.resume, store)
                    await self._follow(store)
                except Exception as exc:  # the store failed; a bug must not stop the daemon
                    self._state = "retrying"
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("notifier failed; starting again", error=self._last_error)
                    await asyncio.to_thread(
                        self._incident, store, "notify-failed", self._last_error
                    )
                    await asyncio.sleep(_RETRY_S)
        finally:
            store.close()

    def resume(self, store: Store) -> None:
        """The routes' state as the stored cursors left it (see the class docstring)."""
        self.router = self._router()
        cursors = store.cursors(self.name)
        self._after = cursors.get(_EVENTS, 0)
        self._witnessed = cursors.get(_CHECKPOINTS, 0)
        self._ticked = cursors.get(_TICK, 0)
        since = self._ticked - self._horizon if self._ticked else None
        carried: list[Outgoing] = []
        for _, event in store.alarm_events_after(0, upto=self._after, since=since):
            # what the event itself made was queued with the cursor; what the clock made
            # after the last tick was not
            carried += [o for o in self.router.on_event(event) if _of_clock(o)]
        carried += self.router.tick(self._ticked)
        self._carried = [o for o in carried if o.t > self._ticked]
        self._pending = self.router.pending()
        self._report_orphans(store)

    async def _follow(self, store: Store) -> None:
        while True:
            seen = self._commits.count if self._commits is not None else 0
            out = await asyncio.to_thread(self.step, store, now_ns())
            self._state = "following"
            if out and self._commits is not None:
                self._commits.note()  # the channels look at the outbox now
            await self._wait(seen)

    def step(self, store: Store, t: int) -> int:
        """Route the alarm events stored since the last step and what fell due by `t`; queue
        the notifications with the cursors, then the fallbacks. Answers how many were queued.
        If the store fails, `run` starts again from the stored cursors."""
        out, self._carried = self._carried, []
        after = self._after
        for rowid, event in store.alarm_events_after(after):
            out += self.router.on_event(event)
            after = rowid
        out += self.router.tick(t)
        ticked = max(self._ticked, t)
        rows = [_row(o, t) for o in out]
        witnessed = self._witnessed
        checkpoints = store.checkpoints_after(witnessed) if self.witnesses else []
        for rowid, checkpoint in checkpoints:
            witnessed = rowid
            witness = Witness.of(checkpoint, site=self.site.id)
            item = witness.json().decode()
            rows += [Queued(witness.id, c, t, _WITNESS, 0, None, item) for c in self.witnesses]
        positions = {_EVENTS: after, _TICK: ticked}
        if self.witnesses:
            positions[_CHECKPOINTS] = witnessed
        queued = store.queue_notifications(rows, sink=self.name, positions=positions)
        self._after, self._ticked, self._witnessed = after, ticked, witnessed
        queued += self._fall_back(store, t)
        self._queued += queued
        self._pending = self.router.pending()
        return queued

    def _fall_back(self, store: Store, t: int) -> int:
        """Queue for each route's fallback what its channels have not delivered in time."""
        queued = 0
        for route in self.routes:
            if route.fallback is None:
                continue
            made_before = t - round(route.fallback_after * NS)
            for channel in route.channels:
                found = store.queue_fallback(
                    route=route.name,
                    channel=channel,
                    fallback=route.fallback,
                    after=store.cursors(channel).get(Stream.EVENTS.value, 0),
                    made_before=made_before,
                    t=t,
                )
                if found:
                    log.warning(
                        "channel has not delivered in time; falling back",
                        route=route.name,
                        channel=channel,
                        fallback=route.fallback,
                        notifications=found,
                    )
                self._fallbacks += found
                queued += found
        return queued

    def _report_orphans(self, store: Store) -> None:
        """Notifications left queued for a channel the config no longer has."""
        channels = {c.name for c in self.site.config.sinks.channels()}
        for channel, count in store.notification_backlog().items():
            if channel not in channels:
                message = (
                    f"{count} notifications queued for channel {channel!r} were never "
                    "delivered, and the config has no such channel any more (renamed or "
                    "removed?): restore it to send them"
                )
                log.error("notifications for a channel that is gone", channel=channel)
                self._incident(store, "notify-orphaned", message)

    async def _wait(self, seen: int) -> None:
        longest = _TICK_S
        due = self.router.next_due()
        if due is not None:
            longest = min(longest, max(0.0, (due - now_ns()) / NS))
        if self._commits is not None:
            await self._commits.after(seen, longest)
        else:
            await asyncio.sleep(longest)

    @staticmethod
    def _incident(store: Store, code: str, message: str) -> None:
        try:
            store.write([Incident(now_ns(), IncidentKind.SOFTWARE, code, "notify", message)])
        except Exception as exc:
            log.error("cannot store the incident", error=str(exc))


def _of_clock(out: Outgoing) -> bool:
    """Made by the clock (an escalation, a summary), not by the event itself."""
    return out.tier > 0 or isinstance(out.item, Summary)


def _row(out: Outgoing, t: int) -> Queued:
    """The outbox row of an item queued at `t` (the fallback counts from then)."""
    item = out.item
    return Queued(item.id, out.channel, t, out.route, out.tier, None, item.json().decode())
