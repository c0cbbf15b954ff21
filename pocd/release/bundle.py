"""`pocd export`: a finished run as its batch-release record, a BagIt bag (RFC 8493) that any
archive's BagIt tool validates, with a zip of it beside.

The payload (`data/`) holds the run (run.json), the protocol, site config and driver files,
the samples (Parquet and gzipped CSV), every record of the run (excursions, deviations with
their lifecycle, alarm events, incidents, e-signatures), the run's segment of the store's
chain (audit.jsonl) with its check (chain.json), the gaps (gaps.csv), the exception summary
(exceptions.json) and report.pdf, rendered from those files. The site attests the payload: an
in-toto statement in a DSSE envelope (attestation.dsse.json, a tag file) whose subjects are
every payload file with its SHA-256, signed with the site key. People sign the bag later
(`pocd sign`), in `signatures/`, without changing any file it covers.

The bag is built in `<DIR>.partial` and renamed when complete: a failed export leaves no bag.
Some 600 lines in one module: the steps of one export, in order (the samples, the report,
the verification and signing are modules of their own).

Must not: export a run in progress; hash a payload file twice (bagit's manifest gives the
attestation's digests); hold the samples in memory.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

import bagit

from pocd.errors import PocdError
from pocd.model import (
    AlarmEvent,
    AuditEntry,
    Excursion,
    Incident,
    LoadedFile,
    PhaseChange,
    Run,
    RunStatus,
    now_ns,
)
from pocd.protocol import Protocol
from pocd.records import deviation_json
from pocd.release.attest import ATTESTATION_TYPE, seal, statement
from pocd.release.charts import Charts
from pocd.release.exceptions import GAP_COLUMNS, Gap, exception_classes, find_gaps, gap_row
from pocd.release.report import write_report
from pocd.release.samples import write_samples
from pocd.release.segment import SegmentReport, write_segment
from pocd.settings import Site, protocol_from_text
from pocd.signatures import verify as signature_intact
from pocd.sitekey import SiteKey
from pocd.store import Store
from pocd.store.chain import pruned_upto
from pocd.store.recordtypes import (
    ALARM_EVENT,
    EXCURSION,
    INCIDENT,
    PHASE_CHANGE,
    RUN,
    SIGNATURE,
    iso,
)
from pocd.store.schema import BLOCK_BITS
from pocd.transports import Device

__all__ = ["ATTESTATION", "ExportError", "Exported", "export"]

FORMAT: Final = "pocd-release/1"
ATTESTATION: Final = "attestation.dsse.json"
SIGNATURES: Final = "signatures"
# Already compressed: stored as they are in the zip.
_STORED: Final = (".parquet", ".gz", ".pdf", ".png")

Progress = Callable[[str, int, int | None], None]  # (stage, done, total or None)


class ExportError(PocdError):
    """The run cannot be exported (unknown, still running, a folder in the way); the message
    says which."""


@dataclass(frozen=True, slots=True)
class Exported:
    bag: Path
    zip: Path
    samples: int
    attestation_sha256: str
    exceptions: int  # records over all exception classes


def _quiet(stage: str, done: int, total: int | None) -> None:
    pass


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _readonly(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)


def _limits_json(protocol: Protocol) -> dict[str, dict[str, dict[str, Any]]]:
    keys = (
        "alert_low",
        "alert_high",
        "action_low",
        "action_high",
        "max_data_loss",
        "stale_after",
        "monitored",
    )
    return {
        phase.id: {
            name: {k: getattr(limits, k) for k in keys} for name, limits in phase.limits.items()
        }
        for phase in protocol.phases
    }


def _downtimes(
    db: sqlite3.Connection, audit: list[AuditEntry], start: int, end: int
) -> list[tuple[int, int]]:
    """(last sample stored before, restart) of every daemon restart within the run: the
    latest receive time before it in the last two blocks of samples that began before it."""
    found = []
    for entry in audit:
        if entry.action == "config.load" and start < entry.t <= end:
            (block,) = db.execute(
                "SELECT max(block) FROM sample_blocks WHERE t_min < ?", (entry.t,)
            ).fetchone()
            last = None
            if block is not None:
                (last,) = db.execute(
                    "SELECT max(t) FROM samples WHERE id BETWEEN ? AND ? AND t < ?",
                    (max(block - 1, 0) << BLOCK_BITS, ((block + 1) << BLOCK_BITS) - 1, entry.t),
                ).fetchone()
            found.append((max(int(last), start) if last is not None else start, entry.t))
    return found


@dataclass(frozen=True, slots=True)
class _Records:
    """What the store holds of a run, read at the export (after a fresh checkpoint)."""

    run: Run
    end: int  # the run's end
    protocol: Protocol | None
    protocol_text: str
    phases: list[PhaseChange]
    excursions: list[Excursion]
    deviations: list[dict[str, Any]]  # with their lifecycle
    alarms: list[AlarmEvent]
    incidents: list[Incident]
    audit: list[AuditEntry]
    signatures: list[dict[str, Any]]  # with whether each is intact
    files: list[_File]  # the site config and the drivers of the run's line


@dataclass(frozen=True, slots=True)
class _File:
    """A site config or driver file of the run: the one in force at its end, as the store
    kept it when the daemon loaded it; or, from a store older than that (schema v17), the file
    as it is now, which says whether it is the one in force."""

    kind: str  # config or driver
    name: str  # its path in the bag
    in_force: str | None  # the hash audited at its last load before the run's end
    now: str  # the hash of the file as it is now
    kept: LoadedFile | None
    current: Path

    def json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "file": self.name,
            "hash_in_force": self.in_force,
            "hash_now": self.now,
            "from": "the store, as loaded" if self.kept else "the file as it is now",
            "as_in_force": self.kept is not None or self.in_force == self.now,
        }

    def write(self, data: Path) -> None:
        target = data / self.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.kept is not None:
            target.write_text(self.kept.text, encoding="utf-8")
        elif self.current.is_file():
            shutil.copyfile(self.current, target)


def _files(site: Site, run: Run, audit: list[AuditEntry], end: int, store: Store) -> list[_File]:
    def in_force(actions: tuple[str, ...], target: str | None) -> str | None:
        loads = [
            a.new
            for a in audit
            if a.t <= end and a.action in actions and (target is None or a.target == target)
        ]
        return loads[-1] if loads else None

    def made(kind: str, name: str, hashed: str | None, now: str, current: Path) -> _File:
        kept = store.loaded_file(hashed) if hashed else None
        return _File(kind, name, hashed, now, kept, current)

    config = in_force(("config.load", "config.reload"), None)
    drivers = {d.driver.id: d.driver for d in _line_devices(site, run)}
    return [
        made("config", f"config/{site.path.name}", config, site.config_hash, site.path),
        *(
            made(
                "driver",
                f"config/drivers/{Path(d.source).name}",
                in_force(("driver.load",), d.id),
                d.hash,
                Path(d.source),
            )
            for _, d in sorted(drivers.items())
        ),
    ]


def _gather(site: Site, run_key: str, key: SiteKey) -> _Records:
    with Store(site.store_path) as store:
        run = store.run(run_key)
        if run is None:
            raise ExportError(f"{site.store_path}: no run {run_key!r}")
        if run.status is RunStatus.RUNNING:
            raise ExportError(
                f"run {run.id} (batch {run.batch_id}) is still running: stop it first"
            )
        stored = store.protocol_text(run.protocol_hash)
        store.checkpoint(f"pocd/{site.id}", key.sign, key.id, now_ns())
        end = run.ended or now_ns()
        audit = store.audit()
        return _Records(
            run=run,
            end=end,
            protocol=protocol_from_text(stored.text, f"store:{run.protocol_hash[:12]}")
            if stored
            else None,
            protocol_text=stored.text if stored else "",
            phases=store.phases(run.id),
            excursions=store.excursions(run.id),
            deviations=[deviation_json(store, d) for d in store.deviations(run.id)],
            alarms=[
                e
                for _, e in store.alarm_events_after(0, since=run.started)
                if e.run_id == run.id or (e.line == run.line and e.t <= end)
            ],
            incidents=[i for i in store.incidents(run.started) if i.t <= end],
            audit=audit,
            signatures=[
                {**SIGNATURE.json(s), "intact": signature_intact(store, s)}
                for s in store.signatures(run.id)
            ],
            files=_files(site, run, audit, end, store),
        )


def _write_data(
    db: sqlite3.Connection, site: Site, records: _Records, data: Path, progress: Progress
) -> tuple[int, SegmentReport, list[Gap], Charts]:
    """The samples, the audit segment and the gaps; answers them with the charts' data."""
    run, protocol = records.run, records.protocol
    first, end_sample = db.execute(
        "SELECT first_sample, end_sample FROM runs WHERE id = ?", (run.id,)
    ).fetchone()
    if first is not None and first <= pruned_upto(db):
        raise ExportError(f"run {run.id}: its samples were pruned (after its release)")
    # a device several lines share has channels of no line (''): the line's own are its too
    shared = {d.id for d in _line_devices(site, run)}
    sources = {
        parameter: (device, point)
        for device, point, parameter, line in db.execute(
            "SELECT device, point, parameter, line FROM channels WHERE parameter <> '' ORDER BY id"
        )
        if line == run.line or (not line and device in shared)
    }
    parameters = list(protocol.parameters.values()) if protocol else []
    charts = Charts([p.id for p in parameters if p.critical], run.started, records.end)
    total = max((end_sample or 0) - (first or 0), 0) or None
    samples = write_samples(
        db,
        first=first or 1,
        end=end_sample,
        line=run.line,
        units={p.id: p.unit for p in parameters},
        folder=data,
        shared=shared,
        on_batch=charts.add,
        progress=lambda done: progress("samples", done, total),
    )
    progress("audit segment", 0, None)
    with (data / "audit.jsonl").open("w", encoding="utf-8") as out:
        segment = write_segment(db, _first_entry(db, run.id), out)
    downtimes = _downtimes(db, records.audit, run.started, records.end)
    gaps = find_gaps(records.excursions, downtimes, sources, records.phases, records.end)
    with (data / "gaps.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(GAP_COLUMNS)
        writer.writerows(gap_row(g) for g in gaps)
    return samples, segment, gaps, charts


def export(
    site: Site,
    run_key: str,
    folder: Path,
    *,
    actor: str,
    progress: Progress = _quiet,
) -> Exported:
    """Export the run `run_key` (an id, a batch id or an id's prefix) to the bag `folder`
    (which must not exist) and `folder`.zip; answers what was written."""
    if folder.exists():
        raise ExportError(f"{folder}: already exists: export to a new folder")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        return _export(site, run_key, folder, partial, actor, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _export(
    site: Site, run_key: str, folder: Path, partial: Path, actor: str, progress: Progress
) -> Exported:
    data = partial / "data"
    data.mkdir(parents=True)
    key = SiteKey.open(site.data_dir)
    progress("records", 0, None)
    records = _gather(site, run_key, key)
    run = records.run
    _copy_files(site, records, data)
    db = _readonly(site.store_path)
    try:
        samples, segment, gaps, charts = _write_data(db, site, records, data, progress)
    finally:
        db.close()
    zipping = _Zip(folder, [data / "samples.parquet", data / "samples.csv.gz"])
    try:
        envelope, classes = _complete(
            site, records, partial, key, actor, samples, segment, gaps, charts, progress
        )
        partial.rename(folder)
        zipped = zipping.finish(folder)
    finally:
        zipping.close()
    digest = hashlib.sha256(envelope).hexdigest()
    with Store(site.store_path) as store:
        store.write(
            [
                AuditEntry(
                    now_ns(),
                    actor,
                    "run.export",
                    run.id,
                    new=digest,
                    details={
                        "bundle": str(folder),
                        "samples": str(samples),
                        "batch_id": run.batch_id,
                    },
                )
            ]
        )
    return Exported(folder, zipped, samples, digest, sum(c["count"] for c in classes))


def _bag(partial: Path, site: Site, run: Run, key: SiteKey, predicate: dict[str, Any]) -> bytes:
    """Make `partial` (holding the payload in data/) a bag, attested; answers the attestation."""
    data = partial / "data"
    for child in data.iterdir():  # bagit moves the payload into data/ itself
        child.rename(partial / child.name)
    data.rmdir()
    bag = bagit.make_bag(
        str(partial),
        {
            "Source-Organization": site.id,
            "External-Identifier": run.batch_id,
            "Internal-Sender-Identifier": run.id,
            "External-Description": f"pocd batch-release record of batch {run.batch_id}",
            "Pocd-Site-Key": key.public.hex(),
        },
        checksums=["sha256"],
    )
    subjects = {p: d["sha256"] for p, d in bag.entries.items() if p.startswith("data/")}
    envelope = seal(statement(subjects, predicate), ATTESTATION_TYPE, key.private_key())
    (partial / ATTESTATION).write_bytes(envelope)
    bag.save(manifests=False)  # the tag manifest now covers the attestation too
    return envelope


def _complete(
    site: Site,
    records: _Records,
    partial: Path,
    key: SiteKey,
    actor: str,
    samples: int,
    segment: SegmentReport,
    gaps: list[Gap],
    charts: Charts,
    progress: Progress,
) -> tuple[bytes, list[dict[str, Any]]]:
    """The rest of the payload (records, exceptions, run.json, report.pdf), then the bag and
    its attestation; answers the attestation and the exception classes."""
    run, data = records.run, partial / "data"
    _write_json(data / "chain.json", segment.json())
    classes = exception_classes(
        run=run,
        protocol=records.protocol,
        window=(run.started, records.end),
        excursions=records.excursions,
        deviation_states={d["id"]: d["state"] for d in records.deviations},
        alarm_events=records.alarms,
        unacknowledged_after=site.config.alarms.unacknowledged_after,
        gaps=gaps,
        phases=records.phases,
        audit=records.audit,
        incidents=records.incidents,
    )
    _write_json(data / "exceptions.json", {"classes": classes})
    _write_json(data / "excursions.json", [EXCURSION.json(e) for e in records.excursions])
    _write_json(data / "deviations.json", records.deviations)
    _write_json(data / "alarms.json", [ALARM_EVENT.json(e) for e in records.alarms])
    _write_json(data / "incidents.json", [INCIDENT.json(i) for i in records.incidents])
    _write_json(data / "signatures.json", records.signatures)
    run_json = _run_json(site, records, actor, samples)
    _write_json(data / "run.json", run_json)
    progress("report", 0, None)
    write_report(data, charts)

    progress("bag", 0, None)
    predicate = {
        "format": FORMAT,
        "batch_id": run.batch_id,
        "run_id": run.id,
        "site_id": site.id,
        "control_site": run_json["control_site"],
        "protocol": {
            "id": run.protocol_id,
            "version": run.protocol_version,
            "hash": run.protocol_hash,
        },
        "checkpoint": segment.checkpoint,
        "exceptions": {c["class"]: c["count"] for c in classes},
        "open_deviations": [d["id"] for d in records.deviations if d["state"] != "closed"],
        "exported": run_json["exported"],
        "samples": samples,
    }
    return _bag(partial, site, run, key, predicate), classes


class _Zip:
    """`<bag>.zip` being written (the bag under its own name, compressed files stored as they
    are): the samples files on a thread of their own from the moment they are complete, while
    the rest of the bag is made, then every other file. A samples file is read through the
    descriptor opened at the start, so bagit moving it into data/ meanwhile does not matter.
    Nothing is left of it unless `finish` completes it."""

    def __init__(self, folder: Path, samples: list[Path]) -> None:
        self.target = folder.with_name(folder.name + ".zip")
        self._partial = self.target.with_name(self.target.name + ".partial")
        self._root = folder.name
        self._zf = zipfile.ZipFile(self._partial, "w", allowZip64=True)
        self._early = [(p.open("rb"), f"{self._root}/data/{p.name}") for p in samples]
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy, name="pocd-export-zip", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            for source, name in self._early:
                with source:
                    stamp = time.localtime(os.fstat(source.fileno()).st_mtime)[:6]
                    with self._zf.open(zipfile.ZipInfo(name, stamp), "w", force_zip64=True) as out:
                        shutil.copyfileobj(source, out, 4 << 20)
        except BaseException as exc:  # raised again by `finish`
            self._error = exc

    def finish(self, folder: Path) -> Path:
        self._thread.join()
        if self._error is not None:
            raise self._error
        early = {name for _, name in self._early}
        for path in sorted(folder.rglob("*")):
            name = f"{self._root}/{path.relative_to(folder).as_posix()}"
            if path.is_file() and name not in early:
                method = zipfile.ZIP_STORED if path.name.endswith(_STORED) else zipfile.ZIP_DEFLATED
                self._zf.write(path, name, compress_type=method)
        self._zf.close()
        self._partial.replace(self.target)
        return self.target

    def close(self) -> None:
        """After `finish`, nothing; else (the export failed) the partial zip removed."""
        self._thread.join()
        if self._partial.exists():
            self._zf.close()
            self._partial.unlink()


def _first_entry(db: sqlite3.Connection, run_id: str) -> int:
    """The chain entry of the run's start."""
    (entry,) = db.execute(
        "SELECT min(c.id) FROM chain AS c JOIN run_events AS r ON c.kind = 'run_events' "
        "AND c.ref = CAST(r.id AS TEXT) WHERE r.run_id = ?",
        (run_id,),
    ).fetchone()
    if entry is None:
        raise ExportError(f"run {run_id}: its start is not in the store's chain")
    return int(entry)


def _line_devices(site: Site, run: Run) -> list[Device]:
    line = site.lines.get(run.line)
    names = line.devices if line else site.devices
    return [site.devices[d] for d in names if d in site.devices]


def _copy_files(site: Site, records: _Records, data: Path) -> None:
    """The protocol and the site config and driver files in force, as the store keeps them
    (see `_File`)."""
    (data / "protocol").mkdir()
    if records.protocol is not None:
        name = f"{records.protocol.id}-{records.protocol.version}.toml"
        (data / "protocol" / name).write_text(records.protocol_text)
    (data / "config" / "drivers").mkdir(parents=True)
    for file in records.files:
        file.write(data)


def _run_json(site: Site, records: _Records, actor: str, samples: int) -> dict[str, Any]:
    run, protocol, end = records.run, records.protocol, records.end
    devices = _line_devices(site, run)
    return {
        "format": FORMAT,
        "run": RUN.json(run),
        "control_site": site.config.site.control_site,
        "protocol": {
            "id": run.protocol_id,
            "version": run.protocol_version,
            "hash": run.protocol_hash,
            "title": protocol.title if protocol else "",
            "file": f"protocol/{run.protocol_id}-{run.protocol_version}.toml" if protocol else None,
            "parameters": [
                {"id": p.id, "unit": p.unit, "critical": p.critical, "description": p.description}
                for p in (protocol.parameters.values() if protocol else ())
            ],
            "phases": [
                {"id": p.id, "title": p.title, "expected_duration": p.expected_duration}
                for p in (protocol.phases if protocol else ())
            ],
            "limits": _limits_json(protocol) if protocol else {},
        },
        "phases": [PHASE_CHANGE.json(p) for p in records.phases],
        "window": {
            "start": iso(run.started),
            "end": iso(end),
            "start_ns": run.started,
            "end_ns": end,
        },
        "devices": [
            {
                "id": d.id,
                "driver": d.driver.id,
                "model": " ".join(x for x in (d.driver.manufacturer, d.driver.model) if x) or None,
                "serial": d.serial_number or None,
                "firmware": d.firmware or None,
                "calibration": d.calibration_due.isoformat() if d.calibration_due else None,
                "transport": d.driver.transport,
                "identity": dict(d.identity),
            }
            for d in devices
        ],
        # what is in config/ is the files as they are now: each says whether it is the one
        # that was in force at the run's end (by the hash the daemon audited at its load)
        # each in force at the run's end, kept by the store when it was loaded (see _File)
        "files": [f.json() for f in records.files],
        "samples": samples,
        "software": {"pocd": version("pocd"), "python": platform.python_version()},
        "exported": {"t": iso(now_ns()), "by": actor, "host": platform.node()},
    }
