"""Modbus codec, request planning and configuration: pure functions, anchored on golden bytes.

The wire tests (a real pymodbus server, socat ptys) are in test_modbus.py.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from pocd.errors import ConfigError
from pocd.settings import load_driver, load_site
from pocd.sim.modbus import device_from_driver, parse_fault
from pocd.transports import get_transport
from pocd.transports.modbus import ModbusPoint, ModbusRunner, ModbusSettings
from pocd.transports.modbus.codec import Item, crc16, decode, encode, read_decoder
from pocd.transports.modbus.config import REGISTER_COUNT, Block
from pocd.transports.modbus.plan import Read, Span, locate, plan_reads

ROOT = Path(__file__).resolve().parent.parent

# shared/DEVICES.md, from the manufacturers' manuals.
VAISALA_REQUEST = bytes.fromhex("F0 03 00 00 00 02 D1 2A")
VAISALA_RESPONSE = bytes.fromhex("F0 03 04 D4 7A 43 E8 33 AB")
HAMILTON_PH_REQUEST = bytes.fromhex("01 03 08 29 00 0A 16 65")


def test_crc_matches_the_golden_frames() -> None:
    for frame in (VAISALA_REQUEST, VAISALA_RESPONSE, HAMILTON_PH_REQUEST):
        assert crc16(frame[:-2]) == frame[-2:]


def test_vaisala_golden_response_is_465_66_ppm() -> None:
    data = VAISALA_RESPONSE[3:-2]
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    assert words == [0xD47A, 0x43E8]  # least significant word first
    value = decode(words, "float32", word_order="little")
    assert value == pytest.approx(465.66, abs=0.005)
    assert encode(value, "float32", word_order="little") == words


def _words(raw: bytes) -> list[int]:
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


CASES = [
    ("int16", -12345, ">h"),
    ("uint16", 54321, ">H"),
    ("int32", -123456789, ">i"),
    ("uint32", 3_000_000_000, ">I"),
    ("float32", 37.25, ">f"),
    ("float64", -1234.5678901234, ">d"),
]


@pytest.mark.parametrize(("type_", "value", "fmt"), CASES)
@pytest.mark.parametrize("word_order", ["big", "little"])
@pytest.mark.parametrize("byte_order", ["big", "little"])
def test_every_type_in_every_order(
    type_: str, value: float, fmt: str, word_order: str, byte_order: str
) -> None:
    # Expected registers built independently of the codec: big-endian bytes, then reorder.
    words = _words(struct.pack(fmt, value))
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    assert encode(value, type_, word_order, byte_order) == words  # type: ignore[arg-type]
    assert decode(words, type_, word_order, byte_order) == pytest.approx(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("byte_orders", [("big",), ("little",), ("big", "little")])
def test_a_read_decodes_all_its_values_at_once_as_each_alone(byte_orders: tuple[str, ...]) -> None:
    """One read's block with every type in both word orders (and a bit where byte orders mix,
    which takes the one-by-one path): read_decoder gives what decode gives for each."""
    block: list[int] = []
    items: list[Item] = []
    for i, (type_, value, _) in enumerate(CASES * 2):
        word_order = "little" if i % 2 else "big"
        byte_order = byte_orders[i % len(byte_orders)]
        items.append((len(block), type_, word_order, byte_order, None))  # type: ignore[arg-type]
        block += encode(value, type_, word_order, byte_order)  # type: ignore[arg-type]
    if len(byte_orders) > 1:
        items.append((0, "bit", "big", "big", 2))
    values = read_decoder(items)(block)
    assert len(values) == len(items)
    for (start, type_, word_order, byte_order, bit), value in zip(items, values, strict=True):
        words = block[start : start + REGISTER_COUNT[type_]]
        assert value == decode(words, type_, word_order, byte_order, bit)
    # Values may repeat registers and come in any order.
    assert read_decoder([items[1], items[0], items[1]])(block) == (values[1], values[0], values[1])


def test_bits_and_bools() -> None:
    assert decode([0b1000_0000_0000_1000], "bit", bit=3) == 1.0
    assert decode([0b1000_0000_0000_1000], "bit", bit=15) == 1.0
    assert decode([0b1000_0000_0000_1000], "bit", bit=4) == 0.0
    assert decode([7], "bool") == 1.0
    assert decode([0], "bool") == 0.0
    assert encode(1, "bit", bit=2, current=0x8000) == [0x8004]
    assert encode(0, "bit", bit=15, current=0x8004) == [0x0004]


def test_nan_and_integer_limits() -> None:
    assert math.isnan(decode(encode(math.nan, "float32", "little"), "float32", "little"))
    assert decode([0x8000], "int16") == -32768  # Vaisala's "no value" for integers
    assert encode(70000, "int16") == [0x7FFF]  # clamped, not wrapped


def test_nearby_points_merge_into_one_read() -> None:
    spans = [Span("holding", 0, 2), Span("holding", 4, 2), Span("holding", 0x800, 1)]
    spans.append(Span("holding", 0x801, 1))
    assert plan_reads(spans, max_gap=2) == [Read("holding", 0, 6), Read("holding", 0x800, 2)]
    assert len(plan_reads(spans, max_gap=1)) == 3


def test_reads_stop_at_125_registers_and_2000_bits() -> None:
    spans = [Span("holding", a, 1) for a in range(130)]
    assert plan_reads(spans, max_gap=0) == [Read("holding", 0, 125), Read("holding", 125, 5)]
    assert len(plan_reads(spans, max_gap=0, max_registers=50)) == 3
    coils = [Span("coil", 0, 1), Span("coil", 1999, 1), Span("coil", 2000, 1)]
    assert plan_reads(coils, max_gap=2000) == [Read("coil", 0, 2000), Read("coil", 2000, 1)]


def test_functions_are_never_merged_and_come_in_code_order() -> None:
    spans = [Span("input", 0, 1), Span("holding", 1, 1), Span("coil", 3, 1), Span("discrete", 0, 1)]
    reads = plan_reads(spans, max_gap=100)
    assert [r.function for r in reads] == ["coil", "discrete", "holding", "input"]


def test_declared_blocks_are_read_whole() -> None:
    blocks = [Block(address=2089, count=10), Block(address=2409, count=10)]
    spans = [Span("holding", 2091, 2), Span("holding", 2093, 2), Span("holding", 2411, 2)]
    reads = plan_reads(spans, max_gap=0, blocks=blocks)
    assert reads == [Read("holding", 2089, 10), Read("holding", 2409, 10)]
    assert locate(reads, Span("holding", 2411, 2)) == (1, 2)


def test_driver_plans() -> None:
    vaisala = ModbusRunner(device_from_driver("co2", "vaisala-gmp251", transport={"host": "h"}))
    assert vaisala.reads == [Read("holding", 0, 6), Read("holding", 0x800, 2)]
    for driver in ("hamilton-arc-ph", "hamilton-visiferm-do"):
        runner = ModbusRunner(device_from_driver("x", driver, transport={"serial_port": "/dev/x"}))
        assert runner.reads == [Read("holding", 2089, 10), Read("holding", 2409, 10)]


def test_driver_defaults_and_site_overrides() -> None:
    spec = get_transport("modbus")
    assert spec.settings is ModbusSettings
    defaults = load_driver("vaisala-gmp251").defaults
    assert (defaults["unit_id"], defaults["baudrate"], defaults["stopbits"]) == (240, 19200, 2)
    device = device_from_driver(
        "co2", "vaisala-gmp251", transport={"serial_port": "/dev/ttyUSB0", "unit_id": 17}
    )
    assert isinstance(device.settings, ModbusSettings)
    assert (device.settings.unit_id, device.settings.stopbits) == (17, 2)
    assert device.settings.pause == pytest.approx(38.5 / 19200)  # 3.5 characters at 19200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"function": "coil", "address": 1, "type": "uint16"}, "is type 'bool'"),
        ({"address": 1, "type": "bit"}, "needs bit"),
        ({"address": 65535, "type": "float32"}, "runs past 65535"),
        ({"address": 1, "status": [{"address": 2}]}, "a status rule needs"),
        ({"address": 1, "typo": 1}, "Extra inputs"),
        ({"address": 1, "valid_min": 5.0, "valid_max": 1.0}, "valid_min must be below"),
    ],
)
def test_bad_points_are_rejected_at_load(body: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModbusPoint.model_validate(body)


def test_coils_default_to_bool() -> None:
    assert ModbusPoint.model_validate({"function": "coil", "address": 3}).type == "bool"


def test_a_device_needs_exactly_one_endpoint() -> None:
    with pytest.raises(ValidationError, match="not both"):
        ModbusSettings.model_validate({"host": "h", "serial_port": "/dev/ttyS0"})
    with pytest.raises(ConfigError, match=r"needs host .* or serial_port") as caught:
        ModbusRunner(device_from_driver("probe", "vaisala-gmp251"))
    assert caught.value.problems[0].device == "probe"
    with pytest.raises(ConfigError, match="needs at least one point"):
        ModbusRunner(device_from_driver("plc", "modbus", transport={"host": "10.0.0.20"}))


def test_fault_specs() -> None:
    fault = parse_fault("silence,unit=2,after=5s,for=10s")
    assert (fault.kind, fault.unit, fault.after, fault.duration) == ("silence", 2, 5.0, 10.0)
    assert parse_fault("exception,code=6,every=3").code == 6
    assert parse_fault("set,point=co2_status,value=0x100").value == 256.0
    assert not parse_fault("startup,for=1s").active(unit=1, elapsed=1.5, request=1)
    assert parse_fault("crc,every=2").active(unit=1, elapsed=0, request=4)
    for bad in ("melt", "silence,unit", "set,value=1", "crc,every=0", "crc,colour=red"):
        with pytest.raises(ValueError):  # noqa: PT011 - each has its own message
            parse_fault(bad)


SITE = """\
[site]
id = "lab"
name = "Lab"
timezone = "Europe/London"
control_site = "cs"

