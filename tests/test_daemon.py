"""The daemon end to end: real sim devices, the real store, the HTTP API and the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from pocd.model import DeviationCause, ExcursionKind, IncidentKind, Quality, RunStatus
from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import (
    FAST_DEVICES,
    api,
    cli_as,
    cli_env,
    cli_login,
    engine_of,
    running,
    spawn_daemon,
    until,
    write_site,
)


async def test_run_lifecycle_through_the_api(tmp_path: Path) -> None:
    # No noise: readings 50 ms apart that differ by noise alone can breach the 1 C/min rate
    # limit (a "rate pending" state the live status rightly shows, seen on a loaded machine).
    devices = FAST_DEVICES.replace("noise = 0.01", "noise = 0.0")
    assert devices != FAST_DEVICES
    site = load_site(write_site(tmp_path, devices))
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] >= 20)
        status, run = await api(
            site,
            "POST",
            "/api/runs",
            {"batch_id": "B-001", "protocol": "CART-TCT"},
        )
        assert status == 201, run
        assert run["protocol_version"] == "3.1"
        assert len(run["protocol_hash"]) == 64
        status, body = await api(
            site,
            "POST",
            "/api/runs",
            {"batch_id": "B-002", "protocol": "CART-TCT"},
        )
        assert status == 409
        assert "still running" in body["error"]

        status, change = await api(site, "POST", "/api/run/phase", {"phase": "activation"})
        assert (status, change["in_order"]) == (200, True)
        override = {"phase": "harvest", "reason": "expansion done on the bench"}
        status, body = await api(site, "POST", "/api/run/phase", override)
        assert (status, body["fields"]) == (428, ["signature"])
        assert "out of protocol order" in body["error"]
        status, body = await api(
            site, "POST", "/api/run/phase", {"phase": "harvest", "signature": True}
        )
        assert status == 409
        assert "needs a reason" in body["error"]
        status, change = await api(site, "POST", "/api/run/phase", {**override, "signature": True})
        assert (status, change["in_order"]) == (200, False)

        status, live = await api(site, "GET", "/api/status")
        assert live["run"]["phase"] == "harvest"
        temperature = next(p for p in live["points"] if p["parameter"] == "temperature")
        assert temperature["state"] == "normal"
        assert temperature["limits"]["alert_high"] == 37.5
        assert temperature["quality"] == "good"
        assert math.isclose(temperature["value"], 37.0, abs_tol=0.1)
        await asyncio.sleep(0.3)
        status, ended = await api(site, "POST", "/api/run/stop", {})
        assert (status, ended["status"]) == (200, "completed")

    with Store(site.store_path, readonly=True) as store:
        (stored,) = store.runs()
        assert stored.status is RunStatus.COMPLETED
        assert stored.timezone == "Europe/London"
        assert [p.phase for p in store.phases(stored.id)] == ["enrichment", "activation", "harvest"]
        (deviation,) = store.deviations(stored.id)
        assert deviation.cause is DeviationCause.PHASE_ORDER
        audit = store.audit()
        actions = [a.action for a in audit]
        # what was loaded, each with its hash: the config, the driver in use, the protocol
        assert actions[:3] == ["config.load", "driver.load", "protocol.load"]
        assert audit[1].target == "sim" and len(audit[1].new or "") == 64
        # between runs, the line's equipment is watched (the built-in watch: no standby)
        assert actions[3:] == [
            "line.standby",
            "login",
            "run.start",
            "run.phase",
            "run.phase",
            "signature",
            "run.stop",
            "line.standby",
        ]
        assert audit[3].new == "pocd-equipment-watch 1"
        assert [a.actor for a in audit][4:10] == ["op"] * 6
        assert store.sample_count() >= daemon.counts["samples"] > 0


async def test_site_status_gates_runs_and_is_audited(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path))
    async with running(site):
        body = {"status": "suspended", "reason": "audit findings", "signature": True}
        assert (await api(site, "POST", "/api/site/status", body))[0] == 200
        status, refused = await api(
            site, "POST", "/api/runs", {"batch_id": "B", "protocol": "CART-TCT"}
        )
        assert status == 409
        assert "suspended" in refused["error"]
        await api(
            site, "POST", "/api/site/status", {**body, "status": "ceased", "reason": "closed"}
        )
        status, refused = await api(site, "POST", "/api/site/status", {**body, "status": "active"})
        assert status == 409
        assert "ceased" in refused["error"]
    with Store(site.store_path, readonly=True) as store:
        changes = [(a.old, a.new, a.actor) for a in store.audit() if a.action == "site.status"]
        assert changes == [("active", "suspended", "op"), ("suspended", "ceased", "op")]


async def test_draft_protocol_cannot_start_a_run(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    source = (tmp_path / "protocols" / "cart-tct-3.1.toml").read_text()
    draft = source.replace('version = "3.1"', 'version = "3.2"').replace('"approved"', '"draft"')
    (tmp_path / "protocols" / "cart-tct-3.2.toml").write_text(draft)
    site = load_site(config)
    async with running(site):
        body = {"batch_id": "B", "protocol": "CART-TCT", "version": "3.2"}
        status, refused = await api(site, "POST", "/api/runs", body)
        assert status == 409
        assert "draft" in refused["error"]


FAULTY_DEVICES = """
[[devices]]
id = "good"
driver = "sim"
transport = { interval = 0.05 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }

