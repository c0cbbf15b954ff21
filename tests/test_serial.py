"""The serial transport on the wire: socat pty pairs, pocd's simulator on the far end (or the
test itself, byte for byte), every shipped driver, both modes, each fault, unplugging.

No mocks: the runner opens a real pty through pyserial-asyncio-fast. Pure codec tests
(golden frames, checksums, framers, fuzzing of the parser) are in test_serial_codec.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pocd.errors import ConfigError
from pocd.model import CommStatus, Incident, Quality, Sample
from pocd.sim.serial import PtyPair, parse_fault
from pocd.transports.serial import SerialRunner
from pocd.transports.serial.codec import Rejected, make_framer
from pocd.transports.serial.port import Port, join, leave, ports
from tests.serialkit import (
    Inbox,
    Record,
    collect,
    comm,
    device,
    drain,
    eventually,
    incidents,
    runner,
    samples,
    simulating,
    simulator,
)
from tests.transportkit import PtyPeer, occurrences, repeats_in, running, until

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

# What each driver's simulator serves (its points' `sim.base`), and the commands it is sent.
EXPECTED: dict[str, tuple[dict[str, float], dict[str, int]]] = {
    "mettler-sics": ({"weight": 100.0}, {"SI": 3}),
    "alicat-mfc": (
        {
            "pressure": 14.7,
            "temperature": 24.0,
            "volumetric_flow": 0.52,
            "mass_flow": 0.5,
            "setpoint": 0.5,
            "gas": 4.0,
        },
        {"A": 3},
    ),
    "vaisala-gmp251-ascii": ({"co2": 50000.0}, {"send": 3}),
    "thermo-heracell": ({"temperature": 37.0, "co2": 5.0}, {"?:3010:00::": 3, "?:3020:00::": 3}),
}
TOLERANCE = {"weight": 1.0, "co2": 500.0, "temperature": 0.5}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[PtyPair]:
    """A socat pty pair: pocd opens `pair.host`, the simulator `pair.device`."""
    async with PtyPair(str(tmp_path / "tty")) as made:
        yield made


def sealed(body: bytes) -> bytes:
    """A Heracell telegram with its checksum, computed here again so as not to trust the
    codec's: the inverted XOR of every byte, lowercase hex, then CR."""
    check = 0
    for byte in body:
        check ^= byte
    return body + format(~check & 0xFF, "02x").encode() + b"\r"


@contextlib.contextmanager
def peer(path: str) -> Iterator[PtyPeer]:
    opened = PtyPeer(path)
    try:
        yield opened
    finally:
        opened.close()


async def port_open() -> None:
    await eventually(lambda: any(p.is_open for p in ports()))


# --- every driver, request/response -----------------------------------------------------------


@pytest.mark.parametrize("driver", sorted(EXPECTED))
async def test_every_driver_is_polled_over_a_pty(driver: str, pair: PtyPair) -> None:
    values, commands = EXPECTED[driver]
    sim = simulator(driver)
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    polled = runner(driver, pair.host)
    async with simulating(pair, sim), running([polled], inbox):
        await collect(inbox, seen, 3 * len(values))
    got = samples(seen)[: 3 * len(values)]
    assert {s.point for s in got} == set(values)
    for sample in got:
        assert sample.quality is Quality.GOOD, sample
        assert sample.value == pytest.approx(
            values[sample.point], abs=TOLERANCE.get(sample.point, 0.1)
        )
    assert incidents(seen) == []
    assert comm(seen) == []
    for command, count in commands.items():
        assert sim.commands[command] >= count


async def test_golden_exchanges_byte_for_byte(pty_pair: tuple[str, str]) -> None:
    """pocd sends exactly the manuals' requests and reads exactly their replies."""
    ours, theirs = pty_pair
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    balance = runner("mettler-sics", ours, transport={"interval": 10.0})
    with peer(theirs) as device_end:
        async with running([balance], inbox):
            assert await device_end.read_until(b"\r\n") == b"SI\r\n"
            device_end.write(b"S S      100.00 g\r\n")
            await collect(inbox, seen, 1)
    weight = samples(seen)[0]
    assert (weight.point, weight.value, weight.quality) == ("weight", 100.00, Quality.GOOD)

    seen.clear()
    incubator = runner("thermo-heracell", ours, transport={"interval": 10.0})
    with peer(theirs) as device_end:
        async with running([incubator], inbox):
            assert await device_end.read_until(b"\r") == b"?:3010:00::c2\r"  # the manual's
            device_end.write(sealed(b"!:3010:05:037.1:"))
            assert await device_end.read_until(b"\r") == sealed(b"?:3020:00::")
            device_end.write(sealed(b"!:3020:04:05.0:"))
            await collect(inbox, seen, 2)
    found = {s.point: s for s in samples(seen)}
    assert found["temperature"].value == 37.1
    assert found["co2"].value == 5.0
    assert incidents(seen) == [], incidents(seen)


