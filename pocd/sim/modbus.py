"""The Modbus simulator: serves any Modbus driver file with pymodbus's server, for the demo,
the tests and the bench. Some 550 lines: every fault it can inject acts inside the one
request handler, beside the register map it falsifies.

Units are driver files at a unit id; several can share one TCP server or one serial port (an
RS-485 bus). Values follow each point's `sim` signal model (base + sine + noise). Faults can
be injected, per unit and for a time window: exception responses, silence, CRC garbage, short
responses, start-up (NaN and "not ready" status), swapped word order, forced values. The
simulator counts the requests it sees. It must not import the transport's runner or links:
it checks pocd from the far side of the wire, sharing only the register codec and the models.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from pocd.configtypes import parse_duration
from pocd.settings import Driver, load_driver
from pocd.sim.pty import pty_pair
from pocd.transports import Device
from pocd.transports.modbus.codec import encode
from pocd.transports.modbus.config import (
    REGISTER_COUNT,
    Function,
    ModbusPoint,
    ModbusSettings,
    SignalModel,
)

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "ModbusSimulator",
    "SimulatedUnit",
    "add_simulate_arguments",
    "device_from_driver",
    "main",
    "parse_fault",
    "run_simulator",
    "unit_from_driver",
]

FaultKind = Literal["exception", "silence", "crc", "short", "startup", "swap-words", "set"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "exception",
    "silence",
    "crc",
    "short",
    "startup",
    "swap-words",
    "set",
)
_FUNCTION_OF_CODE: dict[int, Function] = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    23: "holding",
    4: "input",
}
_BLOCKS: tuple[Function, ...] = ("coil", "discrete", "holding", "input")  # pymodbus's tuple order


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault the simulator injects.

    exception: answer with exception `code`; silence: answer nothing; crc: corrupt the last two
    bytes (the CRC on RTU); short: drop the last register of register responses; startup: the
    device is not ready (floats NaN, points with `sim.startup` serve it); swap-words: encode
    multi-register values in the other word order; set: serve `value` for `point`.
    `unit` limits it to one unit; it is active from `after` seconds for `duration` seconds
    (None: for ever) on every `every`-th request.
    """

    kind: FaultKind
    unit: int | None = None
    after: float = 0.0
    duration: float | None = None
    every: int = 1
    code: int = 2
    point: str = ""
    value: float = 0.0

    def active(self, unit: int, elapsed: float, request: int) -> bool:
        if self.unit is not None and self.unit != unit:
            return False
        if elapsed < self.after:
            return False
        if self.duration is not None and elapsed >= self.after + self.duration:
            return False
        return request % self.every == 0


def parse_fault(text: str) -> Fault:
    """A fault from `KIND[,key=value...]`, e.g. `silence,unit=2,after=5s,for=10s`,
    `exception,code=2,every=3`, `startup,for=30s`, `set,point=co2_status,value=4`."""
    kind, *options = [part.strip() for part in text.split(",")]
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault {kind!r} (one of {', '.join(FAULT_KINDS)})")
    values: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"fault option {option!r} is not key=value")
        if key == "unit":
            values["unit"] = int(value, 0)
        elif key == "after":
            values["after"] = parse_duration(value)
        elif key == "for":
            values["duration"] = parse_duration(value)
        elif key in ("every", "code"):
            values[key] = int(value, 0)
        elif key == "point":
            values["point"] = value
        elif key == "value":
            values["value"] = (
                float(int(value, 0)) if re.fullmatch(r"0x[0-9a-fA-F]+", value) else float(value)
            )
        else:
            raise ValueError(f"unknown fault option {key!r}")
    if values.get("every", 1) < 1:
        raise ValueError("every must be 1 or more")
    if kind == "set" and not values.get("point"):
        raise ValueError("a set fault needs point=NAME")
    return Fault(kind, **values)


@dataclass(slots=True)
class SimulatedUnit:
    """One simulated device: its points at a unit id."""

    unit_id: int
    points: Mapping[str, ModbusPoint]
    name: str = ""
    extra_spans: Sequence[tuple[Function, int, int]] = ()  # (function, address, count) to serve
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.unit_id <= 247:
            raise ValueError(f"unit id {self.unit_id} is not 1..247")
        self.rng = random.Random(self.seed * 7919 + self.unit_id)


