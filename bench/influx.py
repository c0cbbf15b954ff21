"""Bench of InfluxDB forwarding against a local influxd (Debian's 1.6) this script starts.

1. Throughput: the same samples (from bench/store.py's generator, inside a run with phases,
   so every line carries run, batch and phase tags) forwarded by pocd's InfluxDB sink from its
   store, and POSTed by a bare loop of the same line protocol, pre-encoded and pre-compressed,
   one batch after another: what InfluxDB itself takes. Each side writes into a fresh
   database; they alternate `--rounds` times and the best of each is kept, because this
   machine is shared and its speed drifts (each round's own ratio is printed too). pocd
   needs CPU for reading, encoding and compressing where the bare loop needs none, so
   other load on the host lowers the ratio. Target: pocd >= 0.8 of the bare loop.
2. Backfill: with the sink caught up, influxd is stopped, `--backfill` samples (1,000,000)
   are stored while it is down, and it is started again: the time from its restart until the
   sink's backlog is empty, while a live source keeps adding samples that must keep flowing.

Prints human lines, then as its last line one JSON object. Exits 1 if the ratio misses 0.8.

Run: .venv/bin/python bench/influx.py [--samples N] [--backfill N] [--rounds N] [--no-gzip]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import http.client
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.store import make_samples
from pocd.model import NS, PhaseChange, Run, Sample
from pocd.settings import Site, load_site
from pocd.sinks.influxdb import InfluxSink
from pocd.sinks.lineprotocol import SampleEncoder, Timelines
from pocd.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.influxkit
from tests.influxkit import Influxd

__all__ = ["main"]

TARGET_RATIO = 0.8
REPO = Path(__file__).resolve().parent.parent
T0 = 1_767_225_600 * NS  # make_samples' first timestamp


def write_site(
    folder: Path, url: str, database: str, batch: int, gzipped: bool, name: str = "bench"
) -> Site:
    shutil.copytree(REPO / "config" / "protocols", folder / "protocols", dirs_exist_ok=True)
    config = folder / "pocd.toml"
    config.write_text(
        f"""
[site]
id = "bench-site"
name = "Bench"
timezone = "Europe/London"
control_site = "bench-cs"

