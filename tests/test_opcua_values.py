"""The pure parts of the OPC UA transport, with plain values: status codes to quality, values
to numbers, SourceTimestamps, the repeat filter and staleness, config checks at load, and
`pocd certs create`."""

from __future__ import annotations

import math
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asyncua import ua
from cryptography import x509

from pocd.errors import ConfigError
from pocd.model import Quality
from pocd.settings import check_files, load_site
from pocd.transports.opcua.certs import main as certs_main
from pocd.transports.opcua.config import BrowseName, OpcuaPoint, OpcuaSettings, parse_node
from pocd.transports.opcua.security import fingerprint
from pocd.transports.opcua.values import (
    FROZEN_REASON,
    IMPOSSIBLE_TIME,
    STALE_REASON,
    PointTrack,
    Reading,
    judge_status,
    reading_of,
    source_ns,
    to_number,
)
from tests.sitekit import ROOT

T0 = datetime(2026, 9, 1, 8, 0, 0, 123456, tzinfo=UTC)
T0_NS = 1_788_249_600_123_456_000


def data_value(value: object, status: int = 0, stamp: datetime | None = T0) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value), StatusCode=ua.StatusCode(status), SourceTimestamp=stamp)


@pytest.mark.parametrize(
    ("code", "quality", "reason"),
    [
        (ua.StatusCodes.Good, Quality.GOOD, ""),
        (ua.StatusCodes.GoodClamped, Quality.GOOD, ""),
        (ua.StatusCodes.UncertainLastUsableValue, Quality.UNCERTAIN, "UncertainLastUsableValue"),
        (
            ua.StatusCodes.UncertainSensorNotAccurate,
            Quality.UNCERTAIN,
            "UncertainSensorNotAccurate",
        ),
        (ua.StatusCodes.BadCommunicationError, Quality.BAD, "BadCommunicationError"),
        (ua.StatusCodes.BadSensorFailure | 0x0400, Quality.BAD, "BadSensorFailure"),  # info bits
        (0x80FF0000, Quality.BAD, "unknown-status"),  # a code this asyncua does not know
    ],
)
def test_status_codes_become_quality_with_the_status_name(
    code: int, quality: Quality, reason: str
) -> None:
    assert judge_status(code) == (quality, reason)


def test_values_become_numbers() -> None:
    steps = {"Washing": 2.0, "Harvest": 5.0}
    assert to_number(True, {}) == (1.0, "")
    assert to_number(42, {}) == (42.0, "")
    assert to_number(ua.ServerState.Running, {}) == (0.0, "")  # an enumeration
    assert to_number(ua.LocalizedText("Harvest"), steps) == (5.0, "")  # LADS CurrentStepName
    value, reason = to_number("Idle", steps)
    assert math.isnan(value) and reason == "unmapped-text"
    value, reason = to_number("CAR-T Wash 3", {})
    assert math.isnan(value) and reason == "text"
    assert to_number(float("inf"), {})[1] == "inf"
    assert to_number([1, 2], {})[1] == "unsupported-type"


def test_source_timestamps_are_nanoseconds_and_none_when_missing() -> None:
    assert source_ns(T0) == T0_NS
    assert source_ns(None) is None
    assert source_ns(datetime(1601, 1, 1, tzinfo=UTC)) is None  # OPC UA's null DateTime


def test_a_bad_value_is_dropped_an_uncertain_one_kept() -> None:
    bad = reading_of(data_value(36.9, ua.StatusCodes.BadCommunicationError), {})
    assert math.isnan(bad.value) and bad.quality is Quality.BAD
    assert bad.device_t == T0_NS and bad.reason == "BadCommunicationError"
    odd = reading_of(data_value(36.9, ua.StatusCodes.UncertainLastUsableValue), {})
    assert (odd.value, odd.quality) == (36.9, Quality.UNCERTAIN)
    out = reading_of(data_value(120.0), {}, eu_range=(0.0, 100.0))
    assert (out.quality, out.reason) == (Quality.UNCERTAIN, "outside-eurange")


def reading(value: float, stamp: int | None, quality: Quality = Quality.GOOD) -> Reading:
    return Reading(value, quality, "" if quality is Quality.GOOD else "BadX", stamp, 0)