[[devices]]
id = "faulty"
driver = "sim"
transport = { interval = 0.05, outages = [{ start = 0.6, duration = 0.6 }] }
points.ph = { parameter = "ph", unit = "pH", base = 7.1, script = [
  { start = 0.2, duration = 0.3, action = "nan" },
] }
"""


async def test_nan_and_outage_are_recorded_and_other_devices_keep_going(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, FAULTY_DEVICES))
    async with running(site):
        await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "CART-TCT"})
        await api(site, "POST", "/api/run/phase", {"phase": "activation"})
        await asyncio.sleep(1.6)
        await api(site, "POST", "/api/run/stop", {})
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        run_id = run.id
        ph = [s for _, s in store.samples(device="faulty", point="ph")]
        bad = [s for s in ph if s.quality is Quality.BAD]
        assert bad, "NaN readings must be stored as BAD samples"
        assert all(math.isnan(s.value) for s in bad)
        good = [s for _, s in store.samples(device="good")]
        times = [s.t for s in good]
        gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
        assert max(gaps) < 0.5, "the healthy device kept its poll rate through the outage"
        kinds = {(e.parameter, e.kind) for e in store.excursions(run_id)}
        assert ("ph", ExcursionKind.COMM_LOSS) in kinds


async def test_device_point_drives_the_phase(tmp_path: Path) -> None:
    devices = """
[[devices]]
id = "rotea"
driver = "sim"
transport = { interval = 0.05 }
points.step = { unit = "", base = 1, script = [
  { start = 0.0, duration = 1.0, action = "set", value = 1 },
  { start = 1.0, duration = 0.5, action = "set", value = 2 },
  { start = 1.5, duration = 100, action = "set", value = 4 },
] }
"""
    extra = """
