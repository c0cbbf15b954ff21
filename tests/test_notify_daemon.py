"""Notifications in the daemon, against real far sides started here: an aiohttp webhook receiver
checking the HMAC and timestamp, an aiosmtpd SMTP server and Debian's mosquitto. They cover
delivery with every attempt stored, retry after the receiver was down, fallback to another
channel, escalation ended by an acknowledgement, one flood summary, and a `kill -9` while
alarms are active and notifications pending."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest

from pocd.model import AlarmState, AuditEntry, Sample, now_ns
from pocd.settings import Site, load_site
from pocd.store import Store
from tests.notifykit import Mailbox, Mosquitto, Receiver, smtp_server
from tests.sitekit import (
    api,
    cli,
    free_port,
    running,
    spawn_daemon,
    until,
    write_site,
)

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

NS = 1_000_000_000
SECRET = "daemon-hook-secret-93b2"
QUICK = """
id = "QUICK"
version = "1"
title = "Quick limits"
status = "approved"

[parameters.temperature]
unit = "C"
limits = {{ alert_high = {alert_high} }}

[[phases]]
id = "warm"
"""
INCUBATOR = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 3600 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }
"""


def channels_toml(hook: Receiver, smtp_port: int, mqtt_port: int | None = None) -> str:
    text = f"""
[[sinks.webhook]]
name = "hook"
url = "{hook.url}"
secret = {{ file = "hook.secret" }}
timeout = "1s"
backoff_max = "300ms"

[[sinks.email]]
name = "mail"
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "pocd@site.example"
to = ["ward@site.example"]

[[sinks.email]]
name = "oncall"
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "pocd@site.example"
to = ["oncall@site.example"]
"""
    if mqtt_port is not None:
        text += f"""
[[sinks.mqtt]]
name = "broker"
host = "127.0.0.1"
port = {mqtt_port}
prefix = "pocd"
"""
    return text


def notify_toml(*, escalate: str = "", transitions: str = "", mqtt: bool = False) -> str:
    text = f"""
[notify]
base_url = "https://console.site.example"
summary_window = "2s"

[[notify.routes]]
name = "ward"
channels = ["hook"]
fallback = "mail"
fallback_after = "1s"
{transitions}
{escalate}
"""
    if mqtt:
        text += """
[[notify.routes]]
name = "dashboard"
channels = ["broker"]
transitions = ["activate", "acknowledge", "return", "shelve", "realarm"]
consolidate = false
"""
    return text


def make_site(tmp_path: Path, extra: str, alert_high: float = 37.5) -> Site:
    config = write_site(tmp_path, INCUBATOR, extra)
    (tmp_path / "hook.secret").write_text(SECRET + "\n")
    (tmp_path / "protocols" / "quick.toml").write_text(QUICK.format(alert_high=alert_high))
    return load_site(config)


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    r = Receiver(SECRET)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    server = smtp_server(box)
    yield box, server.port
    server.stop()


def queued(site: Site) -> list[tuple[str, str, int, str | None]]:
    """(notification, channel, tier, via) of the outbox, in order."""
    with Store(site.store_path, readonly=True) as store:
        return [(q.notification, q.channel, q.tier, q.via) for _, q in store.notifications()]


def attempts(site: Site) -> list[tuple[str, str, str]]:
    with Store(site.store_path, readonly=True) as store:
        return [(a.notification, a.channel, a.outcome) for a in store.attempts()]


def hook_items(hook: Receiver) -> list[dict[str, object]]:
    return [json.loads(r.body) for r in hook.received]


def recipients(box: Mailbox) -> list[str]:
    return [to for _, tos in box.envelopes for to in tos]


async def excursion(daemon: object, value: float = 37.9) -> None:
    await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), value))  # type: ignore[attr-defined]


def state_of(daemon: object) -> AlarmState | None:
    views = daemon.lines.alarms.view()  # type: ignore[attr-defined]
    found = [v.state for v in views if v.kind == "alert-high"]
    return found[0] if found else None


