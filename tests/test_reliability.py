"""Regression tests of issue 11 in the running daemon: a bad record, a bad phase value, a slow or
failing store, a changed protocol, a restart without a phase, concurrent control, clock jumps.

Where a store fault is needed (a full or dead disk) it is injected by wrapping `Store.write` in
the daemon's own process, and the wrapper says so in its name: a real failing disk cannot be
made on demand here. Everything else is the real daemon with real sim devices, store and API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pocd.errors import StoreError
from pocd.model import (
    NS,
    CommStatus,
    DeviationCause,
    ExcursionKind,
    IncidentKind,
    PhaseChange,
    Run,
    Sample,
    SiteStatus,
    now_ns,
)
from pocd.settings import load_site
from pocd.signatures import Signer
from pocd.store import Store
from tests.sitekit import api, bearer, engine_of, run_of, running, until, write_site

ONE_DEVICE = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 0.05, seed = 1 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }
"""

START = {"batch_id": "B-1", "protocol": "CART-TCT"}


async def timed(call: Any) -> tuple[float, Any]:
    began = time.monotonic()
    result = await call
    return time.monotonic() - began, result


def slow_store(store: Store, seconds: float) -> None:
    """Fault injection: every commit takes `seconds` longer (a disk that crawls), holding the
    store's lock as a slow commit does."""
    write = store.write

    def crawling_disk_write(records: Any) -> None:
        with store._lock:
            time.sleep(seconds)
        write(records)

    store.write = crawling_disk_write  # type: ignore[method-assign]


# --- item 1: one bad record must not stop every later write ------------------------------------


async def test_a_record_the_store_cannot_hold_does_not_stop_later_writes(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    async with running(site) as daemon:
        assert daemon.store is not None
        # what an OPC UA server's DateTime.MaxValue made on 484da67: beyond SQLite's int64
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), 37.0, device_t=2**64))
        await until(lambda: daemon.incident_counts["store"] >= 1)
        before = daemon.store.sample_count()
        elapsed, (status, _) = await timed(api(site, "POST", "/api/runs", START))
        assert status == 201 and elapsed < 2.0
        elapsed, (status, _) = await timed(api(site, "POST", "/api/run/stop", {}))
        assert status == 200 and elapsed < 2.0
        await until(lambda: daemon.store is not None and daemon.store.sample_count() > before + 20)
    with Store(site.store_path, readonly=True) as store:
        (refused,) = [i for i in store.incidents() if i.code == "record-rejected"]
        assert "device_t=18446744073709551616" in refused.message  # the reading is kept


