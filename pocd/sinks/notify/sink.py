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
from pocd.sinks import Sink, SinkKind, SinkSettings
from pocd.sinks.forward import FarSide, Forwarder, Stream, Units, Writer
from pocd.sinks.notify import Channel, ChannelWriter, DeliveryResult, Item
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

S = TypeVar("S", bound=ChannelSettings)


# --- a channel ------------------------------------------------------------------------------


class OutboxEncoder:
    """The notifications queued for one channel, by outbox rowid: one unit each, its JSON."""

    stream = Stream.EVENTS

    def __init__(self, channel: str) -> None:
        self.channel = channel

    def start(self, store: Store) -> None:
        """Nothing to read ahead."""

    def head(self, store: Store) -> int:
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
        super().__init__(
            site,
            name=settings.name,
            far=FarSide(kind, title, kind, settings.where(), unit="notification"),
            settings=settings,
            encoders=[OutboxEncoder(settings.name)],
            open_writer=self._open,
            body=_body,
        )

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
    """Queues the notifications the routes make of the stored alarm events (a `Sink`)."""

    name = "notify"

    def __init__(self, site: Site) -> None:
        notify = site.config.notify
        base_url = notify.base_url or f"http://{site.config.api.listen}"
        self.site = site
        self.routes = notify.routes
        self.router = Router(site.id, notify, base_url=base_url)
        self._store_args = (site.store_path, site.point_parameters(), site.point_lines())
        self._commits: Commits | None = None
        self._after = 0  # the alarm events (rowids) routed
        self._queued = 0
        self._fallbacks = 0
        self._state = "starting"
        self._last_error: str | None = None

    def follow(self, commits: Commits) -> None:
        self._commits = commits

    async def healthcheck(self) -> str:
        return f"{len(self.routes)} notification routes"

    def status(self) -> dict[str, Any]:
        return {
            "kind": "notify",
            "state": self._state,
            "routes": [r.name for r in self.routes],
            "events_routed": self._after,
            "queued": self._queued,
            "fallbacks": self._fallbacks,
            "pending": self.router.pending(),
            "last_error": self._last_error,
        }

    async def run(self) -> None:
        path, parameters, lines = self._store_args
        store = await asyncio.to_thread(Store, path, parameters=parameters, lines=lines)
        try:
            while True:
                try:
                    await self._follow(store)
                except Exception as exc:  # the store failed; a bug must not stop the daemon
                    self._state = "retrying"
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    log.exception("notifier failed; trying again", error=self._last_error)
                    await asyncio.to_thread(self._incident, store, self._last_error)
                    await asyncio.sleep(_RETRY_S)
        finally:
            store.close()

    async def _follow(self, store: Store) -> None:
        while True:
            seen = self._commits.count if self._commits is not None else 0
            out = await asyncio.to_thread(self._step, store, now_ns())
            self._state = "following"
            if out and self._commits is not None:
                self._commits.note()  # the channels look at the outbox now
            await self._wait(seen)

    def _step(self, store: Store, t: int) -> int:
        """Route the alarm events stored since the last step and what fell due by `t`; queue
        the notifications and the fallbacks. Answers how many were queued."""
        out: list[Outgoing] = []
        for rowid, event in store.alarm_events_after(self._after):
            out += self.router.on_event(event)
            self._after = rowid
        out += self.router.tick(t)
        queued = store.queue_notifications([_row(o) for o in out]) if out else 0
        for route in self.routes:
            if route.fallback is None:
                continue
            made_before = t - round(route.fallback_after * NS)
            for channel in route.channels:
                after = store.cursors(channel).get(Stream.EVENTS.value, 0)
                found = store.queue_fallback(
                    route=route.name,
                    channel=channel,
                    fallback=route.fallback,
                    after=after,
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
        self._queued += queued
        return queued

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
    def _incident(store: Store, message: str) -> None:
        try:
            store.write(
                [Incident(now_ns(), IncidentKind.SOFTWARE, "notify-failed", "notify", message)]
            )
        except Exception as exc:
            log.error("cannot store the incident", error=str(exc))


def _row(out: Outgoing) -> Queued:
    item = out.item
    return Queued(item.id, out.channel, out.t, out.route, out.tier, None, item.json().decode())