def test_one_sample_per_point_and_source_time() -> None:
    track = PointTrack()
    take = track.take
    first = take("d", "p", 1, reading(1.0, 100), now=0.0)
    assert first is not None and first.device_t == 100
    assert take("d", "p", 2, reading(1.0, 100), now=0.1) is None  # a repeat: dropped
    assert take("d", "p", 3, reading(2.0, 200), now=0.2) is not None
    assert take("d", "p", 4, reading(1.0, 100), now=0.3) is None  # an older replay: dropped
    late = take("d", "p", 5, reading(1.5, 150), now=0.4)  # late but new: kept
    assert late is not None and late.device_t == 150
    frozen = take("d", "p", 6, reading(2.5, 200), now=0.5)  # new value, old time
    assert frozen is not None and frozen.device_t is None
    assert (frozen.quality, frozen.reason) == (Quality.UNCERTAIN, FROZEN_REASON)
    untimed = [take("d", "p", 7, reading(3.0, None), now=0.6) for _ in range(2)]
    assert all(s is not None and s.device_t is None for s in untimed)  # no time: all kept
    bad = [take("d", "p", 8, reading(math.nan, None, Quality.BAD), now=0.7) for _ in range(3)]
    assert bad[0] is not None and bad[1:] == [None, None]  # a fault without time: once


def test_a_source_time_that_stops_makes_the_point_stale_once() -> None:
    track = PointTrack(stale_after=5.0)
    assert track.take("d", "p", 1, reading(1.0, 100), now=10.0) is not None
    assert track.check_stale("d", "p", 2, now=14.0) is None
    assert track.take("d", "p", 3, reading(1.0, 100), now=14.5) is None
    marker = track.check_stale("d", "p", 4, now=15.5)
    assert marker is not None and marker.reason == STALE_REASON
    assert marker.quality is Quality.BAD and marker.device_t is None
    assert track.check_stale("d", "p", 5, now=30.0) is None  # once per stale stretch
    stuck = track.take("d", "p", 6, reading(1.1, 100), now=31.0)
    assert stuck is not None and (stuck.quality, stuck.reason) == (Quality.BAD, STALE_REASON)
    moving = track.take("d", "p", 7, reading(1.2, 300), now=32.0)
    assert moving is not None and moving.quality is Quality.GOOD and not track.stale
    track.restart(now=100.0)  # a new session: staleness counts from its start
    assert track.check_stale("d", "p", 8, now=104.0) is None


def test_the_stale_marker_reason_is_stale_and_nothing_else_uses_it() -> None:
    # The engine makes a BAD sample of reason `stale` a stale excursion (no fresh value).
    assert STALE_REASON == "stale"
    assert FROZEN_REASON not in ("stale", "")
    track = PointTrack(stale_after=1.0)
    track.take("d", "p", 1, reading(1.0, 100), now=0.0)
    marker = track.check_stale("d", "p", 2, now=2.0)
    assert marker is not None and (marker.quality, marker.reason) == (Quality.BAD, "stale")


# A time no device clock gives: OPC UA's DateTime.MaxValue, as asyncua decodes it.
MAX_VALUE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


@pytest.mark.parametrize(
    "stamp", [MAX_VALUE, datetime(2262, 4, 11, tzinfo=UTC), datetime(3000, 1, 1, tzinfo=UTC)]
)
def test_an_impossible_source_time_makes_the_reading_bad(stamp: datetime) -> None:
    """Nanoseconds past 2262 do not fit the store's 64-bit integers: one such device time
    once stopped every later write. It is judged here, at the source."""
    assert source_ns(stamp) is None
    got = reading_of(data_value(37.2, stamp=stamp), {})
    assert (got.value, got.quality, got.reason, got.device_t) == (
        37.2,
        Quality.BAD,
        IMPOSSIBLE_TIME,
        None,
    )
    assert got.fault == "impossible-time" and stamp.isoformat() in got.detail
    # Just before the limit is a time (wrong, perhaps, but one the store can hold).
    latest = datetime(2262, 4, 10, 23, 59, 59, tzinfo=UTC)
    ok = reading_of(data_value(37.2, stamp=latest), {})
    assert ok.quality is Quality.GOOD and ok.device_t is not None and ok.device_t < 2**63