async def test_a_control_call_on_a_dead_store_answers_in_bounded_time(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    async with running(site) as daemon:
        assert daemon.store is not None
        await bearer(site.config.api.listen)  # logged in while the store still commits
        store, write = daemon.store, daemon.store.write

        def dead_disk_write(records: Any) -> None:  # fault injection: every commit fails
            raise StoreError("disk I/O error (injected)")

        store.write = dead_disk_write  # type: ignore[method-assign]
        elapsed, (status, body) = await timed(api(site, "POST", "/api/runs", START))
        assert elapsed < 8.0
        assert status == 503, body
        assert "not committed within 5 s" in body["error"]
        assert "disk I/O error" in body["error"]
        store.write = write  # type: ignore[method-assign]  # the disk is back
        await until(lambda: daemon.pending_count < 100, within=15)
    with Store(site.store_path, readonly=True) as stored:
        (run,) = stored.runs()  # what the operator did was kept and committed
        assert run.batch_id == "B-1"


# --- item 2: a phase value the running protocol lacks ------------------------------------------

CRYO_DRAFT = """
id = "CART-CRYO"
version = "0.1"
title = "Cryopreservation (draft)"
status = "draft"
[parameters.temperature]
unit = "C"
[[phases]]
id = "cryopreservation"
"""


async def test_a_phase_value_the_running_protocol_lacks_is_a_data_incident(tmp_path: Path) -> None:
    devices = (
        """
[[devices]]
id = "rotea"
driver = "sim"
transport = { interval = 0.05 }
points.step = { unit = "", base = 1, script = [
  { start = 0.0, duration = 0.6, action = "set", value = 1 },
  { start = 0.6, duration = 100, action = "set", value = 9 },
] }
"""
        + ONE_DEVICE
    )
    extra = """
[run.phase_source]
device = "rotea"
point = "step"
phases = { "1" = "enrichment", "9" = "cryopreservation" }
"""
    config = write_site(tmp_path, devices, extra)
    (tmp_path / "protocols" / "cart-cryo-0.1.toml").write_text(CRYO_DRAFT)
    site = load_site(config)
    async with running(site) as daemon:
        assert (await api(site, "POST", "/api/runs", START))[0] == 201
        await until(lambda: daemon.incident_counts["rotea"] >= 1)
        await asyncio.sleep(0.5)  # many readings of the value: still one incident
        assert engine_of(daemon) is not None and engine_of(daemon).phase == "enrichment"
        status, _ = await api(site, "POST", "/api/run/stop", {})
        assert status == 200
    with Store(site.store_path, readonly=True) as store:
        (incident,) = [i for i in store.incidents() if i.code == "phase-unknown"]
        assert incident.kind is IncidentKind.DATA
        assert "step = 9" in incident.message and "'cryopreservation'" in incident.message


async def test_an_engine_error_is_a_software_incident_and_samples_are_kept(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    async with running(site) as daemon:
        assert (await api(site, "POST", "/api/runs", START))[0] == 201
        engine = engine_of(daemon)
        assert engine is not None

        def broken_on_sample(sample: Sample) -> list[Any]:  # fault injection: an engine bug
            raise ZeroDivisionError("a bug in the engine")

        engine.on_sample = broken_on_sample  # type: ignore[method-assign]
        count = daemon.counts["samples"]
        await until(lambda: daemon.counts["samples"] > count + 20)
        status, live = await api(site, "GET", "/api/status")
        assert status == 200 and live["engine_errors"] > 20
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
    with Store(site.store_path, readonly=True) as store:
        (incident,) = [i for i in store.incidents() if i.code == "engine-failed"]
        assert incident.kind is IncidentKind.SOFTWARE and "ZeroDivisionError" in incident.message
        assert store.sample_count() >= daemon.counts["samples"]


async def test_an_infinite_phase_source_value_does_not_stop_the_daemon(tmp_path: Path) -> None:
    extra = """
[run.phase_source]
device = "incubator"
point = "temperature"
phases = { "1" = "enrichment" }
"""
    site = load_site(write_site(tmp_path, ONE_DEVICE, extra))
    async with running(site) as daemon:
        assert (await api(site, "POST", "/api/runs", START))[0] == 201
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), float("inf")))
        count = daemon.counts["samples"]
        await until(lambda: daemon.counts["samples"] > count + 5)
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200


# --- item 4: back-pressure from the store -------------------------------------------------------


async def test_a_store_that_does_not_keep_up_holds_readings_back_and_says_so(
    tmp_path: Path,
) -> None:
    site = load_site(write_site(tmp_path))  # five points every 50 ms
    async with running(site) as daemon:
        assert daemon.store is not None
        await bearer(site.config.api.listen)  # logged in while the store still commits
        daemon.writer.high_water = 40
        slow_store(daemon.store, 0.5)
        await until(lambda: not daemon.writer.room.is_set(), within=10)
        status, live = await api(site, "GET", "/api/status")
        assert status == 200 and live["store"]["keeping_up"] is False
        status, metrics = await api_text(site, "/metrics")
        assert "pocd_store_keeping_up 0.0" in metrics
        waiting = daemon.pending_count
        await asyncio.sleep(0.5)
        assert daemon.pending_count < waiting + 40, "the engine took no more readings"
        daemon.writer.high_water = 10_000
        await until(daemon.writer.room.is_set, within=15)
    with Store(site.store_path, readonly=True) as store:
        codes = [i.code for i in store.incidents()]
        assert "store-backlog" in codes and "store-caught-up" in codes