async def test_an_alarm_is_delivered_escalated_and_an_acknowledgement_ends_the_escalation(
    tmp_path: Path, hook: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    box, smtp_port = mailbox
    escalate = 'escalate = [{ after = "1s", channels = ["oncall"] }, '
    escalate += '{ after = "30s", channels = ["mail"] }]'
    site = make_site(tmp_path, channels_toml(hook, smtp_port) + notify_toml(escalate=escalate))
    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        assert (await api(site, "POST", "/api/runs", {"batch_id": "B-7", "protocol": "QUICK"}))[
            0
        ] == 201
        await excursion(daemon)
        await until(lambda: len(hook.received) == 1)
        (item,) = hook_items(hook)
        assert (item["type"], item["transition"], item["batch_id"], item["value"]) == (
            "alarm",
            "activate",
            "B-7",
            37.9,
        )
        assert (item["unit"], item["limit"], item["phase"], item["priority"]) == (
            "C",
            37.5,
            "warm",
            "medium",
        )
        assert str(item["link"]).startswith("https://console.site.example/alarms/")
        # tier 1 after 1 s: the on-call address is mailed
        await until(lambda: "oncall@site.example" in recipients(box), within=5)
        assert "Escalation tier: 1" in box.messages[0].get_content()
        ack = {"source": "temperature", "kind": "alert-high", "comment": "seen, door shut"}
        assert (await api(site, "POST", "/api/alarms/acknowledge", ack))[0] == 200
        # the notifier routes the acknowledgement: nothing waits on the clock any more
        await until(lambda: daemon.view.status()["sinks"]["notify"]["pending"]["escalations"] == 0)
    tier0 = item["id"]
    assert [(c, tier, via) for _, c, tier, via in queued(site)] == [
        ("hook", 0, None),
        ("oncall", 1, None),
    ]
    assert queued(site)[0][0] == tier0
    assert [(c, o) for _, c, o in attempts(site)] == [
        ("hook", "delivered"),
        ("oncall", "delivered"),
    ]
    assert recipients(box) == ["oncall@site.example"]  # tier 2 never came: acknowledged


async def test_a_receiver_down_is_retried_and_meanwhile_the_fallback_channel_delivers(
    tmp_path: Path, hook: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    box, smtp_port = mailbox
    site = make_site(tmp_path, channels_toml(hook, smtp_port) + notify_toml())
    await hook.stop()
    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        await api(site, "POST", "/api/runs", {"batch_id": "B-8", "protocol": "QUICK"})
        await excursion(daemon)
        # the webhook fails and retries; after fallback_after the ward's mailbox is told
        await until(lambda: "ward@site.example" in recipients(box), within=8)
        assert [o for _, c, o in attempts(site) if c == "hook"][:2] == ["retry", "retry"]
        await hook.start()
        await until(lambda: len(hook.received) == 1, within=8)
        await asyncio.sleep(0.5)  # nothing more comes
    (notification, _, _, _), fallback = queued(site)
    assert fallback == (notification, "mail", 0, "hook")
    assert [r.notification_id for r in hook.received] == [notification]
    assert box.messages[0]["Subject"].startswith("[pocd test-site] MEDIUM activate")
    hook_outcomes = [o for n, c, o in attempts(site) if c == "hook"]
    assert hook_outcomes[-1] == "delivered" and hook_outcomes.count("delivered") == 1
    # who was told what, as QA reads it from the store
    done = cli("alarm", "notifications", "-c", str(site.path), "--json")
    assert done.returncode == 0, done.stderr
    shown = {n["channel"]: n for n in json.loads(done.stdout)}
    assert (shown["hook"]["delivered"], shown["mail"]["delivered"]) == (True, True)
    assert shown["mail"]["via"] == "hook" and shown["hook"]["what"] == "activate"
    assert [a["outcome"] for a in shown["hook"]["attempts"]][:2] == ["retry", "retry"]
    text = cli("alarm", "notifications", "-c", str(site.path)).stdout
    assert "delivered (fallback of hook)" in text


async def test_a_flood_sends_one_summary_per_window_and_mqtt_keeps_each_alarm_state(
    tmp_path: Path, hook: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    _, smtp_port = mailbox
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        extra = channels_toml(hook, smtp_port, broker.port) + notify_toml(mqtt=True)
        site = make_site(tmp_path, extra)
        async with running(site) as daemon:
            await until(lambda: ("incubator", "temperature") in daemon.latest)
            await api(site, "POST", "/api/runs", {"batch_id": "B-9", "protocol": "QUICK"})
            for _ in range(13):  # 13 activations: a flood from the 11th
                await excursion(daemon, 37.9)
                await until(lambda: state_of(daemon) is AlarmState.ACTIVE_UNACKED)
                await excursion(daemon, 37.0)
                await until(lambda: state_of(daemon) is AlarmState.RETURNED_UNACKED)
            # the three alarms after the 10th are summarised by window: one window, or two
            # when they straddle a window's end on a busy machine (windows sit on a grid)
            await until(
                lambda: sum(i["count"] for i in hook_items(hook) if i["type"] == "summary") == 3,
                within=8,
            )
            await asyncio.sleep(0.3)
            items = hook_items(hook)
            # the dashboard route does not consolidate: its retained state is the last one
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.subscribe("pocd/test-site/alarms/#", qos=1)
                message = await asyncio.wait_for(anext(aiter(client.messages)), 5)
            retained = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    finally:
        broker.stop()
    singles = [i for i in items if i["type"] == "alarm"]
    summaries = [i for i in items if i["type"] == "summary"]
    assert len(singles) == 10 and len(summaries) in (1, 2)
    assert sum(s["count"] for s in summaries) == 3
    assert all(s["line"] == "main" for s in summaries)
    assert len({s["start_ns"] for s in summaries}) == len(summaries)  # one per window
    assert message.retain and (retained["transition"], retained["state"]) == (
        "return",
        "returned-unacked",
    )
    with Store(site.store_path, readonly=True) as store:
        on_broker = [q for _, q in store.notifications("broker") if q.route == "dashboard"]
    assert len(on_broker) == 26  # 13 activations and 13 returns, none consolidated


CO2 = """
[[devices]]
id = "co2"
driver = "vaisala-gmp251"
transport = {{ host = "127.0.0.1", port = {port}, interval = 0.2, timeout = 0.3, retries = 0 }}
points.co2 = {{ parameter = "co2_ppm" }}
"""


async def modbus_sim(port: int) -> asyncio.subprocess.Process:
    """The Vaisala CO2 probe simulator on Modbus TCP, listening."""
    sim = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "pocd.sim.modbus", "vaisala-gmp251", "--transport", "tcp"),
        *("--port", str(port)),
        stdout=asyncio.subprocess.PIPE,
    )
    assert sim.stdout is not None
    assert b"listening" in await asyncio.wait_for(sim.stdout.readline(), 15)
    return sim


async def poll(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    for _ in range(int(within * 10)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def alarm_states(site: Site) -> dict[tuple[str, str], str]:
    _, body = await api(site, "GET", "/api/alarms")
    return {(a["source"], a["kind"]): a["state"] for a in body["alarms"]}


def two_device_site(folder: Path, hook: Receiver, smtp_port: int, modbus_port: int) -> Path:
    """The incubator, reading above its alert limit, and the CO2 probe; activations and
    acknowledgements go to the webhook."""
    extra = channels_toml(hook, smtp_port)
    extra += notify_toml(transitions='transitions = ["activate", "acknowledge"]')
    extra = extra.replace('fallback_after = "1s"', 'fallback_after = "1h"')
    config = write_site(folder, INCUBATOR + CO2.format(port=modbus_port), extra)
    (folder / "hook.secret").write_text(SECRET + "\n")
    co2 = '\n[parameters.co2_ppm]\nunit = "ppm"\n'
    (folder / "protocols" / "quick.toml").write_text(QUICK.format(alert_high=36.5) + co2)
    return config


async def test_kill_9_with_alarms_active_and_notifications_pending(
    tmp_path: Path, hook: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    """kill -9 while the receiver is down: after the restart each pending notification is
    delivered once, the acknowledgement kept its state, and a device lost while the daemon
    was down raises its comm-loss alarm."""
    modbus_port = free_port()
    sim = await modbus_sim(modbus_port)
    config = two_device_site(tmp_path, hook, mailbox[1], modbus_port)
    site = load_site(config)
    await hook.stop()
    temperature = ("temperature", "alert-high")
    daemon = spawn_daemon(config)
    try:
        status, _ = await api(site, "POST", "/api/runs", {"batch_id": "B-10", "protocol": "QUICK"})
        assert status == 201

        async def raised() -> bool:
            return (await alarm_states(site)).get(temperature) == "active-unacked"

        await poll(raised)
        ack = {"source": "temperature", "kind": "alert-high", "comment": "seen"}
        assert (await api(site, "POST", "/api/alarms/acknowledge", ack))[0] == 200

        async def both_pending() -> bool:  # queued, tried, neither delivered
            return len(queued(site)) == 2 and len(attempts(site)) >= 2

        await poll(both_pending)
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    sim.kill()
    await sim.wait()
    await hook.start()
    pending = [n for n, *_ in queued(site)]
    daemon = spawn_daemon(config)
    try:

        async def co2_lost() -> bool:
            return any(json.loads(r.body)["source"] == "co2" for r in hook.received)

        await poll(co2_lost)
        await asyncio.sleep(1.0)  # anything sent twice would have come by now
        states = await alarm_states(site)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
    items = hook_items(hook)
    ids = [r.notification_id for r in hook.received]
    assert len(ids) == len(set(ids)), "a notification was sent twice"
    assert ids[:2] == pending  # in the order they were queued
    # the acknowledged alarm went on as the same alarm: it was not raised again
    assert [(i["kind"], i["transition"]) for i in items[:2]] == [
        ("alert-high", "activate"),
        ("alert-high", "acknowledge"),
    ]
    assert [i for i in items[2:] if i["kind"] == "alert-high"] == []
    (lost,) = [i for i in items if i["source"] == "co2"]
    assert (lost["kind"], lost["transition"], lost["priority"]) == ("comm-loss", "activate", "high")
    assert states[temperature] == "active-acked"
    assert states[("co2", "comm-loss")] == "active-unacked"


async def test_each_signed_checkpoint_is_retained_on_the_broker_as_a_witness(
    tmp_path: Path, hook: Receiver, mailbox: tuple[Mailbox, int]
) -> None:
    """With no route at all, an MQTT channel still publishes the chain's checkpoints, and a
    dashboard that connects later gets the latest, which it checks with the site key alone."""
    import base64

    from pocd.sitekey import SiteKey, verify_signature
    from pocd.store.chain import checkpoint_note

    _, smtp_port = mailbox
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        site = make_site(tmp_path, channels_toml(hook, smtp_port, broker.port))
        async with running(site) as daemon:
            assert daemon.store is not None
            key = SiteKey.open(site.data_dir)
            for t in (1, 2):
                daemon.store.write([AuditEntry(now_ns(), "op", "note", f"n{t}", "")])
                made = daemon.store.checkpoint(f"pocd/{site.id}", key.sign, key.id, now_ns())
                assert made is not None
            store = daemon.store
            await until(lambda: len(store.attempts()) >= 2, within=15)
            # a dashboard that connects afterwards is given the latest at once
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.subscribe("pocd/test-site/checkpoint", qos=1)
                message = await asyncio.wait_for(anext(aiter(client.messages)), 10)
                witness = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    finally:
        broker.stop()
    assert message.retain and (witness["size"], witness["hash"]) == made
    note = checkpoint_note(witness["origin"], witness["size"], witness["hash"])
    assert verify_signature(key.public, note, base64.b64decode(witness["signature"]))
    with Store(site.store_path, readonly=True) as store:
        queued = [q for _, q in store.notifications("broker")]
    assert [q.route for q in queued] == ["witness", "witness"]
