"""Lines: several batches at once on their own protocols, a shared device judged on each line
it is in, and the equipment watched between runs. The real daemon with sim devices, the real
store and the HTTP API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pocd.errors import ConfigError
from pocd.model import MAIN_LINE, ExcursionKind
from pocd.settings import Site, load_site
from pocd.sinks.influxdb import InfluxSink
from pocd.store import Store
from tests.influxkit import ADMIN, Influxd, drained, sink_toml
from tests.sitekit import api, cli, running, until, write_site

# Time in the sim scripts is seconds since the device runner started (the daemon's start).
DEVICES = """
[[devices]]
id = "incubator"
driver = "sim"
transport = {{ interval = 0.05, seed = 1 }}
points.temperature = {{ parameter = "temperature", unit = "C", base = 37.0, script = {script} }}

[[devices]]
id = "reactor-a"
driver = "sim"
transport = {{ interval = 0.05, seed = 2, outages = {outages} }}
points.ph = {{ parameter = "ph", unit = "pH", base = 7.1 }}

[[devices]]
id = "reactor-b"
driver = "sim"
transport = {{ interval = 0.05, seed = 3 }}
points.ph = {{ parameter = "ph", unit = "pH", base = 7.1, script = {bad_b} }}
"""

LINES = """
[[lines]]
id = "line-a"
title = "Reactor A"
devices = ["reactor-a", "incubator"]
{standby}

[[lines]]
id = "line-b"
title = "Reactor B"
devices = ["reactor-b"]
points = {{ incubator = ["temperature"] }}
"""


def _protocol(pid: str, phases: list[str], temperature: str, *, kind: str = "batch") -> str:
    text = f"""
id = "{pid}"
version = "1"
title = "{pid}"
status = "approved"
kind = "{kind}"

[parameters.temperature]
unit = "C"
limits = {{ {temperature} }}

