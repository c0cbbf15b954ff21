"""The Modbus transport on the wire: a real pymodbus server on 127.0.0.1, and RTU over a socat
pty pair (frames checked byte for byte against shared/DEVICES.md).

No mocks: every test talks to pymodbus (or to raw bytes on a pty) through real sockets and
ptys. Pure codec and planning tests are in test_modbus_codec.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from pocd.errors import ConfigError
from pocd.model import CommStatus, Incident, IncidentKind, Quality, Sample
from pocd.sim.modbus import ModbusSimulator, device_from_driver, parse_fault, unit_from_driver
from pocd.transports.modbus import ModbusRunner, ModbusSettings
from pocd.transports.modbus.codec import decode
from pocd.transports.modbus.config import REGISTER_COUNT
from pocd.transports.modbus.link import Link, Reply, join, leave, links
from pocd.transports.modbus.plan import Read
from tests.transportkit import PtyPeer, running, until

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")

Record = Sample | CommStatus | Incident
Poll = Callable[[], Coroutine[Any, Any, list[Record]]]

VAISALA_REQUEST = bytes.fromhex("F0 03 00 00 00 02 D1 2A")
VAISALA_RESPONSE = bytes.fromhex("F0 03 04 D4 7A 43 E8 33 AB")
HAMILTON_PH_REQUEST = bytes.fromhex("01 03 08 29 00 0A 16 65")


# --- helpers ----------------------------------------------------------------------------------


def drain(queue: asyncio.Queue[Record]) -> list[Record]:
    records = []
    while not queue.empty():
        records.append(queue.get_nowait())
    return records


@contextlib.asynccontextmanager
async def polling(runner: ModbusRunner) -> AsyncIterator[Poll]:
    """Poll the runner's device on demand (one poll per call), on its shared link."""
    link = join(runner.device.id, runner.settings)

    async def poll() -> list[Record]:
        inbox: asyncio.Queue[Record] = asyncio.Queue()
        await runner.poll(link, inbox)
        return drain(inbox)

    try:
        yield poll
    finally:
        leave(link, runner.device.id)


def samples(records: Sequence[Record], point: str | None = None) -> list[Sample]:
    return [r for r in records if isinstance(r, Sample) and point in (None, r.point)]


def incidents(records: Sequence[Record]) -> list[Incident]:
    return [r for r in records if isinstance(r, Incident)]


