"""The embedded store: SQLite in WAL mode, the site's system of record.

Some 1,100 lines in one module: one `Store` class, one connection and one lock, with the SQL of
every record type beside the code that writes and reads it. The columns of the records other
than samples, and how their rows map to records, are their descriptions in
`pocd.store.recordtypes`.

`Store.write` commits a whole batch of records in one transaction before it returns, or raises
and keeps none of it; the query methods read them back as model records. This module must not
interpret records (that is the engine's job), hold them back, or drop any.

Durability: `synchronous=FULL`. In WAL mode that fsyncs the WAL at every commit, so a batch
that `write` returned for survives kill -9 and power loss. NORMAL would survive only kill -9
(the last commits could vanish with the power) and buys little here: a batch of 20,000
samples pays one fsync (a few ms), and with FULL the bench (bench/store.py) commits 540k-830k
samples/s on the development VM (its speed drifts), against a target of 500k.

Samples: one ~30-byte row each (channel and quality interned into small integers, NaN values
stored as NULL), inserted 500 rows per statement because the per-row cost of sqlite3's
executemany, not SQLite, is what limits a Python writer. Their rowid is the cursor of the
forwarders: rows are never deleted, so rowids only grow. There is no index on samples; time
windows use the block ranges in `sample_blocks` and the latest sample of each channel is kept
in `channel_latest`, both updated by each write (see pocd.store.schema).

Every change is an event (schema v7): a run written, an excursion's transition, a phase
change, a deviation and an audit entry are append-only rows, put in one order by the `events`
table that triggers append to in the same transaction; `events` reads them by that cursor,
each as it was written. Within a batch, records other than samples are stored in the batch's
order, so the events keep the engine's. `runs` and `excursions`, the current state that the
queries read, are upserted from the events by triggers, and refuse any other write (v9).

Forwarders (pocd.sinks) read through their own connection: samples by rowid in the raw shape
of `sample_rows`, and every other change by the event log's id (`events`; the outbox of
schema v3 that it replaced is gone since v9); they keep their cursors
here (`advance_cursors`, never backwards, with the incidents they raised on the way).
What a forwarded sample is tagged with is fixed when it is committed (schema v4): its
channel holds the parameter its point fed under the writer's config (`Store(parameters=)`),
and each run and phase change records the rowid of the first sample committed after it
(`commit_marks`), so the engine's order, not a clock, places a sample in a run and phase.

Records read back as they were written, with two exceptions that SQLite imposes: it stores a
NaN float as NULL, so a NaN limit or worst value reads back as None (a sample value and an
integral read back as NaN), and -0.0 stored in a REAL column reads back as 0.0.

Append-only tables refuse UPDATE and DELETE with triggers. That stops mistakes, not a person
with write access to the file; tamper evidence belongs to the audit chain, not to this module.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeAlias, cast

from pocd.errors import RecordRejected, RunError, StoreError
from pocd.model import (
    AlarmEvent,
    AuditEntry,
    Checkpoint,
    Deviation,
    DeviationChange,
    DeviationState,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    Incident,
    LoadedFile,
    PhaseChange,
    ProtocolText,
    Quality,
    Run,
    RunStatus,
    Sample,
    Signature,
    SiteStatus,
    User,
    UserChange,
)
from pocd.store import chain, schema
from pocd.store.recordtypes import (
    ALARM_EVENT,
    AUDIT_ENTRY,
    DEVIATION,
    EXCURSION,
    INCIDENT,
    PHASE_CHANGE,
    RUN,
    SIGNATURE,
    USER,
)

__all__ = [
    "SAMPLE_KEY_BITS",
    "AmbiguousRunError",
    "Attempt",
    "Change",
    "Channel",
    "Event",
    "Queued",
    "Record",
    "SampleRow",
    "Store",
]

Record: TypeAlias = (
    Sample
    | ExcursionEvent
    | Deviation
    | Incident
    | Run
    | PhaseChange
    | AuditEntry
    | ProtocolText
    | LoadedFile
    | Signature
    | User
    | UserChange
    | AlarmEvent
    | DeviationChange
)
# A record that has a state of its own to show (encoded as one point per record).
Change: TypeAlias = Run | PhaseChange | Excursion | Deviation
# What the event log holds (Store.events): every change as it was written.
Event: TypeAlias = (
    Run | PhaseChange | ExcursionEvent | Deviation | AuditEntry | AlarmEvent | Checkpoint
)
# A sample as the forwarders read it (see Store.sample_rows): (channel code << 32 | quality
# code, value or None for NaN, receive time as decimal text).
SampleRow: TypeAlias = tuple[int, float | None, str]
# What a channel code stands for: (device, point, the parameter it fed or '', the one line
# it belonged to or '').
Channel: TypeAlias = tuple[str, str, str, str]
SAMPLE_KEY_BITS: Final = 32

# Rows per multi-row INSERT. Measured with 20,000-sample batches: 1 row/statement ~0.5M rows/s,
# 100 ~0.9M, 500 ~1.0M, 2000 ~1.05M; 512 keeps statements (2,560 parameters) modest. A batch
# is cut into statements of 512, 256, ..., 1 rows, so any batch takes at most a few statements
# (each cached by sqlite3): the writer thread gives up the GIL once a statement, and a tail of
# single-row statements made it trade the GIL with the event loop hundreds of times a batch.
_MOST_ROWS_PER_INSERT: Final = 512
_SAMPLE_COLUMNS: Final = 5
_INSERT_SAMPLES: Final = {
    rows: "INSERT INTO samples (ch, t, dt, v, q) VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    for rows in (_MOST_ROWS_PER_INSERT >> n for n in range(_MOST_ROWS_PER_INSERT.bit_length()))
}
# The lookup aids are computed from the batch in Python: the same aggregates in SQL (GROUP BY
# over the new rows) sort and took as long as the inserts themselves.
_UPSERT_LATEST: Final = """
INSERT INTO channel_latest (ch, sample_id, t) VALUES (?, ?, ?)
ON CONFLICT (ch) DO UPDATE SET sample_id = excluded.sample_id, t = excluded.t
"""
_UPSERT_BLOCK: Final = """
INSERT INTO sample_blocks (block, t_min, t_max) VALUES (?, ?, ?)
ON CONFLICT (block) DO UPDATE
    SET t_min = min(t_min, excluded.t_min), t_max = max(t_max, excluded.t_max)
