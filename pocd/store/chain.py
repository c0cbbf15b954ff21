"""The tamper-evident chain of the store (schema v13): every record appended to a chained table,
and every committed batch of samples, adds an entry holding the SHA-256 of what it covers and
the hash linking it to the entry before (a hash chain, as in Certificate Transparency logs).
An edited, deleted or inserted record, or an edited sample, no longer matches its entry; a
deleted or inserted entry breaks the links after it.

The entries are made in the transaction that appends the records: by triggers for the records
(which call `digest_row` and `link` through the SQL functions `register` gives the writing
connection; a connection without them cannot append to a chained table at all), and by the
store for samples (`digest_samples`, one entry per batch). `verify` walks the chain.

One module: what makes the chain and what checks it must change together, or not at all.

Must not: change the store; ever change how a digest or link is computed (stored chains would
no longer verify).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sqlite3
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pocd.sitekey import verify_signature

__all__ = [
    "CHAINED",
    "LATER_CHAINED",
    "ChainReport",
    "checkpoint_note",
    "digest_row",
    "digest_samples",
    "digest_shown",
    "link",
    "pruned_upto",
    "register",
    "seed",
    "shown_row",
    "verify",
]

# The chained tables: name -> (key column, the columns digested, in order). Fixed once chained:
# a table added later gets its own migration, its entry here and in LATER_CHAINED.
CHAINED: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "channels": ("id", ("id", "device", "point", "parameter", "line")),
    "qualities": ("id", ("id", "quality", "reason")),
    "run_events": (
        "id",
        (
            "id",
            "run_id",
            "batch_id",
            "site_id",
            "timezone",
            "protocol_id",
            "protocol_version",
            "protocol_hash",
            "operator",
            "started",
            "status",
            "ended",
            "end_reason",
            "line",
            "sample",
        ),
    ),
    "phases": (
        "id",
        ("id", "run_id", "t", "phase", "previous", "actor", "in_order", "reason", "first_sample"),
    ),
    "excursion_events": (
        "id",
        (
            "id",
            "change",
            "t",
            "excursion_id",
            "run_id",
            "parameter",
            "kind",
            "protocol_id",
            "protocol_version",
            "phase",
            "limit_value",
            "start_t",
            "end_t",
            "worst",
            "integral",
            "line",
        ),
    ),
    "deviations": (
        "id",
        ("id", "run_id", "t", "cause", "phase", "description", "parameter", "excursion_id", "line"),
    ),
    "incidents": ("id", ("id", "t", "kind", "code", "source", "message", "raw")),
    "audit": (
        "id",
        ("id", "t", "actor", "action", "target", "reason", "old_value", "new_value", "details"),
    ),
    "protocols": ("hash", ("hash", "id", "version", "text")),
    "users": (
        "login",
        ("login", "name", "roles", "password_hash", "disabled", "created", "changed"),
    ),
    "signatures": (
        "id",
        (
            "id",
            "t",
            "utc_offset",
            "login",
            "name",
            "meaning",
            "action",
            "record",
            "record_hash",
            "run_id",
        ),
    ),
    "alarm_events": (
        "id",
        (
            "id",
            "t",
            "alarm_id",
            "line",
            "source",
            "kind",
            "transition",
            "state",
            "priority",
            "began",
            "actor",
            "comment",
            "until_t",
            "run_id",
            "batch_id",
            "phase",
            "device",
            "value",
            "limit_value",
            "unit",
            "first_out",
        ),
    ),
    "notifications": (
        "id",
        ("id", "notification", "channel", "t", "route", "tier", "via", "item"),
    ),
    "delivery_attempts": ("id", ("id", "t", "notification", "channel", "outcome", "reason")),
    "deviation_changes": (
        "id",
        ("id", "deviation_id", "t", "actor", "state", "note", "disposition", "root_cause"),
    ),
    "loaded_files": ("hash", ("hash", "kind", "name", "text")),
}
# The tables chained by a migration after v13, which made the chain (and chains the others).
LATER_CHAINED: Final = ("deviation_changes", "loaded_files")
# Tables whose rows change in place (a user's roles): each change is an entry of its own.
UPDATED: Final = ("users",)
_NONE: Final = -(2**63)  # a sample without a device time, in its digest
_SEED_BATCH: Final = 65_536  # samples per entry when a store older than the chain is chained


def _sha(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def shown_row(*values: object) -> list[object]:
    """One row's values as SQLite holds them (int, float, text, bytes, NULL) as JSON values:
    bytes as {"hex": ...}. What `digest_row` digests, and what an export shows of the row."""
    return [{"hex": v.hex()} if isinstance(v, bytes) else v for v in values]


def digest_shown(shown: list[object]) -> str:
    return _sha(json.dumps(shown, ensure_ascii=False, separators=(",", ":")).encode())


def digest_row(*values: object) -> str:
    """The SHA-256 of one row's values as SQLite holds them."""
    return digest_shown(shown_row(*values))