def comm(records: Sequence[Record]) -> list[CommStatus]:
    return [r for r in records if isinstance(r, CommStatus)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def crc(frame: bytes) -> bytes:
    """Modbus CRC-16, written here again so that the test does not trust the codec's."""
    value = 0xFFFF
    for byte in frame:
        value ^= byte
        for _ in range(8):
            value = (value >> 1) ^ 0xA001 if value & 1 else value >> 1
    return value.to_bytes(2, "little")


def lsw_first(fmt: str, value: float) -> bytes:
    raw = struct.pack(fmt, value)
    return b"".join(raw[i : i + 2] for i in reversed(range(0, len(raw), 2)))


@pytest.fixture
async def vaisala_tcp() -> AsyncIterator[tuple[ModbusSimulator, int]]:
    """The Vaisala GMP251 simulator on Modbus TCP, on a free port of 127.0.0.1."""
    simulator = ModbusSimulator([unit_from_driver("vaisala-gmp251")])
    port = await simulator.start_tcp("127.0.0.1", 0)
    yield simulator, port
    await simulator.stop()


def vaisala_over_tcp(port: int, **transport: Any) -> ModbusRunner:
    settings = {"host": "127.0.0.1", "port": port, "interval": 0.1, "timeout": 0.2, **transport}
    return ModbusRunner(device_from_driver("incubator-co2", "vaisala-gmp251", transport=settings))


# --- Modbus TCP -------------------------------------------------------------------------------


def _regs(fmt: str, value: float, word_order: str = "big", byte_order: str = "big") -> list[int]:
    raw = struct.pack(fmt, value)
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return words


# name: (point settings, registers the server holds (built with struct), expected value)
TYPED_POINTS: dict[str, tuple[dict[str, Any], list[int], float]] = {
    "i16": ({"type": "int16"}, _regs(">h", -1234), -1234),
    "u16": ({"type": "uint16"}, _regs(">H", 60000), 60000),
    "i32_big": ({"type": "int32"}, _regs(">i", -7654321), -7654321),
    "i32_little": (
        {"type": "int32", "word_order": "little"},
        _regs(">i", -7654321, "little"),
        -7654321,
    ),
    "u32_big": ({"type": "uint32"}, _regs(">I", 4_000_000_000), 4_000_000_000),
    "u32_little": (
        {"type": "uint32", "word_order": "little"},
        _regs(">I", 4_000_000_001, "little"),
        4_000_000_001,
    ),
    "f32_big": ({"type": "float32"}, _regs(">f", 37.5), 37.5),
    "f32_little": (
        {"type": "float32", "word_order": "little"},
        _regs(">f", 465.66, "little"),
        465.66,
    ),
    "f32_bytes": (
        {"type": "float32", "byte_order": "little"},
        _regs(">f", -2.25, "big", "little"),
        -2.25,
    ),
    "f64_big": ({"type": "float64"}, _regs(">d", 1.0e-7), 1.0e-7),
    "f64_little": (
        {"type": "float64", "word_order": "little"},
        _regs(">d", -98765.4321, "little"),
        -98765.4321,
    ),
    "flag": ({"type": "bool"}, [5], 1.0),
    "bit3": ({"type": "bit", "bit": 3}, [0x8008], 1.0),
    "scaled": ({"type": "int16", "scale": 0.1, "offset": -1.0}, _regs(">h", 372), 36.2),
}


async def poll_generic_device(
    device: SimDevice, points: dict[str, dict[str, Any]], **server: Any
) -> list[Any]:
    """One poll of the generic `modbus` driver with these points, against a pymodbus server
    holding `device`; the records it put."""
    port = free_port()
    tcp = ModbusTcpServer([device], address=("127.0.0.1", port), **server)
    await tcp.serve_forever(background=True)
    try:
        runner = ModbusRunner(
            device_from_driver(
                "plc", "modbus", transport={"host": "127.0.0.1", "port": port}, points=points
            )
        )
        async with polling(runner) as poll:
            return list(await poll())
    finally:
        await tcp.shutdown()  # type: ignore[no-untyped-call]


async def test_every_data_type_and_word_order_over_tcp() -> None:
    holding: list[int] = []
    points: dict[str, dict[str, Any]] = {}
    expected: dict[str, float] = {}
    for name, (body, words, value) in TYPED_POINTS.items():
        points[name] = {**body, "address": len(holding)}
        expected[name] = value
        holding += words
    # Bits of the register "bit3" holds (0x8008): 15 set, 4 clear.
    bit3 = points["bit3"]["address"]
    points["bit15"] = {"type": "bit", "bit": 15, "address": bit3}
    points["bit4"] = {"type": "bit", "bit": 4, "address": bit3}
    expected |= {"bit15": 1.0, "bit4": 0.0}
    points["input_f32"] = {
        "function": "input",
        "address": 7,
        "type": "float32",
        "word_order": "little",
    }
    expected["input_f32"] = 5.5
    points["coil3"] = {"function": "coil", "address": 3}
    points["coil4"] = {"function": "coil", "address": 4}
    points["discrete0"] = {"function": "discrete", "address": 0}
    expected |= {"coil3": 1.0, "coil4": 0.0, "discrete0": 1.0}
    device = SimDevice(
        1,
        simdata=(
            [SimData(0, values=[False, False, False, True] + [False] * 12, datatype=DataType.BITS)],
            [SimData(0, values=[True] + [False] * 15, datatype=DataType.BITS)],
            [SimData(0, values=holding, datatype=DataType.REGISTERS)],
            [SimData(7, values=_regs(">f", 5.5, "little"), datatype=DataType.REGISTERS)],
        ),
    )
    requests: list[int] = []

    def count(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            requests.append(pdu.function_code)
        return pdu

    records = await poll_generic_device(device, points, trace_pdu=count)
    got = {s.point: s for s in samples(records)}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].quality is Quality.GOOD, (name, got[name])
        assert got[name].value == pytest.approx(value, rel=1e-6), name
    # 19 points in four requests: one per function, the holding registers in one read.
    assert sorted(requests) == [1, 2, 3, 4]
    assert not incidents(records)


async def test_nearby_points_are_merged_as_the_server_counts(
    vaisala_tcp: tuple[ModbusSimulator, int],
) -> None:
    simulator, port = vaisala_tcp
    for max_gap, per_poll in ((2, 2), (0, 3)):
        before = simulator.requests[240]
        async with polling(vaisala_over_tcp(port, max_gap=max_gap)) as poll:
            for _ in range(3):
                records = await poll()
                assert {s.quality for s in samples(records)} == {Quality.GOOD}
        assert simulator.requests[240] - before == 3 * per_poll


async def test_polls_keep_to_their_grid(vaisala_tcp: tuple[ModbusSimulator, int]) -> None:
    _, port = vaisala_tcp
    runner = vaisala_over_tcp(port, interval=0.05)
    inbox: asyncio.Queue[Record] = asyncio.Queue()
    seen: list[Record] = []
    async with running([runner], inbox):
        for _ in range(20):
            await until(inbox, seen, lambda r: isinstance(r, Sample) and r.point == "co2")
    times = [s.t for s in samples(seen, "co2")]
    # The k-th poll happens at start + k * interval (plus the read's own latency): no drift
    # accumulates, and no poll starts before the previous one ended.
    offsets = [(t - times[0]) / 1e9 - k * 0.05 for k, t in enumerate(times)]
    assert max(abs(o) for o in offsets) < 0.025, offsets
    assert runner.polls == len(times) and runner.grid.skipped == 0


async def test_cancel_stops_a_runner_at_once(vaisala_tcp: tuple[ModbusSimulator, int]) -> None:
    # Back-to-back polls make a cancel likely to land as a response arrives, where
    # asyncio.wait_for inside pymodbus (Python < 3.12) would swallow it.
    _, port = vaisala_tcp
    for attempt in range(40):
        runner = vaisala_over_tcp(port, interval=0)
        task = asyncio.create_task(runner.run(asyncio.Queue()), name=f"modbus {attempt}")
        await asyncio.sleep(0.002 * (attempt % 7))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)
        assert done, f"runner still polling after cancel (attempt {attempt})"
        assert task.cancelled()