[protocols]
dir = "protocols"

[[devices]]
id = "plc"
driver = "modbus"
transport = { host = "10.0.0.20", interval = "500ms" }
points.level = { address = 100, type = "float32", unit = "L" }
points.pump_on = { function = "coil", address = 5 }

[[devices]]
id = "co2"
driver = "vaisala-gmp251"
transport = { serial_port = "/dev/ttyUSB0", unit_id = 17, stopbits = 1 }
points.co2 = { unit = "ppm", valid_max = 100000.0 }
"""


def test_a_site_config_resolves_modbus_devices_over_their_drivers(tmp_path: Path) -> None:
    (tmp_path / "protocols").mkdir()
    (tmp_path / "pocd.toml").write_text(SITE)
    site = load_site(tmp_path / "pocd.toml")
    plc, co2 = site.devices["plc"], site.devices["co2"]
    assert isinstance(plc.settings, ModbusSettings) and isinstance(co2.settings, ModbusSettings)
    assert (plc.settings.host, plc.settings.port, plc.settings.interval) == ("10.0.0.20", 502, 0.5)
    assert plc.points["pump_on"] == ModbusPoint(function="coil", address=5, type="bool")
    assert (co2.settings.unit_id, co2.settings.baudrate, co2.settings.stopbits) == (17, 19200, 1)
    co2_point = co2.points["co2"]
    assert isinstance(co2_point, ModbusPoint)
    # A site overrides keys of a driver point; the rest stays as the driver says.
    assert (co2_point.valid_max, co2_point.word_order, len(co2_point.status)) == (1e5, "little", 2)
    assert ModbusRunner(co2).reads == [Read("holding", 0, 6), Read("holding", 0x800, 2)]


def test_a_bad_modbus_key_names_the_file_key_and_device(tmp_path: Path) -> None:
    (tmp_path / "protocols").mkdir()
    site = SITE.replace('type = "float32", unit = "L"', 'type = "float33", unit = "L"')
    (tmp_path / "pocd.toml").write_text(site.replace("stopbits = 1", "stopbits = 3"))
    with pytest.raises(ConfigError) as caught:
        load_site(tmp_path / "pocd.toml")
    problems = {(p.key, p.device) for p in caught.value.problems}
    assert ("devices[0].points.level.type", "plc") in problems
    assert ("devices[1].transport.stopbits", "co2") in problems


def test_check_reports_a_modbus_device_without_address_or_points(tmp_path: Path) -> None:
    from pocd.errors import ConfigError
    from pocd.settings import load_site

    config = tmp_path / "pocd.toml"
    config.write_text(
        f"""
