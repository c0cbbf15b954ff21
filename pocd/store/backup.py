"""Backups of the live store (`pocd backup`) and their check (`pocd restore --check`).

A backup is SQLite's online backup of the store's file, taken in one step on a read
connection: with the store in WAL mode the daemon's writer goes on committing meanwhile, and the
copy is the snapshot of the moment the step began, so it holds every record committed before
it. The copy is written beside its destination and renamed into place when complete, in
rollback-journal mode so that it is one self-contained file. The check opens the backup alone,
read-only: SQLite's integrity check, the schema version, and the audit chain with its signed
checkpoints.

Must not: write to the live store (the caller audits the backup through the Store), or leave a
partial file under the backup's name.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from pocd.errors import StoreError
from pocd.store import chain
from pocd.store.schema import SCHEMA_VERSION

__all__ = ["BackupCheck", "Made", "check_backup", "make_backup"]


@dataclass(frozen=True, slots=True)
class Made:
    """A backup written: where, its size and sha256, and what it holds."""

    path: Path
    size: int
    sha256: str
    schema_version: int
    entries: int  # of the audit chain
    samples: int  # the highest sample rowid


def make_backup(store_path: Path, destination: Path) -> Made:
    """Back up the store at `store_path` into `destination` (a file, or a folder to hold
    `pocd-<UTC time>.sqlite`); StoreError if it cannot be read or written."""
    if destination.is_dir():
        destination = destination / time.strftime("pocd-%Y%m%dT%H%M%SZ.sqlite", time.gmtime())
    if destination.exists():
        raise StoreError(f"{destination}: already exists; a backup never replaces a file")
    if not store_path.exists():
        raise StoreError(f"{store_path}: no store to back up")
    partial = destination.with_name(destination.name + ".partial")
    try:
        source = sqlite3.connect(f"{store_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)  # pages=-1: one step, one snapshot
                copy.execute("PRAGMA journal_mode=DELETE")
                version, entries, samples = _contents(copy)
            finally:
                copy.close()
        finally:
            source.close()
        digest, size = _sha256(partial)
        partial.rename(destination)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"cannot back up {store_path} to {destination}: {exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return Made(destination, size, digest, version, entries, samples)


@dataclass(frozen=True, slots=True)
class BackupCheck:
    """What `check_backup` found."""

    path: str
    size: int
    sha256: str
    integrity: str  # SQLite's integrity_check: "ok" or its first problems
    schema_version: int
    chain: chain.ChainReport | None  # None when the file is not a store that can be walked
    problems: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.problems


def check_backup(path: Path, public_key: bytes | None) -> BackupCheck:
    """Check the backup at `path` without writing to it or touching any other store."""
    if not path.is_file():
        raise StoreError(f"{path}: no such backup file")
    digest, size = _sha256(path)
    problems: list[str] = []
    # immutable: nothing else writes the file, so SQLite needs no lock or -shm beside it.
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot be opened: {exc}") from None
    try:
        try:
            rows = db.execute("PRAGMA integrity_check(10)").fetchall()
            integrity = "; ".join(str(row[0]) for row in rows)
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            problem = f"not an SQLite database, or damaged: {exc}"
            return BackupCheck(str(path), size, digest, problem, 0, None, [problem])
        if integrity != "ok":
            problems.append(f"SQLite's integrity check: {integrity}")
        report = None
        if version != SCHEMA_VERSION:  # its tables are not the ones this pocd can walk
            problems.append(f"schema version {version}; this pocd reads {SCHEMA_VERSION}")
        else:
            try:
                report = chain.verify(db, public_key)
            except sqlite3.Error as exc:
                problems.append(f"the audit chain cannot be read: {exc}")
            else:
                problems += [f"audit chain: {p}" for p in report.problems]
    finally:
        db.close()
    return BackupCheck(str(path), size, digest, integrity, version, report, problems)


def _contents(db: sqlite3.Connection) -> tuple[int, int, int]:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    entries = int(db.execute("SELECT count(*) FROM chain").fetchone()[0])
    samples = int(db.execute("SELECT coalesce(max(id), 0) FROM samples").fetchone()[0])
    return version, entries, samples


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
