"""Modbus TCP throughput: pocd's transport, engine and store against a bare pymodbus client loop.

One Vaisala GMP251 (driver file as shipped, CO2 scaled to % and fed to the CAR-T protocol's
`co2` and `temperature` parameters) is polled back to back (`interval = 0`) over Modbus TCP:
- pocd: the daemon itself (`Daemon.serve` on a site config written for the bench, with its
  engine, store writer, clock and API), a run of the CAR-T protocol in its expansion phase;
- bare: an `AsyncModbusTcpClient` loop making the same reads (function, address, count, unit).
Both talk to the same server in another process, on a connection of their own. The default
server is a minimal Modbus TCP responder (a blocking socket, a fixed register image encoded
from the driver's signal models) so that it costs far less than either client and the figures
compare the clients; `--server sim` uses pocd's pymodbus simulator instead, which is slower
than the clients, so both sides then measure the simulator.
The machine is shared and its speed drifts, so rounds alternate between the two sides (pocd
first, then bare first, ...) and `ratio` is the median of the ratios of neighbouring rounds;
the best round of each side and the CPU time per read (which other programs hardly move) are
printed too. Prints human lines, then as its last line one JSON object. Target: ratio >= 0.9.
Exits 1 if it is missed.

Run: .venv/bin/python bench/modbus.py [--seconds S] [--rounds N] [--server raw|sim]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and bench/serial.py is named like
# pyserial's package, which pymodbus imports: it would shadow `serial` for everything below.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from pocd.daemon import Daemon
from pocd.logs import configure_logging
from pocd.settings import Site, load_site
from pocd.sim.modbus import device_from_driver
from pocd.store import Store
from pocd.transports.modbus import ModbusPoint, ModbusRunner, ModbusSettings
from pocd.transports.modbus.codec import encode
from pocd.transports.modbus.plan import FUNCTION_CODES, Read

__all__ = ["main"]

TARGET_RATIO = 0.9
DRIVER = "vaisala-gmp251"
DEVICE = "incubator-co2"
PROTOCOL = Path(__file__).resolve().parent.parent / "config/protocols/cart-tct-3.1.toml"
PHASE = "expansion"
# As a site config would say it: CO2 in % for the protocol (the probe counts ppm).
POINTS: dict[str, dict[str, Any]] = {
    "co2": {"parameter": "co2", "unit": "%", "scale": 1e-4, "valid_max": 20.0},
    "temperature": {"parameter": "temperature"},
}
WARM_UP = 0.2  # seconds of each round not measured: connecting, first reads


# --- the server -----------------------------------------------------------------------------


def register_image(points: Sequence[ModbusPoint]) -> dict[int, dict[int, int]]:
    """Function code -> address -> register (or bit), each point at its signal model's base."""
    image: dict[int, dict[int, int]] = {code: {} for code in FUNCTION_CODES.values()}
    for point in points:
        values = image[FUNCTION_CODES[point.function]]
        base = point.sim.base if point.sim is not None else 0.0
        if point.function in ("coil", "discrete"):
            values[point.address] = int(bool(base))
            continue
        raw = (base - point.offset) / point.scale if point.scale else base
        current = values.get(point.address, 0)
        words = encode(raw, point.type, point.word_order, point.byte_order, point.bit, current)
        for i, word in enumerate(words):
            values[point.address + i] = word
    return image


