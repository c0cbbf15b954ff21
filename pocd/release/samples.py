"""The samples of a run in the export: `samples.parquet` and `samples.csv.gz`, the same rows.

Each row is a stored sample as it was committed, with its codes resolved: the channel to device,
point and parameter, the quality code to its name and reason. A run of weeks is tens of millions
of rows, so the rows go through in batches of rowids, never all at once, and the reading (by
ADBC's SQLite driver) overlaps with the writing of each file (pyarrow and ISA-L) on a thread of
its own: all three release the GIL.

Must not: write to the store, change the caller's connection, or round a value: the files are
the GMP record of the run's data, so every number is the stored one, bit for bit.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from isal import isal_zlib

from pocd.errors import StoreError
from pocd.model import Quality

__all__ = ["COLUMNS", "SCHEMA", "write_samples"]

COLUMNS: Final = (
    "id",
    "t",
    "dt",
    "device",
    "point",
    "parameter",
    "value",
    "unit",
    "quality",
    "reason",
)
# Times are ns since the epoch (UTC) as int64, as stored: a timestamp type would invite a reader
# to convert them. Only a missing device time and a NaN value (stored as NULL) are null.
SCHEMA: Final = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("t", pa.int64(), nullable=False),
        pa.field("dt", pa.int64()),
        pa.field("device", pa.string(), nullable=False),
        pa.field("point", pa.string(), nullable=False),
        pa.field("parameter", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("quality", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)

# Rowids read per batch, and so a Parquet row group. Two batches are alive at a time (one
# being read, one being written), ~130 B a row each. On 2 cores, 128k to 1M rowids export at
# the same rate within the machine's noise; the peak RSS is 210 MiB at 128k, 360 MiB at 512k
# and 520 MiB at 1M.
BATCH_ROWIDS: Final = 512 * 1024
# Rows of CSV text formatted and compressed at a time, to keep that text (~115 B a row) small.
_CSV_SLICE: Final = 64 * 1024
# Level 1: a third of the time of level 6 for a file 40 % larger; even so gzip is a third of
# the export's CPU time. pyarrow's own gzip stream cannot be given a level (it uses 9: ten
# times slower).
_GZIP_LEVEL: Final = 1
# The allocator of every buffer made here. pyarrow's default (mimalloc) gives freed pages back
# to the kernel within milliseconds, so each batch faulted its ~60 MB in again (zeroed, as huge
# pages): the system allocator keeps them, for 40 % less system time and 7 % more rows/s.
_POOL: Final = pa.system_memory_pool()
# The stored columns come from a reader process (pocd.release.arrowread) as an Arrow IPC stream:
# its SQLite (ADBC's) must not share a process with this one's on the same file.


@dataclass(frozen=True, slots=True)
class _Codes:
    """What the channel and quality codes of the store stand for, as arrays indexed by code,
    so a batch's codes are resolved with one `take` per column."""

    device: pa.Array
    point: pa.Array
    parameter: pa.Array
    unit: pa.Array
    of_line: pa.Array  # bool: the channel belongs to the exported line
    quality: pa.Array
    reason: pa.Array


