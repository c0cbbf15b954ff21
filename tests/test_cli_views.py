"""What the CLI shows people (rounded, text points as text) and what `--json` keeps (every
value whole, as valid JSON), and `pocd --version`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pocd.model import (
    NS,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    PhaseChange,
    Run,
    RunStatus,
)
from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import cli_as, cli_env, write_site

T0 = 1_780_000_000 * NS


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"invalid JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_pocd_version(tmp_path: Path) -> None:
    done = cli_as(cli_env(tmp_path), "--version")
    assert (done.returncode, done.stdout) == (0, f"pocd {version('pocd')}\n")


def _excursion(number: int, worst: float, end: int | None) -> ExcursionEvent:
    excursion = Excursion(
        id=f"x{number}",
        run_id="r1",
        parameter="temperature",
        kind=ExcursionKind.ALERT_HIGH,
        protocol_id="CART-TCT",
        protocol_version="3.1",
        phase="transduction",
        limit=37.5,
        start=T0 + number * NS,
        end=end,
        worst=worst,
        integral=1.0,
    )
    return ExcursionEvent(ExcursionChange.CLOSED, excursion)


def test_run_show_rounds_for_people_and_json_keeps_every_value(tmp_path: Path) -> None:
    config = write_site(tmp_path, devices="")
    run = Run("r1", "B-1", "test-site", "Europe/London", "CART-TCT", "3.1", "h" * 64, "op", T0)
    with Store(load_site(config).store_path) as store:
        store.write(
            [
                run,
                PhaseChange("r1", T0, "transduction", None, "op"),
                _excursion(1, 37.659903078597615, T0 + NS + 2_998_617_700),
                _excursion(2, math.inf, None),  # an infinite reading, stored before it was BAD
                replace(run, status=RunStatus.COMPLETED, ended=T0 + 10 * NS),
            ]
        )
    env = cli_env(tmp_path)  # reads of the store need no login
    shown = cli_as(env, "run", "show", "-c", str(config), "B-1")
    assert shown.returncode == 0, shown.stderr
    first, second = shown.stdout.split("excursions: 2\n")[1].splitlines()[:2]
    assert first.endswith("transduction 3.0 s, worst 37.66 (limit 37.5)"), first
    assert second.endswith("transduction open, worst inf (limit 37.5)"), second

    as_json = cli_as(env, "run", "show", "-c", str(config), "B-1", "--json")
    assert as_json.returncode == 0, as_json.stderr
    detail = strict_json(as_json.stdout)
    one, two = detail["excursions"]
    assert (one["duration_s"], one["worst"]) == (2.9986177, 37.659903078597615)
    assert (two["duration_s"], two["worst"]) == (None, None)


def _point(**changes: Any) -> dict[str, Any]:
    point = {
        "device": "co2-probe",
        "point": "co2",
        "parameter": "co2",
        "unit": "%",
        "value": 5.00123456,
        "quality": "good",
        "t": T0,
        "limits": {},
        "state": "normal",
        "text": None,
    }
    return {**point, **changes}


def test_status_shows_a_text_point_as_its_text_and_rounds_numbers() -> None:
    from pocd.cli import status_text

    live = {
        "site": {"id": "demo-site"},
        "run": None,
        "lines": [{"id": "main", "run": None, "standby": None, "devices": []}],
        "points": [
            _point(),
            _point(
                device="rotea",
                point="protocol_name",
                parameter=None,
                unit="",
                value=None,
                quality="bad",
                state="recorded",
                text="CAR-T TCT v3",
            ),
            _point(point="ppm", value=50012.34, unit="ppm"),
            _point(point="lost", value=None, quality=None, state="no-data"),
        ],
    }
    lines = status_text(live).splitlines()
    assert lines[0] == "site demo-site: no run"
    assert lines[1].split() == ["co2-probe.co2", "5.001", "%", "normal"]
    assert lines[2].split() == ["rotea.protocol_name", "CAR-T", "TCT", "v3", "recorded"]
    assert lines[3].split() == ["co2-probe.ppm", "50012", "ppm", "normal"]
    assert lines[4].split() == ["co2-probe.lost", "-", "%", "no-data"]


def test_run_show_prints_each_signature_with_its_meaning_name_and_state() -> None:
    from pocd.cli import run_text

    signature = {
        "t": "2026-06-01T10:00:00.000+01:00",
        "utc_offset": "+01:00",
        "login": "olive",
        "name": "Olive Operator",
        "meaning": "performed",
        "action": "run.abort",
        "record": "run:r1",
        "record_hash": "ab" * 32,
        "intact": True,
    }
    detail = {
        "id": "r1",
        "batch_id": "B-1",
        "line": "main",
        "status": "aborted",
        "protocol_id": "CART-TCT",
        "protocol_version": "3.1",
        "protocol_hash": "h" * 64,
        "operator": "olive",
        "started": "2026-06-01T09:00:00.000Z",
        "ended": "2026-06-01T09:00:00.000Z",
        "phases": [],
        "excursions": [],
        "deviations": [],
        "signatures": [signature, {**signature, "meaning": "approved", "intact": False}],
    }
    lines = run_text(detail).split("signatures: 2\n")[1].splitlines()
    assert lines == [
        "  performed by Olive Operator (olive) at 2026-06-01T10:00:00.000+01:00 (UTC+01:00)  "
        "run.abort run:r1  sha256 abababababababab  intact",
        "  approved by Olive Operator (olive) at 2026-06-01T10:00:00.000+01:00 (UTC+01:00)  "
        "run.abort run:r1  sha256 abababababababab  BROKEN: the record changed since it was "
        "signed",
    ]
