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

The two are measured in turns of `--slice` seconds for `--seconds` in all (see
bench/_turns.py): pocd's daemon runs all through, as in service, and its store writer, flushes
and clock run in its own turns. Prints human lines, then as its last
line one JSON object. Target: ratio >= 0.9. Exits 1 if it is missed, or if not every sample
through the engine was stored.

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
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from bench import _turns as turns
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


def start_server(kind: str) -> tuple[turns.Child, int]:
    if kind == "raw":
        command = [sys.executable, __file__, "--serve"]
    else:
        command = [sys.executable, "-m", "pocd.sim.modbus", DRIVER, "--port", "0"]
    server = turns.Child(
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


async def pocd_client(site: Site, counter: mmap.mmap, stop: asyncio.Event) -> dict[str, int]:
    """The daemon, with a run in the bench phase, until `stop`; what it counted and stored."""
    reads, _, points = plan(site)
    daemon = Daemon(site)
    serving = asyncio.create_task(daemon.serve(handle_signals=False), name="daemon")
    await daemon.started.wait()
    protocol = next(iter(site.protocols.values()))
    await daemon.lines.start_run("B-1", protocol.id, protocol.version, "bench")
    phases = [p.id for p in protocol.phases]
    for phase in phases[1 : phases.index(PHASE) + 1]:
        await daemon.lines.advance_phase(phase, "bench")
    counts = daemon.counts
    publisher = asyncio.create_task(
        turns.publish(counter, lambda: counts["samples"] * len(reads) // points)
    )
    try:
        await stop.wait()
        await daemon.lines.stop_run("bench")
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
    publisher = asyncio.create_task(turns.publish(counter, lambda: done))
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
            await turns.warm_up(counter, side, WARM_UP)
            return await task

    configure_logging("warning")  # the daemon's info lines would bury the figures
    with turns.counter(counter_path) as counter:
        print(json.dumps(asyncio.run(run())), flush=True)


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
    sides: list[turns.Side] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pocd-bench-") as tmp:
            reads, _, points = plan(load_site(write_site(Path(tmp) / "site", port)))
            for name in ("pocd", "bare"):
                command = [sys.executable, __file__, "--client", name, "--port", str(port)]
                sides.append(turns.start(name, command, Path(tmp)))
            server_cpu = server.cpu()
            started = time.perf_counter()
            turns.take_turns(sides, args.seconds, args.slice)
            server_cpu = (server.cpu() - server_cpu) / (time.perf_counter() - started)
            results = turns.finish(sides)
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
    ratio = pocd.rate / bare.rate
    cpu = {s.name: s.cpu_us_each() for s in sides}
    seconds = turns.per_second(pocd, bare, args.slice)
    print(f"{DRIVER} over Modbus TCP, {len(reads)} reads a poll ({', '.join(map(str, reads))})")
    print(f"server: {args.server}; turns of {args.slice:g} s, {args.seconds:g} s in all")
    for name, side in (("pocd transport+engine+store", pocd), ("bare pymodbus loop", bare)):
        print(f"{name:>28}: {side.rate:>7,.0f} reads/s, {cpu[side.name]:.0f} us CPU a read")
    print(f"ratio {ratio:.3f}; over each second of turns: {' '.join(map(str, seconds))}")
    print(f"{counts['stored']:,} samples stored, {counts['events']} engine events")
    output = {
        "driver": DRIVER,
        "server": args.server,
        "reads_per_poll": len(reads),
        "pocd_reads_per_s": round(pocd.rate),
        "pocd_samples_per_s": round(pocd.rate / len(reads) * points),
        "bare_reads_per_s": round(bare.rate),
        "pocd_cpu_us_per_read": round(cpu["pocd"], 1),
        "bare_cpu_us_per_read": round(cpu["bare"], 1),
        "cpu_ratio": round(cpu["bare"] / cpu["pocd"], 3),
        "pocd_main_thread_cpu_us_per_read": round(pocd.cpu_us_each(pocd.main_cpu), 1),
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
