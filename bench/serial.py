"""Serial round trips: pocd's MT-SICS poll path against a bare pyserial-asyncio-fast loop.

Both ask `SI` and read `S S      100.00 g` over a socat pty pair of their own. The far end of
each is a small responder in its own process (blocking reads and writes: as fast as a pty
goes), so that what is measured is the asking side. "Through pocd" is the `SerialRunner` with
interval 0, as the daemon runs it: the shared port with its lock and timeout, framing, reply
shapes, quality, one `Sample` per reply into the daemon's inbox, taken every 10 ms as the
daemon's engine does. The bare loop writes, `readuntil`s the line and converts the weight.
The two are measured in turns of `--slice` seconds, each in a process of its own, for
`--seconds` in all (see bench/_turns.py); each asking process's CPU time per round trip is
printed too. A pty ignores the baud rate, so the rate a real 9600-baud 8N1 line allows is
printed as well. Prints one JSON object as its last line. Target: ratio >= 0.9.
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
import mmap
import os
import signal
import sys
import tempfile
import termios
import tty
from typing import Any

import serial_asyncio_fast

from bench import _turns as turns
from pocd.daemon import ENGINE_WINDOW, INBOX_SIZE
from pocd.inbox import Inbox
from pocd.logs import configure_logging
from pocd.model import Sample
from pocd.settings import load_driver
from pocd.sim.serial import PtyPair
from pocd.transports import Device
from pocd.transports.serial import SerialPoint, SerialRunner, SerialSettings

TARGET_RATIO = 0.9
REQUEST = b"SI\r\n"
REPLY = b"S S      100.00 g\r\n"
WEIGHT = 100.0
WARM_UP = 0.3  # seconds each client runs before the turns: opening the port, first replies
SLICE = 0.1  # seconds of one turn
SECONDS = 8.0  # of turns in all, half each side
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


# --- the two clients, each in a process of its own ------------------------------------------


async def bare(port: str, counter: mmap.mmap, stop: asyncio.Event) -> dict[str, Any]:
    """The plainest asyncio loop that does the same exchange."""
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=port, baudrate=9600)
    done = 0
    total = 0.0
    publisher = asyncio.create_task(turns.publish(counter, lambda: done))
    try:
        while not stop.is_set():
            writer.write(REQUEST)
            line = await reader.readuntil(b"\r\n")
            total += float(line.split()[2])
            done += 1
    finally:
        publisher.cancel()
        writer.close()
        await asyncio.sleep(0.02)  # let the transport finish closing in its executor
    return {"round_trips": done, "wrong": 0 if total == WEIGHT * done else done}


async def through_pocd(port: str, counter: mmap.mmap, stop: asyncio.Event) -> dict[str, Any]:
    """pocd's runner (interval 0), counted as the Samples it puts into the inbox."""
    driver = load_driver("mettler-sics")
    settings = SerialSettings.model_validate(
        {**driver.defaults, "port": port, "interval": 0, "timeout": 1.0}
    )
    points = {name: SerialPoint.model_validate(body) for name, body in driver.points.items()}
    runner = SerialRunner(
        Device(id="balance", driver=driver.info, settings=settings, points=points)
    )
    inbox = Inbox(INBOX_SIZE)
    done = 0
    wrong: list[object] = []

    async def take() -> None:  # as the daemon's engine task takes the inbox
        nonlocal done
        while True:
            records = await inbox.take()
            inbox.done(len(records))
            done += len(records)
            wrong.extend(r for r in records if type(r) is not Sample or r.value != WEIGHT)
            await asyncio.sleep(ENGINE_WINDOW)

    tasks = [
        asyncio.create_task(runner.run(inbox), name="serial bench"),
        asyncio.create_task(take()),
        asyncio.create_task(turns.publish(counter, lambda: done + inbox.qsize())),
    ]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"round_trips": done, "wrong": len(wrong), "first_wrong": repr(wrong[:1])}


def client(side: str, counter_path: str) -> None:
    """A client process, with a pty pair and a responder of its own: runs until SIGTERM, says
    "ready" once warm, then prints what it did as JSON."""

    async def run() -> dict[str, Any]:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        with tempfile.TemporaryDirectory(prefix="pocd-bench-") as folder:
            async with PtyPair(str(Path(folder) / "tty")) as pair:
                responder = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--respond", pair.device
                )
                try:
                    go = through_pocd if side == "pocd" else bare
                    task = asyncio.create_task(go(pair.host, counter, stop))
                    await turns.warm_up(counter, side, WARM_UP)
                    return await task
                finally:
                    responder.terminate()
                    await responder.wait()

    configure_logging("warning")  # to stderr: stdout carries "ready" and the result
    with turns.counter(counter_path) as counter:
        print(json.dumps(asyncio.run(run())), flush=True)


def compare(seconds: float, slice_: float) -> int:
    """The turns of the two clients; prints the figures."""
    sides: list[turns.Side] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pocd-bench-") as folder:
            for name in ("pocd", "bare"):
                command = [sys.executable, __file__, "--client", name]
                sides.append(turns.start(name, command, Path(folder)))
            turns.take_turns(sides, seconds, slice_)
            results = turns.finish(sides)
    finally:
        for side in sides:
            side.child.stop()
    for side, result in zip(sides, results, strict=True):
        if result["wrong"]:
            raise SystemExit(f"{side.name}: {result['wrong']} wrong replies: {result}")
    pocd, bare_ = sides
    ratio = pocd.rate / bare_.rate
    line = 9600 / (BITS_PER_BYTE * (len(REQUEST) + len(REPLY)))
    print(
        f"MT-SICS SI round trips over a pty: pocd {pocd.rate:,.0f}/s "
        f"({pocd.cpu_us_each():.0f} us CPU each), bare pyserial-asyncio-fast "
        f"{bare_.rate:,.0f}/s ({bare_.cpu_us_each():.0f} us); ratio {ratio:.3f}; "
        f"a 9600-baud line allows {line:.1f}/s "
        f"({len(REQUEST) + len(REPLY)} bytes x {BITS_PER_BYTE} bits)"
    )
    output = {
        "pocd_round_trips_per_s": round(pocd.rate, 1),
        "bare_round_trips_per_s": round(bare_.rate, 1),
        "pocd_cpu_us_per_round_trip": round(pocd.cpu_us_each(), 1),
        "bare_cpu_us_per_round_trip": round(bare_.cpu_us_each(), 1),
        "line_9600_round_trips_per_s": round(line, 2),
        "bytes_per_round_trip": len(REQUEST) + len(REPLY),
        "ratio_per_second": turns.per_second(pocd, bare_, slice_),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
    }
    print(json.dumps(output))
    return 0 if ratio >= TARGET_RATIO else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=SECONDS, help="of turns, in all")
    parser.add_argument("--slice", type=float, default=SLICE, help="seconds of one turn")
    parser.add_argument("--respond", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=("pocd", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--counter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.respond:
        respond(args.respond)
        return 0
    if args.client:
        client(args.client, args.counter)
        return 0
    return compare(args.seconds, args.slice)


if __name__ == "__main__":
    sys.exit(main())
