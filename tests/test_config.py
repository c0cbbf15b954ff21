"""Site configs and driver files through `pocd check`: the shipped examples, and one malformed
file per way a site config can be wrong, each expected to name the file, the key path and the
device.

The malformed configs are small edits of one valid config (`SITE`), so each case shows only what
it breaks; `test_base_site_is_valid` keeps that base honest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pocd.cli import main
from pocd.errors import ConfigError
from pocd.settings import check_files, load_driver, load_site
from tests.configkit import Bad, edit, find_problem, where

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(REPO.glob("config/**/*.toml")) + sorted(REPO.glob("drivers/**/*.toml"))

PROTOCOL = """\
id = "TEST"
version = "1"
title = "Test protocol"
status = "approved"

[parameters.temp]
unit = "C"
critical = true
limits = { alert_low = 36.5, alert_high = 37.5, action_low = 36.0, action_high = 38.0 }

[parameters.ph]
unit = "pH"
limits = { action_low = 6.8, action_high = 7.4 }

[[phases]]
id = "activation"

[[phases]]
id = "expansion"
"""

SITE = """\
[site]
id = "test-site"
name = "Test site"
timezone = "Europe/London"
control_site = "cs-1"

[store]
flush_interval = "200ms"

[api]
listen = "127.0.0.1:8470"

[protocols]
dir = "protocols"

[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 1.0, seed = 1 }
points.temperature = { parameter = "temp", unit = "C", base = 37.0 }

