"""InfluxDB forwarding against a real influxd (Debian's 1.6, started by tests.influxkit).

The acceptance tests of the InfluxDB sink: every sample the store holds arrives once (count
test, through the daemon), across a 60 s outage of InfluxDB and across kill -9 of the daemon;
a bad point is quarantined without blocking the stream; `pocd check --connect`; several sites
in one database, queried with the README's InfluxQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from pocd.daemon import Daemon
from pocd.model import (
    MAIN_LINE,
    NS,
    Deviation,
    DeviationCause,
    ExcursionEvent,
    IncidentKind,
    PhaseChange,
    Quality,
    Run,
    Sample,
    now_ns,
)
from pocd.settings import Site, load_site
from pocd.sinks.influxdb import InfluxSink
from pocd.store import Store
from tests.influxkit import (
    ADMIN,
    Influxd,
    drained,
    free_port,
    running_influxd,
    sink_toml,
    site_with_sink,
)
from tests.sitekit import api, cli, running, spawn_daemon, until, write_site

README = Path(__file__).resolve().parent.parent / "README.md"


def burst_devices(count: int, points: int, interval: float, quiet_after: float) -> str:
    """Sim devices that send `points` samples every `interval` s, then fall silent."""
    body = "\n".join(
        f'points.p{i:02d} = {{ unit = "", base = {i}.5, noise = 0.1 }}' for i in range(points)
    )
    outage = f"{{ start = {quiet_after}, duration = 1e6 }}"
    return "".join(
        f"""