"""

# The columns of the records other than samples are their descriptions' (see
# pocd.store.recordtypes), the key first where a record has one.
_RUN_COLUMNS: Final = RUN.columns
_PHASE_COLUMNS: Final = PHASE_CHANGE.columns
_EXCURSION_COLUMNS: Final = EXCURSION.columns
_DEVIATION_COLUMNS: Final = DEVIATION.columns


def _values(columns: str, extra: int = 0) -> str:
    return ", ".join("?" * (columns.count(",") + 1 + extra))


# A run and an excursion are stored as events (schema v7): triggers append them to `events`
# and upsert `runs` and `excursions` from them. A run event carries its sample mark (v4),
# which sets the run's marks when it first stores its start and its end.
_RUN_EVENT_COLUMNS: Final = "run_id" + _RUN_COLUMNS.removeprefix("id")
_INSERT_RUN_EVENT: Final = (
    f"INSERT INTO run_events ({_RUN_EVENT_COLUMNS}, sample) "
    f"VALUES ({_values(_RUN_EVENT_COLUMNS, 1)})"
)
_EXCURSION_EVENT_COLUMNS: Final = "change, t, excursion_id" + _EXCURSION_COLUMNS.removeprefix("id")
# The excursions_identity trigger refuses an event that would change what the excursion is.
_INSERT_EXCURSION_EVENT: Final = (
    f"INSERT INTO excursion_events ({_EXCURSION_EVENT_COLUMNS}) "
    f"VALUES ({_values(_EXCURSION_EVENT_COLUMNS)})"
)
_INSERT_DEVIATION: Final = (
    f"INSERT INTO deviations ({_DEVIATION_COLUMNS}) VALUES ({_values(_DEVIATION_COLUMNS)})"
)
_INSERT_PHASE: Final = (
    f"INSERT INTO phases ({_PHASE_COLUMNS}, first_sample) VALUES ({_values(_PHASE_COLUMNS, 1)})"
)
_INSERT_DEVIATION_CHANGE: Final = (
    "INSERT INTO deviation_changes (deviation_id, t, actor, state, note, disposition, "
    "root_cause) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# One chain entry per committed batch of samples (pocd.store.chain).
_CHAIN_SAMPLES: Final = (
    "INSERT INTO chain (kind, ref, digest, hash) SELECT 'samples', ?1, ?2, "
    "pocd_link((SELECT hash FROM chain ORDER BY id DESC LIMIT 1), 'samples', ?1, ?2)"
)
_INCIDENT_COLUMNS: Final = INCIDENT.columns
_INSERT_INCIDENT: Final = (
    f"INSERT INTO incidents ({_INCIDENT_COLUMNS}) VALUES ({_values(_INCIDENT_COLUMNS)})"
)
# Records that mark where they fall among the samples (schema v4), and their statements.
_MARKED: Final = (Run, PhaseChange)
_MARKED_SQL: Final = (_INSERT_RUN_EVENT, _INSERT_PHASE)
_AUDIT_COLUMNS: Final = AUDIT_ENTRY.columns
_INSERT_AUDIT: Final = f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES ({_values(_AUDIT_COLUMNS)})"
_ALARM_EVENT_COLUMNS: Final = ALARM_EVENT.columns
_INSERT_ALARM_EVENT: Final = (
    f"INSERT INTO alarm_events ({_ALARM_EVENT_COLUMNS}) VALUES ({_values(_ALARM_EVENT_COLUMNS)})"
)
_SIGNATURE_COLUMNS: Final = SIGNATURE.columns
_INSERT_SIGNATURE: Final = (
    f"INSERT INTO signatures ({_SIGNATURE_COLUMNS}) VALUES ({_values(_SIGNATURE_COLUMNS)})"
)
_USER_COLUMNS: Final = USER.columns
# A new user: a login taken before (by anyone, disabled or not) is refused by the key.
_INSERT_USER: Final = f"INSERT INTO users ({_USER_COLUMNS}) VALUES ({_values(_USER_COLUMNS)})"
_UPDATE_USER: Final = (
    "UPDATE users SET " + ", ".join(f"{f.column} = ?" for f in USER.stored[1:]) + " WHERE login = ?"
)
# A protocol's text is the same whenever it is loaded again: kept once.
_INSERT_LOADED_FILE: Final = (
    "INSERT INTO loaded_files (hash, kind, name, text) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_INSERT_PROTOCOL: Final = (
    "INSERT INTO protocols (hash, id, version, text) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
)

# What says the store itself failed (a full disk, an I/O error, a lock held too long, a
# corrupt file: plain sqlite3.DatabaseError), not a record: the batch is kept and tried again.
# Any other error of a write is a record's, raised as RecordRejected.
_STORE_FAULTS: Final = (
    sqlite3.OperationalError,
    sqlite3.InternalError,
    sqlite3.NotSupportedError,
    OSError,
    MemoryError,
    StoreError,
)
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_BUSY_TIMEOUT_MS: Final = 10_000
_OPTIMIZE_WAIT_MS: Final = 100
_CHECKPOINT_PAGES: Final = 10_000
_WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024

Row: TypeAlias = tuple[Any, ...]


def _excursion_event(row: Row) -> ExcursionEvent:
    return ExcursionEvent(ExcursionChange(row[0]), EXCURSION.from_row(row[2:]), row[1])


def _checkpoint(row: Row) -> Checkpoint:
    return Checkpoint(row[0], row[1], row[2], bytes(row[3]), bytes(row[4]), row[5])


# What each kind of entry in `events` refers to (schema v7): the table its `ref` is a rowid
# of, the columns to read there, and the event they make.
_EVENT_SOURCES: Final[dict[str, tuple[str, str, Callable[[Row], Event]]]] = {
    "run": ("run_events", _RUN_EVENT_COLUMNS, RUN.from_row),
    "phase": ("phases", _PHASE_COLUMNS, PHASE_CHANGE.from_row),
    "excursion": ("excursion_events", _EXCURSION_EVENT_COLUMNS, _excursion_event),
    "deviation": ("deviations", _DEVIATION_COLUMNS, DEVIATION.from_row),
    "audit": ("audit", _AUDIT_COLUMNS, AUDIT_ENTRY.from_row),
    "alarm": ("alarm_events", _ALARM_EVENT_COLUMNS, ALARM_EVENT.from_row),
    "checkpoint": ("checkpoints", "t, size, hash, note, signature, key_id", _checkpoint),
}


class Queued(NamedTuple):
    """A notification queued for one channel (schema v12)."""

    notification: str  # its stable id (pocd.sinks.notify.message)
    channel: str  # the sink name of the channel
    t: int  # when it was queued for this channel, ns
    route: str  # the route that queued it
    tier: int  # escalation tier, 0 for the first to be told
    via: str | None  # a fallback: the channel that had not delivered it
    item: str  # its JSON


class Attempt(NamedTuple):
    """One delivery attempt of a notification on a channel (schema v12)."""

    t: int
    notification: str
    channel: str
    outcome: str  # delivered, retry or rejected
    reason: str  # the far side's words; empty when delivered


class AmbiguousRunError(RunError, LookupError):
    """A run id prefix matches more than one run."""

    def __init__(self, key: str, matches: Sequence[str]) -> None:
        self.key = key
        self.matches = tuple(matches)
        super().__init__(f"run id prefix {key!r} is ambiguous: {', '.join(self.matches)}")


class Store:
    """The pocd store at `path`: records in, records out.

    One writer thread at a time per process (a lock serialises callers, so `asyncio.to_thread`
    may call it from any worker thread); readers open their own `Store(path, readonly=True)`,
    which WAL lets run alongside the writer and see every committed batch.
    """

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool = False,
        parameters: Mapping[tuple[str, str], str] | None = None,
        lines: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """`parameters` maps (device, point) to the protocol parameter the point feeds under
        the site config (the daemon's), `lines` to the one line it belongs to; each sample
        written is recorded with its channel's parameter and line (see pocd.store.schema, v4
        and v6). Without them, points feed none and belong to no single line."""
        self.path = Path(path)
        self.readonly = readonly
        self._parameters = dict(parameters or {})
        self._lines = dict(lines or {})
        self._lock = threading.Lock()
        # Interned codes of samples: device -> point -> channel id (the channel with this
        # store's parameter of the point), (quality, reason) -> code, and back. Loaded at open
        # and extended by writes; refreshed when a code is unknown (another process may have
        # added it).
        self._channel_ids: dict[str, dict[str, int]] = {}
        self._channels: dict[int, Channel] = {}
        self._quality_ids: dict[tuple[Quality, str], int] = {}
        self._qualities: dict[int, tuple[Quality, str]] = {}
        self._codes_stale = False  # set when a rolled-back write may have interned codes
        self._closed = False
        self._db = self._open()
        try:
            self._load_codes()
        except sqlite3.Error as e:
            self._db.close()
            raise StoreError(f"{self.path}: cannot read the store: {e}") from e

    def _open(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            self._prepare(db)
        except sqlite3.Error as e:
            db.close()
            raise StoreError(f"{self.path}: cannot open the store: {e}") from e
        except BaseException:
            db.close()
            raise
        return db

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        try:
            if self.readonly:
                db = sqlite3.connect(
                    path.resolve().as_uri() + "?mode=ro",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                )
            else:
                # GMP records, for the service's user only: a new data folder is made 0700
                # and a new store 0600 (SQLite gives its -wal and -shm files the mode of the
                # database file). Existing ones keep the modes their owner gave them.
                # Only a file that does not exist yet is touched: closing any descriptor of a
                # file drops every POSIX lock this process holds on it, so opening and closing
                # an open store's file would take the SQLite locks of the process's other
                # connections with it (another process then checkpoints and resets the WAL
                # under them, and their commits are lost).
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{path}: cannot open the store: {e}") from e
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        path = self.path
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # REPLACE conflict resolution deletes rows without firing DELETE triggers unless
        # recursive triggers are on; with them on, our own connections cannot bypass the
        # append-only triggers that way.
        db.execute("PRAGMA recursive_triggers = ON")
        version = schema.read_version(db, path)  # before changing anything in a foreign file
        if self.readonly:
            if version != schema.SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: store schema version {version}, this pocd reads "
                    f"{schema.SCHEMA_VERSION}; open it read-write once to migrate it"
                )
            db.execute("PRAGMA query_only = ON")
            return
        chain.register(db)  # the chain's triggers call them (pocd.store.chain)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: cannot switch the store to WAL (got {mode!r})")
        db.execute("PRAGMA synchronous = FULL")
        # Checkpoint every ~40 MB of WAL instead of 4 MB: pages rewritten by successive
        # commits are copied into the file once, which cut commit time by a third in the bench.
        db.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
        # A long reader can make the WAL grow past that; once it is checkpointed, give the
        # space back instead of keeping the high-water mark.
        db.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        schema.migrate(db, path, parameters=self._parameters, lines=self._lines)

    def close(self) -> None:
        """Close the connection. The last connection to close checkpoints and removes the WAL."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self.readonly:
                    self._optimize()
            finally:
                self._db.close()

    def _optimize(self) -> None:
        """Keep query plans good (cheap). Only an aid: while another connection holds the
        write lock (the daemon's writer, as a sink closes its own) it is skipped, not waited
        for nor raised."""
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_OPTIMIZE_WAIT_MS}")
            self._db.execute("PRAGMA optimize")
        except sqlite3.OperationalError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------

    def write(self, records: Iterable[Record]) -> None:
        """Store a batch in one transaction, committed (fsynced) before this returns.

        On any error nothing of the batch is kept: RecordRejected when what a record holds
        cannot be stored (a constraint, an integer beyond 64 bits, a record of an unknown
        type), StoreError when the store failed (full disk, I/O error). Samples keep their
        order: rowids follow the batch.
        """
        batch = records if isinstance(records, list) else list(records)
        # The hot path is a batch of samples only; test the common case before sorting.
        samples = [r for r in batch if type(r) is Sample]
        others = [r for r in batch if type(r) is not Sample] if len(samples) < len(batch) else []
        try:  # before the transaction: a record that cannot be stored leaves nothing behind
            # Runs and phase changes mark the rowid of the first sample after them: count the
            # samples before each (only in the rare batch that holds one).
            offsets = _sample_offsets(batch) if any(type(r) in _MARKED for r in others) else []
            rows = _other_rows(others, offsets)
        except Exception as e:  # nothing is open yet: only a record can be at fault
            raise RecordRejected(f"{self.path}: {type(e).__name__}: {e}") from e
        with self._lock:
            self._check_open()
            if self.readonly:
                raise StoreError(f"{self.path}: store opened read-only, cannot write")
            if not batch:
                return
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                if self._codes_stale:
                    self._load_codes()
                before = self._insert_samples(samples) if samples else None
                if offsets and before is None:
                    before = db.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0]
                for sql, params in rows:
                    if params and sql in _MARKED_SQL:
                        assert before is not None
                        db.executemany(sql, _marked(params, before + 1))
                    elif params:
                        db.executemany(sql, params)
                db.execute("COMMIT")
            except BaseException as e:
                # Codes interned by the rolled-back transaction are gone from the file; reload
                # them inside the next transaction rather than here, where it could fail too.
                self._codes_stale = True
                rolled_back = self._roll_back()
                if not isinstance(e, Exception):
                    raise  # cancellation, exit: not the store's to judge
                if (
                    isinstance(e, _STORE_FAULTS)
                    or type(e) is sqlite3.DatabaseError  # a corrupt file, not its subclasses
                    or not rolled_back
                ):
                    raise StoreError(
                        f"{self.path}: batch of {len(batch)} records not stored: "
                        f"{type(e).__name__}: {e}"
                    ) from e
                # Anything else is about what a record holds: a constraint, an integer beyond
                # 64 bits, a value of the wrong type. The same batch would fail again.
                raise RecordRejected(
                    f"{self.path}: batch of {len(batch)} records not stored: "
                    f"{type(e).__name__}: {e}"
                ) from e

    def _roll_back(self) -> bool:
        """Undo the open transaction; False if even that failed (the store is in trouble)."""
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            return False
        return True

    def _insert_samples(self, samples: list[Sample]) -> int:
        """Insert the samples; return the rowid before the first of them."""
        db = self._db
        before = db.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0]
        try:
            params = self._sample_params(samples)
        except KeyError:
            self._intern(samples)
            params = self._sample_params(samples)
        width = _SAMPLE_COLUMNS
        start = 0
        for rows, sql in _INSERT_SAMPLES.items():  # the largest statements first
            step = rows * width
            end = start + (len(params) - start) // step * step
            if end > start:
                db.executemany(sql, [params[i : i + step] for i in range(start, end, step)])
                start = end
        # Rowids are max+1 and we hold the write lock, so sample i got before + 1 + i; check
        # it (one B-tree descent) rather than trust it, as the lookup aids depend on it.
        last = db.execute("SELECT max(id) FROM samples").fetchone()[0]
        if last != before + len(samples):
            raise StoreError(
                f"{self.path}: {len(samples)} samples after rowid {before} ended at rowid {last}"
            )
        channels, times = params[0::width], params[1::width]
        db.executemany(_UPSERT_LATEST, _latest_of_channels(channels, times, before + 1))
        db.executemany(_UPSERT_BLOCK, _block_ranges(times, before + 1))
        digest = chain.digest_samples(*(params[i::width] for i in range(width)))  # type: ignore[arg-type]
        db.execute(_CHAIN_SAMPLES, (f"{before + 1}..{last}", digest))
        return int(before)

    def _sample_params(self, samples: list[Sample]) -> list[object]:
        """The flat parameter list of the batch: ch, t, dt, v, q per sample. KeyError if a
        channel or quality is not interned yet.

        One comprehension per column filled into strided slices: measured faster than building
        a tuple per sample, and this is the hot path.
        """
        channel_ids = self._channel_ids
        quality_ids = self._quality_ids
        good = Quality.GOOD
        params: list[object] = [None] * (_SAMPLE_COLUMNS * len(samples))
        params[0::5] = [channel_ids[s.device][s.point] for s in samples]
        params[1::5] = [s.t for s in samples]
        params[2::5] = [s.device_t for s in samples]
        params[3::5] = [s.value for s in samples]  # SQLite stores NaN as NULL
        params[4::5] = [
            0 if s.quality is good and not s.reason else quality_ids[s.quality, s.reason]
            for s in samples
        ]
        return params

    def remap(
        self, parameters: Mapping[tuple[str, str], str], lines: Mapping[tuple[str, str], str]
    ) -> None:
        """What each (device, point) feeds from now on (a reloaded config): a sample of a point
        whose parameter or line changed is recorded under a channel of its own."""
        with self._lock:
            self._parameters = dict(parameters)
            self._lines = dict(lines)
            self._codes_stale = True

    def _intern(self, samples: list[Sample]) -> None:
        """Give every new channel and quality of the batch a code, inside the transaction."""
        db = self._db
        for s in samples:
            points = self._channel_ids.setdefault(s.device, {})
            if s.point not in points:
                key = (s.device, s.point)
                channel = (*key, self._parameters.get(key, ""), self._lines.get(key, ""))
                # Select first: another writer process may have added it since we loaded.
                row = db.execute(
                    "SELECT id FROM channels "
                    "WHERE device = ? AND point = ? AND parameter = ? AND line = ?",
                    channel,
                ).fetchone()
                if row is None:
                    row = db.execute(
                        "INSERT INTO channels (device, point, parameter, line) "
                        "VALUES (?, ?, ?, ?) RETURNING id",
                        channel,
                    ).fetchone()
                points[s.point] = row[0]
                self._channels[row[0]] = channel
            quality = (Quality(s.quality), s.reason)
            if quality not in self._quality_ids:
                row = db.execute(
                    "SELECT id FROM qualities WHERE quality = ? AND reason = ?",
                    (int(quality[0]), quality[1]),
                ).fetchone()
                if row is None:
                    row = db.execute(
                        "INSERT INTO qualities (quality, reason) VALUES (?, ?) RETURNING id",
                        (int(quality[0]), quality[1]),
                    ).fetchone()
                self._quality_ids[quality] = row[0]
                self._qualities[row[0]] = quality

    def _load_codes(self) -> None:
        channels = self._db.execute(
            "SELECT id, device, point, parameter, line FROM channels"
        ).fetchall()
        qualities = self._db.execute("SELECT id, quality, reason FROM qualities").fetchall()
        self._channel_ids = {}
        self._channels = {}
        for code, device, point, parameter, line in channels:
            self._channel_ids.setdefault(device, {})
            key = (device, point)
            if (parameter, line) == (self._parameters.get(key, ""), self._lines.get(key, "")):
                self._channel_ids[device][point] = code
            self._channels[code] = (device, point, parameter, line)
        self._qualities = {code: (Quality(quality), reason) for code, quality, reason in qualities}
        self._quality_ids = {key: code for code, key in self._qualities.items()}

    # -- reading ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with self._lock:
            self._check_open()
            return self._db.execute(sql, params).fetchall()

    def runs(self) -> list[Run]:
        """Every run, in the order they started."""
        return [
            RUN.from_row(r) for r in self._query(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY rowid")
        ]

    def run(self, key: str) -> Run | None:
        """The run with id `key`, else the latest run of batch `key`, else the one run whose
        id starts with `key`; None if there is none. AmbiguousRunError if several ids match."""
        if not key:
            return None
        select = f"SELECT {_RUN_COLUMNS} FROM runs"
        rows = self._query(f"{select} WHERE id = ?", (key,))
        if not rows:
            rows = self._query(
                f"{select} WHERE batch_id = ? ORDER BY started DESC, rowid DESC LIMIT 1", (key,)
            )
        if not rows:
            rows = self._query(
                f"{select} WHERE substr(id, 1, ?) = ? ORDER BY rowid", (len(key), key)
            )
            if len(rows) > 1:
                raise AmbiguousRunError(key, [r[0] for r in rows])
        return RUN.from_row(rows[0]) if rows else None

    def active_run(self) -> Run | None:
        """The running run (the latest started, should a crash have left two running)."""
        rows = self._query(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = ? ORDER BY rowid DESC LIMIT 1",
            (RunStatus.RUNNING.value,),
        )
        return RUN.from_row(rows[0]) if rows else None

    def phases(self, run_id: str | None = None) -> list[PhaseChange]:
        """The phase changes of one run, or of every run, in the order they were recorded."""
        if run_id is None:
            rows = self._query(f"SELECT {_PHASE_COLUMNS} FROM phases ORDER BY id")
        else:
            rows = self._query(
                f"SELECT {_PHASE_COLUMNS} FROM phases WHERE run_id = ? ORDER BY id", (run_id,)
            )
        return [PHASE_CHANGE.from_row(r) for r in rows]

    def excursions(self, run_id: str | None = None) -> list[Excursion]:
        """Excursions in the order they opened, of one run or of all."""
        if run_id is None:
            rows = self._query(f"SELECT {_EXCURSION_COLUMNS} FROM excursions ORDER BY rowid")
        else:
            rows = self._query(
                f"SELECT {_EXCURSION_COLUMNS} FROM excursions WHERE run_id = ? ORDER BY rowid",
                (run_id,),
            )
        return [EXCURSION.from_row(r) for r in rows]

    def active_runs(self) -> list[Run]:
        """Every running run, in the order they started."""
        rows = self._query(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = ? ORDER BY rowid",
            (RunStatus.RUNNING.value,),
        )
        return [RUN.from_row(r) for r in rows]

    def line_excursions(self, line: str, *, open_only: bool = False) -> list[Excursion]:
        """The excursions of a line's equipment (of no run), in the order they opened."""
        still = " AND end_t IS NULL" if open_only else ""
        rows = self._query(
            f"SELECT {_EXCURSION_COLUMNS} FROM excursions "
            f"WHERE line = ? AND run_id IS NULL{still} ORDER BY rowid",
            (line,),
        )
        return [EXCURSION.from_row(r) for r in rows]

    def line_deviations(self, line: str) -> list[Deviation]:
        """The deviations of a line's equipment (of no run), in the order they were raised."""
        rows = self._query(
            f"SELECT {_DEVIATION_COLUMNS} FROM deviations "
            "WHERE line = ? AND run_id IS NULL ORDER BY rowid",
            (line,),
        )
        return [DEVIATION.from_row(r) for r in rows]

    def open_excursions(self, run_id: str | None = None) -> list[Excursion]:
        """The excursions still open: of one run, or (None) every one of the site's."""
        where, params = ("AND run_id = ?", (run_id,)) if run_id is not None else ("", ())
        rows = self._query(
            f"SELECT {_EXCURSION_COLUMNS} FROM excursions WHERE end_t IS NULL {where} "
            "ORDER BY rowid",
            params,
        )
        return [EXCURSION.from_row(r) for r in rows]

    def deviations(self, run_id: str | None = None) -> list[Deviation]:
        if run_id is None:
            rows = self._query(f"SELECT {_DEVIATION_COLUMNS} FROM deviations ORDER BY rowid")
        else:
            rows = self._query(
                f"SELECT {_DEVIATION_COLUMNS} FROM deviations WHERE run_id = ? ORDER BY rowid",
                (run_id,),
            )
        return [DEVIATION.from_row(r) for r in rows]

    def deviation_changes(self, deviation_id: str | None = None) -> list[DeviationChange]:
        """The lifecycle steps of one deviation, or of all, in the order they were made."""
        where, params = ("WHERE deviation_id = ?", (deviation_id,)) if deviation_id else ("", ())
        rows = self._query(
            "SELECT deviation_id, t, actor, state, note, disposition, root_cause "
            f"FROM deviation_changes {where} ORDER BY id",
            params,
        )
        return [
            DeviationChange(d, t, a, DeviationState(st), n, di, rc)
            for d, t, a, st, n, di, rc in rows
        ]

    def incidents(self, since: int | None = None) -> list[Incident]:
        """Incidents in the order they were recorded; with `since`, those at t >= since."""
        if since is None:
            rows = self._query(f"SELECT {_INCIDENT_COLUMNS} FROM incidents ORDER BY id")
        else:
            rows = self._query(
                f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE t >= ? ORDER BY id", (since,)
            )
        return [INCIDENT.from_row(r) for r in rows]

    def incidents_of(self, source: str, code: str, *, after: int = 0) -> list[tuple[int, Incident]]:
        """(id, incident) of the incidents of `source` with `code` after incident id `after`,
        in the order they were recorded (a sink's quarantine, read by its cursor)."""
        rows = self._query(
            f"SELECT id, {_INCIDENT_COLUMNS} FROM incidents "
            "WHERE id > ? AND source = ? AND code = ? ORDER BY id",
            (after, source, code),
        )
        return [(int(r[0]), INCIDENT.from_row(r[1:])) for r in rows]

    def incident_lines(self, source: str, code: str, *, after: int = 0) -> tuple[int, int]:
        """(incidents, lines of their raw bytes in all) of `incidents_of`, without reading
        them: the size of a sink's quarantine, one line per point."""
        text = "CAST(raw AS TEXT)"
        count, lines = self._query(
            f"SELECT count(*), coalesce(sum(length({text}) - "
            f"length(replace({text}, char(10), '')) + 1), 0) FROM incidents "
            "WHERE id > ? AND source = ? AND code = ?",
            (after, source, code),
        )[0]
        return int(count), int(lines)

    def audit(self) -> list[AuditEntry]:
        rows = self._query(f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY id")
        return [AUDIT_ENTRY.from_row(r) for r in rows]

    def verify_chain(self, public_key: bytes | None = None) -> chain.ChainReport:
        """Walk the store's tamper-evident chain and its checkpoints (pocd.store.chain); with
        the site's public key, the checkpoints' signatures too."""
        with self._lock:
            self._check_open()
            return chain.verify(self._db, public_key)

    def checkpoint(
        self, origin: str, sign: Callable[[bytes], bytes], key_id: str, t: int
    ) -> tuple[int, str] | None:
        """Sign the chain's head, if it grew since the last checkpoint, and store the
        checkpoint; answers its (size, hash), None if there was nothing new."""
        with self._transaction("checkpoint not stored") as db:
            size, head = db.execute(
                "SELECT count(*), (SELECT hash FROM chain ORDER BY id DESC LIMIT 1) FROM chain"
            ).fetchone()
            if not size or size == db.execute("SELECT max(size) FROM checkpoints").fetchone()[0]:
                return None
            note = chain.checkpoint_note(origin, size, head)
            db.execute(
                "INSERT INTO checkpoints (t, size, hash, note, signature, key_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (t, size, head, note, sign(note), key_id),
            )
        return int(size), str(head)

    def checkpoints_after(self, after: int) -> list[tuple[int, Checkpoint]]:
        """(rowid, checkpoint) of each checkpoint after rowid `after`, in the order made."""
        rows = self._query(
            "SELECT id, t, size, hash, note, signature, key_id FROM checkpoints WHERE id > ? "
            "ORDER BY id",
            (after,),
        )
        return [(r[0], _checkpoint(r[1:])) for r in rows]

    # -- retention -------------------------------------------------------------------------------

    def pruned_upto(self) -> int:
        """The last sample rowid pruned, 0 if none was (the chained `store.prune` entries)."""
        with self._lock:
            self._check_open()
            return chain.pruned_upto(self._db)

    def prunable(self, before: int) -> tuple[int, list[str]]:
        """The last sample rowid that may be pruned for a cutoff time `before`, and what holds
        pruning back below it: samples from `before` on, a run not exported and released (or
        still running), a sink that has not forwarded them. It ends a batch of the chain, so
        the batch's hash stays whole for the samples kept."""
        held: list[str] = []
        (block,) = self._query("SELECT max(block) FROM sample_blocks WHERE t_max < ?", (before,))[0]
        last = ((block + 1) << schema.BLOCK_BITS) - 1 if block is not None else 0
        # The latest sample always stays: SQLite gives max(rowid) + 1 to the next one, so a
        # table emptied would reuse rowids the chain and the sinks' cursors already name.
        last = min(last, self.sample_count() - 1)
        released = {a.target for a in self.audit_of_action("run.released")}
        exported = {a.target for a in self.audit_of_action("run.export")}
        for run_id, batch, first, status in self._query(
            "SELECT id, batch_id, first_sample, status FROM runs ORDER BY first_sample"
        ):
            if first is None or first > last:
                continue
            why = (
                "is still running"
                if status == "running"
                else "was not exported"
                if run_id not in exported
                else "is not released"
                if run_id not in released
                else ""
            )
            if why:
                held.append(f"run {run_id} (batch {batch}) {why}: its samples from {first} stay")
                last = min(last, first - 1)
        for sink, position in self._query(
            "SELECT sink, position FROM cursors WHERE stream = 'samples' ORDER BY sink"
        ):
            if position < last:
                held.append(f"sink {sink} has forwarded samples up to {position} only")
                last = position
        ends = self._query("SELECT ref FROM chain WHERE kind = 'samples' ORDER BY id DESC")
        batch_end = next((e for e in (int(r[0].partition("..")[2]) for r in ends) if e <= last), 0)
        return max(batch_end, self.pruned_upto()), held

    def prune_samples(self, last: int, entry: AuditEntry) -> int:
        """Delete the samples up to rowid `last` and store `entry` (action `store.prune`, its
        details naming `first` and `last`), in one transaction; answers how many went. The
        samples' chain entries stay: their hashes witness what was pruned."""
        first = self.pruned_upto() + 1
        if last < first:
            return 0
        details = {**entry.details, "first": str(first), "last": str(last)}
        with self._transaction("samples not pruned") as db:
            db.execute("DROP TRIGGER samples_no_delete")  # the one path that deletes samples
            gone = db.execute("DELETE FROM samples WHERE id BETWEEN ? AND ?", (first, last))
            db.execute(schema.SAMPLES_NO_DELETE)
            db.execute(
                "DELETE FROM sample_blocks WHERE block < ?", ((last + 1) >> schema.BLOCK_BITS,)
            )
            db.execute(_INSERT_AUDIT, AUDIT_ENTRY.row(replace(entry, details=details)))
            return int(gone.rowcount)

    def audit_of_action(self, action: str) -> list[AuditEntry]:
        rows = self._query(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE action = ? ORDER BY id", (action,)
        )
        return [AUDIT_ENTRY.from_row(r) for r in rows]

    def alarm_events(self, *, after: int = 0) -> list[AlarmEvent]:
        """Every alarm event after rowid `after`, in the order they were made."""
        return [event for _, event in self.alarm_events_after(after)]

    def alarm_events_after(
        self, after: int, *, upto: int | None = None, since: int | None = None
    ) -> list[tuple[int, AlarmEvent]]:
        """(rowid, event) of the alarm events after rowid `after` (up to rowid `upto`, and of
        time `since` or later, if given), in the order they were made."""
        sql = f"SELECT id, {_ALARM_EVENT_COLUMNS} FROM alarm_events WHERE id > ? AND id <= ?"
        sql += " AND t >= ? ORDER BY id"
        params = (after, upto if upto is not None else 2**63 - 1, since or 0)
        return [(int(r[0]), ALARM_EVENT.from_row(r[1:])) for r in self._query(sql, params)]

    # -- the notification outbox (schema v12) --------------------------------------------------

    def queue_notifications(
        self, rows: Sequence[Queued], *, sink: str, positions: Mapping[str, int]
    ) -> int:
        """Queue notifications, each once per channel (a row whose notification and channel
        are queued already is left out), and move `sink`'s cursors to `positions` (how far it
        routed), in one transaction. Answers how many were new."""
        return self._write(
            (
                "INSERT OR IGNORE INTO notifications "
                "(notification, channel, t, route, tier, via, item) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [tuple(r) for r in rows],
            ),
            (
                "INSERT INTO cursors (sink, stream, position) VALUES (?, ?, ?) "
                "ON CONFLICT (sink, stream) DO UPDATE SET position = excluded.position",
                [(sink, stream, position) for stream, position in positions.items()],
            ),
        )

    def queue_fallback(
        self, *, route: str, channel: str, fallback: str, after: int, made_before: int, t: int
    ) -> int:
        """Queue for `fallback` every notification of `route` on `channel` past its cursor
        position `after` that was made before `made_before`: the channel has not delivered it
        in time. Answers how many were new."""
        return self._write(
            (
                "INSERT OR IGNORE INTO notifications "
                "(notification, channel, t, route, tier, via, item) "
                "SELECT notification, ?, ?, route, tier, channel, item FROM notifications "
                "WHERE channel = ? AND route = ? AND id > ? AND t < ? ORDER BY id",
                [(fallback, t, channel, route, after, made_before)],
            ),
        )

    def notification_backlog(self, channel: str | None = None) -> dict[str, int]:
        """channel -> notifications queued for it past its cursor (for one channel or all)."""
        where, params = ("AND n.channel = ?", (channel,)) if channel is not None else ("", ())
        rows = self._query(
            "SELECT n.channel, count(*) FROM notifications n WHERE n.id > coalesce(("
            "SELECT position FROM cursors c WHERE c.sink = n.channel AND c.stream = 'events'"
            f"), 0) {where} GROUP BY n.channel",
            params,
        )
        return {str(c): int(n) for c, n in rows}

    def notification_head(self, channel: str) -> int:
        """The rowid of the newest notification queued for `channel`, 0 if none."""
        sql = "SELECT coalesce(max(id), 0) FROM notifications WHERE channel = ?"
        return int(self._query(sql, (channel,))[0][0])

    def notifications(
        self, channel: str | None = None, *, after: int = 0, limit: int = -1
    ) -> list[tuple[int, Queued]]:
        """(rowid, row) of the notifications queued after rowid `after`, for one channel or
        all, oldest first."""
        where, params = ("AND channel = ?", [channel]) if channel is not None else ("", [])
        rows = self._query(
            "SELECT id, notification, channel, t, route, tier, via, item FROM notifications "
            f"WHERE id > ? {where} ORDER BY id LIMIT ?",
            [after, *params, limit],
        )
        return [(int(r[0]), Queued(*r[1:])) for r in rows]

    def add_attempt(self, attempt: Attempt) -> None:
        """Store one delivery attempt."""
        self._write(
            (
                "INSERT INTO delivery_attempts (t, notification, channel, outcome, reason) "
                "VALUES (?, ?, ?, ?, ?)",
                [tuple(attempt)],
            ),
        )

    def attempts(self, notification: str | None = None) -> list[Attempt]:
        """The delivery attempts, of one notification or all, in the order they were made."""
        where, params = ("WHERE notification = ?", (notification,)) if notification else ("", ())
        rows = self._query(
            "SELECT t, notification, channel, outcome, reason FROM delivery_attempts "
            f"{where} ORDER BY id",
            params,
        )
        return [Attempt(*r) for r in rows]

    def _write(self, *statements: tuple[str, Sequence[Row]]) -> int:
        """Run each statement over its rows, all in one transaction; the rows changed by the
        first (not by its triggers)."""
        with self._transaction("not stored") as db:
            counts = [db.executemany(sql, rows).rowcount for sql, rows in statements]
        return counts[0]

    @contextlib.contextmanager
    def _transaction(self, failed: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises
        (a store error as StoreError, `failed` saying what was not done)."""
        with self._lock:
            self._check_open()
            if self.readonly:
                raise StoreError(f"{self.path}: store opened read-only, cannot write")
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"{self.path}: {failed}: {e}") from e
                raise

    def signatures(self, run_id: str | None = None) -> list[Signature]:
        """Every electronic signature, or those of one run, in the order they were made."""
        where, params = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        rows = self._query(
            f"SELECT {_SIGNATURE_COLUMNS} FROM signatures {where} ORDER BY id", params
        )
        return [SIGNATURE.from_row(r) for r in rows]

    def audit_of(self, action: str, target: str, *, after: int = 0) -> list[AuditEntry]:
        """The audit entries of `action` on `target` made after `after` (ns), oldest first."""
        sql = f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE action = ? AND target = ? AND t > ?"
        rows = self._query(f"{sql} ORDER BY id", (action, target, after))
        return [AUDIT_ENTRY.from_row(r) for r in rows]

    def signed_record(self, reference: str) -> Run | PhaseChange | AuditEntry | None:
        """The record a signature names (pocd.signatures.reference): `run:<id>`,
        `phase:<run id>:<t>` or `audit:<action>:<t>`; None if there is none."""
        kind, _, key = reference.partition(":")
        if kind == "run":
            rows = self._query(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (key,))
            return RUN.from_row(rows[0]) if rows else None
        head, _, t = key.rpartition(":")
        if not t.isdigit():
            return None
        if kind == "phase":
            sql = f"SELECT {_PHASE_COLUMNS} FROM phases WHERE run_id = ? AND t = ? ORDER BY id"
            rows = self._query(sql, (head, int(t)))
            return PHASE_CHANGE.from_row(rows[0]) if rows else None
        if kind == "audit":
            sql = f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE action = ? AND t = ? ORDER BY id"
            rows = self._query(sql, (head, int(t)))
            return AUDIT_ENTRY.from_row(rows[0]) if rows else None
        return None

    def users(self) -> list[User]:
        """Every user, disabled ones too, by login."""
        rows = self._query(f"SELECT {_USER_COLUMNS} FROM users ORDER BY login")
        return [USER.from_row(r) for r in rows]

    def user(self, login: str) -> User | None:
        rows = self._query(f"SELECT {_USER_COLUMNS} FROM users WHERE login = ?", (login,))
        return USER.from_row(rows[0]) if rows else None

    def protocol_text(self, digest: str) -> ProtocolText | None:
        """The protocol text kept under that hash, if any."""
        rows = self._query(
            "SELECT hash, id, version, text FROM protocols WHERE hash = ?", (digest,)
        )
        return ProtocolText(*rows[0]) if rows else None

    def loaded_file(self, digest: str) -> LoadedFile | None:
        """The config or driver file kept under that hash, if any."""
        rows = self._query(
            "SELECT hash, kind, name, text FROM loaded_files WHERE hash = ?", (digest,)
        )
        return LoadedFile(*rows[0]) if rows else None

    def site_status(self) -> SiteStatus:
        """The new value of the latest "site.status" audit entry; ACTIVE if there is none."""
        rows = self._query(
            "SELECT new_value FROM audit WHERE action = 'site.status' ORDER BY id DESC LIMIT 1"
        )
        if not rows:
            return SiteStatus.ACTIVE
        try:
            return SiteStatus(rows[0][0])
        except ValueError as e:
            raise StoreError(
                f"{self.path}: latest site.status audit entry has unknown status {rows[0][0]!r}"
            ) from e

    def samples(
        self,
        *,
        device: str | None = None,
        point: str | None = None,
        since: int | None = None,
        until: int | None = None,
        after_id: int = 0,
        limit: int | None = None,
    ) -> list[tuple[int, Sample]]:
        """(rowid, sample) in rowid order: rowid > after_id, since <= t < until, at most limit.

        A forwarder reads by cursor with after_id and limit. A time window scans only the
        rowid range of the blocks whose time range meets it, so it stays cheap however large
        the table grows (a clock jump back widens that range, never hides a sample).
        """
        where = ["id BETWEEN ? AND ?"]
        low, high = after_id + 1, _INT64_MAX
        params: list[object] = []
        if device is not None or point is not None:
            channels = self._matching_channels(device, point)
            if not channels:
                return []
            where.append(f"ch IN ({', '.join('?' * len(channels))})")
            params += channels
        if since is not None or until is not None:
            since = _INT64_MIN if since is None else since
            until = _INT64_MAX if until is None else until
            first, last = self._query(
                "SELECT min(block), max(block) FROM sample_blocks WHERE t_max >= ? AND t_min < ?",
                (since, until),
            )[0]
            if first is None:
                return []
            low = max(low, first << schema.BLOCK_BITS)
            high = ((last + 1) << schema.BLOCK_BITS) - 1
            where.append("t >= ? AND t < ?")
            params += [since, until]
        sql = f"SELECT id, ch, t, dt, v, q FROM samples WHERE {' AND '.join(where)} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._query(sql, [low, high, *params])
        with self._lock:
            if self._codes_stale or any(
                r[1] not in self._channels or r[5] not in self._qualities for r in rows
            ):
                self._load_codes()  # written by another connection since we loaded
                self._codes_stale = False
            channel_of = self._channels
            quality_of = self._qualities
        nan = math.nan
        found = []
        for rowid, ch, t, dt, v, q in rows:
            device_, point_, _, _ = channel_of[ch]
            quality, reason = quality_of[q]
            value = nan if v is None else v
            found.append((rowid, Sample(device_, point_, t, value, quality, dt, reason)))
        return found

    def _matching_channels(self, device: str | None, point: str | None) -> list[int]:
        with self._lock:
            self._check_open()
            for attempt in range(2):
                if attempt or self._codes_stale:
                    self._load_codes()  # perhaps added by another connection since
                    self._codes_stale = False
                found = [
                    code
                    for code, (d, p, _, _) in self._channels.items()
                    if (device is None or d == device) and (point is None or p == point)
                ]
                if found:
                    break
            return found

    def sample_count(self) -> int:
        """How many samples the store holds.

        max(rowid), which equals count(*) because rowids are assigned max+1 and samples are
        never deleted (but by a prune, which counts as if they were still there, and always
        keeps the latest), and costs one B-tree descent instead of a scan of the whole table.
        """
        return int(self._query("SELECT coalesce(max(id), 0) FROM samples")[0][0])

    def last_sample_times(self) -> dict[tuple[str, str], int]:
        """(device, point) -> t of its most recently stored sample."""
        # A point has a channel per parameter it fed (schema v4): the latest of them wins.
        rows = self._query(
            "SELECT c.device, c.point, l.t FROM channel_latest AS l "
            "JOIN channels AS c ON c.id = l.ch ORDER BY l.sample_id"
        )
        return {(device, point): t for device, point, t in rows}

    # -- forwarders (pocd.sinks): cursors, raw sample rows, the event log --------------------

    def sample_codes(self) -> tuple[dict[int, Channel], dict[int, tuple[Quality, str]]]:
        """The codes of `sample_rows`: channel -> (device, point, the parameter it fed or '',
        the one line it belonged to or ''), quality -> (quality, reason).

        Read afresh from the file, so codes another connection added since are included.
        """
        with self._lock:
            self._check_open()
            self._load_codes()
            self._codes_stale = False
            return dict(self._channels), dict(self._qualities)

    def sample_rows(self, first: int, last: int) -> list[SampleRow]:
        """The samples with rowid first..last, in rowid order, as the forwarders read them:
        (channel code << 32 | quality code, value or None for NaN, t as decimal text).

        The forwarders' hot path, shaped for it: three objects per row instead of a `Sample`
        (which costs more to build than to encode), one key for the channel and quality
        together (resolved by the caller through `sample_codes`, once per pair), and the time
        as the text every wire format writes, made by SQLite. Rowids have no gaps (a batch
        takes max+1 onwards and nothing is deleted), so row i is the sample with rowid
        first + i.
        """
        rows = self._query(
            f"SELECT ch << {SAMPLE_KEY_BITS} | q, v, CAST(t AS TEXT) FROM samples "
            "WHERE id BETWEEN ? AND ? ORDER BY id",
            (first, last),
        )
        return cast("list[SampleRow]", rows)

    def sample_time_range(self, first: int, last: int) -> tuple[int, int] | None:
        """(min t, max t) of the samples with rowid first..last; None if there are none."""
        low, high = self._query(
            "SELECT min(t), max(t) FROM samples WHERE id BETWEEN ? AND ?", (first, last)
        )[0]
        return None if low is None else (int(low), int(high))

    def sample_time(self, rowid: int) -> int | None:
        """The receive time of the sample with that rowid; None if there is none (yet)."""
        rows = self._query("SELECT t FROM samples WHERE id = ?", (rowid,))
        return int(rows[0][0]) if rows else None

    def commit_marks(
        self,
    ) -> tuple[list[tuple[Run, int, int | None]], list[tuple[PhaseChange, int]]]:
        """Where runs and phase changes fall in the samples' commit order (schema v4): every
        run with the rowid of the first sample committed after its start and after its end
        (None while it runs), every phase change with the rowid of the first sample committed
        after it; each in the order they were stored."""
        runs = self._query(
            f"SELECT {_RUN_COLUMNS}, first_sample, end_sample FROM runs ORDER BY rowid"
        )
        phases = self._query(f"SELECT {_PHASE_COLUMNS}, first_sample FROM phases ORDER BY id")
        return (
            [
                (RUN.from_row(r[:-2]), int(r[-2]), None if r[-1] is None else int(r[-1]))
                for r in runs
            ],
            [(PHASE_CHANGE.from_row(r[:-1]), int(r[-1])) for r in phases],
        )

    def event_count(self) -> int:
        """The id of the latest event (0 when there is none)."""
        return int(self._query("SELECT coalesce(max(id), 0) FROM events")[0][0])

    def events(self, after: int, limit: int) -> list[tuple[int, Event]]:
        """(event id, event) of up to `limit` events after event id `after`, in the order they
        were committed: the order of the batches, and within a batch the order of its records.

        Each event is the record as it was written (schema v7): a `Run` as it started
        (status running) or ended, an `ExcursionEvent` with its change, time and snapshot, a
        `PhaseChange`, a `Deviation` or an `AuditEntry`. Nothing is coalesced: an excursion
        that opened, worsened and closed is three events.
        """
        rows = self._query(
            "SELECT id, kind, ref FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
        )
        refs: dict[str, list[int]] = {}
        for _, kind, ref in rows:
            refs.setdefault(kind, []).append(int(ref))
        found: dict[tuple[str, int], Event] = {}
        for kind, keys in refs.items():
            for i in range(0, len(keys), _MOST_ROWS_PER_INSERT):
                found.update(self._events_of(kind, keys[i : i + _MOST_ROWS_PER_INSERT]))
        try:
            return [(int(event_id), found[(kind, int(ref))]) for event_id, kind, ref in rows]
        except KeyError as e:
            raise StoreError(f"{self.path}: event {e.args[0]} names no record") from None

    def _events_of(self, kind: str, keys: list[int]) -> dict[tuple[str, int], Event]:
        try:
            table, columns, make = _EVENT_SOURCES[kind]
        except KeyError:
            raise StoreError(f"{self.path}: event of unknown kind {kind!r}") from None
        rows = self._query(
            f"SELECT rowid, {columns} FROM {table} WHERE rowid IN ({', '.join('?' * len(keys))})",
            keys,
        )
        return {(kind, r[0]): make(r[1:]) for r in rows}

    def cursors(self, sink: str) -> dict[str, int]:
        """stream -> position of one sink's cursors; a stream never advanced is absent."""
        rows = self._query("SELECT stream, position FROM cursors WHERE sink = ?", (sink,))
        return {stream: int(position) for stream, position in rows}

    def advance_cursors(
        self,
        sink: str,
        positions: Mapping[str, int],
        incidents: Sequence[Incident] = (),
        *,
        audit: Sequence[AuditEntry] = (),
        expected: Mapping[str, int] | None = None,
    ) -> None:
        """Move a sink's cursors forward and store `incidents` with them, in one transaction.

        A sink calls this only for what the far side confirmed; the incidents are what it set
        aside on the way (a rejected point), so they cannot be lost while the cursor moves past
        them; `audit` is the operator action that moved them, if one did. StoreError, and
        nothing stored, if a cursor would move back, or if one is not where `expected` says
        (0 for never advanced): another process moved it meanwhile. Streams not in
        `positions` stay.
        """
        incident_rows = [INCIDENT.row(i) for i in incidents]
        audit_rows = [AUDIT_ENTRY.row(a) for a in audit]
        with self._lock:
            self._check_open()
            if self.readonly:
                raise StoreError(f"{self.path}: store opened read-only, cannot write")
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                current = dict(
                    db.execute(
                        "SELECT stream, position FROM cursors WHERE sink = ?", (sink,)
                    ).fetchall()
                )
                self._refuse_backwards(sink, current, positions)
                self._refuse_moved(sink, current, expected or {})
                db.executemany(
                    "INSERT INTO cursors (sink, stream, position) VALUES (?, ?, ?) "
                    "ON CONFLICT (sink, stream) DO UPDATE SET position = excluded.position",
                    [(sink, stream, position) for stream, position in positions.items()],
                )
                if incident_rows:
                    db.executemany(_INSERT_INCIDENT, incident_rows)
                if audit_rows:
                    db.executemany(_INSERT_AUDIT, audit_rows)
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StoreError(
                        f"{self.path}: cursors of sink {sink!r} not stored: {e}"
                    ) from e
                raise

    def _refuse_moved(
        self, sink: str, current: Mapping[str, int], expected: Mapping[str, int]
    ) -> None:
        moved = [
            f"{stream} is at {current.get(stream, 0)}, not {position}"
            for stream, position in expected.items()
            if current.get(stream, 0) != position
        ]
        if moved:
            raise StoreError(
                f"{self.path}: cursors of sink {sink!r} moved meanwhile: {', '.join(moved)}"
            )

    def _refuse_backwards(
        self, sink: str, current: Mapping[str, int], positions: Mapping[str, int]
    ) -> None:
        back = [
            f"{stream} {current[stream]} -> {position}"
            for stream, position in positions.items()
            if position < current.get(stream, position)
        ]
        if back:
            raise StoreError(
                f"{self.path}: cursors of sink {sink!r} cannot move back: {', '.join(back)}"
            )


def _sample_offsets(batch: list[Record]) -> list[int]:
    """For each run and phase change of the batch, in order: how many samples precede it."""
    offsets = []
    samples = 0
    for record in batch:
        kind = type(record)
        if kind is Sample:
            samples += 1
        elif kind in _MARKED:
            offsets.append(samples)
    return offsets


def _marked(params: list[Row], first: int) -> list[Row]:
    """Rows of run events or phases with their sample offsets made rowids (`first`: the rowid
    of the batch's first sample, or of the next sample if it holds none)."""
    return [(*p[:-1], first + p[-1]) for p in params]


def _other_rows(records: list[Record], offsets: list[int]) -> list[tuple[str, list[Row]]]:
    """The statements and parameter rows of every record that is not a sample, in the order
    of the batch (consecutive records of one type share a statement), so that the events
    they append (schema v7) keep the order the engine emitted them in. Run events and phase
    changes end with their sample offsets (see `_marked`), taken from `offsets`."""
    marks = iter(offsets)
    segments: list[tuple[str, list[Row]]] = []
    for record in records:
        sql, row = _statement_row(record, marks)
        if segments and segments[-1][0] == sql:
            segments[-1][1].append(row)
        else:
            segments.append((sql, [row]))
    return segments


def _statement_row(record: Record, marks: Iterator[int]) -> tuple[str, Row]:
    match record:
        case Run():
            return _INSERT_RUN_EVENT, (*RUN.row(record), next(marks))
        case PhaseChange():
            return _INSERT_PHASE, (*PHASE_CHANGE.row(record), next(marks))
        case ExcursionEvent(excursion=e):
            return _INSERT_EXCURSION_EVENT, (record.change.value, record.t, *EXCURSION.row(e))
        case Deviation():
            return _INSERT_DEVIATION, DEVIATION.row(record)
        case Incident():
            return _INSERT_INCIDENT, INCIDENT.row(record)
        case AuditEntry():
            return _INSERT_AUDIT, AUDIT_ENTRY.row(record)
        case LoadedFile():
            return _INSERT_LOADED_FILE, (record.hash, record.kind, record.name, record.text)
        case ProtocolText():
            return _INSERT_PROTOCOL, (record.hash, record.id, record.version, record.text)
        case Signature():
            return _INSERT_SIGNATURE, SIGNATURE.row(record)
        case AlarmEvent():
            return _INSERT_ALARM_EVENT, ALARM_EVENT.row(record)
        case DeviationChange():
            return _INSERT_DEVIATION_CHANGE, (
                record.deviation_id,
                record.t,
                record.actor,
                record.state.value,
                record.note,
                record.disposition,
                record.root_cause,
            )
        case User():
            return _INSERT_USER, USER.row(record)
        case UserChange(user=user):
            login, *rest = USER.row(user)
            return _UPDATE_USER, (*rest, login)
        case _:
            raise TypeError(f"Store.write cannot store a {type(record).__name__}")


def _latest_of_channels(channels: list[Any], times: list[Any], first_id: int) -> list[Row]:
    """(channel, rowid, t) of the last sample of each channel in a batch starting at first_id."""
    remaining = set(channels)
    found = []
    # From the end: with channels interleaved, each is met within a few steps.
    for i in range(len(channels) - 1, -1, -1):
        if channels[i] in remaining:
            remaining.discard(channels[i])
            found.append((channels[i], first_id + i, times[i]))
            if not remaining:
                break
    return found


def _block_ranges(times: list[Any], first_id: int) -> list[Row]:
    """(block, min t, max t) of each block of rowids a batch starting at first_id touches."""
    bits = schema.BLOCK_BITS
    last_id = first_id + len(times) - 1
    ranges = []
    for block in range(first_id >> bits, (last_id >> bits) + 1):
        low = max(first_id, block << bits) - first_id
        high = min(last_id, ((block + 1) << bits) - 1) - first_id + 1
        part = times[low:high]
        ranges.append((block, min(part), max(part)))
    return ranges
