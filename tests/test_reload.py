"""SIGHUP under a steady sample stream: a valid change applies with no gap in the devices it
left alone, an invalid one is refused and the old config keeps running."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from pocd.daemon import Daemon
from pocd.model import NS, AlarmState, ExcursionKind
from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import FAST_DEVICES, api, free_port, running, spawn_daemon, until, write_site
from tests.test_lines import LINES, lines_site

CHANNEL = f"""
[[sinks.email]]
name = "mail"
host = "127.0.0.1"
port = {free_port()}
security = "none"
from = "pocd@site.example"
to = ["ward@site.example"]
"""
ROUTE = """
[notify]
[[notify.routes]]
name = "ward"
channels = ["mail"]
"""


def samples_of(store_path: Path, device: str, point: str, column: str = "s.t") -> list[Any]:
    """`column` of each sample of the point, in order (s: the sample, c: its channel)."""
    db = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = db.execute(
            f"SELECT {column} FROM samples s JOIN channels c ON c.id = s.ch "
            "WHERE c.device = ? AND c.point = ? ORDER BY s.id",
            (device, point),
        ).fetchall()
    finally:
        db.close()
    return [value for (value,) in rows]


def times(store_path: Path, device: str, point: str) -> list[int]:
    return samples_of(store_path, device, point)


def line_audit(store_path: Path) -> list[tuple[str, str]]:
    with Store(store_path, readonly=True) as store:
        return [(e.action, e.target) for e in store.audit() if e.action.startswith("line.")]


def count(store_path: Path, device: str) -> int:
    return len(times(store_path, device, "temperature" if device == "incubator" else "ph"))


def audited(store_path: Path, action: str) -> list[dict[str, object]]:
    with Store(store_path, readonly=True) as store:
        return [
            {"new": e.new, "old": e.old, **e.details} for e in store.audit() if e.action == action
        ]


async def test_sighup_applies_a_device_change_and_a_route_and_refuses_an_invalid_config(
    tmp_path: Path,
) -> None:
    config = write_site(tmp_path, FAST_DEVICES, extra=CHANNEL)
    site = load_site(config)
    daemon = spawn_daemon(config)
    try:
        path = site.store_path
        await until(lambda: count(path, "incubator") >= 20 and count(path, "bioreactor") >= 20)
        status, before = await api(site, "GET", "/api/status")
        assert status == 200 and "notify" not in before["sinks"]

        # One device changed (the bioreactor's seed and interval), one alert route added.
        text = config.read_text()
        changed = text.replace("interval = 0.05, seed = 2", "interval = 0.1, seed = 3")
        assert changed != text
        config.write_text(changed + ROUTE)
        reloaded = time.time_ns()
        daemon.send_signal(signal.SIGHUP)
        await until(lambda: len(audited(path, "config.reload")) == 1)
        (entry,) = audited(path, "config.reload")
        assert entry["new"] == load_site(config).config_hash
        assert "devices" in str(entry["applied"]) and "notify" in str(entry["applied"])
        assert [d["new"] for d in audited(path, "driver.load")][-1]  # the restarted one's
        await asyncio.sleep(1.5)  # samples on both sides of the reload

        status, after = await api(site, "GET", "/api/status")
        assert after["sinks"]["notify"]["routes"] == ["ward"]

        # The incubator was left alone: its samples ran on through the reload without a gap.
        around = [t for t in times(path, "incubator", "temperature") if abs(t - reloaded) < 2 * NS]
        assert around[0] < reloaded < around[-1]
        gaps = [b - a for a, b in itertools.pairwise(around)]
        assert max(gaps) < 0.5 * NS, max(gaps) / NS
        # The bioreactor restarted at its new interval.
        later = [t for t in times(path, "bioreactor", "ph") if t > reloaded + NS // 2]
        assert len(later) >= 5
        spacing = [b - a for a, b in itertools.pairwise(later)]
        assert min(spacing) > 0.07 * NS

        # An invalid change: refused, audited, and the running config goes on.
        config.write_text(changed.replace('driver = "sim"', 'driver = "no-such-driver"', 1))
        daemon.send_signal(signal.SIGHUP)
        await until(lambda: len(audited(path, "config.reload.refused")) == 1)
        (refused,) = audited(path, "config.reload.refused")
        assert "no-such-driver" in str(refused["problems"])
        assert refused["old"] == entry["new"]
        going = count(path, "incubator")
        await until(lambda: count(path, "incubator") >= going + 10)
        assert daemon.poll() is None
        assert len(audited(path, "config.reload")) == 1
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0


NEW_LINES = """
[[lines]]
id = "line-b"
title = "Reactor B"
devices = ["reactor-b"]