async def api_text(site: Any, path: str) -> tuple[int, str]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{site.config.api.listen}{path}") as resp,
    ):
        return resp.status, await resp.text()


# --- item 8: a run resumes on the exact protocol it started with --------------------------------


async def test_a_run_resumes_on_its_protocol_after_the_file_was_superseded(tmp_path: Path) -> None:
    config = write_site(tmp_path, ONE_DEVICE)
    site = load_site(config)
    async with running(site):
        assert (await api(site, "POST", "/api/runs", START))[0] == 201
    # document control: v3.1 is superseded by v3.2 (which changes v3.1's hash)
    old = tmp_path / "protocols" / "cart-tct-3.1.toml"
    text = old.read_text()
    old.write_text(text.replace('status = "approved"', 'status = "superseded"'))
    (tmp_path / "protocols" / "cart-tct-3.2.toml").write_text(
        text.replace('version = "3.1"', 'version = "3.2"')
    )
    site = load_site(config)
    async with running(site) as daemon:
        assert engine_of(daemon) is not None, "the run is monitored"
        assert engine_of(daemon).protocol.version == "3.1"
        assert engine_of(daemon).protocol.status.value == "approved"  # as it was at the start
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        assert all(e.end is not None for e in store.excursions(run.id))


async def test_a_run_whose_protocol_is_gone_opens_a_deviation_and_closes_what_was_open(
    tmp_path: Path,
) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    t = now_ns() - 60 * NS
    run = Run("r-lost", "B-7", site.id, "UTC", "CART-TCT", "2.0", "f" * 64, "op", t)
    with Store(site.store_path) as store:  # a run started by an older pocd on a lost file
        store.write([run, PhaseChange(run.id, t, "enrichment", None, "op")])
    async with running(site) as daemon:
        assert engine_of(daemon) is None and run_of(daemon) is not None
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
    with Store(site.store_path, readonly=True) as store:
        (deviation,) = store.deviations(run.id)
        assert deviation.cause is DeviationCause.PROTOCOL_MISSING


# --- item 12: a run committed without its first phase -------------------------------------------