def unit_from_driver(
    driver: str, unit_id: int | None = None, *, dirs: Iterable[Path] = (), seed: int = 0
) -> SimulatedUnit:
    """A simulated unit serving every point of a driver file (at its default unit id)."""
    loaded = load_driver(driver, dirs)
    settings = ModbusSettings.model_validate(loaded.defaults)
    points = {n: ModbusPoint.model_validate(body) for n, body in loaded.points.items()}
    spans = [(b.function, b.address, b.count) for b in settings.blocks]
    return SimulatedUnit(
        unit_id=settings.unit_id if unit_id is None else unit_id,
        points=points,
        name=driver,
        extra_spans=spans,
        seed=seed,
    )


def device_from_driver(
    device_id: str,
    driver: str,
    *,
    transport: Mapping[str, Any] | None = None,
    points: Mapping[str, Mapping[str, Any]] | None = None,
    only: Iterable[str] | None = None,
    dirs: Iterable[Path] = (),
) -> Device:
    """A Device as a site config would resolve it, without a site file (tests, bench, demo).

    `transport` and `points` override the driver as a site config does; `only` keeps those
    points of the driver.
    """
    loaded = load_driver(driver, dirs)
    settings = ModbusSettings.model_validate({**loaded.defaults, **(transport or {})})
    extra = points or {}
    names = [*loaded.points, *(n for n in extra if n not in loaded.points)]
    if only is not None:
        keep = set(only)
        names = [n for n in names if n in keep]
    resolved = {
        name: ModbusPoint.model_validate({**loaded.points.get(name, {}), **extra.get(name, {})})
        for name in names
    }
    return Device(id=device_id, driver=loaded.info, settings=settings, points=resolved)