[[lines]]
id = "line-c"
title = "Reactor A, alone"
devices = ["reactor-a"]
"""


async def test_a_reload_takes_lines_and_a_running_line_keeps_its_own_until_its_run_ends(
    tmp_path: Path,
) -> None:
    # Reactor A does not answer from 0.5 s on: an equipment comm-loss open on line A.
    site = lines_site(tmp_path, outages="[{ start = 0.5, duration = 600 }]")
    old_lines = LINES.format(standby="")
    assert old_lines in site.path.read_text()
    async with running(site) as daemon:
        status, run = await api(
            site, "POST", "/api/runs", {"line": "line-b", "batch_id": "P-B", "protocol": "EXPAND-B"}
        )
        assert status == 201, run
        await until(lambda: "reactor-a" in daemon.down)
        old_b = daemon.lines.states["line-b"].line

        # Line A left out, line C added (reactor A alone), line B (running) changed, and
        # reactor B's point made to feed another parameter.
        text = site.path.read_text().replace(old_lines, NEW_LINES)
        renamed = text.replace(
            'parameter = "ph", unit = "pH", base = 7.1, script',
            'parameter = "do", unit = "%-sat", base = 7.1, script',
        )
        assert renamed != text
        site.path.write_text(renamed)
        daemon.reload()
        reloaded = daemon.lines.states
        assert list(reloaded) == ["line-b", "line-c"]
        assert reloaded["line-b"].line == old_b and reloaded["line-b"].run is not None
        status, lines = await api(site, "GET", "/api/lines")
        assert [(x["id"], x["state"]) for x in lines] == [("line-b", "run"), ("line-c", "standby")]
        count = daemon.counts["samples"]
        await until(lambda: daemon.counts["samples"] > count + 20)
        await daemon.flush()
        audit = line_audit(site.store_path)
        assert ("line.remove", "line-a") in audit and ("line.add", "line-c") in audit
        assert ("line.standby", "line-c") in audit
        assert audit.count(("line.standby", "line-b")) == 1  # at the start, not again
        with Store(site.store_path, readonly=True) as store:
            # line A's outage ends with the line; line C, watching reactor A, has its own
            (gone,) = store.line_excursions("line-a")
            (now,) = store.line_excursions("line-c")
        assert gone.kind is now.kind is ExcursionKind.COMM_LOSS
        assert gone.end is not None and gone.end == now.start and now.end is None
        gone_alarms = [v for v in daemon.lines.alarms.view() if v.line == "line-a"]
        assert gone_alarms  # out of scope with their line
        assert all(v.state is AlarmState.SUPPRESSED and not v.active for v in gone_alarms)

        status, ended = await api(site, "POST", f"/api/runs/{run['id']}/stop", {})
        assert status == 200, ended
        assert daemon.lines.states["line-b"].line == daemon.site.lines["line-b"] != old_b
        assert daemon.lines.states["line-b"].line.devices == ["reactor-b"]
        count = daemon.counts["samples"]
        await until(lambda: daemon.counts["samples"] > count + 20)

        # Line C changed between runs: watched anew from the reload, its outage too.
        site.path.write_text(site.path.read_text().replace("Reactor A, alone", "Reactor A"))
        daemon.reload()
        assert daemon.lines.states["line-c"].line.title == "Reactor A"
        await daemon.flush()
        with Store(site.store_path, readonly=True) as store:
            first, second = store.line_excursions("line-c")
        assert first.end == second.start and second.end is None

    audit = line_audit(site.store_path)
    assert ("line.change", "line-c") in audit and ("line.change", "line-b") in audit
    assert audit.count(("line.standby", "line-b")) == 2  # and at the run's end, as it is now
    labels_followed_the_lines(site.store_path, ended["ended_ns"])


def labels_followed_the_lines(store_path: Path, run_ended: int) -> None:
    # The chamber was shared by lines A and B (a channel of no line), then line B's alone
    # until its run ended, then of no line again.
    lines = samples_of(store_path, "incubator", "temperature", "c.line")
    assert [line for line, _ in itertools.groupby(lines)] == ["", "line-b", ""]
    # reactor B's point fed "ph" on line B until its run ended (as the run's engine judged it)
    fed = samples_of(store_path, "reactor-b", "ph", "c.parameter || ' ' || s.t")
    names = [name.split()[0] for name in fed]
    assert [name for name, _ in itertools.groupby(names)] == ["ph", "do"]
    assert int(fed[names.index("do")].split()[1]) > run_ended


async def test_a_sighup_before_the_daemon_is_ready_is_applied_once_it_is(tmp_path: Path) -> None:
    site = lines_site(tmp_path)
    daemon = Daemon(site)
    site.path.write_text(site.path.read_text().replace(LINES.format(standby=""), NEW_LINES))
    daemon.reload()  # before the store is open and the lines resumed from it
    assert list(daemon.lines.states) == ["line-a", "line-b"]
    serving = asyncio.create_task(daemon.serve(handle_signals=False))
    try:
        await asyncio.wait_for(daemon.started.wait(), 20)
        assert list(daemon.lines.states) == ["line-b", "line-c"]
    finally:
        daemon.stop()
        await asyncio.wait_for(serving, 20)
    assert len(audited(site.store_path, "config.reload")) == 1
    audit = line_audit(site.store_path)
    # each line watched once from the start, line C once it was added, line A left out once
    assert sorted(audit) == sorted(
        [
            ("line.standby", "line-a"),
            ("line.standby", "line-b"),
            ("line.remove", "line-a"),
            ("line.add", "line-c"),
            ("line.standby", "line-c"),
            ("line.change", "line-b"),
            ("line.standby", "line-b"),
        ]
    )


async def test_a_run_orphaned_at_the_start_keeps_its_line_until_a_restart_resumes_it(
    tmp_path: Path,
) -> None:
    site = lines_site(tmp_path)
    both = LINES.format(standby="")
    line_a_only = both[: both.index("[[lines]]", both.index("line-a"))]
    async with running(site):
        status, run = await api(
            site, "POST", "/api/runs", {"line": "line-b", "batch_id": "P-B", "protocol": "EXPAND-B"}
        )
        assert status == 201, run
    # restarted without line B: its run is orphaned, still running, not monitored
    site.path.write_text(site.path.read_text().replace(both, line_a_only))
    async with running(load_site(site.path)) as daemon:
        assert list(daemon.lines.states) == ["line-a"]
        # line B is back by a reload: watched on standby, but no other run starts on it
        site.path.write_text(site.path.read_text().replace(line_a_only, both))
        daemon.reload()
        assert daemon.lines.states["line-b"].run is None
        body = {"line": "line-b", "batch_id": "P-B2", "protocol": "EXPAND-B"}
        status, refused = await api(site, "POST", "/api/runs", body)
        assert status == 409, refused
        assert f"run {run['id']}" in refused["error"] and "restart pocd" in refused["error"]
    with Store(site.store_path, readonly=True) as store:
        assert [i.code for i in store.incidents()].count("run-orphaned") == 1
    async with running(load_site(site.path)) as daemon:
        resumed = daemon.lines.states["line-b"].run
        assert resumed is not None and resumed.id == run["id"]