def digest_samples(
    ch: Sequence[int],
    t: Sequence[int],
    dt: Sequence[int | None],
    v: Sequence[float],
    q: Sequence[int],
) -> str:
    """The SHA-256 of a batch of samples, column by column. Every NaN has one form, and a
    missing device time one value, so the stored rows (a NaN stored as NULL, read back as
    NaN) give the digest the written ones gave."""
    nan = math.nan
    h = hashlib.sha256()
    h.update(array("q", ch).tobytes())
    h.update(array("q", t).tobytes())
    h.update(array("q", [_NONE if x is None else x for x in dt]).tobytes())
    # x == x is False for NaN only;
    # measured twice as fast as math.isnan on the write path
    h.update(array("d", [x if x == x else nan for x in v]).tobytes())  # noqa: PLR0124
    h.update(array("q", q).tobytes())
    return h.hexdigest()


def link(previous: str | None, kind: str, ref: object, digest: str) -> str:
    """The hash of an entry: what it covers, linked to the entry before (None: the first)."""
    return _sha(f"{previous or ''}|{kind}|{ref}|{digest}".encode())


def checkpoint_note(origin: str, size: int, head: str) -> bytes:
    """The text a checkpoint signs, in the C2SP checkpoint form: the log's origin, its size
    (entries) and the hash of its last entry, base64."""
    root = base64.b64encode(bytes.fromhex(head)).decode()
    return f"{origin}\n{size}\n{root}\n".encode()


def register(db: sqlite3.Connection) -> None:
    """Give a writing connection the SQL functions the chain's triggers call."""
    db.create_function("pocd_digest", -1, digest_row, deterministic=True)
    db.create_function("pocd_link", 4, link, deterministic=True)


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What `verify` found: the entries and what they cover, and every problem."""

    entries: int
    records: int
    samples: int
    checkpoints: int
    problems: list[str]

    @property
    def holds(self) -> bool:
        return not self.problems


def verify(db: sqlite3.Connection, public_key: bytes | None = None) -> ChainReport:
    """Walk the chain of the store open on `db` (read-only will do), and check each signed
    checkpoint against it; with the site's `public_key`, its signature too."""
    problems: list[str] = []
    previous: str | None = None
    covered: dict[str, set[str]] = {table: set() for table in CHAINED}
    latest: dict[tuple[str, str], str] = {}  # (table, key) -> the digest of its latest entry
    sample_ranges: list[tuple[int, int, str, int]] = []
    entries = 0
    rows = db.execute("SELECT id, kind, ref, digest, hash FROM chain ORDER BY id")
    for entry, kind, ref, digest, stored in rows:
        entries += 1
        if link(previous, kind, ref, digest) != stored:
            problems.append(
                f"chain entry {entry} ({kind} {ref}) does not follow the entry before it: an "
                "entry was removed, inserted or edited there"
            )
        previous = stored
        if kind == "samples":
            first, _, last = ref.partition("..")
            sample_ranges.append((int(first), int(last), digest, entry))
        elif kind in CHAINED:
            covered[kind].add(ref)
            latest[kind, ref] = digest
        else:
            problems.append(f"chain entry {entry}: unknown kind {kind!r}")
    for (table, key), digest in latest.items():
        column, columns = CHAINED[table]
        found = db.execute(
            # the key as text: the column's affinity makes it the stored key again
            f"SELECT {', '.join(columns)} FROM {table} WHERE {column} = ?",
            (key,),
        ).fetchone()
        if found is None:
            problems.append(f"{table} row {key} is gone (deleted since it was recorded)")
        elif digest_row(*found) != digest:
            problems.append(f"{table} row {key} differs from what was recorded (edited)")
    records = 0
    for table, (column, _) in CHAINED.items():
        keys = [str(k) for (k,) in db.execute(f"SELECT {column} FROM {table}")]
        records += len(keys)
        problems += [
            f"{table} row {key} is not in the chain (inserted around it)"
            for key in keys
            if key not in covered[table]
        ]
    samples = _verify_samples(db, sample_ranges, problems)
    checkpoints = _verify_checkpoints(db, entries, public_key, problems)
    return ChainReport(entries, records, samples, checkpoints, problems)