def write_samples(
    db: sqlite3.Connection,
    *,
    first: int,
    end: int | None,
    line: str,
    units: Mapping[str, str],
    folder: Path,
    shared: Collection[str] = (),
    on_batch: Callable[[pa.RecordBatch], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the samples with rowids `first` up to `end` (excluded; None: up to the last one
    stored when called) whose channel belongs to `line` into `folder`/samples.parquet and
    `folder`/samples.csv.gz, in rowid order; return how many were written.

    A device that several lines share has channels of no line (''): those of the devices in
    `shared` (the line's own, as the config has them) are the line's too.

    `units` maps a parameter to its unit ('' for a parameter not in it). `on_batch` is given
    each RecordBatch written (of `SCHEMA`), in order; `progress` the rows written so far after
    each batch. Both are called in the caller's thread. If this raises, the files are partial:
    the caller writes into a folder it discards on failure.
    """
    # No further than the samples stored when called: a running run's go on being committed.
    after_last = int(db.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0]) + 1
    end = after_last if end is None else min(end, after_last)
    first = max(first, 1)  # rowids start at 1
    # After `end` is known: every code of a sample before it was committed with it or earlier.
    codes = _read_codes(db, line, shared, units)
    written = 0
    # The Parquet and the CSV file each have a thread: one writer thread for both would need
    # ~1 s of CPU a million rows and cap the export there; the CSV's alone needs ~0.85 s.
    with (
        _ParquetFile(folder / "samples.parquet") as parquet,
        _CsvGzFile(folder / "samples.csv.gz") as csv,
        ThreadPoolExecutor(1, thread_name_prefix="pocd-export-parquet") as parquet_thread,
        ThreadPoolExecutor(1, thread_name_prefix="pocd-export-csv") as csv_thread,
        _Reader(db, first, end) as reader,
    ):
        # The batches being written, oldest first: at most two, so memory stays flat when the
        # writing is slower than the reading (the reader then waits: block, not buffer).
        pending: deque[_Written] = deque()
        for stored in reader:
            batch = _resolved(stored, codes)
            if batch.num_rows == 0:
                continue
            writes = (
                parquet_thread.submit(parquet.write, batch),
                csv_thread.submit(csv.write, batch),
            )
            pending.append(_Written(writes, batch.num_rows))
            if on_batch is not None:
                on_batch(batch)  # while the writers work on it
            while len(pending) > 1:
                written += pending.popleft().wait()
                if progress is not None:
                    progress(written)
        while pending:
            written += pending.popleft().wait()
            if progress is not None:
                progress(written)
    return written


@dataclass(frozen=True, slots=True)
class _Written:
    """A batch handed to the writers: the futures of its writes and its row count."""

    writes: tuple[Future[None], ...]
    rows: int

    def wait(self) -> int:
        """Wait until the batch is in both files (raising what a write raised); its rows."""
        for write in self.writes:
            write.result()
        return self.rows


def _read_codes(
    db: sqlite3.Connection, line: str, shared: Collection[str], units: Mapping[str, str]
) -> _Codes:
    channels = db.execute("SELECT id, device, point, parameter, line FROM channels").fetchall()
    size = max((row[0] for row in channels), default=0) + 1
    device, point, parameter = [""] * size, [""] * size, [""] * size
    of_line = [False] * size
    for code, device_, point_, parameter_, line_ in channels:
        device[code], point[code], parameter[code] = device_, point_, parameter_
        of_line[code] = line_ == line or (not line_ and device_ in shared)
    qualities = db.execute("SELECT id, quality, reason FROM qualities").fetchall()
    size = max((row[0] for row in qualities), default=0) + 1
    quality, reason = [""] * size, [""] * size
    for code, quality_, reason_ in qualities:
        quality[code], reason[code] = Quality(quality_).name.lower(), reason_
    return _Codes(
        device=pa.array(device, pa.string()),
        point=pa.array(point, pa.string()),
        parameter=pa.array(parameter, pa.string()),
        unit=pa.array([units.get(p, "") for p in parameter], pa.string()),
        of_line=pa.array(of_line, pa.bool_()),
        quality=pa.array(quality, pa.string()),
        reason=pa.array(reason, pa.string()),
    )


def _resolved(stored: pa.RecordBatch, codes: _Codes) -> pa.RecordBatch:
    """The samples of `stored` (arrowread.COLUMNS) of `codes`' line, resolved: a batch of
    SCHEMA."""
    ids, t, dt, channel, quality, values = stored.columns
    batch = pa.record_batch(
        [
            ids,
            t,
            dt,
            pc.take(codes.device, channel, memory_pool=_POOL),
            pc.take(codes.point, channel, memory_pool=_POOL),
            pc.take(codes.parameter, channel, memory_pool=_POOL),
            values,
            pc.take(codes.unit, channel, memory_pool=_POOL),
            pc.take(codes.quality, quality, memory_pool=_POOL),
            pc.take(codes.reason, quality, memory_pool=_POOL),
        ],
        schema=SCHEMA,
    )
    of_line = pc.take(codes.of_line, channel, memory_pool=_POOL)
    if pc.all(of_line).as_py():
        return batch
    return pc.filter(batch, of_line, memory_pool=_POOL)


class _Reader:
    """The stored samples with rowids first..end-1 of `db`'s file, a batch of BATCH_ROWIDS
    rowids at a time, from a reader process (pocd.release.arrowread). StoreError if it
    fails; leaving early stops it."""

    def __init__(self, db: sqlite3.Connection, first: int, end: int) -> None:
        (path,) = (file for _, name, file in db.execute("PRAGMA database_list") if name == "main")
        if not path:
            raise StoreError("an in-memory store has no file to read its samples from")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pocd.release.arrowread",
                path,
                *map(str, (first, end, BATCH_ROWIDS)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        process = self._process
        assert process.stdout is not None and process.stderr is not None
        with contextlib.suppress(pa.ArrowInvalid):  # the stream ended early: the reader says why
            yield from pa.ipc.open_stream(process.stdout, memory_pool=_POOL)
        if process.wait() != 0:
            why = process.stderr.read().decode(errors="replace").strip().splitlines()
            raise StoreError(why[-1] if why else f"the samples reader exited {process.returncode}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        process = self._process
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


class _ParquetFile:
    """samples.parquet being written, one row group a batch."""

    def __init__(self, path: Path) -> None:
        # Integer columns as deltas (ids and times climb steadily): half the size of zstd
        # over plain values, and faster to write. Strings are dictionary-encoded.
        self._writer = pq.ParquetWriter(
            path,
            SCHEMA,
            compression="zstd",
            use_dictionary=["device", "point", "parameter", "unit", "quality", "reason"],
            column_encoding=dict.fromkeys(("id", "t", "dt"), "DELTA_BINARY_PACKED"),
            memory_pool=_POOL,
        )

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch, row_group_size=batch.num_rows)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer.close()


class _CsvGzFile:
    """samples.csv.gz being written: a header line, then a line a sample."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        # ISA-L's deflate: a gzip stream any gunzip reads, three times as fast as zlib's
        self._gzip = isal_zlib.compressobj(
            _GZIP_LEVEL, isal_zlib.DEFLATED, 16 + isal_zlib.MAX_WBITS
        )
        self._write(SCHEMA.empty_table(), header=True)  # an empty run still has its header

    def write(self, batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, _CSV_SLICE):
            self._write(batch.slice(start, _CSV_SLICE), header=False)

    def _write(self, rows: pa.RecordBatch | pa.Table, *, header: bool) -> None:
        text = pa.BufferOutputStream(memory_pool=_POOL)
        pa_csv.write_csv(rows, text, pa_csv.WriteOptions(include_header=header))
        self._file.write(self._gzip.compress(text.getvalue()))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self._file.write(self._gzip.flush())
        finally:
            self._file.close()