[[devices]]
id = "burst-{d}"
driver = "sim"
transport = {{ interval = {interval}, seed = {d}, outages = [{outage}] }}
{body}
"""
        for d in range(count)
    )


def channel_counts(influxd: Influxd, db: str) -> dict[tuple[str, str], int]:
    series = influxd.query(
        'SELECT count("quality") FROM "pocd_sample" GROUP BY "device", "point"', db
    )
    return {(s["tags"]["device"], s["tags"]["point"]): s["values"][0][1] for s in series}


def store_channel_counts(store: Store) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for _, sample in store.samples():
        key = (sample.device, sample.point)
        counts[key] = counts.get(key, 0) + 1
    return counts


async def quiet(daemon: Daemon, within: float = 30.0) -> None:
    """Until no sample has come in for a second."""
    deadline = time.monotonic() + within
    while True:
        before = daemon.counts["samples"]
        await asyncio.sleep(1.0)
        if daemon.counts["samples"] == before:
            return
        assert time.monotonic() < deadline, "the devices kept sending"


# -- count test ---------------------------------------------------------------------------------


async def test_100k_samples_through_the_daemon_arrive_once(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    # 25,000 samples/s until 8 s after start: > 100,000 even when the machine is busy
    devices = burst_devices(2, 50, 0.004, quiet_after=8.0)
    site = site_with_sink(tmp_path, sink_toml(influxd, database), devices)
    async with running(site) as daemon:
        body = {"batch_id": "B 100k", "protocol": "CART-TCT"}
        status, run = await api(site, "POST", "/api/runs", body)
        assert status == 201, run
        await until(lambda: daemon.counts["samples"] >= 50_000, 30)
        body = {"phase": "transduction", "reason": "activation on bench", "signature": True}
        status, _ = await api(site, "POST", "/api/run/phase", body)
        assert status == 200
        await until(lambda: daemon.counts["samples"] >= 100_000, 30)
        await quiet(daemon)  # the devices fell silent: no more samples come
        await api(site, "POST", "/api/run/stop", {})
        await daemon.flush()
        (sink,) = daemon.sinks
        assert isinstance(sink, InfluxSink)
        await drained(sink, site)
        _, live = await api(site, "GET", "/api/status")
        assert live["sinks"]["influxdb"]["backlog"] == 0
        assert live["sinks"]["influxdb"]["oldest_unsent_age_s"] == 0.0
    with Store(site.store_path, readonly=True) as store:
        stored = store.sample_count()
        assert stored >= 100_000
        assert influxd.count(database) == stored
        assert channel_counts(influxd, database) == store_channel_counts(store)
        (mark,) = [m for p, m in store.commit_marks()[1] if p.phase == "transduction"]
        in_transduction = stored - mark + 1
    # run, batch and phase tags come from the stored run and phase changes, by commit order:
    # a sample is tagged with the phase the engine judged it in, whatever its receive time
    series = influxd.query(
        'SELECT count("quality") FROM "pocd_sample" WHERE "phase" = \'transduction\' '
        'GROUP BY "run", "batch"',
        database,
    )
    (tagged,) = series
    assert tagged["tags"] == {"run": run["id"], "batch": "B 100k"}
    assert tagged["values"][0][1] == in_transduction
    (run_point,) = influxd.query('SELECT "status", "operator" FROM "pocd_run"', database)
    assert run_point["values"][0][1:] == ["completed", "op"]
    (deviation,) = influxd.query(
        'SELECT "status", "cause", "phase" FROM "pocd_deviation"', database
    )
    assert deviation["values"][0][1:] == ["open", "phase-order", "transduction"]
    phases = influxd.query('SELECT "actor", "phase" FROM "pocd_phase"', database)
    assert [v[2] for v in phases[0]["values"]] == ["enrichment", "transduction"]


# -- outage test --------------------------------------------------------------------------------

OUTAGE_S = 60  # as the acceptance says: a minute of InfluxDB down mid-run


async def test_influxd_killed_for_a_minute_mid_run_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    with running_influxd(tmp_path / "influxd") as server:
        server.create_database("outage")
        devices = burst_devices(2, 10, 0.01, quiet_after=1e5)  # 2,000 samples/s, all along
        site = site_with_sink(
            tmp_path / "site", sink_toml(server, "outage", backoff_max="2s"), devices
        )
        seen: list[dict[str, Any]] = []
        async with running(site) as daemon:
            (sink,) = daemon.sinks
            await api(
                site,
                "POST",
                "/api/runs",
                {"batch_id": "B-outage", "protocol": "CART-TCT"},
            )
            await until(lambda: sink.status()["sent"] > 2000, 20)
            server.kill()
            down_at = time.monotonic()
            while time.monotonic() - down_at < OUTAGE_S:
                await asyncio.sleep(1.0)
                seen.append(sink.status())
            assert seen[-1]["state"] == "retrying"
            assert seen[-1]["backlog_samples"] > 30 * 2000  # (2,000/s unless the host is busy)
            assert seen[-1]["oldest_unsent_age_s"] >= OUTAGE_S - 5
            server.start()
            # live data keeps flowing while the backlog is backfilled
            deadline = time.monotonic() + 60
            while sink.status()["backlog_samples"] > 200 or sink.status()["backfilling"]:
                seen.append(sink.status())
                assert time.monotonic() < deadline, sink.status()
                await asyncio.sleep(0.02)
            await api(site, "POST", "/api/run/stop", {})
            daemon.stop()  # the devices stop with it; the sink sends what it confirmed
        # positions never went back, on either lane
        for key in ("samples", "samples.split", "samples.live"):
            positions = [s["cursors"][key] for s in seen]
            assert positions == sorted(positions), key
        assert any(s["backfilling"] for s in seen), "the backlog went on a backfill lane"
        assert any(
            s["backfilling"] and s["cursors"]["samples.live"] > s["cursors"]["samples.split"]
            for s in seen
        ), "live samples were confirmed while the backlog was still being backfilled"
        with Store(site.store_path, readonly=True) as store:
            cursor = store.cursors("influxdb")["samples"]
            # what the daemon stored after the sink stopped goes at the next start
            sink = InfluxSink(site, site.config.sinks.influxdb[0])
            task = asyncio.create_task(sink.run(), name="sink:influxdb")
            await until(lambda: sink.status()["cursors"]["samples"] == store.sample_count(), 30)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stored = store.sample_count()
            assert cursor <= stored
            assert server.count("outage") == stored  # every point, none twice
            assert channel_counts(server, "outage") == store_channel_counts(store)
            # in order and intact: one channel's series equals the store's, point by point
            expected = [(s.t, s.value) for _, s in store.samples(device="burst-1", point="p07")]
            codes = [i.code for i in store.incidents() if i.source == "sink:influxdb"]
        (series,) = server.query(
            'SELECT "value" FROM "pocd_sample" WHERE "device" = \'burst-1\' AND '
            "\"point\" = 'p07' ORDER BY time ASC",
            "outage",
        )
        assert [(t, v) for t, v in series["values"]] == expected
        assert codes[:2] == ["influx-unreachable", "influx-recovered"]


# -- crash test ---------------------------------------------------------------------------------


def daemon_status(site: Site) -> dict[str, Any]:
    """The sink's live status, as the test user (logged in once per daemon)."""
    _, live = asyncio.run(api(site, "GET", "/api/status"))
    status: dict[str, Any] = live["sinks"]["influxdb"]
    return status


