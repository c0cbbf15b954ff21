"""The export's samples files against a real pocd store: every row of the run's line, as stored,
in both files, row for row; nothing of another line; empty ranges still valid files."""

from __future__ import annotations

import csv
import gzip
import math
import sqlite3
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pocd.release.samples as samples_module
from pocd.errors import StoreError
from pocd.model import NS, Quality, Run, RunStatus, Sample
from pocd.release.samples import COLUMNS, SCHEMA, write_samples
from pocd.store import Store

T0 = 1_767_225_600 * NS  # 2026-01-01T00:00:00Z
PARAMETERS = {
    ("incubator", "temperature"): "temperature",
    ("incubator", "co2"): "co2",
    ("rotea", "step"): "step",
}
LINES = {
    ("incubator", "temperature"): "L1",
    ("incubator", "co2"): "L1",
    ("pump", "speed"): "L1",  # feeds no parameter
    ("rotea", "step"): "L2",
}
UNITS = {"temperature": "°C", "step": ""}  # co2 has no unit given
QUOTED = 'status 256, "overload"'  # a reason CSV must quote

# Rowid 1, 2, ... in this order. Values that a decimal rendering with 15 digits would change,
# the extremes of float64, a NaN (stored as NULL), device times present and missing, every
# quality.
RUN_SAMPLES = [
    Sample("incubator", "temperature", T0, 0.1 + 0.2, device_t=T0 - 1_500_000),
    Sample("incubator", "co2", T0 + 1, 1 / 3),
    Sample("pump", "speed", T0 + 2, 60.0),
    Sample("rotea", "step", T0 + 3, 1.0),  # line L2
    Sample("rotea", "step", T0 + 4, 2.0),  # line L2
    Sample("rotea", "step", T0 + 5, 3.0),  # line L2
    Sample("incubator", "temperature", T0 + NS, math.nan, device_t=T0 + NS - 7),
    Sample("incubator", "co2", T0 + NS + 1, 5e-324, Quality.UNCERTAIN, None, "drift"),
    Sample("incubator", "temperature", T0 + 2 * NS, sys.float_info.max, Quality.BAD, T0, QUOTED),
    Sample("incubator", "co2", T0 + 2 * NS + 1, -123456789.12345679, device_t=-1),
]
LATER_SAMPLES = [  # committed after the run ended
    Sample("incubator", "temperature", T0 + 3 * NS, 37.0),
    Sample("rotea", "step", T0 + 3 * NS + 1, 4.0),
]
OF_L1 = [i + 1 for i, s in enumerate(RUN_SAMPLES) if LINES[s.device, s.point] == "L1"]


def make_run() -> Run:
    return Run(
        id="run-0001",
        batch_id="B-001",
        site_id="site-1",
        timezone="Europe/Berlin",
        protocol_id="CART-TCT",
        protocol_version="3.1",
        protocol_hash="ab" * 32,
        operator="alice",
        started=T0,
        line="L1",
    )


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "pocd.db"
    run = make_run()
    with Store(path, parameters=PARAMETERS, lines=LINES) as store:
        store.write([run, *RUN_SAMPLES[:5]])
        store.write(RUN_SAMPLES[5:])
        store.write([replace(run, status=RunStatus.COMPLETED, ended=T0 + 3 * NS)])
        store.write(LATER_SAMPLES)
    return path


