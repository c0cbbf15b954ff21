"""Bench of the OPC UA transport: data-change notifications handled per second through pocd
(runner -> inbox -> pocd.store.Store, as the daemon does) against a bare asyncua subscription
loop, on the same server.

The server (pocd's simulator, in its own process) serves 1000 Double variables and writes a
new value to each every 100 ms; clients subscribe to all of them, publishing and sampling
every 100 ms. The bare client is an asyncua loop (`async for` over the subscription, counting
events); pocd's is its runner with a writer committing the samples to a store in a temporary
folder. Two ways to compare them:
- `--mode together` (default): both subscribe at once, the bare loop in a process of its
  own, and count over the same wall-clock window: the same stream from the same server under
  the same machine load, so the ratio says whether pocd keeps up as well as asyncua alone.
- `--mode alternate`: one client at a time, alternating for `--rounds`, each with the server
  to itself (the throughput then depends on how fast the server is at that moment).
A CPU share is a client process's CPU time (all its threads) over its window. Prints human
lines, then as its last line one JSON object. Target: ratio >= 0.9. Exits 1 if missed.

Run: .venv/bin/python bench/opcua.py [--mode together|alternate] [--variables N]
     [--interval S] [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import DataChangeEvent

from pocd.daemon import INBOX_SIZE
from pocd.inbox import Inbox
from pocd.model import CommStatus, Sample
from pocd.settings import Driver
from pocd.sim.opcua import OpcuaSimulator
from pocd.store import Store
from pocd.transports import Device, DriverInfo
from pocd.transports.opcua import OpcuaPoint, OpcuaRunner, OpcuaSettings

__all__ = ["main"]

TARGET_RATIO = 0.9


def bench_driver(variables: int) -> Driver:
    """Variables ns=2;s=v0..v<N-1>, each a slow sine so every write changes its value."""
    points = {
        f"v{i}": {
            "node": f"ns=2;s=v{i}",
            "sim": {"base": 20.0, "amplitude": 5.0, "period": 7.0 + i % 13},
        }
        for i in range(variables)
    }
    info = DriverInfo(id="bench", transport="opcua", description="bench variables")
    return Driver(info=info, defaults={}, points=points)


async def serve(port: int, variables: int, interval: float) -> None:
    sim = OpcuaSimulator(bench_driver(variables), f"opc.tcp://127.0.0.1:{port}", interval=interval)
    async with sim:
        print("ready", flush=True)
        await asyncio.Event().wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Window:
    """Counts over a measured window: events, wall time and this process's CPU time."""

    def __init__(self) -> None:
        self.count = 0
        self.wall = 0.0
        self.cpu = 0.0

    def add(self, other: Window) -> None:
        self.count += other.count
        self.wall += other.wall
        self.cpu += other.cpu

    @property
    def rate(self) -> float:
        return self.count / self.wall if self.wall else 0.0

    @property
    def cpu_share(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0


async def measure(counter: list[int], start_at: float, seconds: float) -> Window:
    """Count what `counter[0]` gains from wall-clock time `start_at`, for `seconds`."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    window = Window()
    start_count, start_wall, start_cpu = counter[0], time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    window.count = counter[0] - start_count
    window.wall = time.perf_counter() - start_wall
    window.cpu = time.process_time() - start_cpu
    return window


async def bare(
    endpoint: str, variables: int, interval: float, start_at: float, seconds: float
) -> Window:
    """A bare asyncua client: one subscription, `async for` over its events."""
    counter = [0]
    # The same request timeout and liveness probe as pocd's runner uses in this bench.
    client = Client(endpoint, timeout=10, watchdog_intervall=5.0)
    async with client:
        sub = await client.create_subscription(interval * 1000, queue_maxsize=1_000_000)
        nodes = [client.get_node(f"ns=2;s=v{i}") for i in range(variables)]
        await sub.subscribe_data_change(
            nodes, sampling_interval=ua.Double(interval * 1000), queuesize=10
        )

        async def count() -> None:
            async for event in sub:
                if isinstance(event, DataChangeEvent):
                    counter[0] += 1

        task = asyncio.create_task(count(), name="bench-bare-count")
        try:
            return await measure(counter, start_at, seconds)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await sub.delete()


async def through_pocd(
    endpoint: str, variables: int, interval: float, start_at: float, seconds: float, folder: Path
) -> tuple[Window, int]:
    """pocd's runner into an inbox; a writer commits batches to a store, as the daemon does."""
    settings = OpcuaSettings.model_validate(
        {
            "endpoint": endpoint,
            "publishing_interval": interval,
            "sampling_interval": interval,
            "timeout": 10.0,
        }
    )
    points = {
        f"v{i}": OpcuaPoint.model_validate({"node": f"ns=2;s=v{i}"}) for i in range(variables)
    }
    info = DriverInfo(id="bench", transport="opcua")
    device = Device(id="bench", driver=info, settings=settings, points=points)
    runner = OpcuaRunner(device)
    inbox = Inbox(INBOX_SIZE)
    stored = [0]
    store = Store(folder / "pocd.sqlite")

    async def writer() -> None:
        while True:
            await asyncio.sleep(0.2)  # the daemon's flush interval
            records = await inbox.take() if inbox.qsize() else []
            inbox.done(len(records))
            # CommStatus is the engine's business, not stored
            batch = [r for r in records if not isinstance(r, CommStatus)]
            if batch:
                await asyncio.to_thread(store.write, batch)
                stored[0] += sum(1 for r in batch if type(r) is Sample)

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(runner.run(inbox), name="bench-runner"),
                tg.create_task(writer(), name="bench-writer"),
            ]
            window = await measure(stored, start_at, seconds)
            for task in tasks:
                task.cancel()
    finally:
        store.close()
    return window, runner.counts["notifications"]


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, *args, stdout=subprocess.PIPE
    )


