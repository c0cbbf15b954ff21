"""The MQTT channel (aiomqtt): each notification's JSON at QoS 1 on
`{prefix}/{site}/{line}/{device or source}/events`, and the alarm's current state RETAINED on
`{prefix}/{site}/alarms/{line}/{source}/{kind}`, so a dashboard that (re)connects is told the
truth at once. A flood summary goes at QoS 1 to `{prefix}/{site}/{line}/summary`, and each
signed checkpoint of the store's chain (a `Witness`, unless `witness = false`) RETAINED to
`{prefix}/{site}/checkpoint`: the control site's witness of the history.

The retained state is the JSON of the alarm's latest notification (its `state` says where it
is). A return to normal that is acknowledged (state `normal`) is retained as such rather than
cleared with an empty payload: the dashboard sees that the alarm is known and normal, when,
and by whose acknowledgement; an empty payload would be indistinguishable from an alarm
never raised or a topic never written.

Delivered means the broker acknowledged both publishes (PUBACK). If the second fails, the item
is retried whole: the event is published again with the same id, which subscribers drop.
One connection is kept between sends; a broken one is dropped and made again on the next send.

Must not: raise for a fault of the broker; put the password in a result or message.
"""

from __future__ import annotations

import ssl
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Final

import aiomqtt

from pocd.sinks import SinkError
from pocd.sinks.config import SecretValue
from pocd.sinks.notify import Connected, DeliveryResult, Item, Notification, Witness, redact
from pocd.sinks.notify.settings import MqttSettings
from pocd.sinks.notify.sink import channel_kind

__all__ = [
    "MqttChannel",
    "event_topic",
    "open_channel",
    "state_topic",
    "summary_topic",
    "witness_topic",
]

_QOS: Final = 1
_ERROR_CHARS: Final = 300


def _level(name: str) -> str:
    """A name as one topic level: no separator, no wildcard, never empty."""
    return "".join("_" if c in "/+#\x00" else c for c in name) or "_"


def event_topic(prefix: str, item: Notification) -> str:
    e = item.event
    return "/".join([prefix, *map(_level, (item.site, e.line, e.device or e.source)), "events"])


def state_topic(prefix: str, item: Notification) -> str:
    e = item.event
    levels = map(_level, (e.line, e.source, e.kind))
    return "/".join([prefix, _level(item.site), "alarms", *levels])


def summary_topic(prefix: str, site: str, line: str) -> str:
    return "/".join([prefix, _level(site), _level(line), "summary"])


def witness_topic(prefix: str, site: str) -> str:
    return "/".join([prefix, _level(site), "checkpoint"])


class MqttChannel(Connected):
    """Publishes items to one broker (see the module docstring)."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        password: SecretValue | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self._password = password
        if tls_context is None and settings.tls:
            tls_context = ssl.create_default_context(cafile=settings.ca_file)
        self._tls = tls_context
        self._stack: AsyncExitStack | None = None
        self._client: aiomqtt.Client | None = None

    @property
    def where(self) -> str:
        return self.settings.where()

    def _new_client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            hostname=s.host,
            port=s.port,
            username=s.username,
            password=self._password.reveal() if self._password else None,
            identifier=s.client_id,
            tls_context=self._tls,
            timeout=s.timeout,
        )

    async def _connected(self) -> aiomqtt.Client:
        if self._client is None:
            stack = AsyncExitStack()
            self._client = await stack.enter_async_context(self._new_client())
            self._stack = stack
        return self._client

    async def _drop(self) -> None:
        stack, client = self._stack, self._client
        self._stack = self._client = None
        if client is not None:
            # aiomqtt leaves a lost connection's error in a future nobody reads (asyncio
            # would log it at garbage collection); it is read here, as `send` reported it.
            lost = client._disconnected
            if lost.done() and not lost.cancelled():
                lost.exception()
        if stack is not None:
            # Already broken, most likely: that is why it is dropped.
            with suppress(aiomqtt.MqttError, OSError, TimeoutError):
                await stack.aclose()

    async def connect(self) -> None:
        """Connect now if the broker is there; if not, the next send tries again."""
        try:
            await self._connected()
        except (aiomqtt.MqttError, OSError, TimeoutError):
            await self._drop()

    async def send(self, item: Item) -> DeliveryResult:
        prefix = self.settings.prefix
        body = item.json()
        timeout = self.settings.timeout
        try:
            client = await self._connected()
            if isinstance(item, Notification):
                await client.publish(event_topic(prefix, item), body, qos=_QOS, timeout=timeout)
                await client.publish(
                    state_topic(prefix, item), body, qos=_QOS, retain=True, timeout=timeout
                )
            elif isinstance(item, Witness):  # the latest checkpoint, for whoever connects
                topic = witness_topic(prefix, item.site)
                await client.publish(topic, body, qos=_QOS, retain=True, timeout=timeout)
            else:
                topic = summary_topic(prefix, item.site, item.line)
                await client.publish(topic, body, qos=_QOS, timeout=timeout)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            await self._drop()
            return DeliveryResult.retry(self._redact(f"{self.where}: {_describe(exc)}"))
        return DeliveryResult.ok()

    async def healthcheck(self) -> str:
        """A connection of its own (login included), closed again."""
        try:
            async with self._new_client():
                pass
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            raise SinkError(self._redact(f"cannot use {self.where}: {_describe(exc)}")) from None
        login = f" as {self.settings.username!r}" if self.settings.username else ""
        return f"MQTT broker at {self.where} accepts the connection{login}"

    async def close(self) -> None:
        await self._drop()

    def _redact(self, text: str) -> str:
        return redact(text, self._password.reveal() if self._password else None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]


def open_channel(settings: MqttSettings, base: Path) -> tuple[MqttChannel, list[str]]:
    """The channel with its password read (a file relative to `base`), and the secret values
    to keep out of messages; SinkError naming the file or variable if it is unusable."""
    try:
        password = settings.password.read(base) if settings.password else None
    except ValueError as exc:
        raise SinkError(str(exc)) from None
    return MqttChannel(settings, password=password), [password.reveal()] if password else []


SINK: Final = channel_kind("mqtt", "MQTT", MqttSettings, open_channel)