[sinks.influxdb]
name = "{name}"
url = "{url}"
api = "v1"
database = "{database}"
batch_size = {batch}
flush_interval = "200ms"
backoff_max = "1s"
gzip = {"true" if gzipped else "false"}
"""
    )
    return load_site(config)


def in_a_run(samples: list[Sample]) -> list[Sample | Run | PhaseChange]:
    """The samples inside a run with four phases, each phase change between the samples it
    separates (a sample's run and phase follow from its place in the commit order), so every
    line carries every tag and some batches cross a phase boundary."""
    run = Run(
        "bench-run-01",
        "B-BENCH",
        "bench-site",
        "Europe/London",
        "CART-TCT",
        "3.1",
        "00" * 32,
        "bench",
        T0,
    )
    phases = ["enrichment", "activation", "transduction", "expansion"]
    step = len(samples) // len(phases)
    records: list[Sample | Run | PhaseChange] = [run]
    for i, phase in enumerate(phases):
        part = samples[i * step : (i + 1) * step if i + 1 < len(phases) else len(samples)]
        t = part[0].t if part else T0
        records.append(PhaseChange(run.id, t, phase, phases[i - 1] if i else None, "bench"))
        records += part
    return records


def fill(store: Store, samples: Sequence[Sample | Run | PhaseChange]) -> None:
    for i in range(0, len(samples), 20_000):
        store.write(list(samples[i : i + 20_000]))


def bare_bodies(store: Store, site: Site, batch: int, gzipped: bool) -> list[bytes]:
    """The line protocol pocd sends for the store's samples, in batches, ready to POST."""
    encoder = SampleEncoder(site.id)
    encoder.set_codes(*store.sample_codes())
    encoder.set_timeline(Timelines(*store.commit_marks()))
    count = store.sample_count()
    bodies = []
    for first in range(1, count + 1, batch):
        last = min(count, first + batch - 1)
        lines = encoder.encode(store.sample_rows(first, last), first)
        data = "\n".join(lines).encode()
        bodies.append(gzip.compress(data, compresslevel=1, mtime=0) if gzipped else data)
    return bodies


def bench_bare(influxd: Influxd, database: str, bodies: list[bytes], gzipped: bool) -> float:
    """Seconds to POST every body, one after another, on one keep-alive connection."""
    influxd.create_database(database)
    conn = http.client.HTTPConnection("127.0.0.1", influxd.port, timeout=60)
    headers = {"Content-Type": "text/plain; charset=utf-8"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    start = time.perf_counter()
    for body in bodies:
        conn.request("POST", f"/write?db={database}&precision=n", body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 204:
            raise SystemExit(f"bare POST answered {resp.status}")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


async def until_caught_up(sink: InfluxSink, target: int, limit_s: float) -> float:
    """Seconds until the sink has confirmed every sample up to rowid `target`."""
    start = time.perf_counter()
    while True:
        cursors = sink.status()["cursors"]
        if cursors["samples"] >= target and cursors["samples.live"] >= target:
            return time.perf_counter() - start
        if time.perf_counter() - start > limit_s:
            raise SystemExit(f"sink did not catch up in {limit_s} s: {sink.status()}")
        await asyncio.sleep(0.005)


async def bench_pocd(site: Site, count: int) -> float:
    """Seconds for a new sink to forward a store of `count` samples (cursor 0 to the end)."""
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    task = asyncio.create_task(sink.run(), name="sink:bench")
    try:
        return await until_caught_up(sink, count, 600)  # start-up and healthcheck included
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def bench_backfill(
    site: Site, influxd: Influxd, store: Store, count: int
) -> dict[str, object]:
    """Time to backfill `count` samples stored while influxd was down; live keeps coming."""
    sink = InfluxSink(site, site.config.sinks.influxdb[0])
    task = asyncio.create_task(sink.run(), name="sink:bench")
    try:
        await until_caught_up(sink, store.sample_count(), 600)
        influxd.stop()
        backlog = [
            Sample(s.device, s.point, s.t + 10**12, s.value, s.quality, s.device_t, s.reason)
            for s in make_samples(count, seed=7)
        ]
        await asyncio.to_thread(fill, store, backlog)
        await asyncio.sleep(1.0)  # the sink fails and backs off, as in a real outage
        live_seen = False
        live_t = T0 + 10**12 + count * 1_000_000
        influxd.start()
        start = time.perf_counter()
        while True:
            # a live source: 100 samples every 50 ms while the backlog drains
            live = [Sample("live-1", "temperature", live_t + i, 37.0) for i in range(100)]
            live_t += 100
            await asyncio.to_thread(store.write, live)
            status = sink.status()
            cursors = status["cursors"]
            if status["backfilling"] and cursors["samples.live"] > cursors["samples.split"]:
                live_seen = True
            if status["backlog_samples"] == 0 and not status["backfilling"]:
                break
            if time.perf_counter() - start > 600:
                raise SystemExit(f"backfill did not finish: {status}")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - start
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {
        "backfill_points": count,
        "backfill_s": round(elapsed, 2),
        "backfill_points_per_s": round(count / elapsed),
        "live_flowed_during_backfill": live_seen,
    }


def throughput(
    influxd: Influxd, root: Path, store: Store, count: int, batch: int, gzipped: bool, rounds: int
) -> dict[str, object]:
    """Alternate the bare loop and pocd `rounds` times over the store's samples."""
    site = write_site(root / "site", influxd.url, "pocd", batch, gzipped)
    bodies = bare_bodies(store, site, batch, gzipped)
    bare_s = pocd_s = math.inf
    round_ratios = []
    # CPU per point, which the host's other load changes far less than the rates
    cpu: dict[str, list[float]] = {"pocd": [], "influxd_bare": [], "influxd_pocd": []}
    for r in range(rounds):
        influx_cpu = influxd.cpu_seconds()
        bare_round = bench_bare(influxd, f"bare_{r}", bodies, gzipped)
        cpu["influxd_bare"].append(influxd.cpu_seconds() - influx_cpu)
        influxd.create_database(f"pocd_{r}")
        # each round is a new sink (new name, new database): from cursor 0
        site = write_site(
            root / "site", influxd.url, f"pocd_{r}", batch, gzipped, name=f"round-{r}"
        )
        influx_cpu, own_cpu = influxd.cpu_seconds(), time.process_time()
        pocd_round = asyncio.run(bench_pocd(site, count))
        cpu["pocd"].append(time.process_time() - own_cpu)
        cpu["influxd_pocd"].append(influxd.cpu_seconds() - influx_cpu)
        print(
            f"round {r}: bare {count / bare_round:,.0f} points/s, "
            f"pocd {count / pocd_round:,.0f} points/s"
        )
        bare_s, pocd_s = min(bare_s, bare_round), min(pocd_s, pocd_round)
        round_ratios.append(round(bare_round / pocd_round, 2))
        if influxd.count(f"pocd_{r}") != count:
            raise SystemExit(f"round {r}: InfluxDB holds {influxd.count(f'pocd_{r}')}")
    bare_rate, pocd_rate = count / bare_s, count / pocd_s
    ratio = pocd_rate / bare_rate
    print(f"{count:,} samples, batches of {batch:,}, gzip {gzipped}, influxd {influxd.version()}")
    print(f"bare POST loop : {bare_rate:>10,.0f} points/s")
    print(f"pocd forwarder : {pocd_rate:>10,.0f} points/s   ratio {ratio:.2f}")
    per_point = {k: round(min(v) / count * 1e6, 2) for k, v in cpu.items()}
    print(
        f"CPU per point  : pocd {per_point['pocd']} us, influxd "
        f"{per_point['influxd_bare']} us (bare) / {per_point['influxd_pocd']} us (pocd)"
    )
    return {
        "bare_points_per_s": round(bare_rate),
        "pocd_points_per_s": round(pocd_rate),
        "ratio": round(ratio, 2),
        "round_ratios": round_ratios,
        "pocd_cpu_us_per_point": per_point["pocd"],
        "influxd_cpu_us_per_point": per_point["influxd_bare"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500_000)
    parser.add_argument("--backfill", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-gzip", action="store_true")
    args = parser.parse_args(argv)
    count, batch, gzipped = args.samples, args.batch, not args.no_gzip

    with tempfile.TemporaryDirectory(prefix="pocd-bench-influx-") as tmp:
        root = Path(tmp)
        influxd = Influxd(root / "influxd", auth=False)
        influxd.start()
        try:
            (root / "site").mkdir()
            samples = in_a_run(make_samples(count))
            with Store(root / "site" / "data" / "pocd.sqlite") as store:
                fill(store, samples)
                del samples
                gc.collect()
                rates = throughput(influxd, root, store, count, batch, gzipped, args.rounds)
                influxd.create_database("backfill")
                site = write_site(root / "site", influxd.url, "backfill", batch, gzipped)
                backfill = asyncio.run(bench_backfill(site, influxd, store, args.backfill))
                print(
                    f"backfill       : {args.backfill:,} points in {backfill['backfill_s']} s "
                    f"after the outage; live flowed meanwhile: "
                    f"{backfill['live_flowed_during_backfill']}"
                )
        finally:
            influxd.stop()
    result: dict[str, object] = {
        "points": count,
        "batch_size": batch,
        "gzip": gzipped,
        **rates,
        "target_ratio": TARGET_RATIO,
        **backfill,
    }
    print(json.dumps(result))
    ratio = rates["ratio"]
    return 0 if isinstance(ratio, float) and ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