class ModbusSimulator:
    """Simulated units behind one pymodbus server (TCP) or on one serial port (RTU)."""

    def __init__(self, units: Sequence[SimulatedUnit], *, faults: Iterable[Fault] = ()) -> None:
        ids = [u.unit_id for u in units]
        if len(set(ids)) != len(ids):
            raise ValueError(f"unit ids must differ: {ids}")
        self.units = {u.unit_id: u for u in units}
        self.faults: list[Fault] = list(faults)  # may be changed while serving
        self.requests: Counter[int] = Counter()  # requests seen, by unit id
        self.started = time.monotonic()
        self.framer: Literal["tcp", "rtu"] = "tcp"
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._now: dict[int, list[Fault]] = {}  # faults for the request in flight, by unit
        self._devices = [self._sim_device(u) for u in units]
        # Unit 0 answers for every unit not simulated; its answers are dropped, as an RS-485
        # bus gives no answer for an address nobody has.
        self._devices.append(SimDevice(0, simdata=_placeholder_blocks()))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def restart_clock(self) -> None:
        """Start-up faults and `after=` windows count from now."""
        self.started = time.monotonic()

    # --- serving --------------------------------------------------------------------------

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve Modbus TCP; returns the port (useful with port 0)."""
        self.framer = "tcp"
        server = ModbusTcpServer(
            self._devices,
            address=(host, port),
            trace_packet=self._trace_packet,
            trace_pdu=self._trace_pdu,
        )
        await server.serve_forever(background=True)
        self._server = server
        sockets = getattr(server.transport, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def start_rtu(
        self,
        serial_port: str,
        *,
        baudrate: int = 19200,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: int = 1,
    ) -> None:
        """Serve Modbus RTU on a serial port (or one end of a pty pair)."""
        self.framer = "rtu"
        server = ModbusSerialServer(
            self._devices,
            framer=FramerType.RTU,
            port=serial_port,
            baudrate=baudrate,
            bytesize=bytesize,
            parity=parity,
            stopbits=stopbits,
            trace_packet=self._trace_packet,
            trace_pdu=self._trace_pdu,
        )
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    async def __aenter__(self) -> ModbusSimulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- values ---------------------------------------------------------------------------

    def value(self, unit: SimulatedUnit, name: str, point: ModbusPoint, elapsed: float) -> float:
        """What the unit serves for a point now, with `startup` and `set` faults applied."""
        for fault in self._now.get(unit.unit_id, ()):
            if fault.kind == "set" and fault.point == name:
                return fault.value
        model = point.sim or SignalModel()
        if any(f.kind == "startup" for f in self._now.get(unit.unit_id, ())):
            if model.startup is not None:
                return model.startup
            if point.type in ("float32", "float64"):
                return math.nan
            if point.sentinels:
                return point.sentinels[0]
        value = model.base
        if model.amplitude:
            value += model.amplitude * math.sin(2 * math.pi * elapsed / model.period)
        if model.noise:
            value += unit.rng.gauss(0.0, model.noise)
        return value

    def _sim_device(self, unit: SimulatedUnit) -> SimDevice:
        spans: dict[Function, list[tuple[int, int]]] = {f: [] for f in _BLOCKS}
        for point in unit.points.values():
            spans[point.function].append((point.address, point.address + point.count))
            for rule in point.status:
                function = rule.function or point.function
                spans[function].append((rule.address, rule.address + REGISTER_COUNT[rule.type]))
        for function, address, count in unit.extra_spans:
            spans[function].append((address, address + count))
        blocks: list[list[SimData]] = []
        for function in _BLOCKS:
            bits = function in ("coil", "discrete")
            if not spans[function]:
                blocks.append(_placeholder(bits))
                continue
            # One block from the lowest to the highest address in use: reads that span unused
            # registers (merged reads) are answered with zeros, as most devices do.
            low = min(s for s, _ in spans[function])
            high = max(e for _, e in spans[function])
            kind = SimType.BITS if bits else SimType.REGISTERS
            empty: bool | int = False if bits else 0
            blocks.append([SimData(low, count=high - low, values=empty, datatype=kind)])
        by_function: dict[Function, list[tuple[str, ModbusPoint]]] = {f: [] for f in _BLOCKS}
        for name, point in unit.points.items():
            by_function[point.function].append((name, point))

        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            registers: list[int],
            set_values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            function = _FUNCTION_OF_CODE.get(function_code)
            if function is None or set_values is not None:
                return None  # writes land in the registers as they are
            self._fill(
                unit, by_function[function], function, start_address, address, count, registers
            )
            return None

        return SimDevice(
            unit.unit_id,
            simdata=(blocks[0], blocks[1], blocks[2], blocks[3]),
            action=action,
        )

    def _fill(
        self,
        unit: SimulatedUnit,
        points: list[tuple[str, ModbusPoint]],
        function: Function,
        start: int,
        address: int,
        count: int,
        registers: list[int],
    ) -> None:
        elapsed = self.elapsed
        swap = any(f.kind == "swap-words" for f in self._now.get(unit.unit_id, ()))
        for name, point in points:
            if point.address + point.count <= address or point.address >= address + count:
                continue
            value = self.value(unit, name, point, elapsed)
            if function in ("coil", "discrete"):
                # Bits are packed 16 to a register, least significant first; `start` counts
                # registers.
                index, bit = point.address // 16 - start, point.address % 16
                registers[index] = encode(value, "bit", bit=bit, current=registers[index])[0]
                continue
            raw = (value - point.offset) / point.scale if point.scale else value
            order = point.word_order
            if swap and point.count > 1:
                order = "big" if order == "little" else "little"
            offset = point.address - start
            current = registers[offset]
            words = encode(raw, point.type, order, point.byte_order, point.bit, current)
            registers[offset : offset + len(words)] = words

    # --- faults on the wire ---------------------------------------------------------------

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        unit = pdu.dev_id
        if not sending:  # a request: count it and decide its faults now
            self.requests[unit] += 1
            elapsed = self.elapsed
            number = self.requests[unit]
            self._now[unit] = [f for f in self.faults if f.active(unit, elapsed, number)]
            return pdu
        for fault in self._now.get(unit, ()):
            if fault.kind == "exception":
                return ExceptionResponse(
                    pdu.function_code & 0x7F,
                    fault.code,
                    device_id=unit,
                    transaction=pdu.transaction_id,
                )
            if fault.kind == "short" and getattr(pdu, "registers", None):
                pdu.registers = pdu.registers[:-1]
        return pdu

    def _trace_packet(self, sending: bool, packet: bytes) -> bytes:
        if not sending or not packet:
            return packet
        unit = packet[0] if self.framer == "rtu" else packet[6] if len(packet) > 6 else 0
        if unit not in self.units:
            return b""
        kinds = {f.kind for f in self._now.get(unit, ())}
        if "silence" in kinds:
            return b""
        if "crc" in kinds:
            return packet[:-2] + bytes(b ^ 0x5A for b in packet[-2:])
        return packet


def _placeholder(bits: bool) -> list[SimData]:
    if bits:
        return [SimData(0, count=16, values=False, datatype=SimType.BITS)]
    return [SimData(0, count=1, values=0, datatype=SimType.REGISTERS)]


def _placeholder_blocks() -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
    return (_placeholder(True), _placeholder(True), _placeholder(False), _placeholder(False))


# --- command line ---------------------------------------------------------------------------


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `pocd simulate` for Modbus drivers (see `run_simulator`)."""
    parser.add_argument(
        "drivers",
        nargs="+",
        metavar="DRIVER[:UNIT]",
        help="driver files to serve, each at its default unit id or at UNIT; "
        "several share one TCP server or one serial bus",
    )
    parser.add_argument("--transport", choices=("tcp", "rtu"), default="tcp")
    parser.add_argument("--host", default="127.0.0.1", help="TCP address to listen on")
    parser.add_argument("--port", type=int, default=5020, help="TCP port (0: any free port)")
    parser.add_argument("--serial-port", help="RTU: serve on this serial device (or pty end)")
    parser.add_argument(
        "--pty-link",
        metavar="PATH",
        help="RTU: make a socat pty pair, serve on one end and link the other end at PATH "
        "for pocd to open",
    )
    parser.add_argument("--baudrate", type=int, help="RTU line settings; default: the driver's")
    parser.add_argument("--bytesize", type=int, choices=(7, 8))
    parser.add_argument("--parity", choices=("N", "E", "O"))
    parser.add_argument("--stopbits", type=int, choices=(1, 2))
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[,key=value...]",
        help=f"inject a fault: {', '.join(FAULT_KINDS)}; keys unit, after, for, every, "
        "code, point, value (e.g. silence,unit=2,after=5s,for=10s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the signal noise")
    parser.add_argument(
        "--drivers-dir", type=Path, action="append", default=[], help="extra driver folder"
    )