[[devices]]
id = "bioreactor"
driver = "sim"
points.ph = { parameter = "ph", unit = "pH", base = 7.1 }
"""

DEVICES = SITE[SITE.index("[[devices]]") :]

PHASE_SOURCE = """
[run.phase_source]
device = "bioreactor"
point = "ph"
phases = { "1" = "activation", "2" = "expansion" }
"""


def write_site(folder: Path, text: str = SITE, protocol: str = PROTOCOL) -> Path:
    (folder / "protocols").mkdir(exist_ok=True)
    (folder / "protocols" / "test.toml").write_text(protocol)
    path = folder / "pocd.toml"
    path.write_text(text)
    return path


def run_check(capsys: pytest.CaptureFixture[str], *paths: Path | str) -> tuple[int, list[str]]:
    code = main(["check", *map(str, paths)])
    return code, capsys.readouterr().err.splitlines()


# --- the shipped examples -----------------------------------------------------------------


def test_examples_exist() -> None:
    assert any(p.parent.name == "site" for p in EXAMPLES)
    assert any(p.parent.name == "drivers" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_passes_check(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_check(capsys, path)
    assert (code, err) == (0, [])


def test_check_prints_ok_per_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.splitlines() == [f"{p}: ok" for p in EXAMPLES]


def test_example_site_resolves_devices_over_drivers() -> None:
    site = load_site(REPO / "config/site/pocd.toml")
    assert site.id == "rfh-poc-1"
    assert set(site.devices) == {"incubator", "bioreactor"}
    incubator = site.devices["incubator"]
    assert incubator.driver.id == "sim"
    assert incubator.driver.transport == "sim"
    assert incubator.title == "Culture chamber"
    assert incubator.settings.interval == 1.0
    assert site.config.store.flush_interval == 0.2
    assert site.config.api.host == "127.0.0.1"
    assert site.config.api.port == 8470
    assert site.parameter_source() == {
        "temperature": ("incubator", "temperature"),
        "co2": ("incubator", "co2"),
        "ph": ("bioreactor", "ph"),
        "do": ("bioreactor", "do"),
        "rocking": ("bioreactor", "rocking"),
    }
    assert site.protocol("CART-TCT").version == "3.1"
    assert site.protocol("CART-TCT", "3.1") is site.protocols[("CART-TCT", "3.1")]
    assert len(site.config_hash) == 64


# --- the CLI entry --------------------------------------------------------------------------


def test_subprocess_check_valid_and_invalid(tmp_path: Path) -> None:
    good = [str(p) for p in EXAMPLES]
    done = subprocess.run(
        [sys.executable, "-m", "pocd", "check", *good],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [f"{p}: ok" for p in good]

    bad = write_site(tmp_path, edit(SITE, ('timezone = "Europe/London"', 'timezone = "Mars/Base"')))
    done = subprocess.run(
        [sys.executable, "-m", "pocd", "check", *good, str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{bad}: site.timezone: unknown time zone 'Mars/Base' (use an IANA name)"
    ]


def test_check_without_files_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check"])
    assert exc.value.code == 2
    assert "FILE" in capsys.readouterr().err


def test_check_reports_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    broken = tmp_path / "broken.toml"
    broken.write_text("[site\n")
    code, err = run_check(capsys, missing, REPO / "config/site/pocd.toml", broken)
    assert code == 2
    assert err[0] == f"{missing}: <top>: no such file"
    assert err[1].startswith(f"{broken}: <top>: not valid TOML: ")
    assert "line 1" in err[1]
    assert len(err) == 2


def test_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[site]\nname = "Hôpital"\n'.encode("latin-1"))
    code, err = run_check(capsys, path)
    assert (code, err) == (2, [f"{path}: <top>: not UTF-8 text (line 2)"])


# --- malformed site configs -----------------------------------------------------------------


SITE_CASES = {
    "unknown-key-top-level": Bad(
        (("[site]", 'colour = "red"\n[site]'),),
        "colour",
        "unknown key (known keys here: access, alarms, api, devices, drivers_dir, lines, "
        "notify, protocols, run, sinks, site, store)",
    ),
    "route-names-no-channel": Bad(
        (("[site]", '[[notify.routes]]\nname = "ward"\nchannels = ["pager"]\n[site]'),),
        "notify",
        "routes[0] (ward): no channel pager (channels: none: add [[sinks.email]], "
        "[[sinks.webhook]] or [[sinks.mqtt]])",
    ),
    "route-names-no-line": Bad(
        (
            (
                "[site]",
                '[[sinks.webhook]]\nname = "hook"\nurl = "http://h/x"\nsecret = { env = "S" }\n'
                '[[notify.routes]]\nname = "ward"\nchannels = ["hook"]\nlines = ["prodigy"]\n'
                "[site]",
            ),
        ),
        "notify",
        "routes[0] (ward): no line prodigy (lines: main)",
    ),
    "sink-name-used-twice-across-kinds": Bad(
        (
            (
                "[site]",
                '[[sinks.email]]\nname = "ward"\nhost = "smtp"\nfrom = "a@b.c"\nto = ["d@e.f"]\n'
                '[[sinks.webhook]]\nname = "ward"\nurl = "http://h/x"\nsecret = { env = "S" }\n'
                "[site]",
            ),
        ),
        "sinks",
        "webhook[0].name: sink name 'ward' is also used by email[0]",
    ),
    "unknown-key-nested": Bad(
        (('flush_interval = "200ms"', 'flush_intervall = "200ms"'),),
        "store.flush_intervall",
        "unknown key (did you mean 'flush_interval'?)",
    ),
    "unknown-key-in-device": Bad(
        (('driver = "sim"\ntransport', 'driver = "sim"\nserial = "X1"\ntransport'),),
        "devices[0].serial",
        "unknown key (did you mean 'serial_number'?)",
        "incubator",
    ),
    "wrong-type": Bad(
        (('flush_interval = "200ms"', 'batch_size = "many"'),),
        "store.batch_size",
        "must be a whole number (got 'many')",
    ),
    "wrong-type-in-device": Bad(
        (('id = "bioreactor"', 'id = "bioreactor"\nenabled = "yes"'),),
        "devices[1].enabled",
        "must be true or false (got 'yes')",
        "bioreactor",
    ),
    "table-expected": Bad(
        (('[api]\nlisten = "127.0.0.1:8470"\n', ""), ("[site]", 'api = "127.0.0.1:8470"\n[site]')),
        "api",
        "must be a table (got '127.0.0.1:8470')",
    ),
    "missing-required-key": Bad(
        (('timezone = "Europe/London"\n', ""),), "site.timezone", "required key is missing"
    ),
    "missing-site-table": Bad(
        (('[site]\nid = "test-site"\nname = "Test site"\n', '[sitex]\nid = "test-site"\n'),),
        "site",
        "required key is missing",
    ),
    "bad-site-id": Bad(
        (('id = "test-site"', 'id = "test site"'),),
        "site.id",
        "must start with a letter or digit and use only letters, digits, '.', '_' and '-' "
        "(got 'test site')",
    ),
    "unknown-time-zone": Bad(
        (('"Europe/London"', '"Europe/Londn"'),),
        "site.timezone",
        "unknown time zone 'Europe/Londn' (use an IANA name)",
    ),
    "listen-without-port": Bad(
        (('"127.0.0.1:8470"', '"127.0.0.1"'),), "api.listen", "'127.0.0.1' is not host:port"
    ),
    "listen-port-out-of-range": Bad(
        (('"127.0.0.1:8470"', '"127.0.0.1:70000"'),), "api.listen", "is not host:port"
    ),
    "listen-bare-ipv6": Bad(
        (('"127.0.0.1:8470"', '"::1:8470"'),), "api.listen", "is not host:port"
    ),
    "listen-space-in-host": Bad(
        (('"127.0.0.1:8470"', '"local host:8470"'),), "api.listen", "is not host:port"
    ),
    "bad-duration-string": Bad(
        (('"200ms"', '"soon"'),),
        "store.flush_interval",
        "'soon' is not a duration like '90s', '5m', '1h30m', '250ms'",
    ),
    "negative-duration": Bad(
        (('"200ms"', "-0.5"),), "store.flush_interval", "a duration cannot be negative (got -0.5)"
    ),
    "boolean-duration": Bad(
        (('"200ms"', "true"),),
        "store.flush_interval",
        "a duration is a number of seconds or a string like '90s', '5m', '1h30m', '250ms' "
        "(got True)",
    ),
    "influxdb-sink-without-api": Bad(
        ((None, '\n[sinks.influxdb]\nurl = "http://127.0.0.1:8086"\n'),),
        "sinks.influxdb[0].api",
        "required key is missing",
    ),
    "influxdb-password-in-the-config-text": Bad(
        (
            (
                None,
                '\n[sinks.influxdb]\nurl = "http://127.0.0.1:8086"\napi = "v1"\n'
                'database = "pocd"\nusername = "u"\npassword = "hunter2"\n',
            ),
        ),
        "sinks.influxdb[0].password",
        "secrets never go in the config text",
    ),
    "device-not-a-table": Bad(
        ((DEVICES, ""), ("[site]", 'devices = ["pump"]\n[site]')),
        "devices[0]",
        "must be a table (got 'pump')",
    ),
    "duplicate-device-id": Bad(
        (('id = "bioreactor"', 'id = "incubator"'),),
        "devices[1].id",
        "duplicate device id (also devices[0])",
        "incubator",
    ),
    "duplicate-of-disabled-device": Bad(
        (('id = "incubator"', 'id = "bioreactor"\nenabled = false'),),
        "devices[1].id",
        "duplicate device id (also devices[0])",
        "bioreactor",
    ),
    "bad-device-id": Bad(
        (('id = "incubator"', 'id = "-incubator"'),),
        "devices[0].id",
        "must start with a letter or digit",
        "-incubator",
    ),
    "unknown-driver": Bad(
        (('driver = "sim"\ntransport', 'driver = "simm"\ntransport'),),
        "devices[0].driver",
        "unknown driver 'simm' (known: ",
        "incubator",
    ),
    "driver-is-a-path": Bad(
        (('driver = "sim"\ntransport', 'driver = "/etc/passwd"\ntransport'),),
        "devices[0].driver",
        "must start with a letter or digit",
        "incubator",
    ),
    "unknown-transport-setting": Bad(
        (("seed = 1 }", "seed = 1, baudrate = 9600 }"),),
        "devices[0].transport.baudrate",
        "unknown key (known keys here: interval, outages, repeat, seed)",
        "incubator",
    ),
    "bad-transport-setting": Bad(
        (("seed = 1 }", 'seed = "one" }'),),
        "devices[0].transport.seed",
        "must be a whole number (got 'one')",
        "incubator",
    ),
    "bad-point-setting": Bad(
        (("base = 7.1 }", "base = 7.1, noise = -0.1 }"),),
        "devices[1].points.ph.noise",
        "must be greater than or equal to 0 (got -0.1)",
        "bioreactor",
    ),
    "unknown-point-setting": Bad(
        (("base = 7.1 }", "base = 7.1, offset = 1.0 }"),),
        "devices[1].points.ph.offset",
        "unknown key",
        "bioreactor",
    ),
    "bad-sim-script-action": Bad(
        (
            (
                "base = 7.1 }",
                'base = 7.1, script = [{ start = "1m", duration = "5m", action = "explode" }] }',
            ),
        ),
        "devices[1].points.ph.script[0].action",
        "must be 'offset', 'ramp', 'set', 'stale', 'bad' or 'nan' (got 'explode')",
        "bioreactor",
    ),
    "nan-point-setting": Bad(
        (("base = 7.1 }", "base = nan }"),),
        "devices[1].points.ph.base",
        "must be a finite number, not nan or inf",
        "bioreactor",
    ),
    "point-feeds-unknown-parameter": Bad(
        (('parameter = "ph"', 'parameter = "pH"'),),
        "devices[1].points.ph.parameter",
        "unknown parameter 'pH' (known: ph, temp)",
        "bioreactor",
    ),
    "point-unit-differs-from-parameter": Bad(
        (('parameter = "ph", unit = "pH"', 'parameter = "ph", unit = "mV"'),),
        "devices[1].points.ph.unit",
        "unit 'mV', but the protocols give 'ph' in 'pH': scale the point and set its unit",
        "bioreactor",
    ),
    "two-points-feed-one-parameter": Bad(
        (("base = 7.1 }", 'base = 7.1 }\npoints.ph2 = { parameter = "temp" }'),),
        "devices[1].points.ph2.parameter",
        "parameter 'temp' is already fed by incubator.temperature (devices[0])",
        "bioreactor",
    ),
    "phase-source-unknown-device": Bad(
        ((None, PHASE_SOURCE.replace('"bioreactor"', '"reactor"')),),
        "run.phase_source.device",
        "unknown device 'reactor' (known: incubator, bioreactor)",
    ),
    "phase-source-disabled-device": Bad(
        (
            ('id = "bioreactor"', 'id = "bioreactor"\nenabled = false'),
            (None, PHASE_SOURCE),
        ),
        "run.phase_source.device",
        "the device is disabled",
        "bioreactor",
    ),
    "phase-source-unknown-point": Bad(
        ((None, PHASE_SOURCE.replace('point = "ph"', 'point = "step"')),),
        "run.phase_source.point",
        "unknown point 'step' (points of the device: ph)",
        "bioreactor",
    ),
    "phase-source-unknown-phase": Bad(
        ((None, PHASE_SOURCE.replace('"2" = "expansion"', '"2" = "expand"')),),
        "run.phase_source.phases.2",
        "unknown phase 'expand'",
    ),
    "phase-source-unknown-key": Bad(
        ((None, PHASE_SOURCE + "poll = 1\n"),),
        "run.phase_source.poll",
        "unknown key (known keys here: device, phases, point)",
    ),
    "missing-protocols-dir": Bad(
        (('dir = "protocols"', 'dir = "protocol"'),), "protocols.dir", "no such folder"
    ),
    "missing-drivers-dir": Bad(
        (("[site]", 'drivers_dir = "my-drivers"\n\n[site]'),),
        "drivers_dir",
        "no such folder",
    ),
    "toml-syntax-error": Bad(
        (('name = "Test site"', "name = Test site"),), "<top>", "not valid TOML: "
    ),
}


def test_base_site_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_site(tmp_path, SITE + PHASE_SOURCE)
    assert run_check(capsys, path) == (0, [])
    site = load_site(path)
    assert site.config.run.phase_source is not None
    assert site.parameter_source() == {
        "temp": ("incubator", "temperature"),
        "ph": ("bioreactor", "ph"),
    }


@pytest.mark.parametrize("case", SITE_CASES.values(), ids=SITE_CASES.keys())
def test_malformed_site(case: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_site(tmp_path, edit(SITE, *case.edits))
    code, err = run_check(capsys, path)
    assert code == 2
    line = find_problem(err, path, case.key, case.device)
    assert case.message in line.removeprefix(where(path, case.key, case.device))


def test_unknown_key_after_devices_lands_in_the_device(tmp_path: Path) -> None:
    # TOML puts a key written after [[devices]] into the last device: the message must say so.
    path = write_site(tmp_path, SITE + 'colour = "red"\n')
    with pytest.raises(ConfigError) as exc:
        load_site(path)
    assert [str(p) for p in exc.value.problems] == [
        f"{path}: devices[1].colour (device 'bioreactor'): unknown key "
        "(known keys here: calibration_due, driver, enabled, firmware, id, points, "
        "serial_number, title, transport)"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = edit(
        SITE,
        (("seed = 1 }", "seed = 1, baudrate = 9600 }")),
        (('parameter = "ph"', 'parameter = "pH"')),
        (None, PHASE_SOURCE.replace('point = "ph"', 'point = "step"')),
    )
    path = write_site(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_site(path)
    assert [(p.key, p.device) for p in exc.value.problems] == [
        ("devices[0].transport.baudrate", "incubator"),
        ("devices[1].points.ph.parameter", "bioreactor"),
        ("run.phase_source.point", "bioreactor"),
    ]


def test_bad_protocol_is_reported_with_its_own_file(tmp_path: Path) -> None:
    # The protocol defines "ph"; when it fails, the site must not also claim "ph" is unknown.
    protocol = PROTOCOL.replace('status = "approved"', 'status = "aproved"')
    path = write_site(tmp_path, SITE + PHASE_SOURCE, protocol)
    with pytest.raises(ConfigError) as exc:
        load_site(path)
    assert [str(p) for p in exc.value.problems] == [
        f"{tmp_path / 'protocols' / 'test.toml'}: status: "
        "must be one of 'draft', 'approved', 'superseded' (got 'aproved')"
    ]


def test_same_protocol_in_two_files(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    (tmp_path / "protocols" / "zz-copy.toml").write_text(
        PROTOCOL.replace("title =", "# copy\ntitle =")
    )
    with pytest.raises(ConfigError) as exc:
        load_site(path)
    assert [str(p) for p in exc.value.problems] == [
        f"{tmp_path / 'protocols' / 'zz-copy.toml'}: id: TEST 1 is also defined in "
        f"{tmp_path / 'protocols' / 'test.toml'}"
    ]


def test_disabled_device_is_checked_but_not_loaded(tmp_path: Path) -> None:
    path = write_site(
        tmp_path, edit(SITE, ('id = "bioreactor"', 'id = "bioreactor"\nenabled = false'))
    )
    site = load_site(path)
    assert set(site.devices) == {"incubator"}


# --- driver files ---------------------------------------------------------------------------

SITE_DRIVER = """\
[driver]
transport = "sim"
manufacturer = "Acme"
model = "Incubator 3000"

