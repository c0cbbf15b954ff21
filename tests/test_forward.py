"""The cursor forwarder (pocd.sinks.forward) driven by a sink kind of the test's own: its writer
POSTs to a real aiohttp server on 127.0.0.1 that takes, rejects or fails writes as a test says.

The encoders are the InfluxDB kind's (the lines are only payload here): a sink that takes only
the events stream, as email, webhook and MQTT channels will, and one that takes only samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pocd.model import NS, IncidentKind, PhaseChange, Run, Sample, now_ns
from pocd.settings import Site, load_site
from pocd.sinks import SINKS, SinkError, get_sink_kind
from pocd.sinks.forward import (
    Encoder,
    FarSide,
    Forwarder,
    Outcome,
    Stream,
    Writer,
    WriteResult,
    refused_alone,
)
from pocd.sinks.influxdb import EventLines, SampleLines
from pocd.store import Store
from pocd.store.writer import StoreWriter
from tests.sitekit import free_port, until, write_site

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


@dataclass
class Hook:
    """The far side: a real HTTP server on loopback. Lines holding a word of `poison` are
    refused (400); while `down` is above 0 it answers 503 with Retry-After and counts down;
    with `refuse_all` it refuses every write (400)."""

    url: str = ""
    received: list[str] = field(default_factory=list)
    requests: int = 0
    poison: tuple[str, ...] = ()
    down: int = 0
    refuse_all: bool = False

    async def write(self, request: web.Request) -> web.Response:
        self.requests += 1
        lines = (await request.text()).split("\n")
        if self.down > 0:
            self.down -= 1
            return web.Response(status=503, text="busy", headers={"Retry-After": "0.05"})
        if self.refuse_all or any(word in line for line in lines for word in self.poison):
            return web.Response(status=400, text="refused")
        self.received += lines
        return web.Response(status=204)

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def serving(hook: Hook) -> AsyncIterator[Hook]:
    app = web.Application()
    app.router.add_post("/write", hook.write)
    app.router.add_get("/ping", hook.ping)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hook.url = f"http://127.0.0.1:{port}"
    try:
        yield hook
    finally:
        await runner.cleanup()


class HookWriter:
    """A `Writer` for the test server: 2xx ok, 400 rejected, anything else (or no answer)
    failed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def write(self, body: bytes) -> WriteResult:
        try:
            async with self._session.post(f"{self.url}/write", data=body) as resp:
                if resp.status < 300:
                    return WriteResult(Outcome.OK)
                text = f"HTTP {resp.status}: {await resp.text()}"
                if resp.status == 400:
                    return WriteResult(Outcome.REJECTED, text)
                after = resp.headers.get("Retry-After")
                return WriteResult(Outcome.FAILED, text, float(after) if after else None)
        except (aiohttp.ClientError, OSError) as exc:
            return WriteResult(Outcome.FAILED, type(exc).__name__, answered=False)

    async def healthcheck(self) -> str:
        try:
            async with self._session.get(f"{self.url}/ping") as resp:
                return f"{self.url} answers /ping with {resp.status}"
        except (aiohttp.ClientError, OSError) as exc:
            raise SinkError(f"cannot reach {self.url}: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._session.close()


@dataclass(frozen=True)
class HookSettings:
    batch_size: int = 10
    flush_interval: float = 0.05
    backoff_max: float = 0.3
    commit_interval: float = 0.5
    in_flight: int = 3
    probe_neighbours: bool = True


def body(lines: Sequence[str]) -> bytes:
    return "\n".join(lines).encode()


def hook_sink(
    site: Site, hook: Hook, *streams: Stream, batch_size: int = 10, flush_interval: float = 0.05
) -> Forwarder:
    samples = SampleLines(site.id)
    encoders: dict[Stream, Encoder] = {
        Stream.SAMPLES: samples,
        Stream.EVENTS: EventLines(site.id, samples),
    }

    def open_writer() -> tuple[Writer, list[str]]:
        return HookWriter(hook.url), []

    return Forwarder(
        site,
        name="hook",
        far=FarSide("hook", "the hook", "hook", hook.url or "nowhere", unit="message"),
        settings=HookSettings(batch_size=batch_size, flush_interval=flush_interval),
        encoders=[encoders[s] for s in streams],
        open_writer=open_writer,
        body=body,
    )


@contextlib.asynccontextmanager
async def forwarding(sink: Forwarder) -> AsyncIterator[Forwarder]:
    task = asyncio.create_task(sink.run(), name="sink:hook")
    try:
        yield sink
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def incidents(site: Site) -> list[tuple[IncidentKind, str]]:
    with Store(site.store_path, readonly=True) as store:
        return [(i.kind, i.code) for i in store.incidents() if i.source == "sink:hook"]


def stored_cursors(site: Site) -> dict[str, int]:
    with Store(site.store_path, readonly=True) as store:
        return store.cursors("hook")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return load_site(write_site(tmp_path))


def a_run(site: Site, t0: int, n: int = 1) -> Run:
    return Run(f"r-{n}", f"B-{n}", site.id, "Europe/London", "CART-TCT", "3.1", "ab" * 32, "op", t0)


def settled(sink: Forwarder, **cursors: int) -> Callable[[], bool]:
    def check() -> bool:
        status = sink.status()
        return bool(status["cursors"] == cursors and status["state"] == "idle")

    return check


async def test_an_events_only_sink_forwards_events_and_never_reads_samples(site: Site) -> None:
    t0 = now_ns()
    with Store(site.store_path) as store:
        run = a_run(site, t0)
        store.write([run, *[Sample("bio", "ph", t0 + i * NS, 7.0) for i in range(50)]])
        store.write([PhaseChange(run.id, t0, "activation", None, "op")])
        events = store.event_count()
    async with serving(Hook()) as hook, forwarding(hook_sink(site, hook, Stream.EVENTS)) as sink:
        await until(settled(sink, events=events))
        assert sink.status()["backlog_samples"] == 0
        with Store(site.store_path) as store:
            store.write([PhaseChange(run.id, t0 + NS, "expansion", "activation", "op")])
            events = store.event_count()
        await until(settled(sink, events=events))
        status = sink.status()
    measurements = [line.split(",")[0] for line in hook.received]
    # the run's state, its start as a transition of its own, then each phase entered
    assert measurements == ["pocd_run", "pocd_run_event", "pocd_phase", "pocd_phase"]
    assert not any(line.startswith("pocd_sample") for line in hook.received)
    assert (status["kind"], status["sent"], status["backlog"]) == ("hook", 4, 0)
    assert stored_cursors(site) == {"events": events}  # no sample cursor is ever stored
    assert incidents(site) == []


async def test_a_refused_message_is_found_by_bisection_and_quarantined(site: Site) -> None:
    t0 = now_ns()
    values = [7.0 + i / 1000 for i in range(40)]
    values[26] = 9.999  # the one sample the hook refuses
    with Store(site.store_path) as store:
        store.write([Sample("bio", "ph", t0 + i * NS, v) for i, v in enumerate(values)])
    hook = Hook(poison=("value=9.999",))
    async with serving(hook), forwarding(hook_sink(site, hook, Stream.SAMPLES)) as sink:
        await until(lambda: sink.status()["cursors"].get("samples.live") == 40)
        await until(lambda: sink.status()["quarantined"] == 1)
        status = sink.status()
    assert status["sent"] == 39 and status["failures"] == 0
    assert len(set(hook.received)) == 39
    assert not any("value=9.999" in line for line in hook.received)
    with Store(site.store_path, readonly=True) as store:
        (incident,) = store.incidents_of("sink:hook", "hook-rejected")
    assert incident[1].kind is IncidentKind.DATA
    assert incident[1].message.startswith("sample 27 rejected by the hook (HTTP 400: refused)")
    assert b"value=9.999" in incident[1].raw and b"\n" not in incident[1].raw
    assert stored_cursors(site)["samples"] == 40


async def test_refused_alone_bisects_to_each_refused_line() -> None:
    lines = [f"m{i};" for i in range(64)]
    hook = Hook(poison=("m3;", "m41;", "m42;"))
    async with serving(hook):
        writer = HookWriter(hook.url)
        try:
            first = await writer.write(body(lines))
            found = await refused_alone(writer, lines, body, first)
        finally:
            await writer.close()
    assert first.rejected
    assert not isinstance(found, WriteResult)
    assert [list(span) for span, _ in found] == [[3], [41], [42]]
    assert hook.requests < 32  # bisection, not one write per line


async def test_a_far_side_that_refuses_everything_is_a_failure_not_a_quarantine(
    site: Site,
) -> None:
    with Store(site.store_path) as store:
        store.write([Sample("bio", "ph", now_ns() + i, 7.0) for i in range(25)])
    hook = Hook(refuse_all=True)
    async with serving(hook), forwarding(hook_sink(site, hook, Stream.SAMPLES)) as sink:
        await until(lambda: sink.status()["failures"] >= 3)
        status = sink.status()
        assert (status["state"], status["sent"], status["quarantined"]) == ("retrying", 0, 0)
        hook.refuse_all = False  # the breaker closes once a write goes through
        await until(settled(sink, **{"samples": 25, "samples.split": 25, "samples.live": 25}))
    assert incidents(site) == [
        (IncidentKind.COMMUNICATION, "hook-refused"),
        (IncidentKind.COMMUNICATION, "hook-recovered"),
    ]
    assert len(set(hook.received)) == 25


async def test_a_busy_far_side_is_retried_with_backoff_and_nothing_is_lost(site: Site) -> None:
    t0 = now_ns()
    with Store(site.store_path) as store:
        store.write([Sample("bio", "ph", t0 + i * NS, 7.0 + i / 100) for i in range(100)])
    hook = Hook(down=4)
    started = asyncio.get_running_loop().time()
    async with serving(hook), forwarding(hook_sink(site, hook, Stream.SAMPLES)) as sink:
        await until(settled(sink, **{"samples": 100, "samples.split": 100, "samples.live": 100}))
        status = sink.status()
    took = asyncio.get_running_loop().time() - started
    assert len(set(hook.received)) == 100 and status["failures"] == 0
    assert took >= 4 * 0.05 * 0.5  # each 503 waited at least its Retry-After, jittered
    assert incidents(site) == [
        (IncidentKind.COMMUNICATION, "hook-refused"),
        (IncidentKind.COMMUNICATION, "hook-recovered"),
    ]


async def test_an_unreachable_far_side_keeps_the_data_until_it_answers(site: Site) -> None:
    t0 = now_ns()
    with Store(site.store_path) as store:
        run = a_run(site, t0)
        store.write([run, PhaseChange(run.id, t0, "activation", None, "op")])
        events = store.event_count()
    hook = Hook(url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    async with forwarding(hook_sink(site, hook, Stream.EVENTS)) as sink:
        await until(lambda: sink.status()["failures"] >= 2)
        assert sink.status()["state"] == "retrying"
        assert sink.status()["backlog_events"] == events
    assert incidents(site) == [(IncidentKind.COMMUNICATION, "hook-unreachable")]
    assert stored_cursors(site).get("events", 0) == 0


async def test_an_events_only_sink_quarantines_a_refused_event_by_what_it_is(site: Site) -> None:
    t0 = now_ns()
    run = a_run(site, t0)
    with Store(site.store_path) as store:
        store.write([run, PhaseChange(run.id, t0, "activation", None, "op")])
        store.write([PhaseChange(run.id, t0 + NS, "expansion", "activation", "op")])
        store.write([PhaseChange(run.id, t0 + 2 * NS, "harvest", "expansion", "op")])
        events = store.event_count()
    hook = Hook(poison=("phase=expansion,",))
    async with serving(hook), forwarding(hook_sink(site, hook, Stream.EVENTS)) as sink:
        await until(settled(sink, events=events))
        status = sink.status()
    assert (status["sent"], status["quarantined"]) == (4, 1)
    with Store(site.store_path, readonly=True) as store:
        ((_, incident),) = store.incidents_of("sink:hook", "hook-rejected")
    assert incident.message.startswith(f"phase {run.id} expansion {t0 + NS} rejected by the hook")
    assert incident.message.endswith("quarantined, later messages go on")
    assert b"phase=expansion," in incident.raw


def test_sink_kinds_are_found_by_their_config_section() -> None:
    assert set(SINKS) == {"influxdb", "email", "webhook", "mqtt"}
    for name in SINKS:
        assert get_sink_kind(name).name == name
    with pytest.raises(KeyError):
        get_sink_kind("pigeon")


def test_a_forwarder_needs_one_encoder_per_stream(site: Site) -> None:
    with pytest.raises(ValueError, match="one encoder per stream"):
        hook_sink(site, Hook(), Stream.EVENTS, Stream.EVENTS)


async def test_a_sink_following_the_writer_sends_at_its_commit_and_does_not_poll(
    site: Site,
) -> None:
    """In the daemon the sink waits on the store writer's commits: idle, it reads the store
    once per flush interval at most (30 s here), yet what is committed goes at once."""
    writer = StoreWriter(batch_size=100, high_water=1000, on_incident=lambda _: None)
    t0 = now_ns()
    with Store(site.store_path) as store:
        writer.store = store
        async with serving(Hook()) as hook:
            sink = hook_sink(site, hook, Stream.SAMPLES, flush_interval=30.0)
            sink.follow(writer.commits)
            reads = 0
            plain_next_batch = sink._next_batch

            def counting_next_batch(now: float) -> Any:  # counts the sink's store reads
                nonlocal reads
                reads += 1
                return plain_next_batch(now)

            sink._next_batch = counting_next_batch  # type: ignore[method-assign]
            async with forwarding(sink):
                await until(lambda: sink.status()["state"] == "idle")
                before = reads
                await asyncio.sleep(1.0)
                assert reads - before <= 1, "idle, it waits for a commit instead of polling"
                for i in range(5):
                    writer.add(Sample("bio", "ph", t0 + i * NS, 7.0))
                committed = time.monotonic()
                await writer.flush()
                await until(lambda: len(hook.received) == 5, within=2.0)
                assert time.monotonic() - committed < 2.0
        writer.store = None