async def test_exception_response_is_a_bad_sample_and_an_incident(
    vaisala_tcp: tuple[ModbusSimulator, int],
) -> None:
    simulator, port = vaisala_tcp
    simulator.faults.append(parse_fault("exception,code=2"))
    runner = vaisala_over_tcp(port)
    async with polling(runner) as poll:
        records = await poll()
    assert len(samples(records)) == 4
    assert all(s.quality is Quality.BAD and math.isnan(s.value) for s in samples(records))
    assert {s.reason for s in samples(records)} == {"modbus-exception-2"}
    found = incidents(records)
    assert [(i.kind, i.code) for i in found] == [
        (IncidentKind.COMMUNICATION, "modbus-exception-2")
    ] * 2
    assert not comm(records)  # the unit answered: it is alive
    assert runner.counts["modbus-exception-2"] == 2


async def test_busy_is_retried_and_still_counted(vaisala_tcp: tuple[ModbusSimulator, int]) -> None:
    simulator, port = vaisala_tcp
    simulator.faults.append(parse_fault("exception,code=6,every=2"))  # every second request
    runner = vaisala_over_tcp(port, retries=1)
    async with polling(runner) as poll:
        records = await poll()
    assert {s.quality for s in samples(records)} == {Quality.GOOD}
    assert [i.code for i in incidents(records)] == ["modbus-exception-6"]
    assert simulator.requests[240] == 3


async def test_timeout_marks_comm_loss_and_recovery(
    vaisala_tcp: tuple[ModbusSimulator, int],
) -> None:
    simulator, port = vaisala_tcp
    simulator.faults.append(parse_fault("silence"))
    runner = vaisala_over_tcp(port, timeout=0.1, retries=1)
    async with polling(runner) as poll:
        records = await poll()
        [down] = comm(records)
        assert not down.ok and "no answer within 0.1 s" in down.reason
        assert {(s.quality, s.reason) for s in samples(records)} == {(Quality.BAD, "timeout")}
        assert len(samples(records)) == 4  # every point, none skipped
        # try + retry: the first is recorded, the repeat counted
        assert [i.code for i in incidents(records)] == ["timeout"]
        assert runner.counts["timeout"] == 2
        [count] = runner.repeats.drain()
        assert count.code == "timeout" and count.message.startswith("1 more 'timeout'")
        assert simulator.requests[240] == 2  # the rest of the poll was not attempted
        simulator.faults.clear()
        records = await poll()
    [up] = comm(records)
    assert up.ok and up.t > down.t
    assert {s.quality for s in samples(records)} == {Quality.GOOD}