async def test_a_run_without_a_phase_record_resumes_in_its_first_phase(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    proto = site.protocol("CART-TCT")
    t = now_ns() - 5 * NS
    run = Run("r-1", "B-1", site.id, "UTC", proto.id, proto.version, proto.hash, "op", t)
    with Store(site.store_path) as store:
        store.write([run])
    async with running(site) as daemon:
        assert engine_of(daemon) is not None and engine_of(daemon).phase == "enrichment"
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
    with Store(site.store_path, readonly=True) as store:
        (phase,) = store.phases(run.id)
        assert (phase.phase, phase.t) == ("enrichment", t)
        assert "phase-restored" in [i.code for i in store.incidents()]


# --- item 15: run control does not read the store on the event loop -----------------------------


async def test_the_event_loop_turns_while_the_store_commits(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    async with running(site) as daemon:
        assert daemon.store is not None
        slow_store(daemon.store, 1.0)
        loop = asyncio.get_running_loop()
        stalls: list[float] = []

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.01)
                stalls.append(loop.time() - last)
                last = loop.time()

        ticking = asyncio.create_task(ticker())
        try:
            await asyncio.sleep(0.3)  # a commit is under way in the writer thread
            await daemon.lines.start_run("B-1", "CART-TCT", None, "op")  # looks up the site status
            signer = Signer("cs", "Control Site", "performed")
            await daemon.lines.set_site_status(
                SiteStatus.SUSPENDED, "cs", "audit", signature=signer
            )
        finally:
            ticking.cancel()
        assert max(stalls) < 0.5, f"the event loop stalled {max(stalls):.2f} s"


# --- item 16: the audit trail describes the running config --------------------------------------


async def test_a_reload_audits_what_it_applied_and_what_waits_for_a_restart(
    tmp_path: Path,
) -> None:
    config = write_site(tmp_path, ONE_DEVICE)
    site = load_site(config)
    async with running(site) as daemon:
        text = config.read_text().replace("interval = 0.05", "interval = 0.1")
        config.write_text(text.replace('flush_interval = "50ms"', 'flush_interval = "60ms"'))
        daemon.reload()
        await daemon.flush()
    with Store(site.store_path, readonly=True) as store:
        (reload,) = [a for a in store.audit() if a.action == "config.reload"]
        assert reload.old == site.config_hash  # what was running
        assert reload.new == load_site(config).config_hash
        assert reload.details["applied"] == "devices, drivers_dir, lines, notify, protocols, sinks"
        assert reload.details["not applied until restart"] == "store"
        # the driver of the device restarted, as at the load before
        drivers = [a for a in store.audit() if a.action == "driver.load"]
        assert [(d.target, d.new) for d in drivers] == [
            ("sim", site.devices["incubator"].driver.hash)
        ] * 2


# --- item 21: an outage across restarts is one excursion ----------------------------------------


async def test_an_outage_across_restarts_is_one_comm_loss_excursion(tmp_path: Path) -> None:
    silent = ONE_DEVICE.replace(
        "seed = 1 }", "seed = 1, outages = [{ start = 0, duration = 3600 }] }"
    )
    site = load_site(write_site(tmp_path, silent))
    async with running(site) as daemon:
        assert (await api(site, "POST", "/api/runs", START))[0] == 201
        await until(lambda: bool(engine_of(daemon) and engine_of(daemon).open_excursions()))
    for _ in range(2):  # two restarts while the device is silent
        async with running(site):
            await asyncio.sleep(0.2)
    with Store(site.store_path, readonly=True) as store:
        (run,) = store.runs()
        losses = [e for e in store.excursions(run.id) if e.kind is ExcursionKind.COMM_LOSS]
        assert len(losses) == 1, losses
        assert losses[0].end is None  # still going on


# --- item 22: concurrent control ------------------------------------------------------------


async def test_concurrent_site_status_changes_make_one_audit_entry(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, ONE_DEVICE))
    body = {"status": "suspended", "reason": "inspection", "signature": True}
    async with running(site):
        answers = await asyncio.gather(
            api(site, "POST", "/api/site/status", body),
            api(site, "POST", "/api/site/status", body),
            api(site, "POST", "/api/runs", START),
        )
    statuses = sorted(status for status, _ in answers[:2])
    assert statuses == [200, 409]
    with Store(site.store_path, readonly=True) as store:
        audit = [a for a in store.audit() if a.action in ("site.status", "run.start")]
        assert [a.action for a in audit].count("site.status") == 1
        if answers[2][0] == 201:  # the run started first: the suspension came after it
            assert [a.action for a in audit] == ["run.start", "site.status"]
        else:
            assert answers[2][0] == 409 and "suspended" in answers[2][1]["error"]


# --- item 9: a clock jump in the running daemon ---------------------------------------------


async def test_a_forward_clock_step_opens_no_stale_data_and_no_deviation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pocd import daemon as daemon_module

    site = load_site(write_site(tmp_path, devices=""))
    from pocd.daemon import Daemon

    daemon = Daemon(site)
    daemon.store = daemon.writer.store = Store(site.store_path)
    try:
        await daemon.lines.start_run("B-1", "CART-TCT", None, "op")
        jumped = 0

        def wall() -> int:
            return time.time_ns() + jumped

        monkeypatch.setattr(daemon_module, "now_ns", wall)

        def feed(n: int, read: Callable[[], int]) -> None:
            for _ in range(n):
                t = read()
                daemon._take([Sample("incubator", "temperature", t, 37.0)], daemon._read_clock())
                time.sleep(0.01)

        feed(10, wall)
        jumped = 3600 * NS  # NTP steps the clock an hour forward
        feed(10, wall)
        assert engine_of(daemon) is not None
        for _ in range(3):
            daemon.lines.tick(daemon._read_clock())
        await daemon.lines.stop_run("op")
        await daemon.flush()
        runs = daemon.store.runs()
        assert runs[0].status.value == "completed"
        assert daemon.store.excursions(runs[0].id) == []
        assert daemon.store.deviations(runs[0].id) == []
        (jump,) = [i for i in daemon.store.incidents() if i.code == "clock-jump"]
        assert jump.kind is IncidentKind.CLOCK and "+3600" in jump.message
    finally:
        daemon.store.close()