def answer(image: dict[int, dict[int, int]], request: bytes) -> bytes:
    """The Modbus TCP response to one read request (function 1-4), or an exception response."""
    transaction, _, _, unit, function, address, count = struct.unpack(">HHHBBHH", request)
    if function not in image:
        pdu = struct.pack(">BB", function | 0x80, 1)
    elif function in (1, 2):
        bits = image[function]
        packed = bytearray((count + 7) // 8)
        for i in range(count):
            if bits.get(address + i):
                packed[i // 8] |= 1 << (i % 8)
        pdu = struct.pack(">BB", function, len(packed)) + bytes(packed)
    else:
        words = image[function]
        registers = [words.get(a, 0) for a in range(address, address + count)]
        pdu = struct.pack(f">BB{count}H", function, 2 * count, *registers)
    return struct.pack(">HHHB", transaction, 0, len(pdu) + 1, unit) + pdu


def serve(image: dict[int, dict[int, int]]) -> None:
    """Answer Modbus TCP reads on 127.0.0.1 until killed; prints the port first. A blocking
    socket per connection (a thread each) is the cheapest Python server there is."""
    # End with the bench, even if it is killed: it holds the other end of stdin.
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    cache: dict[bytes, bytes] = {}

    def connection(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = b""
        with sock, contextlib.suppress(ConnectionError):  # a client may go mid-request
            while data := sock.recv(65536):
                pending += data
                out = []
                while len(pending) >= 12:  # every read request is 12 bytes long
                    request, pending = pending[:12], pending[12:]
                    key = request[2:]  # all but the transaction id
                    body = cache.get(key)
                    if body is None:
                        body = cache[key] = answer(image, request)[2:]
                    out.append(request[:2] + body)
                sock.sendall(b"".join(out))

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=connection, args=(sock,), daemon=True).start()


@dataclass
class Server:
    """The server process, and its CPU time as the kernel counts it."""

    process: subprocess.Popen[str]
    port: int

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(kind: str) -> Server:
    if kind == "raw":
        command = [sys.executable, __file__, "--serve"]
    else:
        command = [sys.executable, "-m", "pocd.sim.modbus", DRIVER, "--port", "0"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"the {kind} server did not start")
    # The simulator says "... listening on 127.0.0.1:PORT: ...", the raw server only the port.
    port = int(line.split("127.0.0.1:")[1].split(":")[0]) if ":" in line else int(line)
    return Server(process, port)


# --- the two clients ------------------------------------------------------------------------


def write_site(folder: Path, port: int) -> Path:
    """A site config for the daemon: the probe, its points as above, the CAR-T protocol."""
    folder.mkdir(parents=True, exist_ok=True)
    protocols = folder / "protocols"
    protocols.mkdir(exist_ok=True)
    (protocols / PROTOCOL.name).write_bytes(PROTOCOL.read_bytes())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        api_port = sock.getsockname()[1]
    points = "\n".join(
        f"points.{name} = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in body.items())} }}"
        for name, body in POINTS.items()
    )
    config = folder / "pocd.toml"
    config.write_text(
        f"""
[site]
id = "bench"
name = "Bench"
timezone = "UTC"
control_site = "bench"

[store]
data_dir = "data"

[api]
listen = "127.0.0.1:{api_port}"

[[devices]]
id = "{DEVICE}"
driver = "{DRIVER}"
transport = {{ host = "127.0.0.1", port = {port}, interval = 0 }}
{points}
"""
    )
    return config


@dataclass
class Measure:
    reads: int
    seconds: float
    cpu: float  # seconds of this process's CPU (all threads)
    main_cpu: float  # of the event loop's thread alone (pocd's store writes in another)
    server_cpu: float

    @property
    def reads_per_s(self) -> float:
        return self.reads / self.seconds


async def measure(server: Server, seconds: float, count: Callable[[], int]) -> Measure:
    """Reads counted over `seconds`, after a warm-up in which the client connects."""
    await asyncio.sleep(WARM_UP)
    if not count():
        raise SystemExit(f"no reads in the first {WARM_UP} s: is the server answering?")
    reads0, t0, cpu0, server0 = count(), time.perf_counter(), time.process_time(), server.cpu()
    main0 = time.thread_time()
    await asyncio.sleep(seconds)
    reads1, t1, cpu1, server1 = count(), time.perf_counter(), time.process_time(), server.cpu()
    main1 = time.thread_time()
    return Measure(reads1 - reads0, t1 - t0, cpu1 - cpu0, main1 - main0, server1 - server0)


async def pocd_round(
    site: Site, server: Server, seconds: float, reads_per_sample: float
) -> tuple[Measure, Daemon]:
    """The daemon from start to stop, with a run in the bench phase; counted while it runs."""
    daemon = Daemon(site)
    serving = asyncio.create_task(daemon.serve(handle_signals=False), name="daemon")
    await daemon.started.wait()
    protocol = next(iter(site.protocols.values()))
    await daemon.start_run("B-1", protocol.id, protocol.version, "bench")
    phases = [p.id for p in protocol.phases]
    for phase in phases[1 : phases.index(PHASE) + 1]:
        await daemon.advance_phase(phase, "bench")
    try:
        result = await measure(
            server, seconds, lambda: round(daemon.counts["samples"] * reads_per_sample)
        )
        await daemon.stop_run("bench")
    finally:
        daemon.stop()
        await serving
    return result, daemon


async def bare_round(reads: Sequence[Read], unit: int, server: Server, seconds: float) -> Measure:
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port)
    calls: dict[str, Callable[..., Awaitable[Any]]] = {
        "holding": client.read_holding_registers,
        "input": client.read_input_registers,
        "coil": client.read_coils,
        "discrete": client.read_discrete_inputs,
    }
    requests = [(calls[r.function], r.address, r.count) for r in reads]
    done = 0
    running = True

    async def loop() -> None:
        nonlocal done
        await client.connect()
        while running:
            for call, address, count in requests:
                response = await call(address, count=count, device_id=unit)
                if response.isError():
                    raise RuntimeError(f"bare read failed: {response}")
                done += 1

    # Stopped by a flag, not cancelled: pymodbus waits with asyncio.wait_for, which before
    # Python 3.12 can swallow a cancellation that arrives with a response (CPython gh-86296).
    task = asyncio.create_task(loop(), name="bare pymodbus")
    try:
        return await measure(server, seconds, lambda: done)
    finally:
        running = False
        await task
        client.close()


@dataclass
class Outcome:
    pocd: list[Measure]
    bare: list[Measure]
    reads: list[Read]  # one poll's
    points: int  # samples a poll
    stored: int  # samples in the store at the end
    events: int  # excursions and deviations from the engine

    @property
    def ratio(self) -> float:
        """The median of the ratios of neighbouring rounds."""
        pairs = zip(self.pocd, self.bare, strict=True)
        return statistics.median(p.reads_per_s / b.reads_per_s for p, b in pairs)

    @property
    def best_pocd(self) -> Measure:
        return max(self.pocd, key=lambda m: m.reads_per_s)

    @property
    def best_bare(self) -> Measure:
        return max(self.bare, key=lambda m: m.reads_per_s)


async def bench(args: argparse.Namespace, server: Server, tmp: Path) -> Outcome:
    site = load_site(write_site(tmp, server.port))
    device = site.devices[DEVICE]
    assert isinstance(device.settings, ModbusSettings)
    reads = ModbusRunner(device).reads
    points = sum(isinstance(p, ModbusPoint) for p in device.points.values())
    pocd: list[Measure] = []
    bare: list[Measure] = []
    counts: Counter[str] = Counter()
    for turn in range(args.rounds):
        if turn % 2:
            bare.append(await bare_round(reads, device.settings.unit_id, server, args.seconds))
        result, daemon = await pocd_round(site, server, args.seconds, len(reads) / points)
        pocd.append(result)
        counts += daemon.counts
        counts["incidents"] += sum(daemon.incident_counts.values())
        if not turn % 2:
            bare.append(await bare_round(reads, device.settings.unit_id, server, args.seconds))
    with Store(site.store_path) as store:
        stored = store.sample_count()
    if counts["incidents"] or stored != counts["samples"]:
        raise SystemExit(
            f"{counts['samples']} samples through the engine, {stored} stored, "
            f"{counts['incidents']} incidents: see the log"
        )
    events = counts["excursions"] + counts["deviations"]
    return Outcome(pocd, bare, reads, points, stored, events)


def cpu_us(m: Measure) -> float:
    return 1e6 * m.cpu / m.reads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each side, in turns")
    parser.add_argument("--server", choices=("raw", "sim"), default="raw")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        # The probe's own points: it serves ppm, whatever scale the site applies.
        points = device_from_driver(DEVICE, DRIVER, transport={"host": "-"}).points.values()
        serve(register_image([p for p in points if isinstance(p, ModbusPoint)]))
        return 0

    configure_logging("warning")  # the daemon's info lines would bury the figures
    server = start_server(args.server)
    try:
        with tempfile.TemporaryDirectory(prefix="pocd-bench-") as tmp:
            result = asyncio.run(bench(args, server, Path(tmp)))
    finally:
        server.process.terminate()
        server.process.wait(timeout=5)
    best_pocd, best_bare, reads = result.best_pocd, result.best_bare, result.reads
    ratio = result.ratio
    cpu_pocd = statistics.median(cpu_us(m) for m in result.pocd)
    cpu_bare = statistics.median(cpu_us(m) for m in result.bare)
    plan = ", ".join(str(r) for r in reads)
    print(f"{DRIVER} over Modbus TCP, {len(reads)} reads a poll ({plan}), server: {args.server}")
    print(f"{args.rounds} rounds of {args.seconds:g} s a side, in turns:")
    for name, rounds in (("pocd", result.pocd), ("bare", result.bare)):
        rates = " ".join(f"{m.reads_per_s:,.0f}" for m in rounds)
        print(f"  {name} rounds: {rates} reads/s")
    print(f"median ratio of neighbouring rounds {ratio:.3f}; best rounds:")
    for name, m in (("pocd transport+engine+store", best_pocd), ("bare pymodbus loop", best_bare)):
        print(
            f"{name:>28}: {m.reads_per_s:>7,.0f} reads/s  client CPU {m.cpu / m.seconds:.2f} core"
            f" ({cpu_us(m):.0f} us/read)  server CPU {m.server_cpu / m.seconds:.2f} core"
        )
    print(f"{result.stored:,} samples stored, {result.events} engine events")
    output = {
        "driver": DRIVER,
        "server": args.server,
        "reads_per_poll": len(reads),
        "pocd_reads_per_s": round(best_pocd.reads_per_s),
        "pocd_samples_per_s": round(best_pocd.reads_per_s / len(reads) * result.points),
        "bare_reads_per_s": round(best_bare.reads_per_s),
        "best_ratio": round(best_pocd.reads_per_s / best_bare.reads_per_s, 3),
        "pocd_cpu_us_per_read": round(cpu_pocd, 1),
        "bare_cpu_us_per_read": round(cpu_bare, 1),
        "cpu_ratio": round(cpu_bare / cpu_pocd, 3),
        "pocd_main_thread_cpu_us_per_read": round(
            statistics.median(1e6 * m.main_cpu / m.reads for m in result.pocd), 1
        ),
        "server_cpu_core": round(best_bare.server_cpu / best_bare.seconds, 2),
        "samples_stored": result.stored,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
    }
    print(json.dumps(output))
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