@contextlib.contextmanager
def vaisala_in_a_thread() -> Iterator[tuple[ModbusSimulator, int]]:
    """The Vaisala simulator on an event loop of its own, in a thread: it answers while the
    test's loop is held up, as a device does."""
    simulator = ModbusSimulator([unit_from_driver("vaisala-gmp251")])
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[int] = concurrent.futures.Future()

    def serve() -> None:
        port = loop.run_until_complete(simulator.start_tcp("127.0.0.1", 0))
        started.set_result(port)
        loop.run_forever()
        loop.run_until_complete(simulator.stop())
        loop.close()

    thread = threading.Thread(target=serve, name="simulator")
    thread.start()
    try:
        yield simulator, started.result(5)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


async def test_an_answer_that_came_while_the_loop_was_held_up_is_taken() -> None:
    """The event loop is held up past the timeout (a long GC pause, a VM stall) while the
    device answers: the answer is there when the loop runs again, so the read succeeds."""
    with vaisala_in_a_thread() as (simulator, port):
        runner = vaisala_over_tcp(port, timeout=0.05, retries=0)
        async with polling(runner) as poll:
            await poll()  # connected
            await asyncio.sleep(0.1)  # the timer of that poll's reads has gone off
            polled = asyncio.create_task(poll())
            # The poll's first step sends its first request; then the loop stalls for 0.3 s.
            asyncio.get_running_loop().call_soon(time.sleep, 0.3)
            records = await polled
    assert not incidents(records) and not comm(records)
    assert {s.quality for s in samples(records)} == {Quality.GOOD}
    assert simulator.requests[240] == 4  # two polls of two reads, none retried