[run.phase_source]
device = "rotea"
point = "step"
phases = { "1" = "enrichment", "2" = "activation", "3" = "transduction", "4" = "expansion" }
"""
    site = load_site(write_site(tmp_path, devices, extra))
    async with running(site) as daemon:
        await api(site, "POST", "/api/runs", {"batch_id": "B", "protocol": "CART-TCT"})
        await until(
            lambda: engine_of(daemon) is not None and engine_of(daemon).phase == "expansion"
        )
        await api(site, "POST", "/api/run/stop", {})
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        phases = store.phases(run.id)
        assert [(p.phase, p.actor, p.in_order) for p in phases] == [
            ("enrichment", "op", True),
            ("activation", "device:rotea", True),
            ("expansion", "device:rotea", False),
        ]
        assert [d.cause for d in store.deviations(run.id)] == [DeviationCause.PHASE_ORDER]


def test_sigterm_flushes_and_exits_0(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    proc = spawn_daemon(config)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    with Store(load_site(config).store_path, readonly=True) as store:
        assert store.sample_count() > 0


def test_kill_9_loses_no_committed_sample_and_resumes_the_run(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    site = load_site(config)
    env = cli_env(tmp_path)
    proc = spawn_daemon(config)
    try:
        cli_login(config, env)
        started = cli_as(
            env, "run", "start", "-c", str(config), "--batch", "B-9", "--protocol", "CART-TCT"
        )
        assert started.returncode == 0, started.stderr
        time.sleep(1.0)
        with Store(site.store_path, readonly=True) as store:
            committed = store.sample_count()
            last_before = max(store.last_sample_times().values())
        assert committed > 0
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(site.store_path, readonly=True) as store:
        assert store.sample_count() >= committed
        (run,) = store.runs()
        assert run.status is RunStatus.RUNNING

    time.sleep(1.0)  # the gap
    proc = spawn_daemon(config)
    try:
        time.sleep(1.0)
        # sessions live in the daemon's memory: the restart ended the one before
        refused = cli_as(env, "run", "stop", "-c", str(config))
        assert refused.returncode == 1 and "pocd login -c" in refused.stderr
        cli_login(config, env)
        stopped = cli_as(env, "run", "stop", "-c", str(config))
        assert stopped.returncode == 0, stopped.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        assert run.status is RunStatus.COMPLETED
        gaps = [e for e in store.excursions(run.id) if e.kind is ExcursionKind.COMM_LOSS]
        # one gap per monitored parameter of the first phase (enrichment: temperature only)
        assert {e.parameter for e in gaps} == {"temperature"}
        (gap,) = gaps
        assert gap.start >= last_before - 10**9
        assert gap.end is not None
        assert gap.duration_s is not None and gap.duration_s >= 1.0
        assert any(
            i.code == "restart" and i.kind is IncidentKind.SOFTWARE for i in store.incidents()
        )


def test_cli_lists_and_shows_runs_from_the_store(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    env = cli_env(tmp_path)
    c = ("-c", str(config))
    proc = spawn_daemon(config)
    try:
        cli_login(config, env)
        started = cli_as(env, "run", "start", *c, "--batch", "B-7", "--protocol", "CART-TCT")
        assert started.returncode == 0, started.stderr
        refused = cli_as(env, "run", "phase", *c, "expansion")  # no signature on stdin
        assert refused.returncode == 1
        assert "out of protocol order" in refused.stderr
        assert cli_as(env, "run", "phase", *c, "activation").returncode == 0
        assert cli_as(env, "run", "stop", *c).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    listed = cli_as(env, "run", "list", *c, "--json")
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    assert (run["batch_id"], run["status"]) == ("B-7", "completed")
    shown = cli_as(env, "run", "show", *c, "B-7", "--json")
    detail = json.loads(shown.stdout)
    assert [p["phase"] for p in detail["phases"]] == ["enrichment", "activation"]
    assert detail["excursions"] == [] and detail["deviations"] == []
    assert cli_as(env, "run", "show", *c, "nope").returncode == 1


def test_control_commands_say_when_the_daemon_is_down(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    result = cli_as(cli_env(tmp_path), "run", "stop", "-c", str(config))
    assert result.returncode == 1
    assert "does not answer" in result.stderr
    assert "pocd serve -c" in result.stderr


@pytest.mark.parametrize(
    ("wall", "mono", "jump"), [(0, 0, None), (5, 1, 4.0), (1, 5, -4.0), (3, 2, None)]
)
def test_clock_watch(wall: float, mono: float, jump: float | None) -> None:
    from pocd.clock import ClockWatch

    watch = ClockWatch(threshold_s=2.0)
    base = 1_700_000_000 * 10**9
    assert watch.check(base, 10**9) == 0
    found = watch.check(base + int(wall * 1e9), 10**9 + int(mono * 1e9))
    assert found == (0 if jump is None else round(jump * 1e9))


async def test_reload_takes_new_protocols_and_an_invalid_config_is_an_incident(
    tmp_path: Path,
) -> None:
    config = write_site(tmp_path)
    site = load_site(config)
    async with running(site) as daemon:
        source = (tmp_path / "protocols" / "cart-tct-3.1.toml").read_text()
        (tmp_path / "protocols" / "cart-tct-3.2.toml").write_text(
            source.replace('version = "3.1"', 'version = "3.2"')
        )
        daemon.reload()
        body = {"batch_id": "B", "protocol": "CART-TCT", "version": "3.2"}
        status, run = await api(site, "POST", "/api/runs", body)
        assert (status, run["protocol_version"]) == (201, "3.2")

        config.write_text(config.read_text().replace('timezone = "Europe/London"', "timezone = 5"))
        daemon.reload()
        await until(lambda: daemon.incident_counts["daemon"] == 1)
        status, _ = await api(site, "GET", "/api/status")
        assert status == 200
    with Store(site.store_path, readonly=True) as store:
        (incident,) = store.incidents()
        assert (incident.kind, incident.code) == (IncidentKind.CONFIGURATION, "config-reload")
        assert "site.timezone" in incident.message
        loads = [a.target for a in store.audit() if a.action == "protocol.load"]
        assert loads.count("CART-TCT 3.2") == 1


def test_a_busy_api_port_is_a_clear_fatal_error(tmp_path: Path) -> None:
    import socket

    config = write_site(tmp_path)
    host, port = load_site(config).config.api.listen.split(":")
    with socket.socket() as sock:
        sock.bind((host, int(port)))
        sock.listen()
        result = cli_as(cli_env(tmp_path), "serve", "-c", str(config))
    assert result.returncode == 1
    assert f"the API cannot listen on {host}:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_metrics_expose_counts_and_pending_for_prometheus(tmp_path: Path) -> None:
    import aiohttp

    site = load_site(write_site(tmp_path))
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] >= 10)
        url = f"http://{site.config.api.listen}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
            text = await resp.text()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    samples = float(lines['pocd_records_total{kind="samples",site="test-site"}'])
    assert samples >= 10
    assert "pocd_store_pending" in lines
    assert float(lines["pocd_store_bytes"]) >= site.store_path.stat().st_size  # and its WAL
    assert abs(float(lines["pocd_store_last_commit_timestamp_seconds"]) - time.time()) < 30
    assert lines["pocd_alarms_active"] == "0.0"
    assert float(lines["pocd_inbox_depth"]) >= 0


async def test_losing_clock_synchronisation_is_an_incident_and_in_status(tmp_path: Path) -> None:
    """The kernel's answer is faked (FakeKernelClock): a test cannot make the host's clock
    lose its NTP synchronisation. The daemon asks it at start and every minute."""
    site = load_site(write_site(tmp_path))
    answers = iter([True, False])

    def fake_kernel_clock() -> bool | None:
        return next(answers, False)

    async with running(site) as daemon:
        daemon._synchronised = fake_kernel_clock
        daemon._check_sync(time.time_ns())  # synchronised
        assert daemon.view.status()["clock"] == {"synchronised": True}
        daemon._check_sync(time.time_ns())  # lost
        daemon._check_sync(time.time_ns())  # still lost: no second incident
        assert daemon.view.status()["clock"] == {"synchronised": False}
        await daemon.flush()
        with Store(site.store_path, readonly=True) as store:
            lost = [i for i in store.incidents() if i.code == "clock-unsynchronised"]
    assert len(lost) == 1 and lost[0].kind is IncidentKind.CLOCK


async def test_metrics_show_a_sinks_backlog_while_influxdb_is_down(tmp_path: Path) -> None:
    import aiohttp

    from tests.sitekit import free_port

    extra = f"""
