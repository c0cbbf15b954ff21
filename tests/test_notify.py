"""The notification channels against real far sides on loopback: aiosmtpd (plain, STARTTLS,
implicit TLS, AUTH), an aiohttp receiver checking signatures, and Debian's mosquitto."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest

from pocd.model import NS, AlarmEvent, AlarmPriority, AlarmState, AlarmTransition
from pocd.sinks import SinkError
from pocd.sinks.config import SecretValue
from pocd.sinks.forward import Outcome
from pocd.sinks.notify import (
    ChannelWriter,
    Delivery,
    Notification,
    Summary,
    SummaryAlarm,
    decode_item,
)
from pocd.sinks.notify.email import EmailChannel, message_id
from pocd.sinks.notify.mqtt import MqttChannel, event_topic, state_topic, summary_topic
from pocd.sinks.notify.settings import EmailSettings, MqttSettings, WebhookSettings
from pocd.sinks.notify.webhook import SignatureRefused, WebhookChannel, sign, verify
from tests.notifykit import Logins, Mailbox, Mosquitto, Receiver, Tls, make_tls, smtp_server

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

T0 = 1_780_000_000 * NS
SECRET = "hook-secret-4f1c"


def alarm(
    state: AlarmState = AlarmState.ACTIVE_UNACKED,
    transition: AlarmTransition = AlarmTransition.ACTIVATE,
    t: int = T0,
) -> AlarmEvent:
    return AlarmEvent(
        t=t,
        alarm_id="al-0042",
        line="line-1",
        source="temperature",
        kind="action-high",
        transition=transition,
        state=state,
        priority=AlarmPriority.HIGH,
        began=T0,
        actor="system" if transition is AlarmTransition.ACTIVATE else "alice",
        comment="" if transition is AlarmTransition.ACTIVATE else "door closed again",
        run_id="run-7",
        batch_id="B-2031",
        phase="expansion",
        device="incubator-1",
        value=38.25,
        limit=38.0,
        unit="°C",
    )


def note(event: AlarmEvent | None = None) -> Notification:
    return Notification.of(event or alarm(), site="site-a", base_url="https://pocd.example/")


def flood() -> Summary:
    alarms = tuple(
        SummaryAlarm(
            f"al-{i}", f"p{i}", "alert-high", AlarmPriority.MEDIUM, AlarmState.ACTIVE_UNACKED
        )
        for i in range(12)
    )
    return Summary.of(
        route="ward",
        site="site-a",
        line="line-1",
        start=T0,
        end=T0 + 600 * NS,
        alarms=alarms,
        base_url="https://pocd.example",
    )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


# --- the message ------------------------------------------------------------------------------


def test_notification_id_is_stable_and_renderings_carry_every_field() -> None:
    n = note()
    assert n.id == note().id  # a resend carries the same id
    assert n.id != note(alarm(AlarmState.ACTIVE_ACKED, AlarmTransition.ACKNOWLEDGE)).id
    assert n.id != Notification.of(alarm(), site="site-a", base_url="x", tier=1).id
    assert n.link == "https://pocd.example/alarms/al-0042"
    text = n.text()
    for part in (
        "site-a",
        "line-1",
        "B-2031",
        "incubator-1",
        "temperature",
        "38.25 °C",
        "38 °C",
        "expansion",
        "high",
        "active-unacked",
        "activate",
        n.link,
        "2026-05-28T20:26:40.000Z",
    ):
        assert part in text, part
    assert "HIGH" in n.subject() and "temperature" in n.subject()
    data = json.loads(n.json())
    assert data["batch_id"] == "B-2031" and data["value"] == 38.25 and data["limit"] == 38.0
    assert data["began"] == "2026-05-28T20:26:40.000Z" and data["link"] == n.link
    assert decode_item(n.json()) == n
    s = flood()
    assert decode_item(s.json()) == s
    assert s.count == 12 and "FLOOD" in s.subject() and "p11" in s.text()


def test_verify_refuses_bad_signature_stale_and_future() -> None:
    body = b'{"a": 1}'
    now = 1_780_000_000.0
    good = sign(SECRET, int(now), body)
    verify(SECRET, str(int(now)), body, good, now)
    for secret, stamp, data, signature, reason in [
        ("other", str(int(now)), body, good, "signature"),
        (SECRET, str(int(now)), b'{"a": 2}', good, "signature"),
        (SECRET, str(int(now) - 301), body, sign(SECRET, int(now) - 301, body), "old"),
        (SECRET, str(int(now) + 301), body, sign(SECRET, int(now) + 301, body), "future"),
        (SECRET, "yesterday", body, good, "unix seconds"),
    ]:
        with pytest.raises(SignatureRefused, match=reason):
            verify(secret, stamp, data, signature, now)


# --- email ------------------------------------------------------------------------------------


def email_settings(
    port: int, security: str, tls: Tls | None = None, **more: object
) -> EmailSettings:
    return EmailSettings.model_validate(
        {
            "host": "127.0.0.1",
            "port": port,
            "security": security,
            "from": "pocd@site-a.example",
            "to": ["oncall@example.org", "qa@example.org"],
            "timeout": 5,
            "ca_file": str(tls.ca_file) if tls else None,
            **more,
        }
    )


@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
async def test_email_delivers_with_every_field(security: str, tls: Tls) -> None:
    mailbox = Mailbox()
    ctx = tls.server_context()
    server = smtp_server(
        mailbox,
        starttls=ctx if security == "starttls" else None,
        implicit_tls=ctx if security == "tls" else None,
    )
    try:
        channel = EmailChannel(email_settings(server.port, security, tls))
        async with channel:
            n = note()
            result = await channel.send(n)
            assert result.delivery is Delivery.DELIVERED, result.reason
            assert "answers" in await channel.healthcheck()
    finally:
        server.stop()
    [mail] = mailbox.messages
    assert mail["Message-ID"] == message_id(n) == f"<{n.id}@pocd.site-a>"
    assert mail["Subject"] == n.subject()
    assert mailbox.envelopes == [("pocd@site-a.example", ["oncall@example.org", "qa@example.org"])]
    body = mail.get_content().replace("\r\n", "\n")  # CRLF on the wire
    assert body == n.text()


async def test_email_auth_wrong_password_rejected_right_one_delivered(tls: Tls) -> None:
    mailbox = Mailbox()
    server = smtp_server(mailbox, starttls=tls.server_context(), logins=Logins("pocd", "right"))
    try:
        settings = email_settings(server.port, "starttls", tls, username="pocd")
        wrong = EmailChannel(settings, password=SecretValue("wrong", "test"))
        result = await wrong.send(note())
        assert result.delivery is Delivery.REJECTED and result.reason.startswith("SMTP 535")
        assert "wrong" not in result.reason
        with pytest.raises(SinkError, match="535"):
            await wrong.healthcheck()
        right = EmailChannel(settings, password=SecretValue("right", "test"))
        assert (await right.send(note())).delivered
        assert "logged in as 'pocd'" in await right.healthcheck()
        # Unauthenticated: the server refuses the mail (5xx), a rejection.
        anonymous = EmailChannel(email_settings(server.port, "starttls", tls))
        assert (await anonymous.send(note())).delivery is Delivery.REJECTED
    finally:
        server.stop()
    assert len(mailbox.messages) == 1


async def test_email_server_down_is_retry_and_summary_delivered(tls: Tls) -> None:
    mailbox = Mailbox()
    server = smtp_server(mailbox)
    port = server.port
    server.stop()
    channel = EmailChannel(email_settings(port, "none"))
    result = await channel.send(note())
    assert result.delivery is Delivery.RETRY and "127.0.0.1" in result.reason
    with pytest.raises(SinkError, match="cannot reach"):
        await channel.healthcheck()
    server = smtp_server(mailbox)
    try:
        channel = EmailChannel(email_settings(server.port, "none"))
        s = flood()
        assert (await channel.send(s)).delivered
    finally:
        server.stop()
    [mail] = mailbox.messages
    assert mail["Message-ID"] == f"<{s.id}@pocd.site-a>" and "FLOOD" in mail["Subject"]
    assert "12 (highest priority medium)" in mail.get_content()


# --- webhook ----------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(SECRET)
    await r.start()
    yield r
    await r.stop()


def webhook(receiver: Receiver, secret: str = SECRET, shift: float = 0.0) -> WebhookChannel:
    settings = WebhookSettings.model_validate(
        {"url": receiver.url, "secret": {"env": "UNUSED"}, "timeout": 2}
    )
    return WebhookChannel(
        settings, secret=SecretValue(secret, "test"), clock=lambda: time.time() + shift
    )


async def test_webhook_delivers_signed_json(receiver: Receiver) -> None:
    async with webhook(receiver) as channel:
        n = note()
        assert (await channel.send(n)).delivered
        assert (await channel.send(flood())).delivered
        assert "HTTP 200" in await channel.healthcheck()
    first, second = receiver.received
    assert first.notification_id == n.id and json.loads(first.body) == n.data()
    assert json.loads(second.body)["type"] == "summary" and json.loads(second.body)["count"] == 12


async def test_webhook_wrong_secret_and_stale_timestamp_rejected(receiver: Receiver) -> None:
    async with webhook(receiver, secret="not-the-secret") as channel:
        result = await channel.send(note())
    assert result.delivery is Delivery.REJECTED and "HTTP 401" in result.reason
    assert "not-the-secret" not in result.reason
    async with webhook(receiver, shift=-3600) as channel:
        result = await channel.send(note())
    assert result.delivery is Delivery.REJECTED and "stale" in result.reason
    assert receiver.refused[0] == "signature does not match the body and timestamp"
    assert receiver.refused[1].endswith("s old (stale: a replay?)")
    assert not receiver.received


async def test_webhook_receiver_down_then_back(receiver: Receiver) -> None:
    await receiver.stop()
    async with webhook(receiver) as channel:
        result = await channel.send(note())
        assert result.delivery is Delivery.RETRY and "Connect" in result.reason
        with pytest.raises(SinkError, match="cannot reach"):
            await channel.healthcheck()
        await receiver.start()
        assert (await channel.send(note())).delivered
    [got] = receiver.received
    assert got.notification_id == note().id


async def test_channel_writer_drives_a_channel_for_the_forwarder(receiver: Receiver) -> None:
    writer = ChannelWriter(webhook(receiver))
    try:
        assert (await writer.write(note().json() + b"\n" + flood().json())).ok
        refused = await writer.write(b'{"type": "nonsense"}')
        assert refused.outcome is Outcome.REJECTED
        await receiver.stop()
        assert (await writer.write(note().json())).outcome is Outcome.FAILED
    finally:
        await writer.close()
    assert [r.notification_id for r in receiver.received] == [note().id, flood().id]


async def test_channel_writer_closes_what_a_healthcheck_opened(receiver: Receiver) -> None:
    """The forwarder checks health before it writes: closing must close that session too (an
    unclosed aiohttp session was reported at the demo's Ctrl-C)."""
    channel = webhook(receiver)
    writer = ChannelWriter(channel)
    assert "HTTP 200" in await writer.healthcheck()
    await writer.close()
    assert channel._session is None


# --- MQTT -------------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def mqtt(broker: Mosquitto) -> MqttChannel:
    return MqttChannel(
        MqttSettings.model_validate({"host": "127.0.0.1", "port": broker.port, "timeout": 2})
    )


async def retained(broker: Mosquitto, topic: str) -> aiomqtt.Message:
    """What a fresh subscriber is told first on `topic`."""
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                return message
    raise AssertionError("no message")


async def test_mqtt_events_and_retained_state(broker: Mosquitto) -> None:
    active, acked = note(), note(alarm(AlarmState.NORMAL, AlarmTransition.ACKNOWLEDGE, T0 + NS))
    events = event_topic("pocd", active)
    assert events == "pocd/site-a/line-1/incubator-1/events"
    assert state_topic("pocd", active) == "pocd/site-a/alarms/line-1/temperature/action-high"
    async with aiomqtt.Client("127.0.0.1", broker.port) as listener:
        await listener.subscribe("pocd/site-a/+/+/events", qos=1)
        async with mqtt(broker) as channel:
            assert (await channel.send(active)).delivered
            async with asyncio.timeout(5):
                message = await anext(aiter(listener.messages))
            assert str(message.topic) == events and message.qos == 1
            assert json.loads(message.payload)["id"] == active.id  # type: ignore[arg-type]
            first = await retained(broker, state_topic("pocd", active))
            assert first.retain and json.loads(first.payload)["state"] == "active-unacked"  # type: ignore[arg-type]
            assert (await channel.send(acked)).delivered
            assert (await channel.send(flood())).delivered
            assert "accepts the connection" in await channel.healthcheck()
    later = await retained(broker, state_topic("pocd", active))
    assert later.retain and json.loads(later.payload)["state"] == "normal"  # type: ignore[arg-type]
    assert json.loads(later.payload)["comment"] == "door closed again"  # type: ignore[arg-type]
    assert summary_topic("pocd", "site-a", "line-1") == "pocd/site-a/line-1/summary"


async def test_mqtt_summary_and_broker_down_then_back(broker: Mosquitto) -> None:
    async with mqtt(broker) as channel:
        async with aiomqtt.Client("127.0.0.1", broker.port) as listener:
            await listener.subscribe(summary_topic("pocd", "site-a", "line-1"), qos=1)
            assert (await channel.send(flood())).delivered
            async with asyncio.timeout(5):
                message = await anext(aiter(listener.messages))
            assert json.loads(message.payload)["count"] == 12  # type: ignore[arg-type]
        broker.stop()
        result = await channel.send(note())
        assert result.delivery is Delivery.RETRY and "mqtt://127.0.0.1" in result.reason
        with pytest.raises(SinkError, match="cannot use"):
            await channel.healthcheck()
        broker.start()
        assert (await channel.send(note())).delivered
    state = await retained(broker, state_topic("pocd", note()))
    assert json.loads(state.payload)["id"] == note().id  # type: ignore[arg-type]
