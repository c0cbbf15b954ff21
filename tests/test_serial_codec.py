"""The serial codec without a port: golden frames from the manuals, checksums, framers, reply
shapes and quality, driver and site config validation, and fuzzing of framer + parser.

Golden strings are the ones in shared/DEVICES.md (and the Vaisala FORM checksum example of the
PTB220 manual), byte for byte. Tests over a pty are in test_serial.py.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocd.errors import ConfigError
from pocd.model import Incident, Quality, Sample
from pocd.settings import load_driver, load_site
from pocd.transports.serial import CHECKSUMS, SerialRunner
from pocd.transports.serial.codec import (
    ETX,
    STX,
    Codec,
    Frame,
    LineFramer,
    Rejected,
    Reply,
    StxEtxFramer,
    make_framer,
)
from tests.serialkit import device, runner
from tests.sitekit import write_site

SERIAL_DRIVERS = ["mettler-sics", "alicat-mfc", "vaisala-gmp251-ascii", "thermo-heracell"]
ALICAT_GOLDEN = b"A +013.60 +024.38 +016.67 +015.44 +015.44 Air"


def read(serial: SerialRunner, data: bytes) -> tuple[dict[str, Sample], list[Incident]]:
    """The samples (by point) and incidents one frame gives."""
    records, _ = serial.frame_records(Frame(data), 1)
    found = {r.point: r for r in records if isinstance(r, Sample)}
    return found, [r for r in records if isinstance(r, Incident)]


# --- golden frames ----------------------------------------------------------------------------


def test_heracell_checksums_of_the_manual() -> None:
    xor = CHECKSUMS["heracell-xor"]
    assert xor is not None
    assert xor.text(b"?:3010:00::") == b"c2"
    assert xor.text(b"!:0011:08:31.07.10:") == b"d2"


def test_heracell_request_is_sent_with_its_checksum() -> None:
    codec = Codec(device("thermo-heracell", "/dev/null").settings)  # type: ignore[arg-type]
    assert codec.encode("?:3010:00::") == b"?:3010:00::c2\r"


def test_heracell_reply_is_checked_and_read() -> None:
    heracell = runner("thermo-heracell", "/dev/null")
    assert heracell.codec.checksum is not None
    body = b"!:3010:05:037.1:"
    found, incidents = read(heracell, body + heracell.codec.checksum.text(body))
    assert found["temperature"].value == pytest.approx(37.1)
    assert found["temperature"].quality is Quality.GOOD
    assert incidents == []
    # Uppercase hex is accepted too (the manual's examples are lowercase).
    found, _ = read(heracell, body + heracell.codec.checksum.text(body).upper())
    assert found["temperature"].value == pytest.approx(37.1)


def test_vaisala_form_checksums() -> None:
    cs4, cs2, csx = CHECKSUMS["vaisala-cs4"], CHECKSUMS["vaisala-cs2"], CHECKSUMS["vaisala-csx"]
    assert cs4 is not None and cs2 is not None and csx is not None
    # PTB220 user's guide, appendix "Checksum": the bytes of "1010.09 " sum to 0x179.
    assert cs4.text(b"1010.09 ") == b"0179"
    assert cs2.text(b"1010.09 ") == b"79"
    # CSX is the NMEA XOR where '$' and '*' count as zero.
    assert csx.text(b"$GP*A") == format(ord("G") ^ ord("P") ^ ord("A"), "02X").encode()


def test_vaisala_reading_with_cs4() -> None:
    vaisala = runner(
        "vaisala-gmp251-ascii",
        "/dev/null",
        transport={"checksum": "vaisala-cs4", "checksum_separator": " "},
    )
    body = b"CO2=  1702 ppm "
    frame = body + format(sum(body) % 65536, "04X").encode()
    found, incidents = read(vaisala, frame)
    assert found["co2"].value == 1702.0
    assert found["co2"].quality is Quality.GOOD
    assert incidents == []
    _, incidents = read(vaisala, body + b"0000")
    assert [i.code for i in incidents] == ["checksum"]
    assert incidents[0].raw == body + b"0000"


def test_vaisala_send_reply_of_the_manual() -> None:
    found, incidents = read(runner("vaisala-gmp251-ascii", "/dev/null"), b"CO2=  1702 ppm")
    assert found["co2"].value == 1702.0
    assert found["co2"].quality is Quality.GOOD
    assert incidents == []


def test_mettler_stable_weight() -> None:
    found, incidents = read(runner("mettler-sics", "/dev/null"), b"S S      100.00 g")
    weight = found["weight"]
    assert weight.value == 100.00
    assert weight.quality is Quality.GOOD
    assert weight.reason == ""
    assert incidents == []


@pytest.mark.parametrize(
    ("frame", "value", "quality", "reason"),
    [
        (b"S D      100.00 g", 100.0, Quality.UNCERTAIN, "dynamic (not settled)"),
        (b"S S     -12.34 g", -12.34, Quality.GOOD, ""),
        (b"S S      1.2345 kg", 1234.5, Quality.GOOD, ""),
        (b"S S      12.3 lb", math.nan, Quality.BAD, "unit"),
        (b"S +", math.nan, Quality.BAD, "overload"),
        (b"S -", math.nan, Quality.BAD, "underload"),
        (b"S I", math.nan, Quality.BAD, "balance busy (command not executable now)"),
    ],
)
def test_mettler_status_and_error_replies(
    frame: bytes, value: float, quality: Quality, reason: str
) -> None:
    found, _ = read(runner("mettler-sics", "/dev/null"), frame)
    weight = found["weight"]
    assert weight.value == pytest.approx(value, nan_ok=True)
    assert weight.quality is quality
    assert weight.reason == reason


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"ES", "sics-syntax-error"),
        (b"ET", "sics-transmission-error"),
        (b"EL", "sics-logical-error"),
    ],
)
def test_mettler_error_replies_are_incidents(frame: bytes, code: str) -> None:
    found, incidents = read(runner("mettler-sics", "/dev/null"), frame)
    assert [i.code for i in incidents] == [code]
    assert incidents[0].raw == frame
    assert found["weight"].quality is Quality.BAD


def test_alicat_frame_of_the_manual() -> None:
    found, incidents = read(runner("alicat-mfc", "/dev/null"), ALICAT_GOLDEN)
    assert {name: s.value for name, s in found.items()} == {
        "pressure": 13.60,
        "temperature": 24.38,
        "volumetric_flow": 16.67,
        "mass_flow": 15.44,
        "setpoint": 15.44,
        "gas": 0.0,  # Air
    }
    assert all(s.quality is Quality.GOOD for s in found.values())
    assert incidents == []


def test_alicat_status_words_set_quality_per_point() -> None:
    alicat = runner("alicat-mfc", "/dev/null")
    found, _ = read(alicat, ALICAT_GOLDEN + b" MOV HLD LCK")
    assert found["mass_flow"].quality is Quality.BAD
    assert found["mass_flow"].reason == "mass flow over range; valve held"
    assert found["volumetric_flow"].quality is Quality.UNCERTAIN
    assert found["setpoint"].quality is Quality.UNCERTAIN
    assert found["pressure"].quality is Quality.GOOD
    assert found["gas"].quality is Quality.GOOD
    found, _ = read(alicat, ALICAT_GOLDEN + b" ADC")
    assert all(s.quality is Quality.BAD for s in found.values())
    found, incidents = read(alicat, ALICAT_GOLDEN + b" XYZ XYZ QQQ")  # words no rule names
    assert found["pressure"].quality is Quality.UNCERTAIN
    assert found["pressure"].reason == "status unknown-word"  # a code: the words are the device's
    assert {i.code for i in incidents} == {"unknown-word"}
    assert all(b"XYZ XYZ QQQ" in i.raw and "XYZ XYZ QQQ" in i.message for i in incidents)


def test_alicat_other_unit_and_unknown_gas() -> None:
    alicat = runner("alicat-mfc", "/dev/null", transport={"address": "B"})
    found, incidents = read(alicat, ALICAT_GOLDEN)  # unit A answering: not ours
    assert found == {}
    assert [i.code for i in incidents] == ["unparseable"]
    assert incidents[0].raw == ALICAT_GOLDEN
    found, incidents = read(alicat, b"B +013.60 +024.38 +016.67 +015.44 +015.44 Xenon")
    assert found["gas"].quality is Quality.BAD
    assert found["gas"].reason == "unknown-code"
    assert [i.code for i in incidents] == ["unknown-code"]
    assert "Xenon" in incidents[0].message and incidents[0].raw.endswith(b"Xenon")
    assert found["pressure"].value == 13.6


def test_alicat_unknown_command_reply() -> None:
    found, incidents = read(runner("alicat-mfc", "/dev/null"), b"?")
    assert [i.code for i in incidents] == ["alicat-unknown-command"]
    assert all(s.quality is Quality.BAD for s in found.values())


def test_heracell_error_replies() -> None:
    heracell = runner("thermo-heracell", "/dev/null")
    xor = heracell.codec.checksum
    assert xor is not None
    for digit, code in [
        ("0", "heracell-telegram-error"),
        ("1", "heracell-unknown-parameter"),
        ("2", "heracell-memory-error"),
        ("3", "heracell-data-error"),
    ]:
        body = f"!:3010:02:?{digit}:".encode()
        found, incidents = read(heracell, body + xor.text(body))
        assert [i.code for i in incidents] == [code]
        assert found["temperature"].quality is Quality.BAD


# --- framers ----------------------------------------------------------------------------------


def test_line_framer_joins_a_terminator_split_across_reads() -> None:
    framer = LineFramer(b"\r\n", 64)
    assert framer.feed(b"S S   1.00 g\r") == []
    assert framer.feed(b"\nS D") == [Frame(b"S S   1.00 g")]
    assert framer.pending == 3
    assert framer.flush() == Frame(b"S D", "partial", terminated=False)
    assert framer.flush() is None


def test_line_framer_custom_terminator_and_overlong() -> None:
    framer = LineFramer(b"#", 8)
    assert framer.feed(b"ab#cd#") == [Frame(b"ab"), Frame(b"cd")]
    assert framer.feed(b"0123456789abcdef") == [
        Frame(b"0123456789abcdef", "overlong", terminated=False)
    ]
    assert framer.pending == 0


def test_stx_etx_framer() -> None:
    framer = StxEtxFramer(32)
    frames = framer.feed(b"zz" + STX + b"one" + ETX + STX + b"tw")
    assert frames == [Frame(b"zz", "garbage", terminated=False), Frame(b"one")]
    assert framer.feed(b"o" + STX + b"three" + ETX) == [
        Frame(b"two", "partial", terminated=False),
        Frame(b"three"),
    ]
    assert framer.feed(b"junk") == []
    assert framer.flush() == Frame(b"junk", "garbage", terminated=False)


def test_stx_etx_device_over_the_codec() -> None:
    settings = device("mettler-sics", "/dev/null", transport={"framing": "stx-etx"}).settings
    codec = Codec(settings)  # type: ignore[arg-type]
    assert codec.encode("SI") == STX + b"SI" + ETX
    assert codec.seal("S S 1.00 g") == STX + b"S S 1.00 g" + ETX


# --- configuration ----------------------------------------------------------------------------


def test_shipped_serial_drivers_build_runners() -> None:
    for name in SERIAL_DRIVERS:
        built = runner(name, "/dev/null")
        assert built.requests or built.settings.mode == "stream"
        assert load_driver(name).info.transport == "serial"


def _driver_file(folder: Path, body: str) -> str:
    path = folder / "probe.toml"
    path.write_text('[driver]\ntransport = "serial"\n' + body)
    return str(path)


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ("[defaults]\nchecksum = 'crc99'\n", "defaults.checksum", "unknown checksum 'crc99'"),
        ("[defaults]\nstopbits = 3\n", "defaults.stopbits", "stop bits are 1, 1.5 or 2"),
        ("[defaults]\nbaudrate = 'fast'\n", "defaults.baudrate", "must be a whole number"),
        (
            "[[defaults.replies]]\npattern = '(unclosed'\n",
            "defaults.replies[0].pattern",
            "not a valid regular expression",
        ),
        (
            "[[defaults.replies]]\npattern = '(?P<v>\\d+)'\n"
            "words = [{ word = 'X', quality = 'bad', group = 'flags' }]\n",
            "defaults.replies[0]",
            "the pattern has no group 'flags'",
        ),
        ("[defaults]\nparity = 'X'\n", "defaults.parity", "must be 'N', 'E', 'O', 'M' or 'S'"),
        ("[defaults]\nterminatr = '\\r'\n", "defaults.terminatr", "did you mean 'terminator'"),
        ("[points.t]\nunits = { C = 1.0 }\n", "points.t", "units need unit_field"),
    ],
)
def test_driver_file_mistakes_name_the_key(
    tmp_path: Path, body: str, key: str, message: str
) -> None:
    path = _driver_file(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_driver("probe", [tmp_path])
    problem = caught.value.problems[0]
    assert problem.file == path
    assert problem.key == key
    assert message in problem.message


def test_device_level_mistakes_are_found_when_the_runner_is_built() -> None:
    with pytest.raises(ConfigError) as caught:
        runner("mettler-sics", "/dev/null", points={"tare": {"field": "tare", "unit": "g"}})
    assert [(p.key, p.device) for p in caught.value.problems] == [
        ("points.tare.field", "mettler-sics")
    ]
    with pytest.raises(ConfigError, match="needs port"):
        SerialRunner(device("alicat-mfc", "/dev/null", transport={"port": None}))


def test_site_config_maps_serial_points_to_protocol_parameters(tmp_path: Path) -> None:
    """How a site declares serial devices: the port (a by-id link survives replugging), line
    settings that differ from the driver's, and which point feeds which protocol parameter."""
    devices = """
[[devices]]
id = "incubator-b"
driver = "thermo-heracell"
title = "CO2 incubator, suite B"
serial_number = "42231001"
points.temperature = { parameter = "temperature" }
points.co2 = { parameter = "co2" }
[devices.transport]
port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1ABC-if00-port0"
baudrate = 19200  # as set on the incubator's touchscreen
interval = "2s"

[[devices]]
id = "balance-1"
driver = "mettler-sics"
transport = { port = "/dev/ttyUSB1", mode = "stream", timeout = "2s" }

[[devices]]
id = "mfc-co2"
driver = "alicat-mfc"
transport = { port = "/dev/ttyUSB2", address = "B" }
points.mass_flow = { description = "CO2 into the incubator" }
"""
    site = load_site(write_site(tmp_path, devices=devices))
    incubator = site.devices["incubator-b"]
    assert incubator.points["temperature"].parameter == "temperature"
    assert incubator.points["co2"].parameter == "co2"
    assert incubator.settings.baudrate == 19200  # type: ignore[attr-defined]
    assert incubator.settings.checksum == "heracell-xor"  # type: ignore[attr-defined]
    assert site.devices["balance-1"].settings.mode == "stream"  # type: ignore[attr-defined]
    mfc = SerialRunner(site.devices["mfc-co2"])
    assert [r.data for r in mfc.requests] == [b"B\r"]