def _verify_checkpoints(
    db: sqlite3.Connection,
    entries: int,
    public_key: bytes | None,
    problems: list[str],
) -> int:
    """Each checkpoint must name an entry the chain still has, with the same hash, and (given
    the key) carry a good signature of its note. Answers how many there are."""
    rows = db.execute(
        "SELECT id, size, hash, note, signature, key_id FROM checkpoints ORDER BY id"
    ).fetchall()
    for number, size, head, note, signature, signer in rows:
        what = f"checkpoint {number} (size {size})"
        if public_key is not None and not verify_signature(public_key, note, signature):
            problems.append(f"{what}: its signature does not verify with key {signer}")
        if size > entries:
            problems.append(
                f"{what}: the chain has only {entries} entries: the entries after "
                f"{entries} were cut off (truncated)"
            )
            continue
        found = db.execute("SELECT hash FROM chain ORDER BY id LIMIT 1 OFFSET ?", (size - 1,))
        (at,) = found.fetchone()
        if at != head:
            problems.append(f"{what}: the chain's entry {size} is not the one it signed")
    return len(rows)


def pruned_upto(db: sqlite3.Connection) -> int:
    """The last sample rowid pruned, 0 if none was: what the latest `store.prune` audit entry
    says (chained, so a prune cannot be claimed afterwards)."""
    row = db.execute(
        "SELECT details FROM audit WHERE action = 'store.prune' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return int(json.loads(row[0])["last"]) if row else 0


def _verify_samples(
    db: sqlite3.Connection, ranges: list[tuple[int, int, str, int]], problems: list[str]
) -> int:
    """Check each batch's digest, and that the batches cover every sample. Answers how many
    samples they cover. A batch pruned is left with its hash: nothing to check it against."""
    count = db.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0]
    pruned = pruned_upto(db)
    expected = 1
    for first, last, digest, entry in ranges:
        if first != expected:
            problems.append(f"chain entry {entry}: samples {expected}..{first - 1} are in no batch")
        expected = last + 1
        if last <= pruned:
            continue
        cols = _sample_columns(db, first, last)
        if cols is None:
            found = db.execute(
                "SELECT count(*) FROM samples WHERE id BETWEEN ? AND ?", (first, last)
            ).fetchone()[0]
            problems.append(f"samples {first}..{last}: {last - first + 1 - found} deleted")
        elif digest_samples(*cols) != digest:
            problems.append(f"samples {first}..{last} differ from what was recorded (edited)")
    if expected <= count:
        problems.append(f"samples {expected}..{count} are not in the chain (inserted)")
    return expected - 1


def _sample_columns(
    db: sqlite3.Connection, first: int, last: int
) -> tuple[list[int], list[int], list[int | None], list[float], list[int]] | None:
    """The columns of samples first..last as stored (NaN for NULL), None if any is missing."""
    rows = db.execute(
        "SELECT id, ch, t, dt, v, q FROM samples WHERE id BETWEEN ? AND ? ORDER BY id",
        (first, last),
    ).fetchall()
    if len(rows) != last - first + 1:
        return None
    nan = math.nan
    return (
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [nan if r[4] is None else r[4] for r in rows],  # a NaN is stored as NULL
        [r[5] for r in rows],
    )


def seed(db: sqlite3.Connection) -> None:
    """Chain what a store held before it had a chain (the v13 migration, in its transaction):
    every row of the chained tables, then the samples in batches."""
    previous: str | None = None

    def append(kind: str, ref: str, digest: str) -> None:
        nonlocal previous
        previous = link(previous, kind, ref, digest)
        db.execute(
            "INSERT INTO chain (kind, ref, digest, hash) VALUES (?, ?, ?, ?)",
            (kind, ref, digest, previous),
        )

    for table, (key, columns) in CHAINED.items():
        if table in LATER_CHAINED:
            continue  # made after the chain, chained from its start
        rows = db.execute(f"SELECT {key}, {', '.join(columns)} FROM {table} ORDER BY {key}")
        for row in rows.fetchall():
            append(table, str(row[0]), digest_row(*row[1:]))
    count = db.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0]
    for first in range(1, count + 1, _SEED_BATCH):
        last = min(count, first + _SEED_BATCH - 1)
        cols = _sample_columns(db, first, last)
        if cols is None:
            raise sqlite3.DatabaseError(f"samples {first}..{last}: some rowids are missing")
        append("samples", f"{first}..{last}", digest_samples(*cols))