def report(name: str, window: Window) -> None:
    print(f"{name:<20} {window.rate:10,.0f} notifications/s, CPU {window.cpu_share:6.1%} of a core")


async def together(
    endpoint: str, port: int, args: argparse.Namespace
) -> tuple[Window, Window, int]:
    """Both clients at once over the same window; the bare one in its own process."""
    start_at = time.time() + args.warmup
    client = await spawn(
        "--bare",
        str(port),
        *("--variables", str(args.variables), "--interval", str(args.interval)),
        *("--start-at", repr(start_at), "--seconds", str(args.seconds)),
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ours, handled = await through_pocd(
                endpoint, args.variables, args.interval, start_at, args.seconds, Path(tmp)
            )
        assert client.stdout is not None
        counted = json.loads(await client.stdout.readline())
    finally:
        if client.returncode is None:
            client.terminate()
        await client.wait()
    plain = Window()
    plain.count, plain.wall, plain.cpu = counted["count"], counted["wall"], counted["cpu"]
    report("bare asyncua loop:", plain)
    report("pocd (into store):", ours)
    return plain, ours, handled


async def alternate(endpoint: str, args: argparse.Namespace) -> tuple[Window, Window, int]:
    """One client at a time, alternating, so a change of load falls on both alike."""
    plain, ours, handled = Window(), Window(), 0
    for _ in range(args.rounds):
        one = await bare(
            endpoint, args.variables, args.interval, time.time() + args.warmup, args.seconds
        )
        report("bare asyncua loop:", one)
        with tempfile.TemporaryDirectory() as tmp:
            two, count = await through_pocd(
                endpoint,
                args.variables,
                args.interval,
                time.time() + args.warmup,
                args.seconds,
                Path(tmp),
            )
        report("pocd (into store):", two)
        plain.add(one)
        ours.add(two)
        handled += count
    return plain, ours, handled


async def run(args: argparse.Namespace) -> int:
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}"
    shape = ("--variables", str(args.variables), "--interval", str(args.interval))
    server = await spawn("--serve", str(port), *shape)
    try:
        assert server.stdout is not None
        if (await server.stdout.readline()).strip() != b"ready":
            print("the bench server did not start", file=sys.stderr)
            return 2
        offered = args.variables / args.interval
        print(f"server: {args.variables} variables, each changing every {args.interval} s")
        print(f"        = {offered:,.0f} changes/s offered to each client ({args.mode})")
        if args.mode == "together":
            plain, ours, handled = await together(endpoint, port, args)
            window = args.seconds
        else:
            plain, ours, handled = await alternate(endpoint, args)
            window = args.seconds * args.rounds
    finally:
        server.terminate()
        await server.wait()
    ratio = ours.rate / plain.rate if plain.rate else 0.0
    print(f"ratio pocd/bare:     {ratio:10.3f} (target >= {TARGET_RATIO})")
    result = {
        "mode": args.mode,
        "variables": args.variables,
        "change_interval_s": args.interval,
        "offered_per_s": round(offered, 1),
        "bare_notifications_per_s": round(plain.rate, 1),
        "pocd_stored_per_s": round(ours.rate, 1),
        "pocd_handled_notifications": handled,
        "ratio": round(ratio, 3),
        "bare_cpu_share": round(plain.cpu_share, 3),
        "pocd_cpu_share": round(ours.cpu_share, 3),
        "window_s": window,
    }
    print(json.dumps(result))
    return 0 if ratio >= TARGET_RATIO else 1


async def bare_process(args: argparse.Namespace) -> None:
    """The bare client's own process (mode together): prints its window as one JSON line."""
    endpoint = f"opc.tcp://127.0.0.1:{args.bare}"
    counted = await bare(endpoint, args.variables, args.interval, args.start_at, args.seconds)
    print(json.dumps({"count": counted.count, "wall": counted.wall, "cpu": counted.cpu}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between changes")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (each)")
    parser.add_argument("--warmup", type=float, default=5.0, help="connect and settle first")
    parser.add_argument("--rounds", type=int, default=3, help="alternate: rounds of each")
    parser.add_argument("--mode", choices=["together", "alternate"], default="together")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.serve, args.variables, args.interval))
        return 0
    if args.bare is not None:
        asyncio.run(bare_process(args))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