def test_site_config_serial_mistakes_name_the_device(tmp_path: Path) -> None:
    devices = """
[[devices]]
id = "balance-1"
driver = "mettler-sics"
transport = { port = "/dev/ttyUSB1", mode = "listen" }
"""
    with pytest.raises(ConfigError) as caught:
        load_site(write_site(tmp_path, devices=devices))
    problem = caught.value.problems[0]
    assert (problem.key, problem.device) == ("devices[0].transport.mode", "balance-1")


# --- fuzzing ----------------------------------------------------------------------------------

_RUNNERS: dict[str, dict[str, Any]] = {
    "mettler-sics": {},
    "alicat-mfc": {},
    "thermo-heracell": {},
    "vaisala-gmp251-ascii": {"checksum": "vaisala-cs4", "checksum_separator": " "},
    "mettler-stx": {"framing": "stx-etx", "max_frame": 32},
}
_TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    STX,
    ETX,
    b"S S      100.00 g\r\n",
    b"S D 1.5 kg\r\n",
    b"S +\r\n",
    b"ES\r\n",
    b"S S  nan g\r\n",
    ALICAT_GOLDEN + b" MOV\r",
    b"A +1 +2 +3 +4 +5 Kr\r",
    b"!:3010:05:037.1:ce\r",
    b"!:3010:02:?1:" + b"00\r",
    b"CO2=  1702 ppm 0000\r\n",
    STX + b"S S 1.0 g" + ETX,
]


