"""Serial round trips: pocd's MT-SICS poll path against a bare pyserial-asyncio-fast loop.

Both ask `SI` and read `S S      100.00 g` over the same socat pty pair, in one run, taking
turns in short slices. The far end is a small responder in its own process (blocking reads
and writes: as fast as a pty goes), so that what is measured is the asking side. "Through
pocd" is the `SerialRunner` with interval 0, as the daemon runs it: the shared port with its
lock and timeout, framing, reply shapes, quality, one `Sample` per reply into the daemon's
inbox. The bare loop writes, `readuntil`s the line and converts the weight. The machine is
shared, so the ratio is the median of the ratios of neighbouring slices, and each client's
CPU time per round trip is printed too (other programs hardly move it). A pty ignores the
baud rate, so the rate a real 9600-baud 8N1 line allows is printed as well. Prints one JSON
object as its last line.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file is named like
# pyserial's package: it would shadow `serial` for everything imported below.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import termios
import time
import tty
from dataclasses import dataclass

import serial_asyncio_fast

from pocd.daemon import INBOX_SIZE
from pocd.inbox import Inbox
from pocd.model import Sample
from pocd.settings import load_driver
from pocd.sim.serial import PtyPair
from pocd.transports import Device
from pocd.transports.serial import SerialPoint, SerialRunner, SerialSettings

REQUEST = b"SI\r\n"
REPLY = b"S S      100.00 g\r\n"
SECONDS = 0.5  # per slice
PAIRS = 8
BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit


def respond(path: str) -> None:
    """The balance: answer every SI line with the golden reply, until the pty goes away."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)
    pending = b""
    try:
        while True:
            data = os.read(fd, 4096)
            if not data:
                return
            pending += data
            asked = pending.count(b"\r\n")
            if asked:
                pending = pending[pending.rindex(b"\r\n") + 2 :]
                os.write(fd, REPLY * asked)
    except OSError:
        return  # the pty pair was removed: the bench is over
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Slice:
    """One timed stretch of one client: round trips per second, and the asking process's
    CPU time per round trip (which the other programs on a shared machine hardly move)."""

    rate: float
    cpu_us: float


async def bare(port: str, seconds: float) -> Slice:
    """The plainest asyncio loop that does the same exchange."""
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=port, baudrate=9600)
    writer.write(REQUEST)  # one exchange before the clock starts, as for pocd
    await reader.readuntil(b"\r\n")
    count = 0
    total = 0.0
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    start = loop.time()
    end = start + seconds
    while loop.time() < end:
        writer.write(REQUEST)
        line = await reader.readuntil(b"\r\n")
        total += float(line.split()[2])
        count += 1
    elapsed, cpu = loop.time() - start, time.process_time() - cpu
    writer.close()
    await asyncio.sleep(0.02)  # let the transport finish closing in its executor
    assert total == 100.0 * count
    return Slice(count / elapsed, 1e6 * cpu / count)


async def through_pocd(port: str, seconds: float) -> Slice:
    """pocd's runner (interval 0), counted as the Samples it puts into the queue."""
    driver = load_driver("mettler-sics")
    settings = SerialSettings.model_validate(
        {**driver.defaults, "port": port, "interval": 0, "timeout": 1.0}
    )
    points = {name: SerialPoint.model_validate(body) for name, body in driver.points.items()}
    runner = SerialRunner(
        Device(id="balance", driver=driver.info, settings=settings, points=points)
    )
    inbox = Inbox(INBOX_SIZE)
    task = asyncio.create_task(runner.run(inbox), name="serial bench")
    first = (await asyncio.wait_for(inbox.take(), 5))[0]  # the port is open and answering
    assert isinstance(first, Sample) and first.value == 100.0, first
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    start = loop.time()
    await asyncio.sleep(seconds)
    count = inbox.qsize()
    elapsed, cpu = loop.time() - start, time.process_time() - cpu
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    records = await inbox.take() if inbox.qsize() else []
    good = [r for r in records if isinstance(r, Sample) and r.value == 100.0]
    assert len(good) == len(records), f"not every record was a good sample: {records[:3]}"
    return Slice(count / elapsed, 1e6 * cpu / count)


async def measure(seconds: float, pairs: int) -> dict[str, float]:
    """Slices of the two clients in turns (bare first, then pocd first, ...); the ratio is the
    median of the ratios of neighbouring slices, which share the machine's load of the moment."""
    bare_slices: list[Slice] = []
    pocd_slices: list[Slice] = []
    with tempfile.TemporaryDirectory(prefix="pocd-bench-") as folder:
        link = str(Path(folder) / "tty")
        async with PtyPair(link) as pair:
            responder = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--respond", pair.device
            )
            try:
                for turn in range(pairs):
                    if turn % 2 == 0:
                        bare_slices.append(await bare(pair.host, seconds))
                        pocd_slices.append(await through_pocd(pair.host, seconds))
                    else:
                        pocd_slices.append(await through_pocd(pair.host, seconds))
                        bare_slices.append(await bare(pair.host, seconds))
                    print(
                        f"turn {turn + 1}: bare {bare_slices[-1].rate:,.0f}/s "
                        f"({bare_slices[-1].cpu_us:.0f} us CPU each), "
                        f"pocd {pocd_slices[-1].rate:,.0f}/s ({pocd_slices[-1].cpu_us:.0f} us)",
                        flush=True,
                    )
            finally:
                responder.terminate()
                await responder.wait()
    ratios = [p.rate / b.rate for p, b in zip(pocd_slices, bare_slices, strict=True)]
    line = 9600 / (BITS_PER_BYTE * (len(REQUEST) + len(REPLY)))
    return {
        "pocd_round_trips_per_s": round(statistics.median(s.rate for s in pocd_slices), 1),
        "bare_round_trips_per_s": round(statistics.median(s.rate for s in bare_slices), 1),
        "ratio": round(statistics.median(ratios), 3),
        "best_pocd_round_trips_per_s": round(max(s.rate for s in pocd_slices), 1),
        "best_bare_round_trips_per_s": round(max(s.rate for s in bare_slices), 1),
        "pocd_cpu_us_per_round_trip": round(statistics.median(s.cpu_us for s in pocd_slices), 1),
        "bare_cpu_us_per_round_trip": round(statistics.median(s.cpu_us for s in bare_slices), 1),
        "line_9600_round_trips_per_s": round(line, 2),
        "bytes_per_round_trip": len(REQUEST) + len(REPLY),
        "seconds_per_slice": seconds,
        "pairs": pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="length of each slice")
    parser.add_argument("--pairs", type=int, default=PAIRS, help="slices of each client")
    parser.add_argument("--respond", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.respond:
        respond(args.respond)
        return
    started = time.perf_counter()
    result = asyncio.run(measure(args.seconds, args.pairs))
    print(
        f"MT-SICS SI round trips over a pty: pocd {result['pocd_round_trips_per_s']:,.0f}/s, "
        f"bare pyserial-asyncio-fast {result['bare_round_trips_per_s']:,.0f}/s "
        f"(ratio {result['ratio']:.2f}); a 9600-baud line allows "
        f"{result['line_9600_round_trips_per_s']:.1f}/s "
        f"({result['bytes_per_round_trip']} bytes x {BITS_PER_BYTE} bits) "
        f"[{time.perf_counter() - started:.0f} s]"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