def test_daemon_killed_mid_forward_resends_without_doubling(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    devices = burst_devices(1, 20, 0.01, quiet_after=3.0)
    site = site_with_sink(tmp_path, sink_toml(influxd, database, batch_size=2000), devices)
    backlog = 300_000  # stored before the daemon starts: the sink has it all to forward
    with Store(site.store_path) as store:
        t0 = now_ns() - 3600 * NS
        for first in range(0, backlog, 20_000):
            store.write(
                [
                    Sample("old", f"p{i % 10}", t0 + i * 1000, float(i))
                    for i in range(first, first + 20_000)
                ]
            )
    proc = spawn_daemon(site.path)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the sink has committed part of the backlog, and not all of it
            with Store(site.store_path, readonly=True) as store:
                committed = store.cursors("influxdb").get("samples", 0)
            if 0 < committed < backlog - 50_000:
                break
            assert time.monotonic() < deadline, daemon_status(site)
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    with Store(site.store_path, readonly=True) as store:
        assert 0 < influxd.count(database) < store.sample_count()  # killed mid-forward

    proc = spawn_daemon(site.path)
    try:
        time.sleep(3.5)  # past the device's silence
        deadline = time.monotonic() + 60
        while daemon_status(site)["backlog"] or daemon_status(site)["state"] != "idle":
            assert time.monotonic() < deadline, daemon_status(site)
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    with Store(site.store_path, readonly=True) as store:
        assert influxd.count(database) == store.sample_count()  # nothing lost, nothing twice
        assert channel_counts(influxd, database) == store_channel_counts(store)


# -- tags from stored data: a point sent again overwrites itself ------------------------------


def group_counts(influxd: Influxd, db: str, tag: str) -> dict[str, int]:
    series = influxd.query(f'SELECT count("quality") FROM "pocd_sample" GROUP BY "{tag}"', db)
    return {s["tags"][tag]: s["values"][0][1] for s in series}


async def forward_all(site: Site, name: str) -> None:
    """A sink of that name forwards the whole store, from its own cursors, then stops."""
    settings = site.config.sinks.influxdb[0].model_copy(update={"name": name})
    sink = InfluxSink(site, settings)
    task = asyncio.create_task(sink.run(), name=f"sink:{name}")
    try:
        await drained(sink, site)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_late_phase_change_does_not_retag_points_already_sent(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    site = site_with_sink(tmp_path, sink_toml(influxd, database))
    t0 = now_ns() - 600 * NS
    run = Run(
        "run-late", "B-late", site.id, "Europe/London", "CART-TCT", "3.1", "ab" * 32, "op", t0
    )
    # the point is on the site's one line, as the daemon records it: it takes that line's run
    lines = {("bio", "ph"): MAIN_LINE}
    with Store(site.store_path, lines=lines) as store:
        store.write(
            [
                run,
                PhaseChange(run.id, t0, "activation", None, "op"),
                *[Sample("bio", "ph", t0 + i * NS, 7.0 + i / 100) for i in range(20)],
            ]
        )
    await forward_all(site, "influxdb")
    # A device-stamped phase change that comes late: its time lies among the samples sent.
    # The engine judged those in activation; they stay tagged so.
    with Store(site.store_path, lines=lines) as store:
        store.write(
            [
                PhaseChange(run.id, t0 + 10 * NS, "transduction", "activation", "device:rotea"),
                *[Sample("bio", "ph", t0 + (20 + i) * NS, 7.5) for i in range(5)],
            ]
        )
    await forward_all(site, "influxdb")
    # everything sent again (a second sink into the same database): each point overwrites
    # itself instead of starting a second series
    await forward_all(site, "again")
    assert influxd.count(database) == 25
    assert group_counts(influxd, database, "phase") == {"activation": 20, "transduction": 5}


PARAMETER_DEVICE = """
[[devices]]
id = "incubator"
driver = "sim"
transport = {{ interval = 0.02, seed = 1 }}
points.temperature = {{ {parameter}unit = "C", base = 37.0, noise = 0.01 }}
"""


async def test_a_points_parameter_tag_is_the_one_it_was_recorded_under(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    device = PARAMETER_DEVICE.format(parameter='parameter = "temperature", ')
    site = site_with_sink(tmp_path, sink_toml(influxd, database), device)
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] >= 10)
    with Store(site.store_path, readonly=True) as store:
        recorded_as_temperature = store.sample_count()
    # the config is edited: the point feeds no parameter any more; the daemon restarts
    site = site_with_sink(
        tmp_path, sink_toml(influxd, database), PARAMETER_DEVICE.format(parameter="")
    )
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] >= 10)
    await forward_all(site, "influxdb")
    await forward_all(site, "again")  # all of it again, under the edited config
    with Store(site.store_path, readonly=True) as store:
        stored = store.sample_count()
    assert influxd.count(database) == stored
    assert group_counts(influxd, database, "parameter") == {
        "temperature": recorded_as_temperature,
        "": stored - recorded_as_temperature,
    }


