"""The reader of the export's samples, run as a process of its own: `python -m
pocd.release.arrowread STORE FIRST END BATCH` writes the samples with rowids FIRST..END-1 of
the store's file to stdout as an Arrow IPC stream, one record batch per BATCH rowids.

It reads with ADBC's SQLite driver, which builds Arrow arrays in C (0.3 us a row, where a
sqlite3 cursor makes a Python object of every value). That driver carries its own copy of
SQLite, and two copies of SQLite in one process must never open the same database: closing a
file drops every POSIX lock the process holds on it, so the other copy's locks would vanish
and a writer elsewhere (the daemon) could commit over a transaction of ours. So it runs here,
where no other SQLite is loaded (this module imports neither sqlite3 nor pocd.store).

Must not: write to the store (it opens the file read-only), or skip a row: a range missing
some rowids (nothing is deleted, rowids have no gaps) is an error, exit 1 with it on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import adbc_driver_sqlite.dbapi as adbc
import pyarrow as pa

__all__ = ["COLUMNS", "main"]

# As stored (codes, not names): pocd.release.samples resolves them.
COLUMNS: Final = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("t", pa.int64(), nullable=False),
        pa.field("dt", pa.int64()),
        pa.field("ch", pa.int64(), nullable=False),
        pa.field("q", pa.int64(), nullable=False),
        pa.field("v", pa.float64()),
    ]
)
# ORDER BY id is served by the rowid search as it goes: no sort.
_SAMPLES: Final = "SELECT id, t, dt, ch, q, v FROM samples WHERE id BETWEEN ? AND ? ORDER BY id"


class RangeError(Exception):
    """A range of rowids does not hold every row it should."""


def read(reader: adbc.Connection, low: int, high: int) -> pa.RecordBatch:
    """The stored samples with rowids low..high, as one batch of COLUMNS."""
    with reader.cursor() as cursor:
        # The driver infers each column's type from the first batch_rows rows, and fails on a
        # later value of another type: by default 1,024, so a run that starts with NaNs (stored
        # as NULL) would read its values as int64 and stop at the first number. One batch of
        # the driver's is all the rows, so the types are those of the whole range (an all-NULL
        # column comes as int64 and is cast: no value to change).
        cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(high - low + 1)})
        cursor.execute(_SAMPLES, (low, high))
        table = cursor.fetch_arrow_table()
    if table.num_rows != high - low + 1:
        raise RangeError(f"samples {low}..{high}: {table.num_rows} rows, expected {high - low + 1}")
    return table.cast(COLUMNS).combine_chunks().to_batches()[0]


def main(argv: list[str]) -> int:
    path, first, end, batch = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    out = pa.output_stream(sys.stdout.buffer)
    try:
        with (
            adbc.connect(f"{path.resolve().as_uri()}?mode=ro", autocommit=True) as reader,
            pa.ipc.new_stream(out, COLUMNS) as stream,
        ):
            for low in range(first, end, batch):
                stream.write_batch(read(reader, low, min(low + batch, end) - 1))
    except RangeError as exc:
        print(exc, file=sys.stderr)
        return 1
    except BrokenPipeError:  # the export stopped reading (it failed): nothing to add
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