# --- item 6 (the daemon's part): a runner that cannot even be built -----------------------


async def test_a_runner_that_cannot_be_built_stops_only_its_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from pocd import daemon as daemon_module

    real = daemon_module.get_transport

    def get_transport_with_a_broken_runner(name: str) -> Any:  # fault injection
        spec = real(name)

        def runner(device: Any) -> Any:
            if device.id == "bioreactor":
                raise ValueError("a bug building the runner")
            return spec.runner(device)

        return replace(spec, runner=runner)

    monkeypatch.setattr(daemon_module, "get_transport", get_transport_with_a_broken_runner)
    site = load_site(write_site(tmp_path))
    async with running(site) as daemon:
        await until(lambda: daemon.incident_counts["bioreactor"] >= 1)
        count = daemon.counts["samples"]
        await until(lambda: daemon.counts["samples"] > count + 20)
        assert (await api(site, "GET", "/api/status"))[0] == 200
    with Store(site.store_path, readonly=True) as store:
        (failed,) = [i for i in store.incidents() if i.code == "runner-failed"]
        assert failed.source == "bioreactor" and "a bug building the runner" in failed.message
        assert [s for _, s in store.samples(device="incubator")]


async def test_a_stored_protocol_that_no_longer_loads_leaves_the_run_unmonitored(
    tmp_path: Path,
) -> None:
    from pocd.model import ProtocolText

    site = load_site(write_site(tmp_path, ONE_DEVICE))
    t = now_ns() - 60 * NS
    run = Run("r-old", "B-8", site.id, "UTC", "CART-TCT", "2.0", "e" * 64, "op", t)
    with Store(site.store_path) as store:  # kept by an older pocd that checked less
        store.write(
            [
                run,
                PhaseChange(run.id, t, "enrichment", None, "op"),
                ProtocolText("e" * 64, "CART-TCT", "2.0", 'id = "CART-TCT"\nstatus = "odd"\n'),
            ]
        )
    for _ in range(2):  # the daemon starts, and again: one deviation, not one per start
        async with running(site) as daemon:
            assert engine_of(daemon) is None and run_of(daemon) is not None
    with Store(site.store_path, readonly=True) as store:
        (deviation,) = store.deviations(run.id)
        assert deviation.cause is DeviationCause.PROTOCOL_MISSING


async def test_a_reading_stamped_before_the_clock_stepped_back_is_judged_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pocd import daemon as daemon_module
    from pocd.daemon import Daemon

    site = load_site(write_site(tmp_path, devices=ONE_DEVICE))
    daemon = Daemon(site)
    daemon.store = daemon.writer.store = Store(site.store_path)
    try:
        await daemon.lines.start_run("B-1", "CART-TCT", None, "op")
        engine = engine_of(daemon)
        assert engine is not None
        before = time.time_ns()
        daemon._take([Sample("incubator", "temperature", before, 37.0)], daemon._read_clock())
        monkeypatch.setattr(daemon_module, "now_ns", lambda: time.time_ns() - 3600 * NS)
        wall = daemon._read_clock()  # the step back is seen: the engine's clocks move back
        # readings stamped before the step, still in the inbox
        daemon._take([CommStatus("incubator", before + 1, ok=False)], wall)
        daemon._take([CommStatus("incubator", before + 2, ok=True)], wall)
        daemon._take([Sample("incubator", "temperature", before + 3, 37.0)], wall)
        assert max(p.now for p in engine._params.values()) <= wall, "judged in the future"
    finally:
        daemon.store.close()
