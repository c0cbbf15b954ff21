"""Modbus TCP throughput: pocd's transport, engine and store against a bare pymodbus client loop.

One Vaisala GMP251 (driver file as shipped, CO2 scaled to % and fed to the CAR-T protocol's
`co2` and `temperature` parameters) is polled back to back (`interval = 0`) over Modbus TCP:
- pocd: the daemon itself (`Daemon.serve` on a site config written for the bench, with its
  engine, store writer, clock and API), a run of the CAR-T protocol in its expansion phase;
  its reads are counted as the samples that came through the engine;
- bare: an `AsyncModbusTcpClient` loop making the same reads (function, address, count, unit).
Each runs in a process of its own, on a connection of its own to the same server (a third
process). The default server is a minimal Modbus TCP responder (a blocking socket, a fixed
register image encoded from the driver's signal models) so that it costs far less than either
client and the figures compare the clients; `--server sim` uses pocd's pymodbus simulator
instead, which is slower than the clients, so both sides then measure the simulator.

The machine is shared and its speed drifts by a quarter within seconds, so the two clients
never run at the same time, nor in rounds seconds apart: both run all along, and the bench
lets one run at a time (SIGCONT, then SIGSTOP after `--slice` seconds), in turns, for
`--seconds` in all. Each side's rate is its reads over the time it was let run, so both are
measured over the same stretch of the machine's moods. pocd's daemon runs all through, as in
service: its store writer, flushes and clock run in its own turns (a stopped process does
nothing). Each side publishes its count to shared memory every 5 ms; the counts at the ends
of a turn are up to 5 ms stale, which cancels over consecutive turns. Prints human lines, then
as its last line one JSON object. Target: ratio >= 0.9. Exits 1 if it is missed, or if not
every sample through the engine was stored.

Run: .venv/bin/python bench/modbus.py [--seconds S] [--slice S] [--server raw|sim]
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
import mmap
import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

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
WARM_UP = 0.3  # seconds each client runs before the turns: connecting, first reads
SLICE = 0.1  # seconds of one turn
SECONDS = 12.0  # of turns in all, half each side
COUNTER = struct.Struct("q")  # a side's reads so far, in shared memory
PUBLISH_EVERY = 0.005  # seconds


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
class Child:
    """A process of the bench (the server or a client), and its CPU time as the kernel counts
    it: of the whole process, or of its main thread alone."""

    process: subprocess.Popen[str]

    def cpu(self, *, main_thread: bool = False) -> float:
        pid = self.process.pid
        stat = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def stdout(self) -> IO[str]:
        assert self.process.stdout is not None
        return self.process.stdout

    def stop(self) -> None:
        """End it, stopped or not."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()


def start_server(kind: str) -> tuple[Child, int]:
    if kind == "raw":
        command = [sys.executable, __file__, "--serve"]
    else:
        command = [sys.executable, "-m", "pocd.sim.modbus", DRIVER, "--port", "0"]
    server = Child(
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    )
    line = server.stdout.readline()
    if not line:
        raise SystemExit(f"the {kind} server did not start")
    # The simulator says "... listening on 127.0.0.1:PORT: ...", the raw server only the port.
    port = int(line.split("127.0.0.1:")[1].split(":")[0]) if ":" in line else int(line)
    return server, port


# --- the two clients, each in a process of its own ------------------------------------------


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


def plan(site: Site) -> tuple[list[Read], ModbusSettings, int]:
    """One poll's reads, the device's settings, and the samples a poll makes."""
    device = site.devices[DEVICE]
    assert isinstance(device.settings, ModbusSettings)
    points = sum(isinstance(p, ModbusPoint) for p in device.points.values())
    return ModbusRunner(device).reads, device.settings, points


async def publish(counter: mmap.mmap, count: Callable[[], int]) -> None:
    while True:
        COUNTER.pack_into(counter, 0, count())
        await asyncio.sleep(PUBLISH_EVERY)