[sinks.influxdb]
url = "http://127.0.0.1:{free_port()}"
api = "v1"
database = "pocd"
"""
    site = load_site(write_site(tmp_path, extra=extra))
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] >= 20)
        await asyncio.sleep(1.5)
        url = f"http://{site.config.api.listen}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            text = await resp.text()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['pocd_sink_backlog{sink="influxdb"}']) > 0
    assert float(lines['pocd_sink_oldest_unsent_age_seconds{sink="influxdb"}']) > 0


async def test_metrics_show_each_devices_reads_and_a_lines_alarm_flood(tmp_path: Path) -> None:
    import aiohttp

    from pocd.sim.modbus import ModbusSimulator, unit_from_driver
    from tests.sitekit import free_port

    modbus = ModbusSimulator([unit_from_driver("vaisala-gmp251")])
    port = await modbus.start_tcp()
    # A probe that answers; one whose gateway is gone; a sim device that drops out for
    # 0.1 s every 0.3 s: each outage a comm-loss alarm, more than 10 in 10 minutes a flood.
    devices = f"""
[[devices]]
id = "probe"
driver = "vaisala-gmp251"
transport = {{ host = "127.0.0.1", port = {port}, interval = 0.05, timeout = 0.3 }}

[[devices]]
id = "gone"
driver = "vaisala-gmp251"
[devices.transport]
host = "127.0.0.1"
port = {free_port()}
interval = 0.05
timeout = 0.2
backoff_max = 0.2

[[devices]]
id = "flaky"
driver = "sim"
points.temperature = {{ parameter = "temperature", unit = "C", base = 37.0 }}
[devices.transport]
interval = 0.02
seed = 1
repeat = 0.3
outages = [{{ start = 0.2, duration = 0.1 }}]
"""
    site = load_site(write_site(tmp_path, devices))
    try:
        async with running(site) as daemon:
            await until(lambda: daemon.view.status()["flood"]["main"], within=15)
            url = f"http://{site.config.api.listen}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                text = await resp.text()
            status = daemon.view.status()
    finally:
        await modbus.stop()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))

    def metric(name: str, device: str, extra: str = "") -> float:
        return float(lines[f'{name}{{device="{device}"{extra}}}'])

    assert lines['pocd_alarm_flood{line="main"}'] == "1.0"
    assert status["devices"]["probe"]["samples"] > 0
    assert metric("pocd_device_samples_total", "probe") >= status["devices"]["probe"]["samples"]
    # every poll of the probe is timed; it answered each one
    reads = metric("pocd_device_read_seconds_count", "probe")
    assert reads >= 5 and metric("pocd_device_read_errors_total", "probe") == 0
    assert metric("pocd_device_read_seconds_bucket", "probe", ',le="+Inf"') == reads
    buckets = [
        float(v)
        for k, v in lines.items()
        if k.startswith('pocd_device_read_seconds_bucket{device="probe"')
    ]
    assert buckets == sorted(buckets) and len(buckets) == 12
    assert 0 < metric("pocd_device_read_seconds_sum", "probe") < reads * 0.3
    # the gone one's polls failed, and so did the sim device's reads in its outages
    assert metric("pocd_device_read_errors_total", "gone") >= 3
    assert metric("pocd_device_samples_total", "gone") > 0  # BAD ones: nothing is dropped
    assert (
        0
        < metric("pocd_device_read_errors_total", "flaky")
        < metric("pocd_device_read_seconds_count", "flaky")
    )