async def test_vaisala_cs4_checksum_over_a_pty(pair: PtyPair) -> None:
    checksummed = {"checksum": "vaisala-cs4", "checksum_separator": " "}
    sim = simulator(
        "vaisala-gmp251-ascii", settings=checksummed, faults=[parse_fault("checksum,every=2")]
    )
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    probe = runner("vaisala-gmp251-ascii", pair.host, transport=checksummed)
    async with simulating(pair, sim), running([probe], inbox):
        await collect(inbox, seen, 3)
    seen += drain(inbox)  # the counts of repeats, put when the runner stopped
    assert all(s.quality is Quality.GOOD for s in samples(seen))
    bad = incidents(seen, "checksum")
    assert probe.counts["checksum"] >= 3  # every other reply, each retried
    assert all(i.raw.startswith(b"CO2=") for i in bad)
    assert occurrences(seen, "checksum") == probe.counts["checksum"]  # none lost


async def test_one_rs485_port_shared_by_two_addressed_units(pair: PtyPair) -> None:
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    unit_a = runner("alicat-mfc", pair.host, device_id="mfc-a")
    unit_b = runner("alicat-mfc", pair.host, device_id="mfc-b", transport={"address": "B"})
    sim_a = simulator("alicat-mfc")
    sim_b = simulator("alicat-mfc", settings={"address": "B"})
    async with simulating(pair, sim_a, sim_b), running([unit_a, unit_b], inbox):
        await collect(inbox, seen, 24)
        assert len(ports()) == 1
        assert set(ports()[0].members) == {"mfc-a", "mfc-b"}
    by_device = {s.device for s in samples(seen)}
    assert by_device == {"mfc-a", "mfc-b"}
    assert all(s.quality is Quality.GOOD for s in samples(seen))
    assert incidents(seen) == []
    assert sim_a.commands["A"] >= 2 and sim_b.commands["B"] >= 2


async def test_devices_that_cannot_share_a_port(tmp_path: Path) -> None:
    path = str(tmp_path / "bus")
    first = device("alicat-mfc", path).settings
    port = join("a", first)  # type: ignore[arg-type]
    try:
        for settings, message in [
            (device("alicat-mfc", path).settings, "address 'A'"),
            (
                device("alicat-mfc", path, transport={"address": "C", "baudrate": 38400}).settings,
                "differs",
            ),
            (
                device(
                    "mettler-sics",
                    path,
                    transport={"mode": "stream", "terminator": "\r", "baudrate": 19200},
                ).settings,
                "stream",
            ),
        ]:
            with pytest.raises(ConfigError, match=message):
                join("b", settings)  # type: ignore[arg-type]
        assert list(port.members) == ["a"]
    finally:
        await leave(port, "a")
    assert ports() == []


# --- stream mode ------------------------------------------------------------------------------


async def test_mettler_stream_mode(pair: PtyPair) -> None:
    sim = simulator("mettler-sics", faults=[parse_fault("set,var=status,value=D,after=0.6s")])
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    balance = runner("mettler-sics", pair.host, transport={"mode": "stream", "timeout": 1.0})
    async with simulating(pair, sim):
        async with running([balance], inbox):
            await until(
                inbox, seen, lambda r: isinstance(r, Sample) and r.quality is Quality.UNCERTAIN
            )
        assert sim.commands["SIR"] == 1
        assert balance.requests == []
        # The runner stopped the stream on its way out.
        await eventually(lambda: sim.commands["SI"] >= 1)
        assert not sim.streaming
    weights = samples(seen)
    assert len(weights) >= 2
    assert weights[0].quality is Quality.GOOD and weights[0].value == pytest.approx(100.0, abs=1)
    assert weights[-1].reason == "dynamic (not settled)"
    assert incidents(seen) == []


async def test_stream_silence_is_comm_loss_and_the_stream_is_restarted(pair: PtyPair) -> None:
    sim = simulator("mettler-sics", faults=[parse_fault("silence,after=0.3s,for=0.8s")])
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    balance = runner("mettler-sics", pair.host, transport={"mode": "stream", "timeout": 0.6})
    async with simulating(pair, sim), running([balance], inbox):
        lost = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        back = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        await until(inbox, seen, lambda r: isinstance(r, Sample))
    assert isinstance(lost, CommStatus) and isinstance(back, CommStatus)
    assert (lost.ok, back.ok) == (False, True)
    assert "nothing usable" in lost.reason
    assert sim.commands["SIR"] >= 2  # asked again after the silence
    assert incidents(seen, "timeout")