async def pocd_client(site: Site, counter: mmap.mmap, stop: asyncio.Event) -> dict[str, int]:
    """The daemon, with a run in the bench phase, until `stop`; what it counted and stored."""
    reads, _, points = plan(site)
    daemon = Daemon(site)
    serving = asyncio.create_task(daemon.serve(handle_signals=False), name="daemon")
    await daemon.started.wait()
    protocol = next(iter(site.protocols.values()))
    await daemon.start_run("B-1", protocol.id, protocol.version, "bench")
    phases = [p.id for p in protocol.phases]
    for phase in phases[1 : phases.index(PHASE) + 1]:
        await daemon.advance_phase(phase, "bench")
    counts = daemon.counts
    publisher = asyncio.create_task(
        publish(counter, lambda: counts["samples"] * len(reads) // points)
    )
    try:
        await stop.wait()
        await daemon.stop_run("bench")
    finally:
        publisher.cancel()
        daemon.stop()
        await serving
    with Store(site.store_path) as store:
        stored = store.sample_count()
    return {
        "samples": counts["samples"],
        "stored": stored,
        "incidents": sum(daemon.incident_counts.values()),
        "events": counts["excursions"] + counts["deviations"],
    }


async def bare_client(site: Site, counter: mmap.mmap, stop: asyncio.Event) -> dict[str, int]:
    reads, settings, _ = plan(site)
    unit = settings.unit_id
    client = AsyncModbusTcpClient("127.0.0.1", port=settings.port)
    calls: dict[str, Callable[..., Awaitable[Any]]] = {
        "holding": client.read_holding_registers,
        "input": client.read_input_registers,
        "coil": client.read_coils,
        "discrete": client.read_discrete_inputs,
    }
    requests = [(calls[r.function], r.address, r.count) for r in reads]
    done = 0
    publisher = asyncio.create_task(publish(counter, lambda: done))
    await client.connect()
    try:
        while not stop.is_set():
            for call, address, count in requests:
                response = await call(address, count=count, device_id=unit)
                if response.isError():
                    raise RuntimeError(f"bare read failed: {response}")
                done += 1
    finally:
        publisher.cancel()
        client.close()
    return {"reads": done}


def client(side: str, port: int, counter_path: str) -> None:
    """A client process: runs until SIGTERM, says "ready" once warm, then its counts as JSON."""

    async def run() -> dict[str, int]:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        with tempfile.TemporaryDirectory(prefix="pocd-bench-") as tmp:
            site = load_site(write_site(Path(tmp), port))
            go = pocd_client if side == "pocd" else bare_client
            task = asyncio.create_task(go(site, counter, stop))
            await asyncio.sleep(WARM_UP)
            if not COUNTER.unpack_from(counter)[0]:
                raise SystemExit(f"{side}: no reads in the first {WARM_UP} s")
            print("ready", flush=True)
            return await task

    configure_logging("warning")  # the daemon's info lines would bury the figures
    with open(counter_path, "r+b") as file, mmap.mmap(file.fileno(), COUNTER.size) as counter:
        print(json.dumps(asyncio.run(run())), flush=True)


# --- the turns ------------------------------------------------------------------------------


@dataclass
class Side:
    """One client's turns: reads and seconds of each."""

    name: str
    child: Child
    counter: mmap.mmap
    turns: list[tuple[int, float]] = field(default_factory=list)
    cpu: float = 0.0  # seconds, over all the turns
    main_cpu: float = 0.0

    @property
    def count(self) -> int:
        return int(COUNTER.unpack_from(self.counter)[0])

    @property
    def reads(self) -> int:
        return sum(n for n, _ in self.turns)

    @property
    def reads_per_s(self) -> float:
        return self.reads / sum(t for _, t in self.turns)

    def cpu_us_per_read(self, cpu: float) -> float:
        return 1e6 * cpu / self.reads


def start_client(name: str, port: int, folder: Path) -> Side:
    path = folder / f"{name}.count"
    path.write_bytes(bytes(COUNTER.size))
    command = [
        sys.executable,
        __file__,
        "--client",
        name,
        "--port",
        str(port),
        "--counter",
        str(path),
    ]
    child = Child(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    with path.open("r+b") as file:
        return Side(name, child, mmap.mmap(file.fileno(), COUNTER.size))


def take_turns(sides: list[Side], seconds: float, slice_: float) -> None:
    """Let one side run at a time, `slice_` seconds each, in turns, for `seconds` in all."""
    cpu0 = [(s.child.cpu(), s.child.cpu(main_thread=True)) for s in sides]
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for side in sides:
            count = side.count
            start = time.perf_counter()
            side.child.process.send_signal(signal.SIGCONT)
            time.sleep(slice_)
            side.child.process.send_signal(signal.SIGSTOP)
            side.turns.append((side.count - count, time.perf_counter() - start))
    for side, (cpu, main_cpu) in zip(sides, cpu0, strict=True):
        side.cpu = side.child.cpu() - cpu
        side.main_cpu = side.child.cpu(main_thread=True) - main_cpu


def per_second(pocd: Side, bare: Side, slice_: float) -> list[float]:
    """The ratio over each second of turns: how much it moved during the bench."""
    group = max(1, round(1 / slice_))
    ratios = []
    for i in range(0, len(pocd.turns) - group + 1, group):
        p, b = pocd.turns[i : i + group], bare.turns[i : i + group]
        p_rate = sum(n for n, _ in p) / sum(t for _, t in p)
        b_rate = sum(n for n, _ in b) / sum(t for _, t in b)
        ratios.append(round(p_rate / b_rate, 3))
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="of turns, in all")
    parser.add_argument("--slice", type=float, default=SLICE, help="seconds of one turn")
    parser.add_argument("--server", choices=("raw", "sim"), default="raw")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=("pocd", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--counter", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        # The probe's own points: it serves ppm, whatever scale the site applies.
        probe = device_from_driver(DEVICE, DRIVER, transport={"host": "-"}).points.values()
        serve(register_image([p for p in probe if isinstance(p, ModbusPoint)]))
        return 0
    if args.client:
        client(args.client, args.port, args.counter)
        return 0

    return compare(args)


def compare(args: argparse.Namespace) -> int:
    """The turns of the two clients against one server; prints the figures."""
    server, port = start_server(args.server)
    sides: list[Side] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pocd-bench-") as tmp:
            reads, _, points = plan(load_site(write_site(Path(tmp) / "site", port)))
            for name in ("pocd", "bare"):
                side = start_client(name, port, Path(tmp))
                sides.append(side)
                if side.child.stdout.readline().strip() != "ready":
                    raise SystemExit(f"the {name} client did not start")
                side.child.process.send_signal(signal.SIGSTOP)
            server_cpu = server.cpu()
            started = time.perf_counter()
            take_turns(sides, args.seconds, args.slice)
            server_cpu = (server.cpu() - server_cpu) / (time.perf_counter() - started)
            for side in sides:  # both at once: a client stopped for seconds would time out
                side.child.process.send_signal(signal.SIGCONT)
                side.child.process.terminate()
            results = [json.loads(s.child.stdout.read().splitlines()[-1]) for s in sides]
    finally:
        for side in sides:
            side.child.stop()
        server.stop()
    pocd, bare = sides
    counts = results[0]
    if counts["incidents"] or counts["stored"] != counts["samples"]:
        raise SystemExit(
            f"{counts['samples']} samples through the engine, {counts['stored']} stored, "
            f"{counts['incidents']} incidents: see the log"
        )
    ratio = pocd.reads_per_s / bare.reads_per_s
    cpu = {s.name: s.cpu_us_per_read(s.cpu) for s in sides}
    seconds = per_second(pocd, bare, args.slice)
    print(f"{DRIVER} over Modbus TCP, {len(reads)} reads a poll ({', '.join(map(str, reads))})")
    print(f"server: {args.server}; turns of {args.slice:g} s, {args.seconds:g} s in all")
    for name, side in (("pocd transport+engine+store", pocd), ("bare pymodbus loop", bare)):
        print(f"{name:>28}: {side.reads_per_s:>7,.0f} reads/s, {cpu[side.name]:.0f} us CPU a read")
    print(f"ratio {ratio:.3f}; over each second of turns: {' '.join(map(str, seconds))}")
    print(f"{counts['stored']:,} samples stored, {counts['events']} engine events")
    output = {
        "driver": DRIVER,
        "server": args.server,
        "reads_per_poll": len(reads),
        "pocd_reads_per_s": round(pocd.reads_per_s),
        "pocd_samples_per_s": round(pocd.reads_per_s / len(reads) * points),
        "bare_reads_per_s": round(bare.reads_per_s),
        "pocd_cpu_us_per_read": round(cpu["pocd"], 1),
        "bare_cpu_us_per_read": round(cpu["bare"], 1),
        "cpu_ratio": round(cpu["bare"] / cpu["pocd"], 3),
        "pocd_main_thread_cpu_us_per_read": round(pocd.cpu_us_per_read(pocd.main_cpu), 1),
        "server_cpu_core": round(server_cpu, 2),
        "samples_stored": counts["stored"],
        "ratio_per_second": seconds,
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
    }
    print(json.dumps(output))
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
