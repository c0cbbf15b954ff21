"""When InfluxDB refuses points: the circuit breaker and the quarantine, against a real influxd.

A refusal of everything (a field-type conflict, a proxy that refuses gzip) is a failure that
is retried with backoff and quarantines nothing; a point refused beside accepted ones is
quarantined, counted in status and metrics, and `pocd sink resend` sends it again whether the
daemon runs or not.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pocd.model import (
    NS,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    IncidentKind,
    Run,
    Sample,
    now_ns,
)
from pocd.settings import Site
from pocd.sinks.influxdb import InfluxSink
from pocd.store import Store
from tests.influxkit import Influxd, drained, sink_toml, site_with_sink
from tests.sitekit import api, cli, free_port, running, until


async def started(site: Site) -> tuple[InfluxSink, asyncio.Task[None]]:
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    return sink, asyncio.create_task(sink.run(), name="sink:influxdb")


async def stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def sink_incidents(site: Site) -> list[tuple[IncidentKind, str]]:
    with Store(site.store_path, readonly=True) as store:
        return [(i.kind, i.code) for i in store.incidents() if i.source == "sink:influxdb"]


async def refusing_everything(sink: InfluxSink, error: str) -> None:
    """Until the sink has failed three times in a row on `error`; then it must have sent and
    quarantined nothing."""
    await until(lambda: sink.status()["failures"] >= 3)
    status = sink.status()
    assert error in str(status["last_error"])
    assert status["state"] == "retrying"
    assert status["cursors"]["samples"] == 0
    assert (status["sent"], status["quarantined"]) == (0, 0)


# -- a refusal of everything is a failure, not a quarantine ----------------------------------


async def test_a_field_type_conflict_is_a_failure_retried_not_a_quarantine(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    t0 = now_ns() - 600 * NS
    # something else wrote `value` as a string: InfluxDB refuses every float value after it
    influxd.write(
        database, f'pocd_sample,device=other,point=x,site=elsewhere value="on" {t0}'.encode()
    )
    site = site_with_sink(tmp_path, sink_toml(influxd, database, batch_size=100))
    with Store(site.store_path) as store:
        store.write([Sample("bio", "ph", t0 + i * 10**6, 7.0 + i / 1000) for i in range(300)])
    sink, task = await started(site)
    try:
        await refusing_everything(sink, "field type conflict")
        assert sink_incidents(site) == [(IncidentKind.COMMUNICATION, "influx-refused")]
        influxd.query('DROP MEASUREMENT "pocd_sample"', database)  # the conflict resolved
        await drained(sink, site, within=20)
    finally:
        await stopped(task)
    assert influxd.count(database) == 300
    assert sink.status()["quarantined"] == 0
    assert sink_incidents(site) == [
        (IncidentKind.COMMUNICATION, "influx-refused"),
        (IncidentKind.COMMUNICATION, "influx-recovered"),
    ]


class GzipRefusingProxy:
    """A reverse proxy on loopback in front of influxd that answers 400 to a gzipped body, as
    some proxies do; everything else goes through."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse = True
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GzipRefusingProxy:
        self._client = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._client is not None
        await self._runner.cleanup()
        await self._client.close()

    async def _handle(self, request: web.Request) -> web.Response:
        assert self._client is not None
        body = await request.read()
        if self.refuse and request.headers.get("Content-Encoding") == "gzip":
            return web.Response(status=400, text="400 Bad Request: gzip is not accepted here")
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with self._client.request(
            request.method, f"{self.upstream}{request.path_qs}", data=body, headers=headers
        ) as answer:
            # framing headers are this hop's own: aiohttp sets them for the body it sends
            hop = {"content-length", "transfer-encoding", "connection", "keep-alive"}
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in hop}
            return web.Response(status=answer.status, body=await answer.read(), headers=headers)


@pytest.fixture
async def proxy(influxd: Influxd) -> AsyncIterator[GzipRefusingProxy]:
    async with GzipRefusingProxy(influxd.url) as server:
        yield server


async def test_a_proxy_that_refuses_gzip_is_a_failure_retried_not_a_quarantine(
    tmp_path: Path, influxd: Influxd, database: str, proxy: GzipRefusingProxy
) -> None:
    toml = sink_toml(influxd, database, batch_size=100).replace(influxd.url, proxy.url)
    site = site_with_sink(tmp_path, toml)
    t0 = now_ns() - 60 * NS
    with Store(site.store_path) as store:
        store.write([Sample("bio", "do", t0 + i * 10**6, 40.0 + i / 100) for i in range(250)])
    sink, task = await started(site)
    try:
        await refusing_everything(sink, "gzip is not accepted")
        proxy.refuse = False
        await drained(sink, site, within=20)
    finally:
        await stopped(task)
    assert influxd.count(database) == 250
    codes = [code for _, code in sink_incidents(site)]
    assert codes == ["influx-refused", "influx-recovered"]


# -- a point refused beside accepted ones is quarantined --------------------------------------