[site]
id = "s"
name = "n"
timezone = "UTC"
control_site = "c"
[protocols]
dir = "{ROOT / "config" / "protocols"}"
[[devices]]
id = "co2"
driver = "vaisala-gmp251"
[[devices]]
id = "generic"
driver = "modbus"
transport = {{ host = "127.0.0.1" }}
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_site(config)
    problems = [str(p).removeprefix(f"{config}: ") for p in caught.value.problems]
    assert problems == [
        "devices[0].transport (device 'co2'): needs host (Modbus TCP) or serial_port (Modbus RTU)",
        "devices[1].points (device 'generic'): a Modbus device needs at least one point "
        "(list them in the site config)",
    ]


@pytest.mark.parametrize(
    ("tick", "now", "wait", "expected"),
    [
        (0, 0.3, None, (1, 0)),  # on time: the next tick
        (0, 2.5, None, (3, 2)),  # ran late: ticks 1 and 2 are skipped, not bunched up
        (0, 0.3, 2.2, (3, 0)),  # no answer: wait 2.2 s, those ticks are not "skipped"
        (4, 4.2, 0.1, (5, 0)),  # a short wait keeps the grid
    ],
)
def test_next_poll_keeps_the_grid(
    tick: int, now: float, wait: float | None, expected: tuple[int, int]
) -> None:
    from pocd.transports import next_poll

    assert next_poll(tick, 0.0, now, 1.0, wait) == expected