# --- faults -----------------------------------------------------------------------------------


async def _poll_with(
    driver: str, pair: PtyPair, fault: str, count: int, **transport: Any
) -> tuple[list[Record], SerialRunner]:
    sim = simulator(driver, faults=[parse_fault(fault)])
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    polled = runner(driver, pair.host, transport=transport)
    async with simulating(pair, sim), running([polled], inbox):
        await collect(inbox, seen, count)
    seen += drain(inbox)  # the counts of repeats, put when the runner stopped
    return seen, polled


async def test_partial_lines_are_counted_and_asked_again(pair: PtyPair) -> None:
    seen, polled = await _poll_with("mettler-sics", pair, "partial,every=2", 3)
    assert all(s.quality is Quality.GOOD for s in samples(seen))  # the retry got a whole one
    partial = incidents(seen, "partial")
    assert polled.counts["partial"] >= 2
    assert all(i.raw.startswith(b"S S") and b"\r\n" not in i.raw for i in partial)
    assert occurrences(seen, "partial") == polled.counts["partial"]


async def test_garbage_bytes_are_counted_with_the_raw_bytes(pair: PtyPair) -> None:
    seen, polled = await _poll_with("alicat-mfc", pair, "garbage,every=2", 18)
    assert all(s.quality is Quality.GOOD for s in samples(seen))
    garbled = incidents(seen, "unparseable")
    assert polled.counts["unparseable"] >= 2
    assert all(i.raw.endswith(b"Air") or i.raw.endswith(b"CO2") for i in garbled)
    assert all(i.raw[:4] != b"A +0" for i in garbled)
    assert occurrences(seen, "unparseable") == polled.counts["unparseable"]


async def test_no_reply_is_comm_loss_then_resumes(pair: PtyPair) -> None:
    sim = simulator("mettler-sics", faults=[parse_fault("silence,after=0.2s,for=0.6s")])
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    balance = runner("mettler-sics", pair.host)
    async with simulating(pair, sim), running([balance], inbox) as tasks:
        lost = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        back = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        await until(inbox, seen, lambda r: isinstance(r, Sample) and r.quality is Quality.GOOD)
        assert not tasks[0].done()
    assert isinstance(lost, CommStatus) and isinstance(back, CommStatus)
    assert (lost.ok, back.ok) == (False, True)
    assert lost.reason == "no reply within 0.25 s"
    dark = [s for s in samples(seen) if s.quality is Quality.BAD]
    assert dark and all(s.reason == "timeout" for s in dark)
    assert incidents(seen, "timeout")
    assert balance.counts["timeout"] >= 2  # the first try and its retry