[parameters.ph]
unit = "pH"
limits = {{ action_low = 6.5, action_high = 7.7 }}
"""
    return text + "".join(f'\n[[phases]]\nid = "{p}"\n' for p in phases)


PROTOCOLS = {
    # line A's batch: the tighter action limit
    "wash-a.toml": _protocol("WASH-A", ["load", "wash"], "alert_high = 37.5, action_high = 38.0"),
    # line B's batch: only an alert at 37.2 for the same chamber
    "expand-b.toml": _protocol(
        "EXPAND-B", ["seed", "grow"], "alert_high = 37.2, action_high = 39.5"
    ),
    "chamber-standby.toml": _protocol(
        "CHAMBER-STANDBY",
        ["standby"],
        "alert_high = 37.5, action_high = 38.5",
        kind="standby",
    ),
}


def lines_site(
    folder: Path,
    *,
    script: str = "[]",
    outages: str = "[]",
    bad_b: str = "[]",
    standby: str = "",
) -> Site:
    devices = DEVICES.format(script=script, outages=outages, bad_b=bad_b)
    config = write_site(folder, devices, LINES.format(standby=standby))
    for name, text in PROTOCOLS.items():
        (folder / "protocols" / name).write_text(text)
    return load_site(config)


async def _start(site: Site, line: str, batch: str, protocol: str) -> dict[str, Any]:
    status, run = await api(
        site,
        "POST",
        "/api/runs",
        {"line": line, "batch_id": batch, "protocol": protocol},
    )
    assert status == 201, run
    return dict(run)


# --- config --------------------------------------------------------------------------------


def test_a_site_without_lines_has_one_line_of_every_device(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path))
    (line,) = site.lines.values()
    assert line.id == MAIN_LINE
    assert line.devices == ["bioreactor", "incubator"]
    assert line.sources["ph"] == ("bioreactor", "ph")
    assert site.point_lines()[("incubator", "temperature")] == MAIN_LINE


def test_lines_take_devices_and_points_and_a_point_may_be_shared(tmp_path: Path) -> None:
    site = lines_site(tmp_path, standby='standby = "CHAMBER-STANDBY"')
    a, b = site.lines["line-a"], site.lines["line-b"]
    assert a.standby == "CHAMBER-STANDBY" and b.standby is None
    # each line's "ph" is its own reactor's; the chamber's temperature counts for both
    assert a.sources == {"ph": ("reactor-a", "ph"), "temperature": ("incubator", "temperature")}
    assert b.sources == {"ph": ("reactor-b", "ph"), "temperature": ("incubator", "temperature")}
    lines_of = site.point_lines()
    assert ("incubator", "temperature") not in lines_of  # in two lines: no single line
    assert lines_of[("reactor-b", "ph")] == "line-b"


@pytest.mark.parametrize(
    ("lines", "key", "message"),
    [
        ('[[lines]]\nid = "x"\ndevices = ["nope"]', "lines[0].devices[0]", "unknown device"),
        (
            '[[lines]]\nid = "x"\npoints = { incubator = ["humidity"] }',
            "lines[0].points.incubator",
            "unknown point",
        ),
        (
            '[[lines]]\nid = "x"\ndevices = ["reactor-a", "reactor-b"]',
            "lines[0]",
            "parameter 'ph' is fed by both reactor-a.ph and reactor-b.ph",
        ),
        (
            '[[lines]]\nid = "x"\ndevices = ["reactor-a"]\nstandby = "WASH-A"',
            "lines[0].standby",
            "no approved standby protocol 'WASH-A'",
        ),
        (
            '[[lines]]\nid = "x"\ndevices = ["reactor-a"]\n[[lines]]\nid = "x"',
            "lines[1].id",
            "duplicate line",
        ),
        (
            '[run.phase_source]\ndevice = "reactor-a"\npoint = "ph"\nphases = { "1" = "load" }\n'
            '[[lines]]\nid = "x"\ndevices = ["reactor-a"]',
            "run.phase_source",
            "each line has its own phase_source",
        ),
    ],
)
def test_a_bad_line_names_its_key(tmp_path: Path, lines: str, key: str, message: str) -> None:
    config = write_site(tmp_path, DEVICES.format(script="[]", outages="[]", bad_b="[]"), lines)
    for name, text in PROTOCOLS.items():
        (tmp_path / "protocols" / name).write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_site(config)
    found = [p for p in caught.value.problems if p.key == key]
    assert found and message in found[0].message, caught.value.problems


# --- two batches at once -------------------------------------------------------------------


async def test_two_lines_run_two_batches_and_a_shared_device_counts_for_both(
    tmp_path: Path,
) -> None:
    # The chamber runs warm (38.2 C) from 2 s to 4 s: past A's action limit, past B's alert.
    script = '[{ start = 2, duration = 2, action = "offset", value = 1.2 }]'
    site = lines_site(tmp_path, script=script)
    async with running(site) as daemon:
        run_a = await _start(site, "line-a", "PATIENT-A", "WASH-A")
        run_b = await _start(site, "line-b", "PATIENT-B", "EXPAND-B")
        status, body = await _start_refused(site, "line-a", "PATIENT-C", "WASH-A")
        assert status == 409 and "still running on line line-a" in body["error"]
        status, body = await _start_refused(site, "line-b", "PATIENT-A", "EXPAND-B")
        assert status == 409 and "unique" in body["error"]  # a batch id once per site
        status, change = await api(
            site, "POST", f"/api/runs/{run_a['id']}/phase", {"phase": "wash"}
        )
        assert status == 200 and change["run"] == run_a["id"]
        status, lines = await api(site, "GET", "/api/lines")
        assert [(x["id"], x["run"]["id"], x["run"]["phase"]) for x in lines] == [
            ("line-a", run_a["id"], "wash"),
            ("line-b", run_b["id"], "seed"),
        ]

        def chamber_back() -> bool:
            temps = [
                p for p in daemon.view.points() if p.point == "temperature" and p.value is not None
            ]
            return daemon.counts["samples"] > 150 and all(p.value < 37.1 for p in temps)

        await until(lambda: daemon.lines.counts["excursions"] >= 3, within=15)
        await until(chamber_back, within=15)
        for run in (run_a, run_b):
            status, ended = await api(site, "POST", f"/api/runs/{run['id']}/stop", {})
            assert status == 200 and ended["status"] == "completed"

    shows = {}
    for run in (run_a, run_b):
        shown = cli("run", "show", "-c", str(site.path), run["id"], "--json")
        assert shown.returncode == 0, shown.stderr
        shows[run["id"]] = json.loads(shown.stdout)
    a, b = shows[run_a["id"]], shows[run_b["id"]]
    assert (a["line"], b["line"]) == ("line-a", "line-b")
    assert [p["phase"] for p in a["phases"]] == ["load", "wash"]
    assert [p["phase"] for p in b["phases"]] == ["seed"]
    # each run lists only its own records, judged by its own protocol's limits
    assert {(e["kind"], e["limit"], e["phase"]) for e in a["excursions"]} == {
        ("alert-high", 37.5, "wash"),
        ("action-high", 38.0, "wash"),
    }
    assert {(e["kind"], e["limit"]) for e in b["excursions"]} == {("alert-high", 37.2)}
    assert all(e["parameter"] == "temperature" for e in a["excursions"] + b["excursions"])
    assert [d["cause"] for d in a["deviations"]] == ["action-limit"]
    assert b["deviations"] == []
    with Store(site.store_path, readonly=True) as store:
        ids = {e.id for e in store.excursions(run_a["id"])} | {
            e.id for e in store.excursions(run_b["id"])
        }
        assert len(ids) == 3  # three excursions, none shared between the runs
        # the shared chamber's readings are stored once, not once per line
        times = [t for ch, t in _sample_times(store) if ch == ("incubator", "temperature")]
        assert times and len(times) == len(set(times))


async def _start_refused(site: Site, line: str, batch: str, protocol: str) -> Any:
    body = {"line": line, "batch_id": batch, "protocol": protocol}
    return await api(site, "POST", "/api/runs", body)


def _sample_times(store: Store) -> list[tuple[tuple[str, str], int]]:
    channels, _ = store.sample_codes()
    rows = store.sample_rows(1, store.sample_count())
    return [(channels[key >> 32][:2], int(t)) for key, _, t in rows]


# --- between runs --------------------------------------------------------------------------


async def test_the_equipment_is_watched_between_runs(tmp_path: Path) -> None:
    # From 1 s to 2.5 s the chamber reaches 38.2 C (past the standby alert limit, 37.5); from
    # 1 s to 3 s reactor A does not answer; reactor B (line B has no standby protocol) is
    # still watched for comm-loss. From 5 s the chamber is warm again, for long.
    script = (
        '[{ start = 1, duration = 1.5, action = "offset", value = 1.2 }, '
        '{ start = 5, duration = 60, action = "offset", value = 1.2 }]'
    )
    outages = "[{ start = 1, duration = 2 }]"
    bad_b = '[{ start = 1, duration = 1, action = "bad" }]'
    standby = 'standby = "CHAMBER-STANDBY"'
    site = lines_site(tmp_path, script=script, outages=outages, bad_b=bad_b, standby=standby)
    async with running(site) as daemon:
        status, lines = await api(site, "GET", "/api/lines")
        assert [(x["id"], x["state"], x["standby"]["protocol"]) for x in lines] == [
            ("line-a", "standby", "CHAMBER-STANDBY 1"),
            ("line-b", "standby", "pocd-equipment-watch 1"),
        ]

        def chamber_on_a(kind: str) -> bool:
            return any(
                p.line == "line-a" and p.point == "temperature" and kind in p.state
                for p in daemon.view.points()
            )

        # the first warm stretch comes and goes; during the second an equipment excursion is
        # open when the run starts
        await until(lambda: chamber_on_a("alert-high"), within=10)
        await until(lambda: not chamber_on_a("alert-high"), within=10)
        await until(lambda: chamber_on_a("alert-high"), within=10)
        run = await _start(site, "line-a", "PATIENT-A", "WASH-A")
        await until(lambda: chamber_on_a("action-high"), within=10)
        status, _ = await api(site, "POST", f"/api/runs/{run['id']}/stop", {})
        assert status == 200
        await until(lambda: not chamber_on_a("action-high") and chamber_on_a("alert-high"))

    with Store(site.store_path, readonly=True) as store:
        equipment = store.line_excursions("line-a")
        kinds = [(e.parameter, e.kind) for e in equipment]
        assert ("ph", ExcursionKind.COMM_LOSS) in kinds
        chamber = [e for e in equipment if e.parameter == "temperature"]
        assert [e.kind for e in chamber[:2]] == [ExcursionKind.ALERT_HIGH] * 2
        assert all(e.run_id is None and e.protocol_id == "CHAMBER-STANDBY" for e in equipment)
        # the standby excursion open at the start ends there; the run judges anew, by its own
        # limits (its action limit 38.0), from the start
        started = run["started_ns"]
        assert chamber[1].end == started
        judged = {e.kind: e for e in store.excursions(run["id"])}
        assert set(judged) == {ExcursionKind.ALERT_HIGH, ExcursionKind.ACTION_HIGH}
        assert all(e.start >= started and e.line == "line-a" for e in judged.values())
        assert [d.cause.value for d in store.deviations(run["id"])] == ["action-limit"]
        # after the run the standby limits apply again: the chamber is still warm
        after = [e for e in chamber if e.start >= judged[ExcursionKind.ALERT_HIGH].end]
        assert after and after[0].kind is ExcursionKind.ALERT_HIGH
        # line B, with no standby protocol, still records bad quality (and comm-loss)
        watched = store.line_excursions("line-b")
        assert [(e.parameter, e.kind, e.protocol_id) for e in watched] == [
            ("ph", ExcursionKind.BAD_QUALITY, "pocd-equipment-watch")
        ]
        assert store.line_deviations("line-a") == []


# --- what the control site finds in InfluxDB ------------------------------------------------


async def test_the_control_site_finds_every_sample_of_one_batch_in_influxdb(
    tmp_path: Path, influxd: Influxd, database: str
) -> None:
    """The README's queries: a batch's run gives its line and time window; the samples of
    the line's own points carry its run; a shared device's are found by the window."""
    devices = DEVICES.format(script="[]", outages="[]", bad_b="[]")
    config = write_site(tmp_path, devices, sink_toml(influxd, database) + LINES.format(standby=""))
    (tmp_path / "password.txt").write_text(ADMIN[1] + "\n")
    for name, text in PROTOCOLS.items():
        (tmp_path / "protocols" / name).write_text(text)
    site = load_site(config)
    async with running(site) as daemon:
        counted = daemon.counts
        await until(lambda: counted["samples"] >= 30)
        run_a = await _start(site, "line-a", "PATIENT-A", "WASH-A")
        run_b = await _start(site, "line-b", "PATIENT-B", "EXPAND-B")
        mark = counted["samples"]
        await until(lambda: counted["samples"] >= mark + 60)
        await api(site, "POST", f"/api/runs/{run_a['id']}/stop", {})
        mark = counted["samples"]
        await until(lambda: counted["samples"] >= mark + 30)
        await api(site, "POST", f"/api/runs/{run_b['id']}/stop", {})
        mark = counted["samples"]
        await until(lambda: counted["samples"] >= mark + 30)
        await daemon.flush()
        (sink,) = daemon.sinks
        assert isinstance(sink, InfluxSink)
        await drained(sink, site)
        sent = sink.status()["cursors"]["samples"]  # the devices go on until the daemon stops

    with Store(site.store_path, readonly=True) as store:
        stored = [s for _, s in store.samples()][:sent]
        marks = {run.id: (first, end) for run, first, end in store.commit_marks()[0]}
    assert influxd.count(database) == len(stored)
    for run, own in ((run_a, "reactor-a"), (run_b, "reactor-b")):
        # 1. the batch's run: its line, and its window from its start (the point's time) to
        # its end (the `ended` field)
        (point,) = influxd.query(
            f'SELECT "ended" FROM "pocd_run" WHERE "batch" = \'{run["batch_id"]}\' '
            'GROUP BY "line", "run"',
            database,
        )
        assert point["tags"] == {"line": run["line"], "run": run["id"]}
        started, ended = point["values"][0]
        # 2. the samples of the line's own points carry the run: every one the engine
        # judged in it, by commit order, and none of another line's
        tagged = influxd.query(
            f'SELECT count("quality") FROM "pocd_sample" WHERE "run" = \'{run["id"]}\' '
            'GROUP BY "device"',
            database,
        )
        assert {s["tags"]["device"]: s["values"][0][1] for s in tagged} == {
            own: sum(
                1
                for i, s in enumerate(stored, start=1)
                if s.device == own and marks[run["id"]][0] <= i < (marks[run["id"]][1] or 0)
            )
        }
        # 3. a device the line shares (the chamber) carries no line: its samples of the
        # batch are those of the window
        (shared,) = influxd.query(
            'SELECT count("quality") FROM "pocd_sample" WHERE "device" = \'incubator\' '
            f"AND time >= {started} AND time <= {ended}",
            database,
        )
        assert shared["values"][0][1] == sum(
            1 for s in stored if s.device == "incubator" and started <= s.t <= ended
        )
    (untagged,) = influxd.query(
        'SELECT count("quality") FROM "pocd_sample" WHERE "device" = \'incubator\' '
        "AND \"line\" = ''",
        database,
    )
    assert untagged["values"][0][1] == sum(1 for s in stored if s.device == "incubator")
