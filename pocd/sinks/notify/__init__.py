"""Notification channels: email (pocd.sinks.notify.email), webhooks (.webhook) and MQTT
(.mqtt), each delivering one `Notification` or flood `Summary` (.message) to one far side.

What lives here is the contract every channel keeps and the adapter that lets the cursor
forwarder (pocd.sinks.forward) drive a channel:
- `Channel.send(item)` answers a `DeliveryResult`: delivered; retry (the far side is down,
  busy or timed out), with the reason; or rejected (it refused the item: a 5xx SMTP reply,
  an HTTP 4xx other than 408/429), which the forwarder retries all the same while the
  route's fallback takes over (see `DeliveryResult.write_result`).
  It never raises for a fault of the far side.
- `healthcheck()` exercises the real path once and says what answered, or raises SinkError.
- a channel is an async context manager (`connect` / `close`).

The channels' modules import their client libraries; this one imports none of them, so that
the settings (.settings) load without them.

Must not: route, escalate or consolidate (the alarm layer and its routes do), read or write the
store, show a secret in a result or message.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Protocol, Self

from pocd.model import AlarmPriority, AlarmState
from pocd.sinks.forward import Outcome, WriteResult
from pocd.sinks.notify.message import Item, Notification, Summary, SummaryAlarm, Witness

__all__ = [
    "Channel",
    "ChannelWriter",
    "Connected",
    "Delivery",
    "DeliveryResult",
    "Item",
    "Notification",
    "Summary",
    "SummaryAlarm",
    "Witness",
    "decode_item",
    "redact",
]


class Delivery(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"  # the far side is down, busy or timed out: send it again after backoff
    REJECTED = "rejected"  # the far side refused this item: kept as failed, not retried


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The answer of one delivery attempt."""

    delivery: Delivery
    reason: str = ""  # the far side's words, or what went wrong on the way; never a secret
    retry_after: float | None = None  # seconds the far side asked to wait, if it said

    @property
    def delivered(self) -> bool:
        return self.delivery is Delivery.DELIVERED

    @classmethod
    def ok(cls) -> DeliveryResult:
        return cls(Delivery.DELIVERED)

    @classmethod
    def retry(cls, reason: str, retry_after: float | None = None) -> DeliveryResult:
        return cls(Delivery.RETRY, reason, retry_after)

    @classmethod
    def rejected(cls, reason: str) -> DeliveryResult:
        return cls(Delivery.REJECTED, reason)

    def write_result(self) -> WriteResult:
        """The same answer in the forwarder's terms. A refusal is taken as the channel's, not
        the notification's: a wrong secret, address or login refuses every notification, and
        quarantining them one by one would tell no one. So it is a failure, retried with
        backoff, while the route's fallback channel takes over (pocd.sinks.notify.sink)."""
        if self.delivery is Delivery.DELIVERED:
            return WriteResult(Outcome.OK)
        if self.delivery is Delivery.REJECTED:
            return WriteResult(Outcome.FAILED, f"refused: {self.reason}")
        return WriteResult(Outcome.FAILED, self.reason, self.retry_after)


class Connected:
    """What every channel does alike: `async with` connects and closes, and a secret is
    never in a reason it gives."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def redact(text: str, secret: str | None) -> str:
    """`text` with `secret` (if any) starred out."""
    return text.replace(secret, "***") if secret else text


class Channel(Protocol):
    """One configured notification channel."""

    async def connect(self) -> None:
        """Prepare to send (a session, a connection). Never raises for a down far side:
        `send` reconnects and answers retry."""
        ...

    async def send(self, item: Item) -> DeliveryResult:
        """Deliver one item; never raises for a fault of the far side."""
        ...

    async def healthcheck(self) -> str:
        """Exercise the real path once: what answered, or SinkError saying why not."""
        ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def decode_item(line: str | bytes) -> Item:
    """The item of one forwarder unit (the `json()` of a Notification or Summary);
    ValueError if it is not one."""
    try:
        data = json.loads(line)
        if data["type"] == "alarm":
            return Notification.from_data(data)
        if data["type"] == "checkpoint":
            return Witness.from_data(data)
        if data["type"] == "summary":
            alarms = tuple(
                SummaryAlarm(
                    str(a["alarm_id"]),
                    str(a["source"]),
                    str(a["kind"]),
                    AlarmPriority(a["priority"]),
                    AlarmState(a["state"]),
                )
                for a in data["alarms"]
            )
            return Summary(
                str(data["id"]),
                str(data["site"]),
                str(data["line"]),
                int(data["start_ns"]),
                int(data["end_ns"]),
                alarms,
                str(data["link"]),
            )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a notification: {exc!r}") from None
    raise ValueError(f"not a notification: type {data.get('type')!r}")


class ChannelWriter:
    """A channel as the forwarder's `Writer`: a payload is units joined by newlines, each the
    JSON of one item (an encoder of alarm events makes them; a batch size of 1 suits a
    channel). The items are sent in order; the first that is not delivered answers for the
    payload, so the forwarder's bisection finds a rejected one and retries on a failure.
    Items before it are sent again on the retry, with the same id. `journal`, if given, is
    told every attempt's result (pocd.sinks.notify.sink stores them)."""

    def __init__(
        self,
        channel: Channel,
        journal: Callable[[Item, DeliveryResult], Awaitable[None]] | None = None,
    ) -> None:
        self.channel = channel
        self.journal = journal
        self._connected = False

    async def write(self, body: bytes) -> WriteResult:
        if not self._connected:
            await self.channel.connect()
            self._connected = True
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = decode_item(line)
            except ValueError as exc:
                return WriteResult(Outcome.REJECTED, str(exc))
            result = await self.channel.send(item)
            if self.journal is not None:
                await self.journal(item, result)
            if not result.delivered:
                return result.write_result()
        return WriteResult(Outcome.OK)

    async def healthcheck(self) -> str:
        return await self.channel.healthcheck()

    async def close(self) -> None:
        # Always: a healthcheck opens a session (aiohttp's) without `connect`.
        await self.channel.close()
        self._connected = False
