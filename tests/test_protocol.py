"""Protocol files: validation (one malformed file per way to be wrong), identity by content hash,
limit resolution per phase, and durations.

The malformed protocols are small edits of one valid protocol (`PROTOCOL`);
`test_base_protocol_is_valid` keeps that base honest.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pocd.cli import main
from pocd.configtypes import parse_duration
from pocd.errors import ConfigError
from pocd.protocol import Limits, ProtocolStatus
from pocd.settings import LimitSpec, StoreSection, load_protocol
from tests.configkit import Bad, edit, find_problem, where

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "protocols" / "cart-tct-3.1.toml"

PROTOCOL = """\
# A small protocol: two parameters, three phases.
id = "TEST"
version = "1"
title = "Test protocol"
status = "approved"
approved_on = 2026-01-15

[parameters.temp]
unit = "C"
critical = true

[parameters.temp.limits]
alert_low = 36.5
alert_high = 37.5
action_low = 36.0
action_high = 38.0
on_delay = "10s"

[parameters.ph]
unit = "pH"
limits = { alert_low = 6.9, alert_high = 7.3, action_low = 6.8, action_high = 7.4 }

[[phases]]
id = "activation"
title = "Activation"
expected_duration = "1d"

[[phases]]
id = "expansion"
limits.ph = { alert_low = 6.85, stale_after = "1m" }

[[phases]]
id = "harvest"
expected_duration = "4h"
limits.ph = { monitored = false }
"""

# The same content as PROTOCOL: other key order, inline tables for standard ones and the
# reverse, dotted keys, other whitespace and comments.
PROTOCOL_REFORMATTED = """\
status   =   'approved'   # literal string, same value
title = "Test protocol"
approved_on = 2026-01-15
version = "1"
id = "TEST"

[[phases]]
  id = "activation"
  expected_duration = "1d"
  title = "Activation"

[[phases]]
id = "expansion"
[phases.limits.ph]
stale_after = "1m"
alert_low = 6.85

[[phases]]
limits = { ph = { monitored = false } }
expected_duration = "4h"
id = "harvest"

[parameters]
ph={unit="pH",limits={action_high=7.4,action_low=6.8,alert_high=7.3,alert_low=6.9}}