async def test_a_stall_before_the_request_goes_out_is_not_a_timeout(
    vaisala_tcp: tuple[ModbusSimulator, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process is held up (a pause, a stalled VM) after an attempt began but before its
    request is written: the answer's time is counted from the write."""
    simulator, port = vaisala_tcp
    call = Link._call
    stalls = []

    def stalled_call(link: Link, read: Read, unit: int) -> Any:
        if not stalls:
            stalls.append(read)
            time.sleep(0.3)  # six times the timeout
        return call(link, read, unit)

    runner = vaisala_over_tcp(port, timeout=0.05, retries=0)
    async with polling(runner) as poll:
        await poll()  # connected
        monkeypatch.setattr(Link, "_call", stalled_call)
        records = await poll()
    assert len(stalls) == 1
    assert not incidents(records) and not comm(records)
    assert {s.quality for s in samples(records)} == {Quality.GOOD}
    assert simulator.requests[240] == 4  # two polls of two reads, none retried


async def test_short_response(vaisala_tcp: tuple[ModbusSimulator, int]) -> None:
    simulator, port = vaisala_tcp
    simulator.faults.append(parse_fault("short"))
    async with polling(vaisala_over_tcp(port, retries=0)) as poll:
        records = await poll()
    assert {s.reason for s in samples(records)} == {"short-response"}
    assert [i.code for i in incidents(records)] == ["short-response", "short-response"]
    assert "5 of 6 values" in incidents(records)[0].message
    assert not comm(records)


async def test_wrong_word_order_is_caught_by_the_valid_range(
    vaisala_tcp: tuple[ModbusSimulator, int],
) -> None:
    simulator, port = vaisala_tcp
    simulator.faults.append(parse_fault("swap-words"))
    async with polling(vaisala_over_tcp(port)) as poll:
        records = await poll()
    [co2] = samples(records, "co2")
    assert co2.quality is Quality.BAD
    assert co2.reason == "out-of-range"
    found = incidents(records)  # temperature may land inside its range, or not: noise decides
    assert {(i.kind, i.code) for i in found} == {(IncidentKind.DATA, "out-of-range")}
    assert any(
        i.message.startswith("co2: ") and "outside valid range [0, 200000]" in i.message
        for i in found
    )


async def test_tcp_server_killed_and_restarted_mid_run() -> None:
    port = free_port()
    command = [sys.executable, "-m", "pocd.sim.modbus", "vaisala-gmp251"]
    command += ["--transport", "tcp", "--port", str(port)]

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert b"listening on 127.0.0.1:" in line
        return proc

    runner = vaisala_over_tcp(port, timeout=0.2, retries=0, backoff_max=0.4)
    inbox: asyncio.Queue[Record] = asyncio.Queue()
    seen: list[Record] = []
    server = await start()
    try:
        async with running([runner], inbox):
            for _ in range(3):
                await until(inbox, seen, lambda r: isinstance(r, Sample) and r.point == "co2")
            server.send_signal(signal.SIGKILL)
            await server.wait()
            down = await until(inbox, seen, lambda r: isinstance(r, CommStatus))
            await asyncio.sleep(0.5)
            server = await start()
            up = await until(inbox, seen, lambda r: isinstance(r, CommStatus), within=5)
            await until(inbox, seen, lambda r: isinstance(r, Sample) and r.quality is Quality.GOOD)
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            await server.wait()
    assert isinstance(down, CommStatus) and isinstance(up, CommStatus)
    assert not down.ok and up.ok
    good = [s for s in samples(seen) if s.quality is Quality.GOOD]
    # The down/up pair brackets the gap: no good sample inside it, good samples on both sides.
    assert not [s for s in good if down.t <= s.t < up.t]
    assert [s for s in good if s.t < down.t] and [s for s in good if s.t >= up.t]
    assert "connection" in {i.code for i in incidents(seen) if down.t <= i.t < up.t}
    assert up.t - down.t < 3e9  # resumed by itself, within backoff of the restart


async def test_missing_serial_port_is_a_fault_not_a_crash() -> None:
    device = device_from_driver(
        "ph", "hamilton-arc-ph", transport={"serial_port": "/dev/pocd-no-such-port", "timeout": 0.2}
    )
    async with polling(ModbusRunner(device)) as poll:
        records = await poll()
    [down] = comm(records)
    assert not down.ok and "cannot open rtu /dev/pocd-no-such-port" in down.reason
    assert {s.reason for s in samples(records)} == {"connection"}
    assert [i.code for i in incidents(records)] == ["connection"]


async def test_devices_on_one_port_must_agree() -> None:
    def settings(**over: Any) -> ModbusSettings:
        return ModbusSettings.model_validate({"serial_port": "/dev/pocd-bus", **over})

    first = join("a", settings(unit_id=1))
    try:
        assert join("b", settings(unit_id=2)) is first
        with pytest.raises(ConfigError, match="already used by 'a'"):
            join("c", settings(unit_id=1))
        with pytest.raises(ConfigError, match="9600 8N1 differs from rtu /dev/pocd-bus 19200"):
            join("d", settings(unit_id=3, baudrate=9600))
        assert links() == [first] and first.members == {"a": 1, "b": 2}
    finally:
        leave(first, "b")
        leave(first, "a")
    assert links() == []


# --- Modbus RTU over a pty pair ---------------------------------------------------------------


async def test_vaisala_golden_frames_on_the_wire(pty_pair: tuple[str, str]) -> None:
    ours, far = pty_pair
    device = device_from_driver(
        "co2",
        "vaisala-gmp251",
        transport={"serial_port": ours, "timeout": 2.0},
        only=["co2"],
        points={"co2": {"status": []}},  # the golden request reads the CO2 float alone
    )
    peer = PtyPeer(far)
    try:
        async with polling(ModbusRunner(device)) as poll:
            reply = asyncio.create_task(poll())
            assert await peer.read(8) == VAISALA_REQUEST
            peer.write(VAISALA_RESPONSE)
            records = await reply
    finally:
        peer.close()
    [co2] = samples(records)
    assert co2.quality is Quality.GOOD
    assert co2.value == pytest.approx(465.66, abs=0.005)
    assert not incidents(records)


async def test_hamilton_golden_request_and_channel_decode(pty_pair: tuple[str, str]) -> None:
    ours, far = pty_pair
    device = device_from_driver(
        "ph", "hamilton-arc-ph", transport={"serial_port": ours, "timeout": 2.0}
    )

    def channel(unit_code: int, value: float, status: int, low: float, high: float) -> bytes:
        data = lsw_first(">I", unit_code) + lsw_first(">f", value) + lsw_first(">I", status)
        data += lsw_first(">f", low) + lsw_first(">f", high)
        frame = bytes([0x01, 0x03, len(data)]) + data
        return frame + crc(frame)

    peer = PtyPeer(far)
    try:
        async with polling(ModbusRunner(device)) as poll:
            reply = asyncio.create_task(poll())
            assert await peer.read(8) == HAMILTON_PH_REQUEST
            peer.write(channel(0x1000, 4.02503, 0, 0.0, 14.0))
            temperature_request = bytes.fromhex("01 03 09 69 00 0A")  # PMC6: manual 2410
            assert await peer.read(8) == temperature_request + crc(temperature_request)
            peer.write(channel(0x04, 24.35834, 0, -20.0, 150.0))
            records = await reply
    finally:
        peer.close()
    got = {s.point: s for s in samples(records)}
    assert {s.quality for s in got.values()} == {Quality.GOOD}
    assert got["ph"].value == pytest.approx(4.02503, rel=1e-6)
    assert got["temperature"].value == pytest.approx(24.35834, rel=1e-6)
    assert (got["ph_unit"].value, got["temperature_unit"].value) == (0x1000, 0x04)
    assert got["ph_status"].value == 0


async def test_hamilton_status_bits_and_unit_code_set_quality(pty_pair: tuple[str, str]) -> None:
    ours, far = pty_pair
    simulator = ModbusSimulator([unit_from_driver("hamilton-arc-ph")])
    await simulator.start_rtu(far, stopbits=2)
    try:
        device = device_from_driver("ph", "hamilton-arc-ph", transport={"serial_port": ours})
        async with polling(ModbusRunner(device)) as poll:
            simulator.faults = [parse_fault("set,point=ph_status,value=0x08")]  # warning
            records = await poll()
            warning = {s.point: s for s in samples(records)}
            warned = incidents(records)
            assert incidents(await poll()) == []  # the same status again: no news
            simulator.faults = [parse_fault("set,point=ph_status,value=0x10")]  # error
            records = await poll()
            error = {s.point: s for s in samples(records)}
            erred = incidents(records)
            simulator.faults = [parse_fault("set,point=ph_unit,value=0x200000")]  # mV, not pH
            records = await poll()
            wrong_unit = {s.point: s for s in samples(records)}
            unit_incidents = incidents(records)
    finally:
        await simulator.stop()
    # The reason is the rule's label and a state; the status value is in the incident, once.
    assert (warning["ph"].quality, warning["ph"].reason) == (
        Quality.UNCERTAIN,
        "ph status uncertain",
    )
    assert [(i.code, i.message) for i in warned] == [("status", "ph: ph status reads 8 (0x8)")]
    assert (error["ph"].quality, error["ph"].reason) == (Quality.BAD, "ph status bad")
    assert [i.message for i in erred] == ["ph: ph status reads 16 (0x10)"]
    assert erred[0].raw == bytes([0, 0x10, 0, 0])  # the status words as on the wire (LSW first)
    assert wrong_unit["ph"].quality is Quality.BAD
    assert wrong_unit["ph"].reason == "unit code unexpected"
    assert [i.message for i in unit_incidents] == [
        "ph: unit code reads 2097152 (0x200000), expected 4096 (0x1000)"
    ]
    assert warning["temperature"].quality is Quality.GOOD  # its own channel's status is fine


async def test_vaisala_startup_nan_is_bad_never_a_number(pty_pair: tuple[str, str]) -> None:
    ours, far = pty_pair
    simulator = ModbusSimulator(
        [unit_from_driver("vaisala-gmp251")], faults=[parse_fault("startup,for=0.6s")]
    )
    await simulator.start_rtu(far, stopbits=2)
    device = device_from_driver(
        "co2", "vaisala-gmp251", transport={"serial_port": ours, "interval": 0.1, "timeout": 0.3}
    )
    inbox: asyncio.Queue[Record] = asyncio.Queue()
    seen: list[Record] = []
    try:
        simulator.restart_clock()
        async with running([ModbusRunner(device)], inbox):
            await until(
                inbox,
                seen,
                lambda r: isinstance(r, Sample) and r.point == "co2" and r.quality is Quality.GOOD,
            )
    finally:
        await simulator.stop()
    co2 = samples(seen, "co2")
    assert len(co2) >= 4
    for sample in co2[:-1]:  # all but the first good one
        assert sample.quality is Quality.BAD and math.isnan(sample.value)
    assert "nan; co2 status bad" in {s.reason for s in co2}
    assert 256.0 in {s.value for s in samples(seen, "co2_status")}
    assert co2[-1].value == pytest.approx(50000, abs=2000)
    found = incidents(seen)
    assert {(i.kind, i.code) for i in found} == {(IncidentKind.DATA, c) for c in ("nan", "status")}
    assert any("co2 status reads 256" in i.message for i in found if i.code == "status")


async def test_crc_garbage_is_an_incident_with_the_raw_bytes(pty_pair: tuple[str, str]) -> None:
    ours, far = pty_pair
    simulator = ModbusSimulator([unit_from_driver("vaisala-gmp251")], faults=[parse_fault("crc")])
    await simulator.start_rtu(far, stopbits=2)
    device = device_from_driver(
        "co2", "vaisala-gmp251", transport={"serial_port": ours, "timeout": 0.1, "retries": 1}
    )
    runner = ModbusRunner(device)
    try:
        async with polling(runner) as poll:
            records = await poll()
    finally:
        await simulator.stop()
    found = incidents(records)
    # Two reads, each tried twice: each read's first CRC error is recorded, its retry counted.
    assert [i.code for i in found] == ["crc"] * 2
    assert runner.counts["crc"] == 4
    assert [i.code for i in runner.repeats.drain()] == ["crc"] * 2
    assert found[0].raw[:3] == bytes([0xF0, 0x03, 12]) and len(found[0].raw) == 17
    assert {s.reason for s in samples(records)} == {"crc"}


async def test_shared_bus_one_silent_unit_does_not_slow_the_others(
    pty_pair: tuple[str, str],
) -> None:
    ours, far = pty_pair
    interval, duration = 0.1, 3.0
    simulator = ModbusSimulator(
        [
            unit_from_driver("vaisala-gmp251"),
            unit_from_driver("hamilton-arc-ph", 1),
            unit_from_driver("hamilton-visiferm-do", 2),
        ],
        faults=[parse_fault("silence,unit=1")],
    )
    await simulator.start_rtu(far, stopbits=2)
    common = {"serial_port": ours, "interval": interval, "timeout": 0.05, "retries": 0}
    common["backoff_max"] = 0.5
    runners = [
        ModbusRunner(device_from_driver("co2", "vaisala-gmp251", transport=common)),
        ModbusRunner(
            device_from_driver("ph", "hamilton-arc-ph", transport=common | {"unit_id": 1})
        ),
        ModbusRunner(
            device_from_driver("do", "hamilton-visiferm-do", transport=common | {"unit_id": 2})
        ),
    ]
    inbox: asyncio.Queue[Record] = asyncio.Queue()
    try:
        async with running(runners, inbox):
            await asyncio.sleep(0.05)
            [bus] = links()
            assert bus.members == {"co2": 240, "ph": 1, "do": 2}  # one client, one lock
            await asyncio.sleep(duration - 0.05)
    finally:
        await simulator.stop()
    records = drain(inbox)
    polls = int(duration / interval)
    for device, point in (("co2", "co2"), ("do", "do")):
        good = {
            s.t for s in samples(records, point) if s.device == device and s.quality is Quality.GOOD
        }
        assert len(good) >= 0.9 * polls, (device, len(good), polls)
        assert not [s for s in comm(records) if s.device == device]
    ph_comm = [s for s in comm(records) if s.device == "ph"]
    assert [s.ok for s in ph_comm] == [False]  # comm-loss once, no flapping
    ph = samples(records, "ph")
    assert ph and {(s.quality, s.reason) for s in ph} == {(Quality.BAD, "timeout")}
    # Backoff: the dead unit was tried far less often than it would have been polled.
    assert simulator.requests[1] <= polls / 2, simulator.requests[1]


# --- the fast path and its plain twin; overflow of the scaling (issue 11, item 18) -------------

_FINITE = st.floats(allow_nan=False, allow_infinity=False)
_POINTS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["float32", "float64", "int16", "uint32"]),
            "words": st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
            "scale": st.one_of(st.just(1.0), st.sampled_from([1e10, 1e300, -1e308]), _FINITE),
            "offset": st.one_of(st.just(0.0), _FINITE),
            "valid": st.one_of(st.none(), st.tuples(_FINITE, _FINITE)),
            "sentinel": st.booleans(),
            "status": st.one_of(
                st.none(),
                st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0xFF)),
            ),
        }
    ),
    min_size=1,
    max_size=12,
)
_HUGE_F32 = [*struct.unpack(">HH", struct.pack(">f", 3.0e38)), 0, 0]