def test_reasons_are_codes_the_server_text_is_kept_apart() -> None:
    text = reading_of(data_value("CAR-T Wash 3"), {})
    assert (text.quality, text.reason, text.text) == (Quality.BAD, "text", "CAR-T Wash 3")
    state = reading_of(data_value(ua.LocalizedText("Idle")), {"Running": 1.0})
    assert (state.reason, state.text) == ("unmapped-text", "Idle")
    mapped = reading_of(data_value("Running"), {"Running": 1.0})
    assert (mapped.value, mapped.reason, mapped.text) == (1.0, "", "Running")
    nan = reading_of(data_value(float("nan")), {})
    assert (nan.reason, nan.fault) == ("nan", "nan")
    unknown = reading_of(data_value(1.0, 0x80FF0000), {})
    assert (unknown.quality, unknown.reason) == (Quality.BAD, "unknown-status")
    odd = reading_of(data_value([1, 2]), {})
    assert (odd.reason, odd.fault) == ("unsupported-type", "unsupported-type")
    assert "[1, 2]" in odd.detail


def test_a_changed_text_without_a_source_time_is_news() -> None:
    track = PointTrack()
    untimed = [reading_of(data_value(t, stamp=None), {}) for t in ("A", "A", "B")]
    taken = [track.take("d", "p", i, r, now=0.0) for i, r in enumerate(untimed)]
    assert taken[0] is not None and taken[1] is None and taken[2] is not None


def test_node_ids_and_browse_paths() -> None:
    assert str(parse_node("ns=2;s=Rotea.ProtocolState")) == "ns=2;s=Rotea.ProtocolState"
    assert str(parse_node("nsu=http://opcfoundation.org/UA/LADS/;i=5")).startswith("nsu=")
    path = parse_node("/2:Rotea/rotea:ProtocolStepNumber")
    assert path.absolute and path.elements == (  # type: ignore[union-attr]
        BrowseName(2, "Rotea"),
        BrowseName("rotea", "ProtocolStepNumber"),
    )
    assert not parse_node("lads:FunctionSet/lads:SensorValue").absolute  # type: ignore[union-attr]
    for wrong in ("ns=2;x=Name", "//", "ns=two;s=Name"):
        with pytest.raises(ValueError, match=r"node id|browse path"):
            OpcuaPoint.model_validate({"node": wrong})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"security_policy": "Basic256Sha256"}, "needs certificate and private_key"),
        ({"security_mode": "Sign"}, "needs a security_policy"),
        ({"username": "op"}, "needs password_file or password_env"),
        ({"password_env": "X"}, "a password needs a username"),
        ({"endpoint": "http://x"}, "is not an endpoint"),
        ({"root": "2:Rotea"}, "must start at the Objects folder"),
        ({"backoff_min": 10, "backoff_max": 1}, "backoff_min"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpcuaSettings.model_validate(settings)


def test_the_shipped_drivers_pass_pocd_check() -> None:
    files = [
        str(ROOT / "drivers" / f"{n}.toml") for n in ("opcua", "lads-analog-sensor", "thermo-rotea")
    ]
    assert check_files(files) == []


def test_security_settings_are_checked_at_load(tmp_path: Path) -> None:
    site = tmp_path / "pocd.toml"
    (tmp_path / "protocols").mkdir()
    site.write_text(
        """
[site]
id = "s"
name = "S"
timezone = "UTC"
control_site = "c"

[[devices]]
id = "rotea"
driver = "thermo-rotea"
transport.security_policy = "Basic256Sha256"
transport.certificate = "c.der"
transport.private_key = "k.pem"
transport.username = "op"
points.protocol_state = { node = "ns=2;x=1" }
"""
    )
    problems = [str(p) for p in check_files([str(site)])]
    assert any("devices[0].transport" in p and "server_certificate" in p for p in problems)
    assert any("devices[0].points.protocol_state.node" in p for p in problems)
    with pytest.raises(ConfigError):
        load_site(site)


def test_certs_create_makes_a_pair_for_the_application_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "pki" / "pocd.der", tmp_path / "pki" / "pocd-key.pem"
    argv = ["create", "--certificate", str(cert), "--private-key", str(key)]
    assert certs_main([*argv, "--application-uri", "urn:site1:pocd", "--hostname", "gw1"]) == 0
    loaded = x509.load_der_x509_certificate(cert.read_bytes())
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:site1:pocd"]
    assert san.get_values_for_type(x509.DNSName) == ["gw1"]
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    out = capsys.readouterr().out
    assert fingerprint(loaded) in out and "urn:site1:pocd" in out
    assert certs_main(argv) == 1  # never replaces a pair a server may trust
    assert "exists" in capsys.readouterr().err
