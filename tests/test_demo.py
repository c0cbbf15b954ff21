"""`pocd demo` as a new user runs it: to the end, stopped with Ctrl-C, too short, longer; and
its live view."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from pocd.model import ExcursionKind, Quality
from pocd.settings import load_site
from pocd.status import PointStatus
from pocd.store import Store
from tests.sitekit import cli


def test_demo_provokes_an_alert_and_an_action_deviation(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    done = cli("demo", "--seconds", "91", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert "The data is in" in done.stdout
    config = data / "pocd.toml"
    assert f"run list -c {config}" in done.stdout
    runs = json.loads(cli("run", "list", "-c", str(config), "--json").stdout)
    assert [(r["line"], r["protocol_id"], r["status"]) for r in runs] == [
        ("prodigy", "CART-TCT", "completed"),
        ("cocoon", "CAR-T-EXPAND", "completed"),
        ("cocoon", "CAR-T-EXPAND", "completed"),
    ]
    run, first, second = runs
    detail = json.loads(cli("run", "show", "-c", str(config), run["id"], "--json").stdout)
    assert [p["phase"] for p in detail["phases"]] == [
        "enrichment",
        "activation",
        "transduction",
        "expansion",
        "harvest",
        "formulation",
    ]
    kinds = {(e["parameter"], e["kind"]) for e in detail["excursions"]}
    assert ("temperature", "alert-high") in kinds
    assert ("ph", "action-low") in kinds
    assert ("co2", "bad-quality") in kinds
    assert ("ph", "comm-loss") in kinds
    assert [d["cause"] for d in detail["deviations"]] == ["action-limit"]
    # The shared chamber's warm stretch is the CAR-T run's alert, and on the Cocoon line,
    # between its two runs, an equipment excursion judged by the standby protocol.
    with Store(data / "pocd.sqlite", readonly=True) as store:
        (equipment,) = [
            e for e in store.line_excursions("cocoon") if e.kind is ExcursionKind.ALERT_HIGH
        ]
    assert equipment.parameter == "temperature"
    assert (equipment.protocol_id, equipment.run_id) == ("CHAMBER-STANDBY", None)
    assert first["ended_ns"] < equipment.start < equipment.end < second["started_ns"]
    for cocoon in (first, second):
        shown = json.loads(cli("run", "show", "-c", str(config), cocoon["id"], "--json").stdout)
        assert shown["excursions"] == [] and shown["deviations"] == []
    # the excursions are alarms, and the demo operator acknowledged the first, with a note
    with Store(data / "pocd.sqlite", readonly=True) as store:
        raised = [e for e in store.alarm_events() if e.transition.value == "activate"]
        (acked,) = [a for a in store.audit() if a.action == "alarm.acknowledge"]
    assert {(e.source, e.kind) for e in raised} >= {("temperature", "alert-high")}
    assert (acked.actor, acked.reason.startswith("seen on the live view")) == (
        "demo-operator",
        True,
    )
    assert "demo-operator acknowledged the alarm" in done.stdout
    # the local webhook receiver printed each signed notification it got
    assert (
        "webhook received (signature checked): medium activate prodigy/temperature" in done.stdout
    )
    assert "webhook received (signature checked): medium acknowledge" in done.stdout
    got = int(done.stdout.split("webhook receiver got ")[1].split()[0])
    assert got >= 2


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocd", "demo", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = data / "pocd.sqlite"
    deadline = time.monotonic() + 30
    while not (
        store.exists()
        and json.loads(cli("run", "list", "-c", str(data / "pocd.toml"), "--json").stdout or "[]")
    ):
        assert time.monotonic() < deadline, "the demo's run did not start"
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "The data is in" in out
    runs = json.loads(cli("run", "list", "-c", str(data / "pocd.toml"), "--json").stdout)
    assert runs and all(run["status"] == "completed" for run in runs)


def test_a_demo_shorter_than_its_script_is_refused(tmp_path: Path) -> None:
    """`--seconds 40` used to run 40 s of a 90 s script: no deviation, no phase past
    activation. Refused at once instead, saying how long the script needs."""
    data = tmp_path / "demo"
    done = cli("demo", "--seconds", "40", "--data-dir", str(data))
    assert done.returncode == 2
    assert "40 s is too short for the demo's script: it needs at least 90 s" in done.stderr
    assert not data.exists(), "nothing was started"


@pytest.mark.parametrize("seconds", [90.0, 91.0, 180.0, 600.0])
def test_a_longer_demo_stretches_its_script_and_every_fault_keeps_its_phase(
    tmp_path: Path, seconds: float
) -> None:
    from pocd.demo import DemoScript, write_demo_site

    script = DemoScript.for_seconds(seconds)
    steps = script.rotea_steps()
    assert [step for _, step in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1][0] + script.phase_seconds == pytest.approx(seconds, abs=0.01)
    phases = ["enrichment", "activation", "transduction", "expansion", "harvest", "formulation"]

    def phase_of(start: float, duration: float) -> str:
        (phase,) = {
            phases[int(t // script.phase_seconds)] for t in (start, start + duration - 0.001)
        }
        return phase

    config = write_demo_site(
        tmp_path,
        script,
        rotea_endpoint="opc.tcp://127.0.0.1:4840",
        co2_port=5020,
        ph_port=str(tmp_path / "ph.pty"),
        heracell_port=str(tmp_path / "heracell.pty"),
        balance_port=str(tmp_path / "balance.pty"),
    )
    load_site(config)  # the stretched site config is valid
    with config.open("rb") as fh:
        devices = {d["id"]: d for d in tomllib.load(fh)["devices"]}
    incubator = devices["incubator"]
    assert incubator["transport"]["repeat"] == pytest.approx(seconds)
    (warm,) = incubator["points"]["temperature"]["script"]
    assert phase_of(warm["start"], warm["duration"]) == "transduction"
    assert warm["duration"] > 10, "longer than the temperature's on-delay"
    (startup,) = script.co2_faults()
    assert startup.duration is not None
    assert phase_of(startup.after, startup.duration) == "activation"
    low_ph, silence = script.ph_faults()
    assert low_ph.duration is not None and silence.duration is not None
    assert phase_of(low_ph.after, low_ph.duration) == "expansion"
    assert low_ph.duration > 5, "longer than the pH's on-delay"
    assert phase_of(silence.after, silence.duration) == "harvest"


def test_the_live_view_shows_a_text_point_as_its_text() -> None:
    from pocd.demo import value_cell

    protocol_name = PointStatus(
        device="rotea",
        point="protocol_name",
        parameter=None,
        unit="",
        value=None,
        quality=Quality.BAD,
        t=1,
        limits={},
        state="recorded",
        text="CAR-T TCT v3",
    )
    assert value_cell(protocol_name).plain == "CAR-T TCT v3"
    lost = replace(protocol_name, text=None)
    assert value_cell(lost).plain == "BAD"
    reading = replace(lost, quality=Quality.GOOD, value=37.0123)
    assert value_cell(reading).plain == "37.012"