def _plc(examples: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """Points (6 registers each: the value, then a status register) and their register image."""
    points: dict[str, dict[str, Any]] = {}
    holding: list[int] = []
    for i, case in enumerate(examples):
        kind, words = case["type"], case["words"]
        point: dict[str, Any] = {
            "address": 6 * i,
            "type": kind,
            "scale": case["scale"],
            "offset": case["offset"],
        }
        if case["valid"] is not None and case["valid"][0] < case["valid"][1]:
            point["valid_min"], point["valid_max"] = case["valid"]
        raw = decode(words[: REGISTER_COUNT[kind]], kind)
        if case["sentinel"] and math.isfinite(raw):
            point["sentinels"] = [raw]
        status = case["status"]
        if status is not None and (status[1] or status[2]):
            word, bad, uncertain = status
            rule = {"address": 6 * i + 4, "label": f"p{i} status"}
            point["status"] = [
                rule | {k: v for k, v in (("bad_mask", bad), ("uncertain_mask", uncertain)) if v}
            ]
            holding += [*words, word, 0]
        else:
            holding += [*words, 0, 0]
        points[f"p{i}"] = point
    return points, holding


@contextlib.contextmanager
def _registers_in_a_thread() -> Iterator[tuple[list[int], int]]:
    """A Modbus TCP server (unit 1) whose holding registers are `image`, which the test sets:
    one server, on a loop of its own, for all the examples of a property test."""
    image: list[int] = []

    async def answer(
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        for i in range(address, address + count):
            registers[i - start_address] = image[i] if i < len(image) else 0

    device = SimDevice(
        1,
        simdata=[SimData(0, count=256, values=0, datatype=DataType.REGISTERS)],
        action=answer,
    )
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def start() -> ModbusTcpServer:
        server = ModbusTcpServer([device], address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        return server

    def serve() -> None:
        server = loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.shutdown())  # type: ignore[no-untyped-call]
        loop.close()

    thread = threading.Thread(target=serve, name="registers")
    thread.start()
    try:
        assert started.wait(5)
        yield image, port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


async def _fast_and_plain(examples: list[dict[str, Any]], image: list[int], port: int) -> None:
    points, holding = _plc(examples)
    image[:] = holding
    runner = ModbusRunner(
        device_from_driver(
            "plc", "modbus", transport={"host": "127.0.0.1", "port": port}, points=points
        )
    )
    async with polling(runner) as poll:
        polled = {s.point: s for s in samples(await poll())}
    # What the plain twin makes of the same registers, point by point.
    results: list[Reply | Any] = [
        Reply(holding[r.address : r.address + r.count], 0) for r in runner.reads
    ]
    for slot in runner._slots:
        plain, _ = runner._evaluate(slot, results)
        fast = polled[slot.name]
        assert (fast.quality, fast.reason) == (plain.quality, plain.reason), (slot, fast)
        assert fast.value == plain.value or (math.isnan(fast.value) and math.isnan(plain.value))
        if fast.quality is Quality.GOOD:  # no infinity, raw or made by the scaling, is GOOD
            assert math.isfinite(fast.value), (slot, fast)
        raw = slot.decode(holding[slot.point.address : slot.point.address + slot.point.count])
        scaled = raw * slot.scale + slot.offset
        if math.isfinite(raw) and raw not in slot.sentinels and not math.isfinite(scaled):
            assert fast.reason.split("; ")[0] == "overflow" and math.isnan(fast.value)


def test_the_fast_path_decides_as_its_plain_twin() -> None:
    """`poll` judges a plainly GOOD value inline and leaves the rest to `_evaluate`: over any
    registers, scale, offset, valid range, sentinel and status rule, the two must agree, and an
    infinity made by the scaling must be BAD ("overflow"), never a GOOD value."""
    with _registers_in_a_thread() as (image, port):

        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
        @example(
            [
                {"type": "float32", "words": _HUGE_F32, "scale": 1e300, "offset": 0.0}
                | {"valid": None, "sentinel": False, "status": None}
            ]
        )
        @given(examples=_POINTS)
        def fast_and_plain(examples: list[dict[str, Any]]) -> None:
            asyncio.run(_fast_and_plain(examples, image, port))

        fast_and_plain()


async def test_an_infinity_made_by_the_scaling_is_bad_with_an_incident() -> None:
    points = {
        "flow": {"address": 0, "type": "float32", "scale": 1e300},  # 3e38 * 1e300: infinite
        "level": {"address": 2, "type": "float32"},
    }
    holding = _HUGE_F32[:2] + list(struct.unpack(">HH", struct.pack(">f", 3.0e38)))
    device = SimDevice(1, simdata=[SimData(0, values=holding, datatype=DataType.REGISTERS)])
    records = await poll_generic_device(device, points)
    got = {s.point: s for s in samples(records)}
    assert got["flow"].quality is Quality.BAD and got["flow"].reason == "overflow"
    assert math.isnan(got["flow"].value)  # no infinity reaches the store (nor InfluxDB)
    assert got["level"].quality is Quality.GOOD and got["level"].value == pytest.approx(3e38)
    [incident] = incidents(records)
    assert (incident.kind, incident.code) == (IncidentKind.DATA, "overflow")
    assert incident.message.startswith("flow: 3.0000000054977558e+38 * scale 1e+300 + offset 0")
    assert incident.raw == struct.pack(">f", 3.0e38)