# -- bad point ----------------------------------------------------------------------------------


async def test_a_bad_point_is_quarantined_and_later_points_arrive(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    site = site_with_sink(tmp_path, sink_toml(influxd, database, batch_size=1000))
    t0 = now_ns() - 600 * NS
    samples = [Sample("pump", "flow", t0 + i * NS // 10, 1.5 + i / 1e4) for i in range(5000)]
    samples[2345] = Sample("pump", "flow", samples[2345].t, float("inf"))  # InfluxDB refuses it
    with Store(site.store_path) as store:
        store.write(samples)
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    task = asyncio.create_task(sink.run(), name="sink:influxdb")
    try:
        await drained(sink, site)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert influxd.count(database) == 4999
    (last,) = influxd.query('SELECT last("value") FROM "pocd_sample"', database)
    assert last["values"][0] == [samples[-1].t, samples[-1].value]
    with Store(site.store_path) as store:
        (incident,) = store.incidents()
        assert (incident.kind, incident.code) == (IncidentKind.DATA, "influx-rejected")
        assert incident.source == "sink:influxdb"
        assert "sample 2346 rejected by InfluxDB (HTTP 400: unable to parse" in incident.message
        assert (
            incident.raw
            == (
                f"pocd_sample,device=pump,point=flow,site=test-site quality=0i,value=inf "
                f"{samples[2345].t}"
            ).encode()
        )
        assert store.cursors("influxdb")["samples"] == 5000
    # started again, it does not send or quarantine that point a second time
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    task = asyncio.create_task(sink.run(), name="sink:influxdb")
    await drained(sink, site)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sink.status()["sent"] == 0
    with Store(site.store_path, readonly=True) as store:
        assert len(store.incidents()) == 1


async def test_points_beyond_retention_are_quarantined_by_the_request_not_one_by_one(
    tmp_path: Path, influxd: Influxd
) -> None:
    influxd.query('CREATE DATABASE "hour_only" WITH DURATION 1h NAME "hour"')
    site = site_with_sink(tmp_path, sink_toml(influxd, "hour_only", batch_size=1000))
    old = now_ns() - 10 * 86400 * NS  # ten days ago: beyond a one-hour retention policy
    recent = now_ns() - 60 * NS
    samples = [Sample("scale", "mass", old + i * NS, 1000.0 + i) for i in range(2500)]
    samples += [Sample("scale", "mass", recent + i * 10**6, 2000.0 + i) for i in range(700)]
    with Store(site.store_path) as store:
        store.write(samples)
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    task = asyncio.create_task(sink.run(), name="sink:influxdb")
    try:
        await drained(sink, site)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert influxd.count("hour_only") == 700
    assert sink.status()["quarantined"] == 2500
    with Store(site.store_path, readonly=True) as store:
        incidents = [i for i in store.incidents() if i.code == "influx-rejected"]
    # a handful of incidents (whole requests), each with every line it refused
    assert 3 <= len(incidents) <= 8
    assert sum(i.raw.count(b"\n") + 1 for i in incidents) == 2500
    assert "points beyond retention policy" in incidents[0].message
    assert incidents[0].message.startswith("1000 points, sample 1 to sample 1000, rejected")


# -- secrets, healthcheck -----------------------------------------------------------------------


async def test_a_refused_login_is_reported_without_the_password(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    wrong = "wr0ng-Passw0rd-9f8e7d"
    site = site_with_sink(tmp_path, sink_toml(influxd, database, password="wrong.txt"))
    (tmp_path / "wrong.txt").write_text(wrong)
    with Store(site.store_path) as store:
        store.write([Sample("d", "p", now_ns(), 1.0)])
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(sink.run(), name="sink:influxdb")
        await until(lambda: sink.status()["state"] == "retrying", 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    status = sink.status()
    assert "HTTP 401" in str(status["last_error"])
    assert "refused the login" in str(status["health"])
    with Store(site.store_path, readonly=True) as store:
        incidents = store.incidents()
    assert [i.code for i in incidents] == ["influx-refused"]
    for text in (json.dumps(status), repr(logs), repr(incidents)):
        assert wrong not in text
        assert ADMIN[1] not in text


def test_check_connect_runs_each_sinks_healthcheck(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    (tmp_path / "wrong.txt").write_text("not-the-password")
    sinks = (
        sink_toml(influxd, database, name="good")
        + sink_toml(influxd, "no_such_db", name="no-db")
        + sink_toml(influxd, database, name="bad-login", password="wrong.txt")
    ).replace(influxd.url, "URL")
    dead = f"http://127.0.0.1:{free_port()}"
    sinks += sink_toml(influxd, database, name="dead").replace(influxd.url, dead)
    site = site_with_sink(tmp_path, sinks.replace("URL", influxd.url))

    result = cli("check", "--connect", str(site.path))
    assert result.returncode == 1, result
    out, err = result.stdout, result.stderr
    assert re.search(r"sink good: ok: InfluxDB 1\.6\.\S+ at .* answers /ping", out), out
    assert f"sink no-db: {influxd.url} has no database 'no_such_db'" in err
    assert "sink bad-login:" in err and "refused the login of user 'pocd-admin'" in err
    assert f"sink dead: cannot reach {dead}" in err
    assert "not-the-password" not in out + err
    assert ADMIN[1] not in out + err

    good = site_with_sink(tmp_path / "good", sink_toml(influxd, database))
    result = cli("check", "--connect", str(good.path))
    assert result.returncode == 0, result.stderr
    assert "sink influxdb: ok" in result.stdout


# -- control site: several sites, one database, the README's queries ---------------------------


def readme_influxql() -> dict[str, str]:
    """The InfluxQL queries of the README, by the comment above each."""
    text = README.read_text()
    block = text.split("```sql\n-- InfluxQL", 1)[1].split("```", 1)[0]
    queries = {}
    for chunk in block.strip().split("\n\n"):
        comment, *query = chunk.strip().split("\n")
        queries[comment.removeprefix("-- ").strip()] = " ".join(q.strip() for q in query)
    return queries


async def test_two_sites_in_one_database_and_the_control_site_queries(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    queries = readme_influxql()
    t0 = now_ns() - 120 * NS
    sites = []
    for n, site_id in enumerate(("rfh-poc-1", "gosh-mm-2")):
        folder = tmp_path / site_id
        config = write_site(folder, devices="", extra=sink_toml(influxd, database))
        config.write_text(config.read_text().replace('id = "test-site"', f'id = "{site_id}"'))
        (folder / "password.txt").write_text(ADMIN[1])
        site = load_site(config)
        run = Run(
            f"run-{n}",
            f"B-{n}",
            site_id,
            "Europe/London",
            "CART-TCT",
            "3.1",
            "ab" * 32,
            "op",
            t0,
        )
        with Store(site.store_path) as store:
            store.write(
                [
                    run,
                    PhaseChange(run.id, t0, "expansion", None, "op"),
                    *[
                        Sample("incubator", "temperature", t0 + i * NS, 37.0 + n + i / 100)
                        for i in range(60)
                    ],
                    Sample("incubator", "co2", t0 + 61 * NS, float("nan"), Quality.BAD),
                    Deviation(
                        f"dev-{n}",
                        run.id,
                        t0 + 30 * NS,
                        DeviationCause.ACTION_LIMIT,
                        "expansion",
                        f"too warm at {site_id}",
                        "temperature",
                    ),
                ]
            )
        sites.append(site)
    sinks = [InfluxSink(site, site.config.sinks.influxdb[0]) for site in sites]
    tasks = [asyncio.create_task(s.run(), name=f"sink:{s.site_id}") for s in sinks]
    try:
        for sink, site in zip(sinks, sites, strict=True):
            await drained(sink, site)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    deviations = influxd.query(queries["every site's open deviations"], database)
    assert {s["tags"]["site"]: [v[1] for v in s["values"]] for s in deviations} == {
        "rfh-poc-1": ["too warm at rfh-poc-1"],
        "gosh-mm-2": ["too warm at gosh-mm-2"],
    }
    latest = influxd.query(queries["the latest value of every point at every site"], database)
    found = {(s["tags"]["site"], s["tags"]["point"]): s["values"][0][1:] for s in latest}
    assert found[("rfh-poc-1", "temperature")] == [0, 37.59]
    assert found[("gosh-mm-2", "temperature")] == [0, 38.59]
    assert found[("gosh-mm-2", "co2")] == [2, None]  # a NaN reading: no value, quality bad
    assert influxd.query(queries["every site's open excursions"], database) == []


# -- every transition, across an outage ---------------------------------------------------------

QUICK_PROTOCOL = """
id = "QUICK"
version = "1"
title = "Quick limits"
status = "approved"

[parameters.temperature]
unit = "C"
critical = true
limits = { alert_high = 37.5, action_high = 38.0 }

[[phases]]
id = "only"
"""

WARMING_INCUBATOR = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 0.05, seed = 1 }
[devices.points.temperature]
parameter = "temperature"
unit = "C"
base = 37.0
script = [{ start = 4, duration = 1, action = "offset", value = 1.2 }]
"""


async def test_an_outage_loses_no_transition_of_an_excursion_or_a_deviation(
    tmp_path: Path,
) -> None:
    """InfluxDB is down while an excursion opens, grows and closes and a deviation opens:
    once it is back it holds each transition, not just the final state."""
    with running_influxd(tmp_path / "influxd") as server:
        server.create_database("transitions")
        config = write_site(tmp_path / "site", WARMING_INCUBATOR, sink_toml(server, "transitions"))
        (tmp_path / "site" / "password.txt").write_text(ADMIN[1] + "\n")
        (tmp_path / "site" / "protocols" / "quick.toml").write_text(QUICK_PROTOCOL)
        site = load_site(config)
        async with running(site) as daemon:
            (sink,) = daemon.sinks
            assert isinstance(sink, InfluxSink)
            body = {"batch_id": "B-T", "protocol": "QUICK"}
            status, run = await api(site, "POST", "/api/runs", body)
            assert status == 201, run
            await until(lambda: sink.status()["sent"] > 0)
            server.kill()
            # the chamber warms past both limits at 4 s and is back at 5 s
            await until(lambda: daemon.lines.counts["deviations"] >= 1, 15)
            with Store(site.store_path, readonly=True) as store:
                await until(lambda: all(e.end for e in store.excursions(run["id"])), 15)
            server.start()
            await api(site, "POST", "/api/run/stop", {})
            await daemon.flush()
            await drained(sink, site)
            sent = sink.status()["cursors"]["samples"]
        with Store(site.store_path, readonly=True) as store:
            excursions = store.excursions(run["id"])
            (deviation,) = store.deviations(run["id"])
            transitions = [e for _, e in store.events(0, 10_000) if isinstance(e, ExcursionEvent)]
        assert server.count("transitions") == sent
        series = server.query(
            'SELECT "id", "worst" FROM "pocd_excursion_event" GROUP BY "kind", "change"',
            "transitions",
        )
        found = sorted(
            (s["tags"]["kind"], s["tags"]["change"], v[1], v[2])
            for s in series
            for v in s["values"]
        )
        expected = sorted(
            (e.excursion.kind.value, e.change.value, e.excursion.id, e.excursion.worst)
            for e in transitions
        )
        assert found == expected
        assert {(kind, change) for kind, change, _, _ in found} >= {
            ("action-high", "opened"),
            ("action-high", "closed"),
            ("alert-high", "opened"),
            ("alert-high", "closed"),
        }
        assert {e.kind.value for e in excursions} == {"alert-high", "action-high"}
        (point,) = server.query('SELECT "id", "status" FROM "pocd_deviation"', "transitions")
        assert point["values"][0][1:] == [deviation.id, "open"]
        runs = server.query(
            'SELECT "status" FROM "pocd_run_event" GROUP BY "change"', "transitions"
        )
        assert {s["tags"]["change"]: s["values"][0][1] for s in runs} == {
            "started": "running",
            "ended": "completed",
        }


async def test_each_signed_checkpoint_reaches_influxdb_as_a_witness_of_the_chain(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    """The control site, holding only what InfluxDB got, can check each checkpoint's
    signature with the site's public key: a later rewrite of the store's history is caught."""
    import base64

    from pocd.sitekey import SiteKey, verify_signature
    from pocd.store.chain import checkpoint_note

    site = site_with_sink(tmp_path, sink_toml(influxd, database))
    async with running(site) as daemon:
        assert daemon.store is not None
        key = SiteKey.open(site.data_dir)
        made = await asyncio.to_thread(
            daemon.store.checkpoint, f"pocd/{site.id}", key.sign, key.id, time.time_ns()
        )
        assert made is not None
        (sink,) = daemon.sinks
        assert isinstance(sink, InfluxSink)
        await drained(sink, site)
    (series,) = influxd.query(
        'SELECT "origin", "size", "hash", "signature", "key_id" FROM "pocd_checkpoint"', database
    )
    points = [dict(zip(series["columns"], v, strict=True)) for v in series["values"]]
    assert (points[0]["size"], points[0]["hash"]) == made
    for point in points:
        note = checkpoint_note(point["origin"], point["size"], point["hash"])
        signature = base64.b64decode(point["signature"])
        assert point["key_id"] == key.id
        assert verify_signature(key.public, note, signature)
        assert not verify_signature(key.public, note.replace(b"\n", b"\n1", 1), signature)
