"""Bench of `pocd export`: samples exported per second, the whole bundle included.

Builds (once, then cached) a store of one run of 50 parameters read at 1 Hz for 13 days
(56.16M samples) through `Store.write`, as the daemon would have written it, and times the
whole export of that run (samples as Parquet and gzipped CSV, records, audit segment, gaps,
report.pdf with a chart per critical parameter, the BagIt bag, its attestation and its zip)
against a plain loop (fetchmany, pa.array, ParquetWriter, CSVWriter) over a 2M-row slice.
The store is built in a child process so its memory does not count towards the export's peak
RSS. Prints human lines, then as its last line one JSON object. Targets: >= 1,000,000
samples/s and a peak RSS under 1 GiB. Exits 1 if one is missed.

Run: .venv/bin/python bench/export.py [--days N] [--baseline-rows N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pocd.model import NS, PhaseChange, ProtocolText, Quality, Run, RunStatus, Sample
from pocd.release.bundle import export
from pocd.release.samples import COLUMNS, SCHEMA
from pocd.settings import load_site, protocol_from_text
from pocd.store import Store

__all__ = ["build_store", "main", "measure_export"]

TARGET_SAMPLES_PER_S = 1_000_000
TARGET_PEAK_RSS_MIB = 1024

PARAMETERS = 50
T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z
BATCH = 50_000  # samples per Store.write: 1,000 seconds of the run
# Bump when the synthetic data changes, so a cached store of the old shape is not reused.
DATA_VERSION = 3

# (point, unit, mean, sd, the device gives its own timestamp); 10 bioreactors with 5 points
# each make the 50 parameters.
POINTS = (
    ("temperature", "°C", 37.0, 0.05, True),
    ("ph", "pH", 7.2, 0.02, True),
    ("dissolved-oxygen", "%", 40.0, 2.0, True),
    ("agitation", "rpm", 120.0, 1.5, False),
    ("pressure", "mbar", 1013.0, 0.8, False),
)
BAD_REASONS = ("overload", "status 256", "sensor-fault", "nan")


def channels() -> list[tuple[str, str, str, str, float, float, bool]]:
    """(device, point, parameter, unit, mean, sd, has device time) of every parameter."""
    found = []
    for k in range(PARAMETERS // len(POINTS)):
        device = f"bioreactor-{k + 1:02d}"
        for point, unit, mean, sd, has_device_t in POINTS:
            found.append((device, point, f"{point}-{k + 1:02d}", unit, mean, sd, has_device_t))
    return found


def store_path(days: float) -> Path:
    """Where the store of that many days is cached (the data dir of the bench's site): keyed
    by everything that shapes it."""
    folder = Path(tempfile.gettempdir()) / "pocd-bench-export"
    return folder / f"run-{days:g}d-{PARAMETERS}p-1hz-v{DATA_VERSION}" / "pocd.sqlite"


def protocol() -> str:
    """The run's protocol: the 50 parameters, temperature and pH of each bioreactor critical."""
    parts = ['id = "BENCH"\nversion = "1"\ntitle = "Bench"\nstatus = "approved"\n']
    for _, point, parameter, unit, mean, sd, _ in channels():
        critical = "true" if point in ("temperature", "ph") else "false"
        parts.append(
            f'[parameters.{parameter}]\nunit = "{unit}"\ncritical = {critical}\n'
            f"limits = {{ alert_low = {mean - 3 * sd}, alert_high = {mean + 3 * sd}, "
            f"action_low = {mean - 5 * sd}, action_high = {mean + 5 * sd} }}\n"
        )
    parts.append('[[phases]]\nid = "expansion"\n')
    return "\n".join(parts)


def the_run() -> Run:
    found = protocol_from_text(protocol(), "bench")
    return Run(
        id="run-bench",
        batch_id="B-BENCH",
        site_id="site-1",
        timezone="Europe/Berlin",
        protocol_id=found.id,
        protocol_version=found.version,
        protocol_hash=found.hash,
        operator="alice",
        started=T0,
        line="L1",
    )


def site_config(path: Path, folder: Path) -> Path:
    """A site config in `folder` whose store is the one at `path`."""
    (folder / "protocols").mkdir(parents=True)
    (folder / "protocols" / "bench.toml").write_text(protocol())
    config = folder / "pocd.toml"
    config.write_text(
        '[site]\nid = "site-1"\nname = "Bench site"\ntimezone = "Europe/Berlin"\n'
        f'control_site = "cs-1"\n\n[store]\ndata_dir = "{path.parent}"\n'
    )
    return config


def readings(seconds: int, seed: int = 1) -> Iterator[list[Sample]]:
    """The run's samples in batches of BATCH: every parameter once a second, ~0.5 % BAD."""
    rng = random.Random(seed)
    table = channels()
    # Pre-drawn noise, cycled: drawing 56M gaussians would make the build twice as slow.
    noise = [rng.gauss(0.0, 1.0) for _ in range(65_521)]
    bad = {rng.randrange(seconds * len(table)) for _ in range(seconds * len(table) // 200)}
    batch: list[Sample] = []
    i = 0
    for second in range(seconds):
        t_second = T0 + second * NS
        for j, (device, point, _, _, mean, sd, has_device_t) in enumerate(table):
            t = t_second + j * 20_000  # a poll reads the points 20 us apart
            device_t = t - 1_500_000 - (i % 7) * 100_000 if has_device_t else None
            value = mean + sd * noise[i % len(noise)]
            if i in bad:
                reason = BAD_REASONS[i % len(BAD_REASONS)]
                if reason == "nan":
                    value = math.nan
                batch.append(Sample(device, point, t, value, Quality.BAD, device_t, reason))
            else:
                batch.append(Sample(device, point, t, value, device_t=device_t))
            i += 1
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def build_store(days: float) -> Path:
    """The cached store of a run of `days`, built first if it is not there yet.

    Built under a temporary name and renamed when complete, so an interrupted build is never
    taken for a cached store.
    """
    path = store_path(days)
    if path.exists():
        return path
    partial = path.parent.with_name(path.parent.name + ".partial") / path.name
    shutil.rmtree(partial.parent, ignore_errors=True)
    partial.parent.mkdir(parents=True)
    table = channels()
    run = the_run()
    seconds = round(days * 86_400)
    start = time.perf_counter()
    with Store(
        partial,
        parameters={(d, p): parameter for d, p, parameter, *_ in table},
        lines={(d, p): run.line for d, p, *_ in table},
    ) as store:
        found = protocol_from_text(protocol(), "bench")
        store.write(
            [
                ProtocolText(found.hash, found.id, found.version, found.text),
                run,
                PhaseChange(run.id, T0, "expansion", None, run.operator),
            ]
        )
        for batch in readings(seconds):
            store.write(batch)
        ended = T0 + seconds * NS
        store.write([replace(run, status=RunStatus.COMPLETED, ended=ended)])
    print(
        f"built {path.name}: {seconds * len(table):,} samples "
        f"in {time.perf_counter() - start:.0f} s"
    )
    partial.parent.rename(path.parent)
    return path


def run_marks(path: Path) -> tuple[int, int | None]:
    """(first_sample, end_sample) of the bench's run, as the store marked them."""
    with Store(path, readonly=True) as store:
        runs, _ = store.commit_marks()
    ((_, first, end),) = [(r, f, e) for r, f, e in runs if r.id == "run-bench"]
    return first, end


@dataclass(frozen=True, slots=True)
class Measured:
    """What one export of the bench's run took and wrote."""

    samples: int
    seconds: float
    cpu_seconds: float  # of all its threads
    peak_rss_mib: float
    file_bytes: dict[str, int]

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds


def measure_export(path: Path, folder: Path) -> Measured:
    """Time the whole export of the bench's run (`pocd export`), into `folder`/B-BENCH and
    its zip. The peak RSS is this process's high-water mark plus its children's (the samples
    reader; if the store was built in this run, the builder's peak may stand in for the
    reader's, an overestimate): call it before anything else big runs."""
    site = load_site(site_config(path, folder / "site"))
    bag = folder / "B-BENCH"
    start, cpu_start = time.perf_counter(), os.times()
    done = export(site, "run-bench", bag, actor="bench")
    elapsed, cpu_end = time.perf_counter() - start, os.times()
    files = {p.relative_to(bag).as_posix(): p.stat().st_size for p in bag.rglob("*") if p.is_file()}
    return Measured(
        samples=done.samples,
        seconds=elapsed,
        cpu_seconds=sum(cpu_end[:4]) - sum(cpu_start[:4]),  # the reader process's included
        peak_rss_mib=(  # KiB on Linux
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        )
        / 1024,
        file_bytes={**files, done.zip.name: done.zip.stat().st_size},
    )


def plain_export(path: Path, first: int, rows: int, folder: Path) -> float:
    """The straightforward loop, over `rows` samples from rowid `first`: seconds taken.

    Writes the same columns, with the codes resolved by a join in SQL, one pyarrow table per
    fetchmany, gzip at the same level 1 (pyarrow's own gzip stream, at level 9, would make
    the comparison one of gzip levels): what one would write without measuring.
    """
    units = {parameter: unit for _, _, parameter, unit, *_ in channels()}
    names = {int(q): q.name.lower() for q in Quality}
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    start = time.perf_counter()
    cursor = db.execute(
        "SELECT s.id, s.t, s.dt, c.device, c.point, c.parameter, s.v, k.quality, k.reason "
        "FROM samples AS s JOIN channels AS c ON c.id = s.ch JOIN qualities AS k ON k.id = s.q "
        "WHERE s.id BETWEEN ? AND ? AND c.line = 'L1' ORDER BY s.id",
        (first, first + rows - 1),
    )
    with (
        pq.ParquetWriter(folder / "samples.parquet", SCHEMA) as parquet,
        gzip.open(folder / "samples.csv.gz", "wb", compresslevel=1) as out,
        pa_csv.CSVWriter(out, SCHEMA) as csv,
    ):
        while chunk := cursor.fetchmany(100_000):
            ids, t, dt, device, point, parameter, v, quality, reason = zip(*chunk, strict=True)
            table = pa.table(
                [
                    pa.array(ids, pa.int64()),
                    pa.array(t, pa.int64()),
                    pa.array(dt, pa.int64()),
                    pa.array(device, pa.string()),
                    pa.array(point, pa.string()),
                    pa.array(parameter, pa.string()),
                    pa.array(v, pa.float64()),
                    pa.array([units.get(p, "") for p in parameter], pa.string()),
                    pa.array([names[q] for q in quality], pa.string()),
                    pa.array(reason, pa.string()),
                ],
                schema=SCHEMA,
            )
            parquet.write_table(table)
            csv.write_table(table)
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


def check_export(folder: Path, rows: int) -> None:
    """Spot-check the files written: row count and columns. The tests check the values."""
    data = folder / "B-BENCH" / "data"
    parquet = pq.ParquetFile(data / "samples.parquet")
    if parquet.metadata.num_rows != rows or tuple(parquet.schema_arrow.names) != COLUMNS:
        raise SystemExit(f"{data / 'samples.parquet'}: not the {rows:,} rows expected")
    with gzip.open(data / "samples.csv.gz", "rt") as f:
        header = f.readline().strip()
    if header != ",".join(f'"{c}"' for c in COLUMNS):
        raise SystemExit(f"{data / 'samples.csv.gz'}: header {header!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=float, default=13.0, help="length of the run")
    parser.add_argument(
        "--baseline-rows", type=int, default=2_000_000, help="rows of the plain loop's slice"
    )
    args = parser.parse_args(argv)

    # The build holds millions of Sample objects at a time; out of this process, so the
    # export's peak RSS is its own.
    builder = multiprocessing.get_context("spawn").Process(target=build_store, args=(args.days,))
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        raise SystemExit(f"building the store failed (exit code {builder.exitcode})")
    path = store_path(args.days)
    # A run is exported days after its samples were written: let the build's writes reach the
    # disk first, or their writeback competes with the export's own (the disk here takes
    # ~350 MB/s, and the store is 2 GB).
    os.sync()
    print(f"store {path} ({path.stat().st_size / 2**20:,.0f} MiB)")

    with tempfile.TemporaryDirectory(prefix="pocd-bench-export-") as tmp:
        ours, plain = Path(tmp) / "ours", Path(tmp) / "plain"
        ours.mkdir()
        plain.mkdir()
        measured = measure_export(path, ours)
        check_export(ours, measured.samples)
        first, _ = run_marks(path)
        plain_rows = min(args.baseline_rows, measured.samples)
        plain_rate = plain_rows / plain_export(path, first, plain_rows, plain)
    rate = measured.per_s
    size = measured.file_bytes["B-BENCH.zip"]  # the bundle as it travels
    # All CPU seconds of its threads over its wall time: a low rate at the usual CPU a row
    # means the machine was busy with something else, not that the export got slower.
    cores = measured.cpu_seconds / measured.seconds
    print(
        f"pocd export   : {rate:>12,.0f} samples/s  ({measured.samples:,} samples, "
        f"{measured.seconds:.1f} s on {cores:.2f} cores, "
        f"peak RSS {measured.peak_rss_mib:,.0f} MiB, {size / 2**20:,.0f} MiB written)"
    )
    print(f"plain loop    : {plain_rate:>12,.0f} samples/s  ({plain_rows:,} samples)")
    met = rate >= TARGET_SAMPLES_PER_S and measured.peak_rss_mib < TARGET_PEAK_RSS_MIB
    result = {
        "days": args.days,
        "samples": measured.samples,
        "seconds": round(measured.seconds, 1),
        "samples_exported_per_s": round(rate),
        "cpu_seconds_per_million": round(measured.cpu_seconds / measured.samples * 1e6, 2),
        "cores_used": round(cores, 2),
        "peak_rss_mib": round(measured.peak_rss_mib),
        "bundle_bytes": size,
        "file_bytes": {k: v for k, v in measured.file_bytes.items() if v > 2**20},
        "plain_samples_per_s": round(plain_rate),
        "ratio": round(rate / plain_rate, 2),
        "cpus": os.cpu_count(),
        "targets_met": met,
    }
    print(json.dumps(result))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