[parameters.temp]
limits.on_delay = "10s"
limits.action_high = 38.0
limits.action_low = 36.0
limits.alert_high = 37.5
limits.alert_low = 36.5
critical = true
unit = "C"
"""

# sha256 of the canonical JSON of PROTOCOL. Pinned: a change to the canonical form would give
# every approved protocol a new identity, so it must be a deliberate, visible decision.
PROTOCOL_HASH = "8ca2670942bb1ceec3279db54baa076dabd3f4e8daf8d81d325e684d6d5458f4"


def write(folder: Path, text: str, name: str = "test.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# --- malformed protocols --------------------------------------------------------------------


PROTOCOL_CASES = {
    "unknown-key-top-level": Bad(
        (('status = "approved"', 'status = "approved"\nprodukt = "CAR-T"'),),
        "produkt",
        "unknown key (did you mean 'product'?)",
    ),
    "unknown-key-in-parameter": Bad(
        (('unit = "pH"', 'unit = "pH"\ncritcal = true'),),
        "parameters.ph.critcal",
        "unknown key (did you mean 'critical'?)",
    ),
    "unknown-key-in-limits": Bad(
        (("alert_low = 6.85,", "alert_lo = 6.85,"),),
        "phases[1].limits.ph.alert_lo",
        "unknown key (did you mean 'alert_low'?)",
    ),
    "unknown-key-in-phase": Bad(
        (('title = "Activation"', 'titel = "Activation"'),),
        "phases[0].titel",
        "unknown key (did you mean 'title'?)",
    ),
    "wrong-type-top-level": Bad(
        (('version = "1"', "version = 1"),), "version", "must be a string (got 1)"
    ),
    "wrong-type-limit": Bad(
        (("action_high = 7.4", 'action_high = "7.4"'),),
        "parameters.ph.limits.action_high",
        "must be a number (got '7.4')",
    ),
    "wrong-type-critical": Bad(
        (("critical = true", 'critical = "yes"'),),
        "parameters.temp.critical",
        "must be true or false (got 'yes')",
    ),
    "date-as-string": Bad(
        (("approved_on = 2026-01-15", 'approved_on = "2026-01-15"'),),
        "approved_on",
        "must be a TOML date such as 2026-09-01, without quotes (got '2026-01-15')",
    ),
    "phase-limits-not-a-table": Bad(
        (("limits.ph = { monitored = false }", "limits.ph = false"),),
        "phases[2].limits.ph",
        "must be a table (got False)",
    ),
    "alert-wider-than-action-low": Bad(
        (("alert_low = 6.9,", "alert_low = 6.7,"),),
        "parameters.ph.limits",
        "alert_low (6.7) is wider than action_low (6.8): alert limits must lie inside the "
        "action limits",
    ),
    "alert-wider-than-action-high": Bad(
        (("alert_high = 37.5", "alert_high = 38.5"),),
        "parameters.temp.limits",
        "alert_high (38.5) is wider than action_high (38.0)",
    ),
    "low-equals-high": Bad(
        (("action_low = 6.8, action_high = 7.4", "action_low = 7.4, action_high = 7.4"),),
        "parameters.ph.limits",
        "action_low (7.4) must be below action_high (7.4)",
    ),
    "low-above-high-in-phase": Bad(
        (("alert_low = 6.85,", "alert_low = 7.2, alert_high = 7.0,"),),
        "phases[1].limits.ph",
        "alert_low (7.2) must be below alert_high (7.0)",
    ),
    "violation-only-after-merge": Bad(
        # 7.35 alone is fine; over the defaults it is above alert_high 7.3.
        (("alert_low = 6.85,", "alert_low = 7.35,"),),
        "phases[1].limits.ph",
        "alert_low (7.35) must be below alert_high (7.3) (phase 'expansion' over the "
        "defaults in parameters.ph.limits)",
    ),
    "alert-wider-only-after-merge": Bad(
        (("limits.ph = { monitored = false }", "limits.temp = { alert_high = 38.2 }"),),
        "phases[2].limits.temp",
        "alert_high (38.2) is wider than action_high (38.0): alert limits must lie inside the "
        "action limits (phase 'harvest' over the defaults",
    ),
    "negative-deadband": Bad(
        (('on_delay = "10s"', 'on_delay = "10s"\ndeadband = -0.1'),),
        "parameters.temp.limits.deadband",
        "must be greater than or equal to 0 (got -0.1)",
    ),
    "zero-max-rate": Bad(
        (('on_delay = "10s"', 'on_delay = "10s"\nmax_rate = 0'),),
        "parameters.temp.limits.max_rate",
        "must be greater than 0 (got 0)",
    ),
    "nan-limit": Bad(
        (("action_high = 38.0", "action_high = nan"),),
        "parameters.temp.limits.action_high",
        "must be a finite number, not nan or inf (got nan)",
    ),
    "infinite-limit": Bad(
        (("action_high = 38.0", "action_high = +inf"),),
        "parameters.temp.limits.action_high",
        "must be a finite number, not nan or inf (got inf)",
    ),
    "unknown-parameter-in-phase": Bad(
        (("limits.ph = { monitored = false }", "limits.do = { monitored = false }"),),
        "phases[2].limits.do",
        "unknown parameter 'do' in phase 'harvest' (known: ph, temp)",
    ),
    "duplicate-phase-id": Bad(
        (('id = "harvest"', 'id = "activation"'),),
        "phases[2].id",
        "duplicate phase 'activation' (also phases[0])",
    ),
    "bad-phase-id": Bad(
        (('id = "harvest"', 'id = "harvest day"'),),
        "phases[2].id",
        "must start with a letter or digit and use only letters, digits, '.', '_' and '-' "
        "(got 'harvest day')",
    ),
    "bad-parameter-id": Bad(
        (("[parameters.ph]", '[parameters."p H"]'), ("limits.ph = { a", 'limits."p H" = { a')),
        "parameters.p H",
        "parameter id 'p H' must start with a letter or digit",
    ),
    "bad-protocol-id": Bad(
        (('id = "TEST"', 'id = "TEST/1"'),), "id", "must start with a letter or digit"
    ),
    "invalid-status": Bad(
        (('status = "approved"', 'status = "Approved"'),),
        "status",
        "must be one of 'draft', 'approved', 'superseded' (got 'Approved')",
    ),
    "missing-title": Bad((('title = "Test protocol"\n', ""),), "title", "required key is missing"),
    "missing-unit": Bad((('unit = "pH"\n', ""),), "parameters.ph.unit", "required key is missing"),
    "missing-phase-id": Bad(
        (('id = "expansion"\n', ""),), "phases[1].id", "required key is missing"
    ),
    "empty-version": Bad((('version = "1"', 'version = ""'),), "version", "must have at least 1"),
    "no-phases": Bad(
        (
            (PROTOCOL[PROTOCOL.index("[[phases]]") :], ""),
            ("[parameters.temp]", "phases = []\n\n[parameters.temp]"),
        ),
        "phases",
        "must not be empty",
    ),
    "bad-duration-string": Bad(
        (('on_delay = "10s"', 'on_delay = "10 seconds"'),),
        "parameters.temp.limits.on_delay",
        "'10 seconds' is not a duration like '90s', '5m', '1h30m', '250ms'",
    ),
    "negative-duration": Bad(
        (('expected_duration = "4h"', "expected_duration = -3600"),),
        "phases[2].expected_duration",
        "a duration cannot be negative (got -3600)",
    ),
    "boolean-duration": Bad(
        (('stale_after = "1m"', "stale_after = true"),),
        "phases[1].limits.ph.stale_after",
        "a duration is a number of seconds or a string like '90s', '5m', '1h30m', '250ms' "
        "(got True)",
    ),
    "toml-syntax-error": Bad(
        (('title = "Test protocol"', 'title = "Test protocol'),), "<top>", "not valid TOML: "
    ),
}


def test_base_protocol_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, PROTOCOL)
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


@pytest.mark.parametrize("case", PROTOCOL_CASES.values(), ids=PROTOCOL_CASES.keys())
def test_malformed_protocol(case: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, edit(PROTOCOL, *case.edits))
    assert main(["check", str(path)]) == 2
    line = find_problem(capsys.readouterr().err.splitlines(), path, case.key, None)
    assert case.message in line.removeprefix(where(path, case.key))


def test_missing_protocol_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: <top>: no such file\n"
    with pytest.raises(ConfigError) as exc:
        load_protocol(path)
    assert [(p.file, p.key, p.message) for p in exc.value.problems] == [
        (str(path), "", "no such file")
    ]


def test_all_problems_of_a_file_together(tmp_path: Path) -> None:
    text = edit(
        PROTOCOL,
        ('version = "1"', "version = 1"),
        ('unit = "pH"\n', ""),
        ('expected_duration = "4h"', 'expected_duration = "4 hours"'),
    )
    with pytest.raises(ConfigError) as exc:
        load_protocol(write(tmp_path, text))
    assert [p.key for p in exc.value.problems] == [
        "version",
        "parameters.ph.unit",
        "phases[2].expected_duration",
    ]


# --- identity -------------------------------------------------------------------------------


def test_hash_is_pinned(tmp_path: Path) -> None:
    assert load_protocol(write(tmp_path, PROTOCOL)).hash == PROTOCOL_HASH


def test_reformatting_keeps_the_hash(tmp_path: Path) -> None:
    original = load_protocol(write(tmp_path, PROTOCOL, "a.toml"))
    reformatted = load_protocol(write(tmp_path, PROTOCOL_REFORMATTED, "b.toml"))
    assert reformatted.hash == original.hash
    assert reformatted.source != original.source  # the file is not part of the identity


def test_reemitted_example_keeps_the_hash(tmp_path: Path) -> None:
    original = load_protocol(EXAMPLE)
    text = to_toml(tomllib_load(EXAMPLE))
    assert text != EXAMPLE.read_text()
    assert load_protocol(write(tmp_path, text)).hash == original.hash


CHANGES = {
    "limit": ("action_high = 38.0", "action_high = 38.1"),
    "limit-in-phase": ("alert_low = 6.85", "alert_low = 6.86"),
    "duration": ('on_delay = "10s"', 'on_delay = "11s"'),
    "added-limit": ('on_delay = "10s"', 'on_delay = "10s"\nmax_rate = 1.0'),
    "monitored": ("monitored = false", "monitored = true"),
    "critical": ("critical = true", "critical = false"),
    "unit": ('unit = "pH"', 'unit = "pH units"'),
    "status": ('status = "approved"', 'status = "draft"'),
    "version": ('version = "1"', 'version = "1.1"'),
    "title": ('title = "Test protocol"', 'title = "Test protocol "'),
    "phase-title": ('title = "Activation"', 'title = "Activation (TransAct)"'),
    "approved-on": ("approved_on = 2026-01-15", "approved_on = 2026-01-16"),
    "added-description": ('title = "Activation"', 'title = "Activation"\ndescription = "x"'),
    "phase-order": (
        '[[phases]]\nid = "activation"\ntitle = "Activation"\nexpected_duration = "1d"\n\n'
        '[[phases]]\nid = "expansion"\n',
        '[[phases]]\nid = "expansion"\n'
        '\n[[phases]]\nid = "activation"\ntitle = "Activation"\nexpected_duration = "1d"\n',
    ),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_changing_a_value_changes_the_hash(change: tuple[str, str], tmp_path: Path) -> None:
    changed = load_protocol(write(tmp_path, edit(PROTOCOL, change)))
    assert changed.hash != PROTOCOL_HASH


def test_changes_give_distinct_hashes(tmp_path: Path) -> None:
    hashes = {
        load_protocol(write(tmp_path, edit(PROTOCOL, change), f"{name}.toml")).hash
        for name, change in CHANGES.items()
    }
    assert len(hashes) == len(CHANGES)


# --- limit resolution -----------------------------------------------------------------------


def test_every_phase_has_every_parameter() -> None:
    protocol = load_protocol(EXAMPLE)
    assert set(protocol.parameters) == {"temperature", "co2", "ph", "do", "rocking"}
    assert [p.id for p in protocol.phases] == [
        "enrichment",
        "activation",
        "transduction",
        "expansion",
        "harvest",
        "formulation",
    ]
    for phase in protocol.phases:
        assert set(phase.limits) == set(protocol.parameters), phase.id


def test_example_protocol_resolves() -> None:
    protocol = load_protocol(EXAMPLE)
    assert (protocol.id, protocol.version, protocol.status) == (
        "CART-TCT",
        "3.1",
        ProtocolStatus.APPROVED,
    )
    assert protocol.key == ("CART-TCT", "3.1")
    assert protocol.source == str(EXAMPLE)
    assert protocol.parameters["temperature"].critical
    assert not protocol.parameters["do"].critical
    assert protocol.parameters["ph"].unit == "pH"

    temperature = Limits(
        alert_low=36.5,
        alert_high=37.5,
        action_low=36.0,
        action_high=38.0,
        deadband=0.1,
        on_delay=10.0,
        off_delay=5.0,
        max_rate=1.0,
        stale_after=30.0,
        budget=1800.0,
        max_data_loss=300.0,
    )
    # No phase overrides temperature: the defaults hold throughout.
    assert all(phase.limits["temperature"] == temperature for phase in protocol.phases)

    expansion = protocol.phase("expansion")
    # One key overridden, the others from the parameter's defaults.
    assert expansion.limits["ph"] == Limits(
        alert_low=6.85,
        alert_high=7.35,
        action_low=6.8,
        action_high=7.45,
        deadband=0.02,
        on_delay=5.0,
        off_delay=5.0,
        stale_after=30.0,
        budget=3600.0,
        max_data_loss=600.0,
    )
    assert protocol.phase("activation").limits["ph"].alert_low == 6.9
    # Rocking is not monitored by default and switched on, with limits, for expansion only.
    assert expansion.limits["rocking"] == Limits(
        monitored=True,
        alert_low=10.0,
        alert_high=15.0,
        action_low=8.0,
        action_high=17.0,
        on_delay=20.0,
        stale_after=60.0,
    )
    assert [p.id for p in protocol.phases if p.limits["rocking"].monitored] == ["expansion"]
    assert protocol.phase("harvest").limits["rocking"] == Limits(monitored=False)
    # `monitored = false` in a phase keeps the other limits (they still describe the parameter).
    enrichment_co2 = protocol.phase("enrichment").limits["co2"]
    assert not enrichment_co2.monitored
    assert (enrichment_co2.alert_low, enrichment_co2.action_high) == (4.5, 6.0)
    assert protocol.phase("activation").limits["co2"].monitored

    assert protocol.phase("enrichment").expected_duration == 4 * 3600
    assert protocol.phase("expansion").expected_duration == 9 * 86400
    assert protocol.phase("expansion").title == "Expansion with rocking"
    assert protocol.phase_index("harvest") == 4


def test_small_protocol_resolves(tmp_path: Path) -> None:
    protocol = load_protocol(write(tmp_path, PROTOCOL))
    assert protocol.phase("expansion").title == "expansion"  # no title: the id
    assert protocol.phase("expansion").expected_duration is None
    assert protocol.phase("activation").expected_duration == 86400.0
    assert protocol.phase("expansion").limits["ph"] == Limits(
        alert_low=6.85, alert_high=7.3, action_low=6.8, action_high=7.4, stale_after=60.0
    )
    assert protocol.phase("harvest").limits["ph"] == Limits(
        monitored=False, alert_low=6.9, alert_high=7.3, action_low=6.8, action_high=7.4
    )
    assert protocol.phase("harvest").limits["temp"].on_delay == 10.0
    with pytest.raises(KeyError):
        protocol.phase("formulation")


def test_parameter_without_limits_is_monitored_without_bounds(tmp_path: Path) -> None:
    text = edit(PROTOCOL, ("[parameters.ph]", '[parameters.weight]\nunit = "g"\n\n[parameters.ph]'))
    protocol = load_protocol(write(tmp_path, text))
    assert all(phase.limits["weight"] == Limits() for phase in protocol.phases)


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (90, 90.0),
        (2.5, 2.5),
        (0, 0.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("5min", 300.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        (" 2h ", 7200.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        ("0s", 0.0),
    ],
)
def test_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "a duration is a number of seconds"),
        (False, "a duration is a number of seconds"),
        (None, "a duration is a number of seconds"),
        ([5], "a duration is a number of seconds"),
        ("", "is not a duration"),
        ("90", "is not a duration"),
        ("soon", "is not a duration"),
        ("5x", "is not a duration"),
        ("m5", "is not a duration"),
        ("-5s", "is not a duration"),
        ("1h-30m", "is not a duration"),
        ("5 minutes", "is not a duration"),
        (-1, "cannot be negative"),
        (-0.001, "cannot be negative"),
        (math.nan, "must be finite"),
        (math.inf, "must be finite"),
    ],
)
def test_bad_duration(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_duration_fields_take_both_forms() -> None:
    assert StoreSection.model_validate({"flush_interval": "250ms"}).flush_interval == 0.25
    assert StoreSection.model_validate({"flush_interval": 2}).flush_interval == 2.0
    spec = LimitSpec.model_validate({"on_delay": "1m", "stale_after": 30, "budget": "1h30m"})
    assert (spec.on_delay, spec.stale_after, spec.budget) == (60.0, 30.0, 5400.0)


# --- helpers: a small TOML writer for the re-emission test ---------------------------------


def tomllib_load(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def to_toml(doc: Mapping[str, Any]) -> str:
    """Standard tables only, keys in reverse order, a comment on every table: as unlike the
    hand-written file as TOML allows, with the same values."""
    lines: list[str] = ["# re-emitted"]
    _emit(doc, [], lines)
    return "\n".join(lines) + "\n"


def _emit(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    def is_table(v: object) -> bool:
        return isinstance(v, dict)

    def is_table_array(v: object) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    keys = sorted(table, reverse=True)
    lines.extend(
        f"{k}   =   {_value(table[k])}"
        for k in keys
        if not is_table(table[k]) and not is_table_array(table[k])
    )
    for k in keys:
        if is_table(table[k]):
            lines += ["", f"# table {k}", f"[{'.'.join([*path, k])}]"]
            _emit(table[k], [*path, k], lines)
        elif is_table_array(table[k]):
            for item in table[k]:
                lines += ["", f"[[{'.'.join([*path, k])}]]"]
                _emit(item, [*path, k], lines)


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for this text
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(value)