@pytest.fixture
def db(store_path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(store_path.resolve().as_uri() + "?mode=ro", uri=True)
    yield db
    db.close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def run_marks(path: Path) -> tuple[int, int | None]:
    with Store(path, readonly=True) as store:
        ((_, first, end),) = store.commit_marks()[0]
    return first, end


def expected_row(rowid: int, sample: Sample) -> dict[str, Any]:
    """The row a sample written to the store must be exported as."""
    return {
        "id": rowid,
        "t": sample.t,
        "dt": sample.device_t,
        "device": sample.device,
        "point": sample.point,
        "parameter": PARAMETERS.get((sample.device, sample.point), ""),
        "value": None if math.isnan(sample.value) else sample.value,
        "unit": UNITS.get(PARAMETERS.get((sample.device, sample.point), ""), ""),
        "quality": sample.quality.name.lower(),
        "reason": sample.reason,
    }


def stored_rows(db: sqlite3.Connection, first: int, end: int, line: str) -> list[dict[str, Any]]:
    """The same rows as a plain join reads them from the store (the reference)."""
    rows = db.execute(
        "SELECT s.id, s.t, s.dt, c.device, c.point, c.parameter, s.v, k.quality, k.reason "
        "FROM samples AS s JOIN channels AS c ON c.id = s.ch "
        "JOIN qualities AS k ON k.id = s.q "
        "WHERE s.id >= ? AND s.id < ? AND c.line = ? ORDER BY s.id",
        (first, end, line),
    ).fetchall()
    return [
        {
            "id": rowid,
            "t": t,
            "dt": dt,
            "device": device,
            "point": point,
            "parameter": parameter,
            "value": v,
            "unit": UNITS.get(parameter, ""),
            "quality": Quality(quality).name.lower(),
            "reason": reason,
        }
        for rowid, t, dt, device, point, parameter, v, quality, reason in rows
    ]


def parquet_rows(folder: Path) -> list[dict[str, Any]]:
    table = pq.read_table(folder / "samples.parquet")
    assert table.schema.equals(SCHEMA)
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def csv_rows(folder: Path) -> list[dict[str, Any]]:
    """The CSV's rows with the column types of the Parquet file ('' is null)."""
    with gzip.open(folder / "samples.csv.gz", "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == COLUMNS
        rows = []
        for fields in reader:
            row: dict[str, Any] = dict(zip(COLUMNS, fields, strict=True))
            for name in ("id", "t", "dt"):
                row[name] = int(row[name]) if row[name] else None
            row["value"] = float(row["value"]) if row["value"] else None
            rows.append(row)
    return rows


def test_the_columns_are_the_schema() -> None:
    assert tuple(SCHEMA.names) == COLUMNS


def test_both_files_hold_the_run_line_samples_as_stored(
    store_path: Path, db: sqlite3.Connection, folder: Path
) -> None:
    first, end = run_marks(store_path)
    assert (first, end) == (1, len(RUN_SAMPLES) + 1)

    count = write_samples(db, first=first, end=end, line="L1", units=UNITS, folder=folder)

    expected = [expected_row(i, RUN_SAMPLES[i - 1]) for i in OF_L1]
    assert count == len(expected) == 7
    assert stored_rows(db, first, len(RUN_SAMPLES) + 1, "L1") == expected
    assert parquet_rows(folder) == expected
    assert csv_rows(folder) == expected
    assert db.total_changes == 0 and not db.in_transaction


def test_each_kind_of_stored_value_comes_through(
    store_path: Path, db: sqlite3.Connection, folder: Path
) -> None:
    write_samples(db, first=1, end=None, line="L1", units=UNITS, folder=folder)
    rows = {row["id"]: row for row in parquet_rows(folder)}
    nan = rows[7]  # a NaN is stored as NULL: null, and BAD with its reason
    assert (nan["value"], nan["dt"], nan["quality"], nan["reason"]) == (
        None,
        T0 + NS - 7,
        "bad",
        "nan",
    )
    assert rows[2]["dt"] is None  # no device time
    assert rows[1]["value"] == 0.30000000000000004  # not 0.3: no rounding on the way
    assert rows[8]["value"] == 5e-324
    assert (rows[8]["quality"], rows[8]["reason"]) == ("uncertain", "drift")
    assert (rows[9]["value"], rows[9]["quality"], rows[9]["reason"]) == (
        sys.float_info.max,
        "bad",
        QUOTED,
    )
    assert (rows[3]["parameter"], rows[3]["unit"]) == ("", "")  # feeds no parameter
    assert (rows[2]["parameter"], rows[2]["unit"]) == ("co2", "")  # no unit known
    assert rows[1]["unit"] == "°C"
    assert {4, 5, 6, len(RUN_SAMPLES) + 2}.isdisjoint(rows)  # line L2


def test_without_an_end_every_sample_stored_is_written(
    store_path: Path, db: sqlite3.Connection, folder: Path
) -> None:
    count = write_samples(db, first=1, end=None, line="L1", units=UNITS, folder=folder)

    stored = RUN_SAMPLES + LATER_SAMPLES
    expected = [
        expected_row(i + 1, s) for i, s in enumerate(stored) if LINES[s.device, s.point] == "L1"
    ]
    assert count == len(expected)
    assert parquet_rows(folder) == csv_rows(folder) == expected
    assert expected[-1]["id"] == len(stored) - 1  # the later temperature, not the L2 step


def test_a_range_of_rowids_is_written_whatever_run_it_is(
    db: sqlite3.Connection, folder: Path
) -> None:
    count = write_samples(db, first=2, end=9, line="L1", units=UNITS, folder=folder)

    expected = stored_rows(db, 2, 9, "L1")
    assert [row["id"] for row in expected] == [2, 3, 7, 8]
    assert count == 4
    assert parquet_rows(folder) == csv_rows(folder) == expected


def test_an_end_past_the_last_sample_stops_at_it(db: sqlite3.Connection, folder: Path) -> None:
    count = write_samples(db, first=1, end=1_000, line="L2", units=UNITS, folder=folder)

    assert [row["id"] for row in parquet_rows(folder)] == [4, 5, 6, 12]
    assert count == 4


def test_batches_and_progress_are_reported_as_written(
    db: sqlite3.Connection, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 3 rowids: 1-3, 4-6 (line L2 only: no batch), 7-9, 10-12.
    monkeypatch.setattr(samples_module, "BATCH_ROWIDS", 3)
    batches: list[pa.RecordBatch] = []
    progress: list[int] = []

    count = write_samples(
        db,
        first=1,
        end=None,
        line="L1",
        units=UNITS,
        folder=folder,
        on_batch=batches.append,
        progress=progress.append,
    )

    assert [b.num_rows for b in batches] == [3, 3, 2]
    assert all(b.schema.equals(SCHEMA) for b in batches)
    assert progress == [3, 6, 8] and count == 8
    written = parquet_rows(folder)
    assert pa.Table.from_batches(batches).to_pylist() == written == csv_rows(folder)
    assert pq.ParquetFile(folder / "samples.parquet").metadata.num_row_groups == 3


@pytest.mark.parametrize(("first", "end"), [(5, 5), (4, 7), (0, 1), (100, None)])
def test_an_empty_range_writes_files_with_only_the_header(
    db: sqlite3.Connection, folder: Path, first: int, end: int | None
) -> None:
    calls: list[object] = []

    count = write_samples(
        db,
        first=first,
        end=end,
        line="L1",
        units=UNITS,
        folder=folder,
        on_batch=calls.append,
        progress=calls.append,
    )

    assert count == 0 and calls == []
    assert parquet_rows(folder) == []
    with gzip.open(folder / "samples.csv.gz", "rt", encoding="utf-8") as f:
        assert f.read() == ",".join(f'"{name}"' for name in COLUMNS) + "\n"


def test_its_writer_threads_are_gone_when_it_returns(db: sqlite3.Connection, folder: Path) -> None:
    before = set(threading.enumerate())
    write_samples(db, first=1, end=None, line="L1", units=UNITS, folder=folder)
    assert set(threading.enumerate()) - before == set()


def test_a_callback_that_fails_stops_the_export_and_the_threads(
    db: sqlite3.Connection, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(samples_module, "BATCH_ROWIDS", 3)
    before = set(threading.enumerate())

    def refuse(batch: pa.RecordBatch) -> None:
        raise RuntimeError("charts refused")

    with pytest.raises(RuntimeError, match="charts refused"):
        write_samples(db, first=1, end=None, line="L1", units=UNITS, folder=folder, on_batch=refuse)
    assert set(threading.enumerate()) - before == set()


def test_a_gap_in_the_rowids_is_an_error_not_a_shifted_id(tmp_path: Path, folder: Path) -> None:
    # Rowids never have gaps in a store pocd wrote; a copy with a row missing must not export
    # its neighbours under the wrong ids. The copy is plain SQLite: the store refuses deletes.
    path = tmp_path / "damaged.db"
    with Store(tmp_path / "pocd.db", lines=LINES) as store:
        store.write(RUN_SAMPLES)
    source = sqlite3.connect(tmp_path / "pocd.db")
    damaged = sqlite3.connect(path)
    source.backup(damaged)
    source.close()
    damaged.execute("DROP TRIGGER samples_no_delete")
    damaged.execute("DELETE FROM samples WHERE id = 2")
    damaged.commit()

    with pytest.raises(StoreError, match=r"samples 1\.\.10: 9 rows, expected 10"):
        write_samples(damaged, first=1, end=None, line="L1", units=UNITS, folder=folder)
    damaged.close()


def test_a_device_the_line_shares_with_others_is_written_with_it(
    tmp_path: Path, folder: Path
) -> None:
    """A device on several lines has channels of no line: the run's line takes them when its
    config names the device (`shared`), and only then."""
    path = tmp_path / "pocd.db"
    shared = [Sample("incubator", "temperature", T0 + i, 37.0 + i) for i in range(3)]
    with Store(path, parameters=PARAMETERS, lines={}) as store:
        store.write(shared)
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        args = {"first": 1, "end": None, "line": "L1", "units": UNITS, "folder": folder}
        assert write_samples(db, **args) == 0
        assert write_samples(db, **args, shared={"incubator"}) == 3
    finally:
        db.close()
    assert [r["value"] for r in parquet_rows(folder)] == [37.0, 38.0, 39.0]


def test_a_run_that_starts_with_missing_values_keeps_its_column_types(
    tmp_path: Path, folder: Path
) -> None:
    """The reader infers a column's type from the first rows it reads: more than a thousand
    NaNs (stored as NULL) with no device time, then numbers, must come out as doubles and
    integers, exactly, not stop at the first number."""
    path = tmp_path / "pocd.db"
    values = [math.nan] * 1_500 + [-2.5, 0.1 + 0.2, 7.0]
    written = [Sample("incubator", "co2", T0 + i, v) for i, v in enumerate(values)]
    with Store(path, parameters=PARAMETERS, lines=LINES) as store:
        store.write(written)
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        count = write_samples(db, first=1, end=None, line="L1", units=UNITS, folder=folder)
    finally:
        db.close()
    assert count == len(values)
    rows = parquet_rows(folder)
    assert [r["value"] for r in rows[:1_500]] == [None] * 1_500
    assert [r["value"] for r in rows[1_500:]] == [-2.5, 0.1 + 0.2, 7.0]
    assert [r["t"] for r in rows] == [T0 + i for i in range(len(values))]
    assert {r["dt"] for r in rows} == {None}
    assert csv_rows(folder) == rows
