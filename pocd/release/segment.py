"""A run's segment of the store's chain, as `audit.jsonl` in its bundle, and its offline check.

The segment runs from the chain entry of the run's start to the last entry of a signed
checkpoint made at the export. Its first line names the hash of the entry before it (so the
segment links into the whole chain, which the site and the control site hold); then come the
checkpoints within it, whose signatures (by the site key) and heads must match (first, so a
check keeps only the hashes they name); then each entry with the row it covers, so the
verifier recomputes every record's digest and every link. An edited, deleted, inserted or
reordered line breaks a link or a digest.

Rows are shown as stored, except a user's password hash: a user entry carries its digest
only. An entry of a row changed in place later (users) has no row either: only the latest
entry of such a row can be recomputed from the store.

Must not: show a password hash.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

from pocd.sitekey import verify_signature
from pocd.store.chain import CHAINED, UPDATED, checkpoint_note, digest_shown, link, shown_row
from pocd.store.recordtypes import AUDIT_ENTRY, iso

__all__ = ["SegmentReport", "verify_segment", "write_segment"]

_WITHHELD: Final = frozenset({"users"})  # rows never shown (a password hash)
_ROWS_PER_QUERY: Final = 500


@dataclass(slots=True)
class SegmentReport:
    first: int = 0
    last: int = 0
    entries: int = 0
    rows: int = 0  # entries whose row was recomputed
    checkpoints: int = 0
    checkpoint: dict[str, Any] = field(default_factory=dict)  # the last one
    problems: list[str] = field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {
            "verified": not self.problems,
            "first": self.first,
            "last": self.last,
            "entries": self.entries,
            "rows": self.rows,
            "checkpoints": self.checkpoints,
            "checkpoint": self.checkpoint,
            "problems": self.problems,
        }


def _rows(db: sqlite3.Connection, table: str, keys: list[str]) -> dict[str, list[object]]:
    column, columns = CHAINED[table]
    found: dict[str, list[object]] = {}
    for i in range(0, len(keys), _ROWS_PER_QUERY):
        part = keys[i : i + _ROWS_PER_QUERY]
        rows = db.execute(
            f"SELECT {column}, {', '.join(columns)} FROM {table} "
            f"WHERE {column} IN ({', '.join('?' * len(part))})",
            part,
        )
        found.update((str(r[0]), shown_row(*r[1:])) for r in rows)
    return found


def _entries(db: sqlite3.Connection, first: int, last: int) -> Iterator[dict[str, Any]]:
    """The segment's entries, each with its row, a thousand entries' rows per lookup."""
    step = 1000
    for low in range(first, last + 1, step):
        batch = db.execute(
            "SELECT id, kind, ref, digest, hash FROM chain WHERE id BETWEEN ? AND ? ORDER BY id",
            (low, min(last, low + step - 1)),
        ).fetchall()
        wanted: dict[str, list[str]] = {}
        for _, kind, ref, _, _ in batch:
            if kind in CHAINED and kind not in _WITHHELD:
                wanted.setdefault(kind, []).append(ref)
        rows = {table: _rows(db, table, refs) for table, refs in wanted.items()}
        for entry, kind, ref, digest, hashed in batch:
            line: dict[str, Any] = {
                "type": "entry",
                "id": entry,
                "kind": kind,
                "ref": ref,
                "digest": digest,
                "hash": hashed,
            }
            row = rows.get(kind, {}).get(ref)
            if kind in _WITHHELD or (
                kind in UPDATED and row is not None and digest_shown(row) != digest
            ):
                line["row"] = None  # withheld, or changed since: its digest is the evidence
            elif row is not None:  # shown even if edited since: the check then says so
                line["row"] = row
                if kind == "audit":
                    line["record"] = AUDIT_ENTRY.json(AUDIT_ENTRY.from_row(row[1:]))
            yield line  # a row missing from the store is missing here: the check says so


def write_segment(db: sqlite3.Connection, first: int, out: IO[str]) -> SegmentReport:
    """Write the chain from entry `first` to the last checkpoint as JSON lines; answers what
    it wrote, checked as `verify_segment` would (line by line as written: a segment of a long
    run is never held in memory)."""
    (last,) = db.execute("SELECT max(size) FROM checkpoints").fetchone()
    if last is None or last < first:
        raise ValueError("no checkpoint covers the segment: make one first")
    before = db.execute("SELECT hash FROM chain WHERE id = ?", (first - 1,)).fetchone()
    checker = _Checker(None)

    def emit(obj: dict[str, Any]) -> None:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        out.write(text + "\n")
        checker.feed(text)

    emit(
        {
            "type": "segment",
            "format": "pocd-audit-segment/1",
            "first": first,
            "last": last,
            "previous": before[0] if before else None,
        }
    )
    # the checkpoints before the entries: the check then keeps only the hashes they name
    for number, t, size, head, note, signature, signer in db.execute(
        "SELECT id, t, size, hash, note, signature, key_id FROM checkpoints "
        "WHERE size BETWEEN ? AND ? ORDER BY id",
        (first, last),
    ).fetchall():
        emit(
            {
                "type": "checkpoint",
                "number": number,
                "t_ns": t,
                "size": size,
                "hash": head,
                "note": bytes(note).decode(),
                "signature": base64.b64encode(signature).decode(),
                "key_id": signer,
            }
        )
    for entry in _entries(db, first, last):
        emit(entry)
    return checker.finish()


def verify_segment(lines: Iterable[str | bytes], site_key: bytes | None) -> SegmentReport:
    """Check a segment's links, rows and checkpoints (their signatures with `site_key`, if
    given). Every problem names the line."""
    checker = _Checker(site_key)
    for raw in lines:
        checker.feed(raw)
    return checker.finish()


class _Checker:
    """The check of a segment fed line by line: the header, the checkpoints, the entries."""

    def __init__(self, site_key: bytes | None) -> None:
        self.site_key = site_key
        self.report = SegmentReport()
        self.number = 0  # lines fed
        self.previous: str | None = None  # the hash of the entry before
        self.expected = 0  # the id of the next entry
        self.header_seen = False
        self.stopped = False
        # size -> the checkpoints of that size, each with its line, until that entry is read
        self.pending: dict[int, list[tuple[dict[str, Any], int]]] = {}

    def feed(self, raw: str | bytes) -> None:
        self.number += 1
        report, number = self.report, self.number
        if self.stopped:
            return
        try:
            obj = json.loads(raw)
            kind = obj["type"]
        except (ValueError, KeyError, TypeError):
            report.problems.append(f"audit.jsonl line {number}: not a segment line")
            return
        if kind == "segment" and not self.header_seen and number == 1:
            self.header_seen = True
            report.first, report.last = int(obj["first"]), int(obj["last"])
            self.previous, self.expected = obj["previous"], report.first
        elif not self.header_seen:
            report.problems.append(f"audit.jsonl line {number}: the segment's header is missing")
            self.stopped = True
        elif kind == "entry":
            _check_entry(obj, number, self.previous, self.expected, report)
            self.previous, self.expected = obj.get("hash"), int(obj.get("id", self.expected)) + 1
            for checkpoint, line in self.pending.pop(self.expected - 1, []):
                _check_checkpoint(checkpoint, line, self.previous, self.site_key, report)
        elif kind == "checkpoint":
            _read_checkpoint(obj, report)
            try:
                self.pending.setdefault(int(obj["size"]), []).append((obj, number))
            except (KeyError, ValueError, TypeError):
                report.problems.append(f"audit.jsonl line {number}: an unreadable checkpoint")
        else:
            report.problems.append(f"audit.jsonl line {number}: unknown line type {kind!r}")

    def finish(self) -> SegmentReport:
        report = self.report
        if not self.header_seen:
            if not report.problems:
                report.problems.append("audit.jsonl: empty, or no segment header")
            return report
        if self.expected != report.last + 1:
            report.problems.append(
                f"audit.jsonl: the segment ends at entry {self.expected - 1}, its header says "
                f"{report.last}: entries were cut off or added"
            )
        for size, checkpoints in sorted(self.pending.items()):
            report.problems += [
                f"audit.jsonl line {line} (checkpoint {c.get('number')}): entry {size} of the "
                "segment is not the one it signed (it is not there)"
                for c, line in checkpoints
            ]
        if not report.checkpoints:
            report.problems.append("audit.jsonl: no signed checkpoint covers the segment")
        return report


def _check_entry(
    obj: dict[str, Any], number: int, previous: str | None, expected: int, report: SegmentReport
) -> None:
    problems = report.problems
    report.entries += 1
    where = f"audit.jsonl line {number} (entry {obj.get('id')}, {obj.get('kind')} {obj.get('ref')})"
    try:
        entry, kind, ref, digest, hashed = (obj[k] for k in ("id", "kind", "ref", "digest", "hash"))
    except KeyError as exc:
        problems.append(f"{where}: no {exc.args[0]}")
        return
    if entry != expected:
        problems.append(f"{where}: expected entry {expected} here: entries deleted or reordered")
    if link(previous, kind, ref, digest) != hashed:
        problems.append(f"{where}: does not link to the line before it (edited, or inserted)")
    row = obj.get("row")
    if kind in CHAINED and "row" not in obj:
        problems.append(f"{where}: its row was not in the store (deleted)")
    elif row is not None:
        report.rows += 1
        if digest_shown(row) != digest:
            problems.append(f"{where}: its row differs from what was recorded (edited)")
        elif kind == "audit" and obj.get("record") != AUDIT_ENTRY.json(
            AUDIT_ENTRY.from_row(row[1:])
        ):
            problems.append(f"{where}: its record does not show its row (edited)")


def _read_checkpoint(obj: dict[str, Any], report: SegmentReport) -> None:
    """Count a checkpoint; the last read is the segment's (they come in the order made)."""
    report.checkpoints += 1
    # as signed statements hold it: canonical JSON (RFC 8785) has no integers beyond 2**53
    report.checkpoint = {k: obj.get(k) for k in ("number", "size", "hash", "key_id")}
    report.checkpoint["t"] = iso(obj["t_ns"]) if isinstance(obj.get("t_ns"), int) else None


def _check_checkpoint(
    obj: dict[str, Any],
    number: int,
    entry_hash: str | None,
    site_key: bytes | None,
    report: SegmentReport,
) -> None:
    """A checkpoint against the entry of its size, read just now."""
    where = f"audit.jsonl line {number} (checkpoint {obj.get('number')})"
    try:
        size, head, note = int(obj["size"]), str(obj["hash"]), str(obj["note"]).encode()
        signature = base64.b64decode(obj["signature"], validate=True)
    except (KeyError, ValueError, TypeError):
        report.problems.append(f"{where}: unreadable")
        return
    origin = note.split(b"\n", 1)[0].decode(errors="replace")
    if note != checkpoint_note(origin, size, head):
        report.problems.append(f"{where}: its note does not state its size and hash")
    if entry_hash != head:
        report.problems.append(f"{where}: entry {size} of the segment is not the one it signed")
    if site_key is not None and not verify_signature(site_key, note, signature):
        report.problems.append(f"{where}: its signature does not verify with the site key")