async def test_a_stall_before_the_request_goes_out_is_not_a_timeout(
    pair: PtyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process is held up (a pause, a stalled VM) just before a request is written: the
    reply's time is counted from the write, so the device has its whole timeout."""
    write = Port.write
    stalls = []

    def stalled_write(port: Port, data: bytes, device: str) -> None:
        if not stalls:
            stalls.append(data)
            time.sleep(0.5)  # twice the timeout (FAST: 0.25 s)
        write(port, data, device)

    monkeypatch.setattr(Port, "write", stalled_write)
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    async with (
        simulating(pair, simulator("mettler-sics")),
        running([runner("mettler-sics", pair.host)], inbox),
    ):
        await collect(inbox, seen, 3)
    assert stalls == [b"SI\r\n"]
    assert not incidents(seen) and not comm(seen)
    assert [s.quality for s in samples(seen)][:3] == [Quality.GOOD] * 3


@pytest.mark.parametrize(
    ("fault", "reason", "code"),
    [
        ("error,code=ES", "syntax error", "sics-syntax-error"),
        ("error,code=EL", "logical error", "sics-logical-error"),
        ("error,code=S +", "overload", None),
        ("error,code=S -", "underload", None),
        ("error,code=S I", "balance busy (command not executable now)", None),
    ],
)
async def test_mettler_error_codes(
    pair: PtyPair, fault: str, reason: str, code: str | None
) -> None:
    seen, _ = await _poll_with("mettler-sics", pair, fault, 2)
    assert all((s.quality, s.reason) == (Quality.BAD, reason) for s in samples(seen))
    if code is not None:
        assert occurrences(seen, code) >= 2
        assert incidents(seen, code)[0].raw == code_reply(fault)
    else:
        assert incidents(seen) == []
    assert comm(seen) == []  # the balance answers: it is there


def code_reply(fault: str) -> bytes:
    return parse_fault(fault).code.encode()


async def test_transmission_error_is_asked_again(pair: PtyPair) -> None:
    seen, _ = await _poll_with("mettler-sics", pair, "error,code=ET,every=2", 3)
    assert all(s.quality is Quality.GOOD for s in samples(seen))
    assert occurrences(seen, "sics-transmission-error") >= 2


async def test_alicat_status_word_and_wrong_unit(pair: PtyPair) -> None:
    seen, _ = await _poll_with("alicat-mfc", pair, "set,var=status,value= MOV", 6)
    found = {s.point: s for s in samples(seen)}
    assert found["mass_flow"].quality is Quality.BAD
    assert found["mass_flow"].reason == "mass flow over range"
    assert found["pressure"].quality is Quality.GOOD
    seen, _ = await _poll_with("alicat-mfc", pair, "set,var=address,value=B", 6)
    assert all((s.quality, s.reason) == (Quality.BAD, "unparseable") for s in samples(seen))
    assert incidents(seen, "unparseable")[0].raw.startswith(b"B +")


async def test_heracell_bad_checksums_and_error_codes(pair: PtyPair) -> None:
    seen, polled = await _poll_with("thermo-heracell", pair, "checksum,every=2", 4)
    assert all(s.quality is Quality.GOOD for s in samples(seen))
    assert incidents(seen, "checksum")
    assert polled.counts["checksum"] == occurrences(seen, "checksum")
    seen, _ = await _poll_with("thermo-heracell", pair, "error,code=!:{param}:02:?3:", 2)
    assert all(s.quality is Quality.BAD for s in samples(seen))
    assert incidents(seen, "heracell-data-error")[0].raw.startswith(b"!:3010:02:?3:")


async def test_slow_replies(pair: PtyPair) -> None:
    seen, _ = await _poll_with("mettler-sics", pair, "slow,delay=100ms", 2)
    assert all(s.quality is Quality.GOOD for s in samples(seen))
    assert incidents(seen) == []
    # Slower than the timeout: each try times out, and the late reply is counted.
    seen, polled = await _poll_with("mettler-sics", pair, "slow,delay=300ms", 3, timeout=0.2)
    assert incidents(seen, "timeout")
    assert polled.counts["timeout"] >= 1


async def test_simulated_port_vanishing(pair: PtyPair) -> None:
    sim = simulator("mettler-sics", faults=[parse_fault("vanish,after=0.2s,for=0.5s")])
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    balance = runner("mettler-sics", pair.host)
    async with simulating(pair, sim), running([balance], inbox) as tasks:
        lost = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        back = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        assert not tasks[0].done()
    assert isinstance(lost, CommStatus) and isinstance(back, CommStatus)
    assert (lost.ok, back.ok) == (False, True)
    assert sim.opens == 2


# --- unplugging -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["poll", "stream"])
async def test_unplug_is_comm_loss_and_replug_resumes(pair: PtyPair, mode: str) -> None:
    """The pty pair is removed (a USB adapter pulled) and made again: comm-loss, then the
    runner reopens the port by itself and readings resume; it never stops running."""
    sim = simulator("mettler-sics")
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    # (In stream mode the balance sends 4 lines a second: a silence is 1 s.)
    balance = runner("mettler-sics", pair.host, transport={"mode": mode, "timeout": 1.0})
    async with simulating(pair, sim), running([balance], inbox) as tasks:
        await until(inbox, seen, lambda r: isinstance(r, Sample))
        await pair.unplug()
        assert not await asyncio.to_thread(os.path.exists, pair.host)
        lost = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        await asyncio.sleep(0.3)  # a few failed reopenings
        assert not tasks[0].done()
        await pair.plug()
        back = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=3)
        after = await until(
            inbox, seen, lambda r: isinstance(r, Sample) and r.quality is Quality.GOOD
        )
        assert not tasks[0].done()
        assert ports()[0].opens == 2
    assert isinstance(lost, CommStatus) and isinstance(back, CommStatus)
    assert (lost.ok, back.ok) == (False, True)
    assert "port lost" in lost.reason
    assert incidents(seen, "port")  # the reopenings that failed while it was gone
    assert seen.index(after) > seen.index(back)
    assert incidents(seen, "timeout") == []


# --- a babbling line (issue 11, item 19) ------------------------------------------------------

