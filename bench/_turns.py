"""Two clients measured in turns: the method the throughput benches share (not a bench itself).

The machine is shared and its speed drifts by a quarter within seconds, so two clients are
never timed at the same time, nor in rounds seconds apart. Each runs all along in a process of
its own, and the bench lets one run at a time (SIGCONT, then SIGSTOP after a slice), in turns.
Each side's rate is what it did over the time it was let run, so both are measured over the
same stretch of the machine's moods; a stopped process does nothing, so whatever a side does
in the background (a store writer, a flush) lands in its own turns. Two identical clients
measured this way come out within 3 % of each other.

A client process takes `--counter PATH`, publishes how much it has done there (`publish`, every
5 ms: the counts at the ends of a turn are up to 5 ms stale, which cancels over consecutive
turns), prints "ready" once warm, and at SIGTERM stops and prints one JSON object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Child",
    "Side",
    "counter",
    "finish",
    "per_second",
    "publish",
    "start",
    "take_turns",
    "warm_up",
]

_COUNTER = struct.Struct("q")
_PUBLISH_EVERY = 0.005  # seconds


@contextlib.contextmanager
def counter(path: str | Path) -> Iterator[mmap.mmap]:
    """The shared count at `path` (made by `start`), mapped."""
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), _COUNTER.size) as mapped:
        yield mapped


def count_of(mapped: mmap.mmap) -> int:
    return int(_COUNTER.unpack_from(mapped)[0])


async def warm_up(mapped: mmap.mmap, name: str, seconds: float, *, patience: float = 5.0) -> None:
    """In a client: wait for its first counts, then `seconds` more, and say "ready"."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    while not count_of(mapped):
        if loop.time() > give_up:
            raise SystemExit(f"{name}: nothing done in the first {patience:g} s")
        await asyncio.sleep(0.01)
    await asyncio.sleep(seconds)
    print("ready", flush=True)


async def publish(mapped: mmap.mmap, count: Callable[[], int]) -> None:
    """In a client: keep the shared count up to date, until cancelled."""
    while True:
        _COUNTER.pack_into(mapped, 0, count())
        await asyncio.sleep(_PUBLISH_EVERY)


@dataclass
class Child:
    """A process of a bench, and its CPU time as the kernel counts it: of the whole process,
    or of its main thread alone."""

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


@dataclass
class Side:
    """One client: its process, its shared count, and what it did in each of its turns."""

    name: str
    child: Child
    counter: mmap.mmap
    turns: list[tuple[int, float]] = field(default_factory=list)  # (done, seconds)
    cpu: float = 0.0  # seconds, over all the turns
    main_cpu: float = 0.0  # of its main thread

    @property
    def done(self) -> int:
        return sum(n for n, _ in self.turns)

    @property
    def rate(self) -> float:
        return self.done / sum(t for _, t in self.turns)

    def cpu_us_each(self, cpu: float | None = None) -> float:
        """CPU microseconds per thing done, of the process (or the `cpu` given)."""
        return 1e6 * (self.cpu if cpu is None else cpu) / self.done


def start(name: str, command: list[str], folder: Path) -> Side:
    """Start a client (`command` plus `--counter PATH`) and wait until it is ready. It runs on
    until the turns begin: a client stopped for long (while another one starts) would find
    its requests timed out when let go."""
    path = folder / f"{name}.count"
    path.write_bytes(bytes(_COUNTER.size))
    process = subprocess.Popen(
        [*command, "--counter", str(path)], stdout=subprocess.PIPE, text=True
    )
    child = Child(process)
    with path.open("r+b") as file:
        side = Side(name, child, mmap.mmap(file.fileno(), _COUNTER.size))
    if child.stdout.readline().strip() != "ready":
        child.stop()
        raise SystemExit(f"the {name} client did not start")
    return side


def take_turns(sides: list[Side], seconds: float, slice_: float) -> None:
    """Let one side run at a time, `slice_` seconds each, in turns, for `seconds` in all."""
    for side in sides:
        side.child.process.send_signal(signal.SIGSTOP)
    cpu0 = [(s.child.cpu(), s.child.cpu(main_thread=True)) for s in sides]
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for side in sides:
            before = count_of(side.counter)
            started = time.perf_counter()
            side.child.process.send_signal(signal.SIGCONT)
            time.sleep(slice_)
            side.child.process.send_signal(signal.SIGSTOP)
            side.turns.append((count_of(side.counter) - before, time.perf_counter() - started))
    for side, (cpu, main_cpu) in zip(sides, cpu0, strict=True):
        side.cpu = side.child.cpu() - cpu
        side.main_cpu = side.child.cpu(main_thread=True) - main_cpu


def finish(sides: list[Side]) -> list[dict[str, Any]]:
    """Stop every client (all at once: one stopped for long would time out its requests) and
    collect the JSON object each prints last."""
    for side in sides:
        side.child.process.send_signal(signal.SIGCONT)
        side.child.process.terminate()
    results = []
    for side in sides:
        lines = side.child.stdout.read().splitlines()
        if side.child.process.wait() != 0 or not lines:
            raise SystemExit(f"the {side.name} client failed: see above")
        results.append(json.loads(lines[-1]))
    return results


def per_second(a: Side, b: Side, slice_: float) -> list[float]:
    """a's rate over b's, over each second of turns: how much it moved during the bench."""
    group = max(1, round(1 / slice_))
    ratios = []
    for i in range(0, min(len(a.turns), len(b.turns)) - group + 1, group):
        ta, tb = a.turns[i : i + group], b.turns[i : i + group]
        rate_a = sum(n for n, _ in ta) / sum(t for _, t in ta)
        rate_b = sum(n for n, _ in tb) / sum(t for _, t in tb)
        ratios.append(round(rate_a / rate_b, 3))
    return ratios