async def test_a_point_refused_alone_in_its_batch_is_quarantined_not_blocking(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    site = site_with_sink(tmp_path, sink_toml(influxd, database))
    t0 = now_ns() - 60 * NS
    run = Run("r-inf", "B-inf", site.id, "Europe/London", "CART-TCT", "3.1", "ab" * 32, "op", t0)
    with Store(site.store_path) as store:
        store.write([run, *[Sample("bio", "ph", t0 + i * NS, 7.0) for i in range(20)]])
    sink, task = await started(site)
    try:
        await drained(sink, site)
        # one bad sample alone in the next batch, and one bad event alone in its own: their
        # neighbours were taken, so each is quarantined and the streams go on
        excursion = Excursion(
            "e-inf", run.id, "ph", ExcursionKind.ACTION_HIGH, "CART-TCT", "3.1", "x", 7.4, t0
        )
        with Store(site.store_path) as store:
            store.write([Sample("bio", "ph", t0 + 20 * NS, float("inf"))])
            await drained(sink, site)
            opened = replace(excursion, worst=float("inf"))
            store.write([ExcursionEvent(ExcursionChange.OPENED, opened)])
            await drained(sink, site)
            store.write([Sample("bio", "ph", t0 + 21 * NS, 7.1)])
            await drained(sink, site)
    finally:
        await stopped(task)
    assert influxd.count(database) == 21
    status = sink.status()
    # the sample, and the excursion's two points (its state and its opening) with worst=inf
    assert (status["quarantined"], status["quarantine_incidents"], status["failures"]) == (3, 3, 0)
    assert sink_incidents(site) == [(IncidentKind.DATA, "influx-rejected")] * 3


# -- counted in status and metrics; `pocd sink resend` -----------------------------------------


def metric(text: str, name: str) -> float:
    (value,) = re.findall(rf'^{name}{{sink="influxdb"}} (\S+)$', text, re.MULTILINE)
    return float(value)


async def test_the_quarantine_is_counted_and_resent_with_or_without_the_daemon(
    tmp_path: Path, influxd: Influxd
) -> None:
    influxd.query('CREATE DATABASE "hour_db" WITH DURATION 1h NAME "hour"')
    site = site_with_sink(tmp_path, sink_toml(influxd, "hour_db", batch_size=100))
    old = now_ns() - 10 * 86400 * NS  # beyond the one-hour retention policy
    recent = now_ns() - 60 * NS
    with Store(site.store_path) as store:
        store.write(
            [
                *[Sample("scale", "mass", old + i * NS, 100.0 + i) for i in range(150)],
                Sample("scale", "mass", recent, float("inf")),  # InfluxDB never takes this one
                *[Sample("scale", "mass", recent + (1 + i) * NS, 200.0 + i) for i in range(49)],
            ]
        )
    async with running(site) as daemon:
        (sink,) = daemon.sinks
        await until(lambda: sink.status()["quarantined"] == 151)
        assert sink.status()["cursors"]["samples"] == 200
        _, live = await api(site, "GET", "/api/status")
        assert live["sinks"]["influxdb"]["quarantined"] == 151
        async with aiohttp.ClientSession() as session:
            url = f"http://{site.config.api.listen}/metrics"
            async with session.get(url) as resp:
                text = await resp.text()
        assert metric(text, "pocd_sink_quarantined") == 151
        assert metric(text, "pocd_sink_failures") == 0
        assert metric(text, "pocd_sink_sent_total") == sink.status()["sent"] >= 49
        assert abs(metric(text, "pocd_sink_last_delivery_timestamp_seconds") - time.time()) < 60
        listed = await asyncio.to_thread(cli, "sink", "quarantine", "-c", str(site.path), "--json")
        assert listed.returncode == 0, listed.stderr
        assert [e["points"] for e in json.loads(listed.stdout)] == [100, 50, 1]

        # the retention policy is widened: the old points can go now, the infinite one cannot
        influxd.query('ALTER RETENTION POLICY "hour" ON "hour_db" DURATION INF')
        result = await asyncio.to_thread(
            cli, "sink", "resend", "-c", str(site.path), "--operator", "qa-jane"
        )
        assert result.returncode == 1, result
        assert "150 of 151 quarantined points sent (3 incidents)" in result.stderr
        assert "1 refused again and kept in quarantine" in result.stderr
        assert influxd.count("hour_db") == 199
        # the running sink sees the quarantine shrink
        await until(lambda: sink.status()["quarantined"] == 1)

    # the daemon stopped: the command works on the store alone; nothing goes, nothing changes
    with Store(site.store_path, readonly=True) as store:
        incidents_before = len(store.incidents())
    result = await asyncio.to_thread(
        cli, "sink", "resend", "-c", str(site.path), "--operator", "qa-jane"
    )
    assert result.returncode == 1, result
    assert "InfluxDB refused every point again; the quarantine is unchanged" in result.stderr
    with Store(site.store_path, readonly=True) as store:
        assert len(store.incidents()) == incidents_before
        *first, (last_id, again) = store.incidents_of("sink:influxdb", "influx-rejected")
        assert [len(i.raw.split(b"\n")) for _, i in first] == [100, 50, 1]
        assert store.cursors("influxdb")["quarantine"] == first[-1][0] < last_id
        assert "line 1 of incident" in again.message
        assert "refused again by InfluxDB on resend" in again.message
        assert again.raw == first[-1][1].raw  # the line itself, kept
        (audit,) = [a for a in store.audit() if a.action == "sink.resend"]
        assert (audit.actor, audit.target) == ("qa-jane", "influxdb")
        assert audit.new == "150 sent, 1 refused again, 0 not sent"
