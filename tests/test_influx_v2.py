"""The v2 write path (influxdb-client) against a recording HTTP server, named as such.

No InfluxDB 2.x can run here, so `RecordingHTTPServer` stands in for one: it answers /health
and /api/v2/write the way InfluxDB 2.x does and keeps every request, so the test can assert
the exact request the sink makes. The same line protocol goes to the real InfluxDB 1.x in
test_influx.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from pocd.model import NS, Incident, Quality, Sample
from pocd.settings import load_site
from pocd.sinks import SinkError, build_sinks
from pocd.sinks.influxdb import InfluxSink
from pocd.store import Store
from tests.sitekit import free_port, until, write_site

T0 = 1_767_225_600 * NS
TOKEN = "v2-token-Zq8xK3pL0wN5"


@dataclass(frozen=True, slots=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class RecordingHTTPServer:
    """A stand-in for InfluxDB 2.x on loopback: records requests, answers like 2.x does.

    A line holding `value=inf` is refused with 400 the way 2.x refuses an unparsable point.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> RecordingHTTPServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # raw bodies: the test asserts the bytes on the wire, gzip and all
        self._runner = web.AppRunner(app, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        if request.path == "/health":
            return web.json_response(
                {"name": "influxdb", "status": "pass", "version": "v2.7.11", "checks": []}
            )
        if request.path == "/api/v2/write":
            text = gzip.decompress(body) if request.headers.get("Content-Encoding") else body
            if b"value=inf" in text:
                return web.json_response(
                    {"code": "invalid", "message": "unable to parse 'value=inf': invalid number"},
                    status=400,
                )
            return web.Response(status=204)
        return web.Response(status=404)

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/api/v2/write"]


V2_SINK = """
[sinks.influxdb]
url = "{url}"
api = "v2"
org = {{ env = "POCD_TEST_INFLUX_ORG" }}
bucket = {{ file = "bucket.txt" }}
token = {{ file = "secrets/token" }}
flush_interval = "50ms"
backoff_max = "200ms"
"""


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingHTTPServer]:
    async with RecordingHTTPServer() as server:
        yield server


def v2_site(folder: Path, url: str) -> Path:
    config = write_site(folder, devices="", extra=V2_SINK.format(url=url))
    (folder / "bucket.txt").write_text("site-data/autogen\n")
    (folder / "secrets").mkdir()
    (folder / "secrets" / "token").write_text(TOKEN + "\n")
    return config


async def test_v2_write_request_is_exactly_the_documented_one(
    tmp_path: Path, recorder: RecordingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POCD_TEST_INFLUX_ORG", "uk-cs-01")
    site = load_site(v2_site(tmp_path, recorder.url))
    samples = [Sample("bio", "ph", T0 + i * NS, 7.0 + i / 100) for i in range(10)]
    with Store(site.store_path) as store:
        store.write(samples)
    (sink,) = build_sinks(site)
    task = asyncio.create_task(sink.run(), name="sink:influxdb")
    try:
        await until(lambda: sink.status()["cursors"]["samples"] == 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert recorder.requests[0].path == "/health"  # the healthcheck at start-up
    (write,) = recorder.writes()
    assert write.method == "POST"
    assert write.query == {"org": "uk-cs-01", "bucket": "site-data/autogen", "precision": "ns"}
    assert write.headers["Authorization"] == f"Token {TOKEN}"
    assert write.headers["Content-Encoding"] == "gzip"
    assert write.headers["Content-Type"].startswith("text/plain")
    lines = gzip.decompress(write.body).decode().split("\n")
    assert lines == [
        f"pocd_sample,device=bio,point=ph,site=test-site quality=0i,value={s.value!r} {s.t}"
        for s in samples
    ]
    assert TOKEN not in json.dumps(sink.status())


async def test_v2_bad_point_is_bisected_out_and_quarantined(
    tmp_path: Path, recorder: RecordingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POCD_TEST_INFLUX_ORG", "uk-cs-01")
    site = load_site(v2_site(tmp_path, recorder.url))
    samples = [Sample("bio", "do", T0 + i * NS, 50.0 + i) for i in range(40)]
    samples[25] = Sample("bio", "do", T0 + 25 * NS, float("inf"), Quality.GOOD)
    with Store(site.store_path) as store:
        store.write(samples)
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    task = asyncio.create_task(sink.run(), name="sink:influxdb")
    try:
        await until(lambda: sink.status()["cursors"]["samples"] == 40)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    accepted = [
        line
        for w in recorder.writes()
        for line in gzip.decompress(w.body).decode().split("\n")
        if b"value=inf" not in gzip.decompress(w.body)
    ]
    assert {int(line.rsplit(" ", 1)[1]) for line in accepted} == {
        s.t for i, s in enumerate(samples) if i != 25
    }
    with Store(site.store_path) as store:
        (incident,) = [i for i in store.incidents() if i.code == "influx-rejected"]
    assert isinstance(incident, Incident)
    assert incident.source == "sink:influxdb"
    assert "sample 26" in incident.message
    assert b"value=inf" in incident.raw
    assert sink.status()["quarantined"] == 1


async def test_v2_missing_secret_is_named_never_shown(
    tmp_path: Path, recorder: RecordingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POCD_TEST_INFLUX_ORG", raising=False)
    site = load_site(v2_site(tmp_path, recorder.url))
    (sink,) = build_sinks(site)
    with pytest.raises(SinkError, match="environment variable POCD_TEST_INFLUX_ORG is not set"):
        await sink.healthcheck()
    monkeypatch.setenv("POCD_TEST_INFLUX_ORG", "uk-cs-01")
    assert "answers /health: pass" in await sink.healthcheck()