# What a balance at 9600 baud looks like to a port set to 19200: bytes that never make a reply.
_BABBLE = b"\x81\xa5S\xfe\x07 \xc3\x11g\r\n"


async def test_a_babbling_line_is_one_incident_then_a_count_per_interval(pair: PtyPair) -> None:
    """A wrong baud rate garbles every frame: the first is recorded at once, the rest are
    counted, and each interval that saw repeats ends with one incident saying how many, from
    when to when, with the raw bytes of the last; none is lost, and a line quiet for an
    interval starts afresh."""
    balance = runner("mettler-sics", pair.host, transport={"mode": "stream", "timeout": 10.0})
    balance.repeats.interval = 0.3
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []

    def counts() -> list[Incident]:
        return [i for i in incidents(seen, "unparseable") if repeats_in(i)]

    with peer(pair.device) as device_end:
        async with running([balance], inbox) as tasks:
            await port_open()
            device_end.write(_BABBLE * 300)
            await eventually(lambda: balance.counts["unparseable"] == 300)
            first = await until(inbox, seen, lambda r: isinstance(r, Incident))
            await until(inbox, seen, lambda r: isinstance(r, Incident) and repeats_in(r) > 0)
            device_end.write(_BABBLE * 200)  # the line babbles on: the next interval counts it
            await until(inbox, seen, lambda r: isinstance(r, Incident) and repeats_in(r) > 0)
            await asyncio.sleep(0.7)  # a quiet interval: the window closes
            device_end.write(_BABBLE)
            again = await until(inbox, seen, lambda r: isinstance(r, Incident))
            assert not tasks[0].done()
    seen += drain(inbox)
    assert isinstance(first, Incident) and first.code == "unparseable"
    assert first.raw == _BABBLE[:-2] and not repeats_in(first)
    assert [repeats_in(i) for i in counts()] == [299, 200]
    count = counts()[0]
    assert count.kind is first.kind and count.source == "mettler-sics"
    assert count.raw == _BABBLE[:-2]  # a sample of what the line said
    assert re.match(
        r"299 more 'unparseable' incident\(s\) from \S+ to \S+ \(\S+ s\), counted and not "
        r"recorded one by one \(a count at most every 0.3 s\); the last: no reply shape matches",
        count.message,
    )
    assert isinstance(again, Incident) and not repeats_in(again)  # recorded at once again
    assert len(incidents(seen)) == 4  # not 501
    assert occurrences(seen, "unparseable") == balance.counts["unparseable"] == 501


# --- fuzzing over a pty -----------------------------------------------------------------------

_CHUNKS = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\r\n", b"\r", b"S S      100.00 g\r\n", b"S D 1 kg\r\n", b"EL\r\n"]),
    ),
    max_size=20,
)
_END = b"\r\nS S      999.00 g\r\n"
_REJECTS = {"unparseable", "partial", "overlong", "garbage", "checksum"}


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(chunks=_CHUNKS)
def test_random_streams_over_a_pty_are_all_counted(
    tmp_path_factory: Any, chunks: list[bytes]
) -> None:
    """A stream-mode runner fed random bytes keeps running, and counts every rejected frame."""
    folder = tmp_path_factory.mktemp("fuzz")
    asyncio.run(_fuzz_once(str(folder / "tty"), chunks))


async def _fuzz_once(link: str, chunks: list[bytes]) -> None:
    stream = b"".join(chunks) + _END
    balance = runner("mettler-sics", link, transport={"mode": "stream", "timeout": 10.0})
    framer = make_framer("line", b"\r\n", balance.settings.max_frame)
    decoded = [balance.codec.decode(frame) for frame in framer.feed(stream)]
    expected = Counter(d.code for d in decoded if isinstance(d, Rejected))
    inbox: Inbox = asyncio.Queue()
    seen: list[Record] = []
    async with PtyPair(link) as made:
        with peer(made.device) as device_end:
            async with running([balance], inbox) as tasks:
                await port_open()
                for chunk in chunks:
                    device_end.write(chunk)
                device_end.write(_END)
                await until(inbox, seen, lambda r: isinstance(r, Sample) and r.value == 999.0)
                assert not tasks[0].done()
    seen += drain(inbox)  # the counts of repeats, put when the runner stopped
    codes = {r.code for r in seen if isinstance(r, Incident)}
    # Every fault is counted, and stands in the records: as an incident, or in a count.
    assert {c: occurrences(seen, c) for c in codes} == dict(balance.counts)
    assert {c: occurrences(seen, c) for c in codes if c in _REJECTS} == expected
    assert {c: n for c, n in balance.counts.items() if c in _REJECTS} == expected