@functools.cache
def _fuzzed(name: str) -> SerialRunner:
    """One runner per driver for all examples: frame_records is pure (it counts nothing)."""
    driver = "mettler-sics" if name == "mettler-stx" else name
    return runner(driver, "/dev/null", transport=_RUNNERS[name])


_STREAMS = st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(_TOKENS)), max_size=25)


@pytest.mark.parametrize("name", sorted(_RUNNERS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_STREAMS)
def test_random_byte_streams_never_crash_and_every_rejected_frame_is_counted(
    name: str, chunks: list[bytes]
) -> None:
    serial = _fuzzed(name)
    settings_ = serial.settings
    framer = make_framer(settings_.framing, settings_.reply_terminator, settings_.max_frame)
    frames: list[Frame] = []
    for chunk in chunks:
        frames.extend(framer.feed(chunk))
    rest = framer.flush()
    frames.extend([rest] if rest is not None else [])

    # Cutting the same bytes into other pieces gives the same frames.
    whole = make_framer(settings_.framing, settings_.reply_terminator, settings_.max_frame)
    again = whole.feed(b"".join(chunks))
    tail = whole.flush()
    again += [tail] if tail is not None else []
    # (Where the framer gives up on an unterminated run of bytes depends on the reads.)
    if all(len(f.data) <= settings_.max_frame for f in frames + again):
        assert again == frames
    if settings_.framing == "line":  # no byte is lost: the frames and terminators are the input
        rebuilt = b"".join(
            f.data + (settings_.reply_terminator if f.terminated else b"") for f in frames
        )
        assert rebuilt == b"".join(chunks)

    for frame in frames:
        decoded = serial.codec.decode(frame)
        records, usable = serial.frame_records(frame, 1)
        if isinstance(decoded, Rejected):  # one incident, with the bytes, for each rejection
            assert not usable
            assert [(type(r), r.code, r.raw) for r in records if isinstance(r, Incident)] == [
                (Incident, decoded.code, frame.data)
            ]
        elif isinstance(decoded, Reply):
            assert usable
            for record in records:
                if isinstance(record, Sample) and record.quality is Quality.GOOD:
                    assert math.isfinite(record.value)
        else:
            assert records == []


# --- reasons are codes; infinities are never GOOD (issue 11, items 13 and 18) -------------------

_NUMBER = st.from_regex(r"\A[-+]?\d{1,400}(\.\d{0,3})?\Z")
_WORD = st.from_regex(r"\A[A-Z]{3}\Z")
_GAS = st.from_regex(r"\A[A-Za-z][\w-]{0,12}\Z")


def _alicat_reasons(alicat: SerialRunner) -> set[str]:
    """Every reason an Alicat sample may have: the driver's own, and the codes."""
    shapes = alicat.settings.replies
    driver = {s.reason for s in shapes} | {r.reason for s in shapes for r in s.words}
    codes = {"not-a-number", "unknown-code", "unit", "out-of-range", "overflow"}
    return driver | codes | {"status unknown-word"}


@settings(max_examples=200, deadline=None)
@given(
    numbers=st.lists(_NUMBER, min_size=5, max_size=5),
    gas=_GAS,
    words=st.lists(_WORD, max_size=6),
)
def test_whatever_the_device_sends_a_reason_is_one_of_a_few_codes(
    numbers: list[str], gas: str, words: list[str]
) -> None:
    """50,000 garbled readings once made 50,001 reasons (each interned for ever in the store):
    a reason must not hold what the device sent. The incident keeps that, with the raw bytes."""
    alicat = _fuzzed("alicat-mfc")
    frame = f"A {' '.join(numbers)} {gas}{''.join(' ' + w for w in words)}".encode()
    found, incidents = read(alicat, frame)
    allowed = _alicat_reasons(alicat)
    for sample in found.values():
        parts = sample.reason.split("; ") if sample.reason else []
        assert set(parts) <= allowed, sample
        assert len(parts) == len(set(parts)), sample  # each once: a bounded set of reasons
        if sample.quality is Quality.GOOD:
            assert math.isfinite(sample.value)
    assert all(i.raw == frame for i in incidents)


def test_an_infinity_made_by_the_scaling_is_bad_with_an_incident() -> None:
    alicat = runner(
        "alicat-mfc", "/dev/null", points={"pressure": {"scale": 1e300}, "mass_flow": {}}
    )
    frame = b"A +1000000000 +024.38 +016.67 +015.44 +015.44 Air"
    found, incidents = read(alicat, frame)
    pressure = found["pressure"]
    assert pressure.quality is Quality.BAD and pressure.reason == "overflow"
    assert math.isnan(pressure.value)  # no infinity reaches the store (nor InfluxDB)
    assert [(i.kind.value, i.code) for i in incidents] == [("data", "overflow")]
    assert incidents[0].raw == frame and incidents[0].message.startswith("pressure: overflow")
    assert found["temperature"].quality is Quality.GOOD  # the other points as usual
    # A huge number that the scaling keeps finite is a number.
    big = runner("alicat-mfc", "/dev/null", points={"pressure": {"scale": 1e-300}})
    found, incidents = read(big, frame)
    assert found["pressure"].quality is Quality.GOOD and incidents == []