def run_simulator(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM. Prints one line saying where it listens, then serves."""
    units: list[SimulatedUnit] = []
    for spec in args.drivers:
        name, _, unit = spec.partition(":")
        units.append(
            unit_from_driver(
                name, int(unit, 0) if unit else None, dirs=args.drivers_dir, seed=args.seed
            )
        )
    faults = [parse_fault(text) for text in args.fault]
    first = ModbusSettings.model_validate(
        load_driver(args.drivers[0].partition(":")[0], args.drivers_dir).defaults
    )
    line = {
        "baudrate": args.baudrate or first.baudrate,
        "bytesize": args.bytesize or first.bytesize,
        "parity": args.parity or first.parity,
        "stopbits": args.stopbits or first.stopbits,
    }
    asyncio.run(_serve(args, units, faults, line))
    return 0


async def _serve(
    args: argparse.Namespace,
    units: list[SimulatedUnit],
    faults: list[Fault],
    line: dict[str, Any],
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    names = ", ".join(f"{u.name}@{u.unit_id}" for u in units)
    async with contextlib.AsyncExitStack() as stack:
        simulator = await stack.enter_async_context(ModbusSimulator(units, faults=faults))
        if args.transport == "tcp":
            port = await simulator.start_tcp(args.host, args.port)
            print(f"modbus tcp simulator listening on {args.host}:{port}: {names}", flush=True)
        else:
            serial_port = args.serial_port
            if args.pty_link:
                serial_port = stack.enter_context(pty_pair(args.pty_link))
            if not serial_port:
                raise SystemExit("--transport rtu needs --serial-port or --pty-link")
            await simulator.start_rtu(serial_port, **line)
            where = f"{serial_port} (pocd opens {args.pty_link})" if args.pty_link else serial_port
            settings = f"{line['baudrate']} {line['bytesize']}{line['parity']}{line['stopbits']}"
            print(f"modbus rtu simulator on {where} {settings}: {names}", flush=True)
        await stop.wait()


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_simulate_arguments(parser)
    return parser


def main(driver: Driver, argv: Sequence[str]) -> int:
    """`pocd simulate DRIVER [more DRIVER[:UNIT]] [options]`."""
    return run_simulator(_parser("pocd simulate").parse_args([driver.info.id, *argv]))


if __name__ == "__main__":
    sys.exit(run_simulator(_parser("python -m pocd.sim.modbus").parse_args()))