[defaults]
interval = "2s"
seed = 7

[points.temperature]
parameter = "temp"
unit = "C"
base = 37.0
"""


def test_site_driver_folder(tmp_path: Path) -> None:
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers" / "acme-3000.toml").write_text(SITE_DRIVER)
    text = edit(
        SITE,
        ("[site]", 'drivers_dir = "drivers"\n\n[site]'),
        (
            'driver = "sim"\ntransport = { interval = 1.0, seed = 1 }\n'
            'points.temperature = { parameter = "temp", unit = "C", base = 37.0 }\n',
            'driver = "acme-3000"\npoints.temperature = { noise = 0.1 }\n',
        ),
    )
    site = load_site(write_site(tmp_path, text))
    incubator = site.devices["incubator"]
    assert incubator.title == "Incubator 3000"
    assert incubator.settings.interval == 2.0
    point = incubator.points["temperature"]
    assert (point.parameter, point.unit) == ("temp", "C")
    assert point.model_dump()["base"] == 37.0
    assert point.model_dump()["noise"] == 0.1


@pytest.mark.parametrize(
    ("edits", "key", "message"),
    [
        pytest.param(
            (('transport = "sim"', 'transport = "canbus"'),),
            "driver.transport",
            "unknown transport 'canbus'",
            id="unknown-transport",
        ),
        pytest.param(
            (("seed = 7", "seed = 7\nparity = 'E'"),),
            "defaults.parity",
            "unknown key (known keys here: interval, outages, repeat, seed)",
            id="unknown-default",
        ),
        pytest.param(
            (("base = 37.0", "base = '37'"),),
            "points.temperature.base",
            "must be a number (got '37')",
            id="bad-point",
        ),
        pytest.param(
            (('model = "Incubator 3000"', 'modell = "Incubator 3000"'),),
            "driver.modell",
            "unknown key (did you mean 'model'?)",
            id="unknown-header-key",
        ),
    ],
)
def test_malformed_driver(
    edits: tuple[tuple[str | None, str], ...],
    key: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "acme-3000.toml"
    path.write_text(edit(SITE_DRIVER, *edits))
    code, err = run_check(capsys, path)
    assert code == 2
    assert err == [where(path, key) + message]


def test_broken_driver_names_the_device_that_uses_it(tmp_path: Path) -> None:
    (tmp_path / "drivers").mkdir()
    driver = tmp_path / "drivers" / "acme-3000.toml"
    driver.write_text(SITE_DRIVER.replace("seed = 7", "seed = 7.5"))
    text = edit(
        SITE,
        ("[site]", 'drivers_dir = "drivers"\n\n[site]'),
        ('driver = "sim"\ntransport', 'driver = "acme-3000"\ntransport'),
    )
    with pytest.raises(ConfigError) as exc:
        load_site(write_site(tmp_path, text))
    assert [str(p) for p in exc.value.problems] == [
        f"{driver}: defaults.seed (device 'incubator'): must be a whole number (got 7.5)"
    ]


def test_shipped_sim_driver() -> None:
    driver = load_driver("sim")
    assert driver.info.transport == "sim"
    assert driver.info.source == str(REPO / "drivers" / "sim.toml")
    assert driver.defaults == {"interval": 1.0}


# --- whole devices and shared buses, at load (issue 11, item 6) -------------------------------
#
# A serial device that could not run used to pass `pocd check` and fail only when the daemon
# built its runner; two devices clashing on a bus, only when the second joined it. Each is now
# a problem at load, with the file, the key path and the device.

BALANCE = """
[[devices]]
id = "balance"
driver = "mettler-sics"
transport = { port = "/dev/ttyUSB7" }
"""

VAISALA = """
[[devices]]
id = "co2"
driver = "vaisala-gmp251"
transport = { serial_port = "/dev/ttyUSB7" }
"""

HAMILTON = """
[[devices]]
id = "ph"
driver = "hamilton-arc-ph"
transport = { serial_port = "/dev/ttyUSB7", unit_id = 240 }
"""

DEVICE_CASES = {
    "serial-device-without-port": Bad(
        ((None, BALANCE.replace('transport = { port = "/dev/ttyUSB7" }\n', "")),),
        "devices[2].transport",
        "needs port (e.g. /dev/ttyUSB0)",
        "balance",
    ),
    "serial-point-reads-no-group": Bad(
        ((None, BALANCE + 'points.weight = { field = "wieght" }\n'),),
        "devices[2].points.weight.field",
        "no reply shape has a group 'wieght'",
        "balance",
    ),
    "serial-status-word-for-unknown-point": Bad(
        (
            (
                None,
                BALANCE.replace(
                    '"/dev/ttyUSB7" }',
                    '"/dev/ttyUSB7", replies = [{ pattern = '
                    '"^(?P<weight>\\\\S+) (?P<status>\\\\S)$", '
                    'words = [{ word = "D", quality = "bad", points = ["mass"] }] }] }',
                ),
            ),
        ),
        "devices[2].transport.replies[0]",
        "status word 'D': unknown point 'mass'",
        "balance",
    ),
    "two-units-with-one-id-on-a-bus": Bad(
        ((None, VAISALA + HAMILTON),),
        "devices[3].transport.unit_id",
        "unit id 240 on /dev/ttyUSB7 is already used by 'co2' (devices[2])",
        "ph",
    ),
    "two-units-with-one-id-behind-a-gateway": Bad(
        (
            (
                None,
                VAISALA.replace('serial_port = "/dev/ttyUSB7"', 'host = "10.0.0.9"')
                + HAMILTON.replace('serial_port = "/dev/ttyUSB7"', 'host = "10.0.0.9"'),
            ),
        ),
        "devices[3].transport.unit_id",
        "unit id 240 on tcp 10.0.0.9:502 is already used by 'co2' (devices[2])",
        "ph",
    ),
    "line-settings-differ-on-a-bus": Bad(
        ((None, VAISALA + HAMILTON.replace("unit_id = 240", "unit_id = 1, stopbits = 1")),),
        "devices[3].transport",
        "line settings 19200 8N1, frame_pause 2.01 ms on /dev/ttyUSB7 differ from "
        "19200 8N2, frame_pause 2.01 ms of 'co2' (devices[2])",
        "ph",
    ),
    "modbus-rtu-beside-serial-ascii-on-one-tty": Bad(
        ((None, BALANCE + VAISALA),),
        "devices[3].transport.serial_port",
        "/dev/ttyUSB7 carries serial ASCII for 'balance' (devices[2]); a port speaks one "
        "protocol, so Modbus RTU cannot share it",
        "co2",
    ),
    "two-names-of-one-port-are-one-bus": Bad(
        ((None, BALANCE + VAISALA.replace("/dev/ttyUSB7", "/dev/../dev/ttyUSB7")),),
        "devices[3].transport.serial_port",
        "a port speaks one protocol",
        "co2",
    ),
    "serial-line-settings-differ": Bad(
        (
            (
                None,
                BALANCE.replace('"/dev/ttyUSB7" }', '"/dev/ttyUSB7", address = "1" }')
                + BALANCE.replace('id = "balance"', 'id = "scale"').replace(
                    '"/dev/ttyUSB7" }', '"/dev/ttyUSB7", address = "2", baudrate = 19200 }'
                ),
            ),
        ),
        "devices[3].transport",
        "line settings 19200 8N1, lines ending b'\\r\\n', max_frame 1024 on /dev/ttyUSB7 differ",
        "scale",
    ),
    "one-serial-address-twice": Bad(
        ((None, BALANCE + BALANCE.replace('id = "balance"', 'id = "scale"')),),
        "devices[3].transport.address",
        "address '' on /dev/ttyUSB7 is already used by 'balance' (devices[2])",
        "scale",
    ),
    "a-streaming-device-must-be-alone": Bad(
        (
            (
                None,
                BALANCE.replace('"/dev/ttyUSB7" }', '"/dev/ttyUSB7", mode = "stream" }')
                + BALANCE.replace('id = "balance"', 'id = "scale"').replace(
                    '"/dev/ttyUSB7" }', '"/dev/ttyUSB7", address = "2" }'
                ),
            ),
        ),
        "devices[3].transport.port",
        "'balance' (devices[2]) streams",
        "scale",
    ),
}


def test_devices_that_share_a_bus_rightly_pass(tmp_path: Path) -> None:
    # Distinct unit ids with one line; a disabled device does not run, so it clashes with none.
    text = SITE + VAISALA + HAMILTON.replace("unit_id = 240", "unit_id = 1")
    text += VAISALA.replace('id = "co2"', 'id = "spare"\nenabled = false')
    site = load_site(write_site(tmp_path, text))
    assert set(site.devices) == {"incubator", "bioreactor", "co2", "ph"}


# --- paths relative to the config file, and the files pocd check reads (item 17) ------------

ROTEA_SECURED = """
[[devices]]
id = "rotea"
driver = "thermo-rotea"
transport.security_policy = "Basic256Sha256"
transport.certificate = "pki/client.der"
transport.private_key = "pki/client-key.pem"
transport.trust_dir = "pki/trusted"
transport.username = "op"
transport.password_file = "secrets/opcua-password"
"""


def _pki(folder: Path) -> None:
    (folder / "pki" / "trusted").mkdir(parents=True)
    (folder / "pki" / "client.der").write_bytes(b"cert")
    (folder / "pki" / "client-key.pem").write_bytes(b"key")
    (folder / "secrets").mkdir()
    (folder / "secrets" / "opcua-password").write_text("pw\n")


def test_opcua_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pki(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory plays no part
    site = load_site(write_site(tmp_path, SITE + ROTEA_SECURED))
    settings = site.devices["rotea"].settings.model_dump()
    assert settings["certificate"] == str(tmp_path / "pki" / "client.der")
    assert settings["private_key"] == str(tmp_path / "pki" / "client-key.pem")
    assert settings["trust_dir"] == str(tmp_path / "pki" / "trusted")
    assert settings["password_file"] == str(tmp_path / "secrets" / "opcua-password")
    assert check_files([str(tmp_path / "pocd.toml")]) == []


def test_check_reports_each_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pki(tmp_path)
    (tmp_path / "pki" / "client-key.pem").unlink()
    (tmp_path / "secrets" / "opcua-password").unlink()
    (tmp_path / "secrets" / "opcua-password").mkdir()  # a folder where a file belongs
    (tmp_path / "pki" / "trusted").rmdir()
    path = write_site(tmp_path, SITE + ROTEA_SECURED)
    load_site(path)  # the config itself is valid: `pocd run list` and friends still load it
    code, err = run_check(capsys, path)
    assert code == 2
    assert err == [
        f"{path}: devices[2].transport.private_key (device 'rotea'): no such file: "
        f"{tmp_path / 'pki' / 'client-key.pem'}",
        f"{path}: devices[2].transport.trust_dir (device 'rotea'): no such folder: "
        f"{tmp_path / 'pki' / 'trusted'}",
        f"{path}: devices[2].transport.password_file (device 'rotea'): "
        f"{tmp_path / 'secrets' / 'opcua-password'} is a folder, not a file",
    ]


def test_a_driver_files_paths_are_relative_to_the_driver_file(tmp_path: Path) -> None:
    _pki(tmp_path / "drivers")
    (tmp_path / "drivers" / "secured-rotea.toml").write_text(
        (REPO / "drivers" / "thermo-rotea.toml")
        .read_text()
        .replace(
            'read = "subscription"',
            'read = "subscription"\ntrust_dir = "pki/trusted"\ncertificate = "pki/client.der"',
        )
    )
    text = SITE.replace("[site]", 'drivers_dir = "drivers"\n\n[site]') + (
        '\n[[devices]]\nid = "rotea"\ndriver = "secured-rotea"\n'
        'transport = { security_policy = "Basic256Sha256", private_key = "key.pem" }\n'
    )
    (tmp_path / "key.pem").write_bytes(b"key")
    site = load_site(write_site(tmp_path, text))
    settings = site.devices["rotea"].settings.model_dump()
    assert settings["trust_dir"] == str(tmp_path / "drivers" / "pki" / "trusted")
    assert settings["certificate"] == str(tmp_path / "drivers" / "pki" / "client.der")
    assert settings["private_key"] == str(tmp_path / "key.pem")  # from the site config


# --- values no operator means (item 20) --------------------------------------------------------

ROTEA_USER = """
[[devices]]
id = "rotea"
driver = "thermo-rotea"
transport = { username = "op", password_env = "ROTEA_PASSWORD" }
"""

UNMEANT_CASES = {
    "flush-interval-zero": Bad(
        (('flush_interval = "200ms"', "flush_interval = 0"),),
        "store.flush_interval",
        "0 s would commit without pause and keep a core busy: at least 10ms",
    ),
    "flush-interval-a-day": Bad(
        (('flush_interval = "200ms"', 'flush_interval = "1d"'),),
        "store.flush_interval",
        "86400 s of samples would wait in memory, lost if the daemon crashes: at most 10s",
    ),
    "opcua-user-on-an-unsecured-channel": Bad(
        ((None, ROTEA_USER),),
        "devices[2].transport",
        "username 'op' needs a security_policy other than None: on an unsecured channel the "
        "password would travel in clear",
        "rotea",
    ),
}


CHECKED_CASES = {**DEVICE_CASES, **UNMEANT_CASES}


@pytest.mark.parametrize("case", CHECKED_CASES.values(), ids=CHECKED_CASES.keys())
def test_whole_device_bus_and_unmeant_problems_at_load(
    case: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_site(tmp_path, edit(SITE, *case.edits))
    code, err = run_check(capsys, path)
    assert code == 2
    line = find_problem(err, path, case.key, case.device)
    assert case.message in line.removeprefix(where(path, case.key, case.device))


def test_flush_interval_within_its_bounds_passes(tmp_path: Path) -> None:
    for value in ('"10ms"', '"10s"', "1"):
        site = load_site(write_site(tmp_path, edit(SITE, ('"200ms"', value))))
        assert 0.01 <= site.config.store.flush_interval <= 10


def test_check_reports_a_data_folder_that_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not-a-folder").write_text("")
    text = edit(SITE, ('flush_interval = "200ms"', 'data_dir = "not-a-folder/data"'))
    path = write_site(tmp_path, text)
    code, err = run_check(capsys, path)
    assert (code, err) == (
        2,
        [
            f"{path}: store.data_dir: the data folder {tmp_path / 'not-a-folder' / 'data'} "
            f"cannot be made: {tmp_path / 'not-a-folder'} is not a folder"
        ],
    )
    # A data folder that does not exist yet, in a writable place, is made at the first start.
    path = write_site(tmp_path, edit(SITE, ('flush_interval = "200ms"', 'data_dir = "new/d"')))
    assert run_check(capsys, path) == (0, [])


def test_an_api_open_to_the_network_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_site(tmp_path, edit(SITE, ('"127.0.0.1:8470"', '"0.0.0.0:8470"')))
    code = main(["check", str(path)])
    out = capsys.readouterr()
    assert code == 0  # it works: the operator is told, the service may start
    assert out.out == f"{path}: ok\n"
    assert out.err.startswith(
        f"warning: {path}: api.listen: 0.0.0.0:8470 can be reached from other machines without "
        "TLS: passwords, signatures and session tokens would cross the network in clear"
    )
    for loopback in ('"localhost:8470"', '"[::1]:8470"', '"127.0.0.2:8470"'):
        path = write_site(tmp_path, edit(SITE, ('"127.0.0.1:8470"', loopback)))
        assert run_check(capsys, path) == (0, [])


def test_a_route_to_a_disabled_channel_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "hook.secret").write_text("s3cret\n")
    channel = (
        '[[sinks.webhook]]\nname = "hook"\nurl = "http://h/x"\nsecret = { file = "hook.secret" }\n'
        'enabled = false\n[[notify.routes]]\nname = "ward"\nchannels = ["hook"]\n[site]'
    )
    path = write_site(tmp_path, edit(SITE, ("[site]", channel)))
    code = main(["check", str(path)])
    out = capsys.readouterr()
    assert code == 0
    assert out.err.startswith(
        f"warning: {path}: notify.routes[0]: route ward names the disabled channel hook"
    )


def test_check_reports_a_sinks_secret_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = (
        '\n[sinks.influxdb]\nurl = "http://127.0.0.1:8086"\napi = "v1"\ndatabase = "pocd"\n'
        'username = "pocd"\npassword = { file = "secrets/influx-password" }\n'
    )
    path = write_site(tmp_path, SITE + sink)
    site = load_site(path)  # resolved against the config file, as every path is
    (settings,) = site.config.sinks.influxdb
    assert settings.password is not None
    assert settings.password.file == str(tmp_path / "secrets" / "influx-password")
    code, err = run_check(capsys, path)
    assert code == 2
    assert err == [
        f"{path}: sinks.influxdb[0].password.file: no such file: "
        f"{tmp_path / 'secrets' / 'influx-password'}"
    ]
