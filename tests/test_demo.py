"""`pocd demo` as a new user runs it: to the end, and stopped with Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.sitekit import cli


def test_demo_provokes_an_alert_and_an_action_deviation(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    done = cli("demo", "--seconds", "91", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert "The data is in" in done.stdout
    config = data / "pocd.toml"
    assert f"run list -c {config}" in done.stdout
    (run,) = json.loads(cli("run", "list", "-c", str(config), "--json").stdout)
    assert run["status"] == "completed"
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
    (run,) = json.loads(cli("run", "list", "-c", str(data / "pocd.toml"), "--json").stdout)
    assert run["status"] == "completed"
