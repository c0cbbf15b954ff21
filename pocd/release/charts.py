"""The envelope of each critical parameter over a run, for the report's charts: per time
bucket the lowest and highest charted value, fed batch by batch so a run of tens of millions
of samples charts in memory of a few arrays per parameter.

Only good and uncertain values are charted; bad and missing ones (null, NaN, infinite) are
counted and leave their bucket empty, so a gap shows as a gap. `add` is vectorised (pyarrow
compute and numpy): it must cost little next to writing the samples. Nothing here draws, reads
files or knows the report's layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["CHARTED_QUALITIES", "Charts", "Envelope"]

# The qualities whose values are charted, by position: 0 good, 1 uncertain.
CHARTED_QUALITIES = ("good", "uncertain")
_UNCERTAIN = 1

Floats = npt.NDArray[np.float64]
Counts = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Envelope:
    """One parameter's envelope: bucket i covers [start_ns + i * width_ns, + width_ns).

    `low` and `high` are NaN in a bucket with no charted value. `count` is the number of
    values charted in each bucket, `uncertain` how many of them were uncertain. `charted` is
    the number of values charted, `excluded` the number of the parameter's samples in the
    window that were not (bad quality, null or not finite)."""

    parameter: str
    start_ns: int
    width_ns: int
    low: Floats
    high: Floats
    uncertain: Counts
    count: Counts
    charted: int
    excluded: int

    @property
    def starts_ns(self) -> npt.NDArray[np.int64]:
        """The start time of each bucket (ns since the epoch, UTC)."""
        return self.start_ns + self.width_ns * np.arange(len(self.low), dtype=np.int64)


class Charts:
    """Per critical parameter, a min/max envelope in `buckets` time buckets over
    [start_ns, end_ns), fed batch by batch, so a 56M-sample run charts in flat memory."""

    def __init__(
        self, parameters: Iterable[str], start_ns: int, end_ns: int, buckets: int = 1000
    ) -> None:
        names = list(dict.fromkeys(parameters))
        if end_ns <= start_ns:
            raise ValueError(f"the window [{start_ns}, {end_ns}) is empty")
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, not {buckets}")
        self.parameters: tuple[str, ...] = tuple(names)
        self.start_ns = start_ns
        self.end_ns = end_ns
        # Integer bucket width (rounded up) rather than (t - start) * buckets / span: no
        # overflow of int64 on long runs, and each bucket's edges are exact nanoseconds.
        self.width_ns = -(-(end_ns - start_ns) // buckets)
        self.buckets = -(-(end_ns - start_ns) // self.width_ns)
        cells = len(names) * self.buckets
        # One spare cell past the end takes the rows not charted (see `add`).
        self._low_spare: Floats = np.full(cells + 1, np.inf)
        self._high_spare: Floats = np.full(cells + 1, -np.inf)
        self._low, self._high = self._low_spare[:cells], self._high_spare[:cells]
        self._count: Counts = np.zeros(cells, np.int64)
        self._uncertain: Counts = np.zeros(cells, np.int64)
        self._excluded: Counts = np.zeros(len(names), np.int64)
        self._names = pa.array(names, pa.string())
        self._qualities = pa.array(CHARTED_QUALITIES, pa.string())
        self.outside = 0  # samples of these parameters outside the window: not charted

    def add(self, batch: pa.RecordBatch) -> None:
        """Charts a batch of samples: columns t (int64 ns), parameter (string or dictionary),
        value (float64, nullable) and quality (string or dictionary: good, uncertain, bad).
        Samples of other parameters are ignored."""
        if batch.num_rows == 0:
            return
        p = _positions(batch.column("parameter"), self._names)
        known = p >= 0
        if not known.any():
            return
        times = batch.column("t")
        if times.null_count:
            raise ValueError(f"{times.null_count} samples of the batch have no time")
        t = _numpy(times, np.int64)
        inside = (t >= self.start_ns) & (t < self.end_ns)
        mine = known & inside
        self.outside += int(np.count_nonzero(known)) - int(np.count_nonzero(mine))
        q = _positions(batch.column("quality"), self._qualities)
        v = _numpy(batch.column("value"), np.float64)  # nulls read as NaN
        charted = mine & (q >= 0) & np.isfinite(v)
        # Rows not charted go to one spare cell past the end instead of being compacted out:
        # four boolean selections of the batch would cost more than the whole accumulation.
        spare = len(self._low)
        bucket = (t - self.start_ns) // self.width_ns
        cell = np.where(charted, p.astype(np.int64) * self.buckets + bucket, spare)
        with np.errstate(invalid="ignore"):  # the spare cell takes NaNs
            np.minimum.at(self._low_spare, cell, v)
            np.maximum.at(self._high_spare, cell, v)
        counts = np.bincount(cell, minlength=spare + 1)[:spare]
        self._count += counts
        self._uncertain += np.bincount(cell[(q == _UNCERTAIN) & charted], minlength=spare + 1)[
            :spare
        ]
        ids = p[mine & ~charted]
        if len(ids):
            self._excluded += np.bincount(ids, minlength=len(self.parameters))

    def envelope(self, parameter: str) -> Envelope:
        """The envelope of one of the parameters, as charted so far."""
        try:
            i = self.parameters.index(parameter)
        except ValueError:
            raise KeyError(f"{parameter!r} is not charted (not one of {self.parameters})") from None
        cells = slice(i * self.buckets, (i + 1) * self.buckets)
        low, high = self._low[cells].copy(), self._high[cells].copy()
        empty = low > high
        low[empty] = np.nan
        high[empty] = np.nan
        return Envelope(
            parameter,
            self.start_ns,
            self.width_ns,
            low,
            high,
            self._uncertain[cells].copy(),
            self._count[cells].copy(),
            int(self._count[cells].sum()),
            int(self._excluded[i]),
        )


def _positions(column: pa.Array | pa.ChunkedArray, values: pa.Array) -> npt.NDArray[np.int8]:
    """For each row, the position of its text in `values` (fewer than 127), -1 for any other
    text or null. A dictionary column is looked up once per dictionary entry, not per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        entries = pc.index_in(_strings(column.dictionary), value_set=values)
        # The extra last entry is what a null index (filled with -1) reads.
        lookup = np.append(_numpy(entries.fill_null(-1), np.int8), np.int8(-1))
        indices = column.indices
        if indices.null_count:
            indices = indices.cast(pa.int64()).fill_null(-1)
        by_row: npt.NDArray[np.int8] = lookup[indices.to_numpy(zero_copy_only=False)]
        return by_row
    found = pc.index_in(_strings(column), value_set=values)
    if found.null_count:
        found = found.fill_null(-1)
    positions: npt.NDArray[np.int8] = _numpy(found, np.int8)
    return positions


def _strings(column: pa.Array) -> pa.Array:
    return column if column.type == pa.string() else column.cast(pa.string())


def _numpy(column: pa.Array | pa.ChunkedArray, dtype: type[np.generic]) -> npt.NDArray[Any]:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)
