"""The batch-release report: Charts' envelope against a plain computation, and report.pdf
rendered from a payload folder of the exporter's shapes, read back with pdftotext and drawn
page by page with pdftoppm (poppler), the tools an auditor would use."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pocd.release.charts import Charts
from pocd.release.exceptions import GAP_COLUMNS
from pocd.release.report import ReportError, write_report
from pocd.store.recordtypes import iso

NS = 1_000_000_000
START = int(datetime(2026, 9, 1, 6, 0, tzinfo=UTC).timestamp()) * NS
HOUR = 3600 * NS
END = START + 30 * HOUR
BATCH = "B-2026-0917"
RUN = "run-7f3a"
HOSTILE = 'Door opened <b>&amp; closed</b> & "re-sealed" <script>x</script> \u2603'
CLASSES = (
    ("action-excursions", "Action-limit excursions", "excursions.json"),
    ("alert-excursions", "Alert-limit excursions", "excursions.json"),
    ("deviations-open", "Deviations open", "deviations.json"),
    ("deviations-assessed", "Deviations assessed, not closed", "deviations.json"),
    ("deviations-closed", "Deviations closed", "deviations.json"),
    ("alarms-unacknowledged-long", "Alarms unacknowledged beyond 15 min", "alarms.json"),
    ("alarms-shelved-or-out-of-service", "Alarms shelved or out of service", "alarms.json"),
    ("data-gaps-beyond-allowance", "Data gaps beyond allowance", "gaps.csv"),
    ("phases-out-of-order", "Phases out of order", "run.json phases"),
    ("config-changes", "Configuration changes during the run", "audit.jsonl"),
    ("incidents", "Incidents", "incidents.json"),
    ("clock-jumps", "Clock jumps", "incidents.json"),
)
PHASES = (("activation", 0), ("transduction", 8), ("expansion", 20))  # hours from START


def at(hours: float) -> int:
    return START + int(hours * HOUR)


def timed(key: str, t: int | None) -> dict[str, Any]:
    """A time field as RecordType.json writes it: ISO text and nanoseconds."""
    return {key: iso(t), f"{key}_ns": t}


def write_payload(folder: Path, *, hostile: str = HOSTILE) -> None:
    """The payload files of one run, in the exporter's shapes."""
    limits = {
        "temperature": {
            "alert_low": 36.5,
            "alert_high": 37.5,
            "action_low": 36.0,
            "action_high": 38.0,
            "max_data_loss": 300.0,
            "stale_after": 30.0,
            "monitored": True,
        },
        "ph": {
            "alert_low": 6.9,
            "alert_high": 7.35,
            "action_low": 6.8,
            "action_high": 7.45,
            "max_data_loss": 600.0,
            "stale_after": 30.0,
            "monitored": True,
        },
    }
    phase_limits = {
        "activation": {"temperature": limits["temperature"], "ph": {"monitored": False}},
        "transduction": limits,
        "expansion": {
            "temperature": limits["temperature"],
            "ph": limits["ph"] | {"alert_low": 6.85},
        },
    }
    run = {
        "id": RUN,
        **timed("started", START),
        "batch_id": BATCH,
        "site_id": "site-utrecht-1",
        "timezone": "Europe/Amsterdam",
        "protocol_id": "CART-TCT",
        "protocol_version": "3.1",
        "protocol_hash": "9f" * 32,
        "operator": "anna.op",
        "status": "completed",
        **timed("ended", END),
        "end_reason": "harvest done",
        "line": "main",
    }
    phases = []
    previous = None
    for phase, hours in PHASES:
        phases.append(
            {
                "phase": phase,
                "previous": previous,
                **timed("t", at(hours)),
                "actor": "anna.op",
                "in_order": True,
                "reason": "",
            }
        )
        previous = phase
    release = {
        "format": "pocd-release/1",
        "run": run,
        "control_site": "control-leiden",
        "protocol": {
            "id": "CART-TCT",
            "version": "3.1",
            "hash": "9f" * 32,
            "title": "Autologous CAR-T, closed-system TCT process",
            "file": "protocols/CART-TCT-3.1.toml",
            "parameters": [
                {"id": "temperature", "unit": "C", "critical": True, "description": "Chamber"},
                {"id": "ph", "unit": "pH", "critical": True, "description": "Culture pH"},
                {"id": "do", "unit": "%-sat", "critical": False, "description": "DO"},
            ],
            "phases": [
                {"id": "activation", "title": "Activation", "expected_duration": 28800.0},
                {"id": "transduction", "title": "Transduction", "expected_duration": 43200.0},
                {"id": "expansion", "title": "Expansion", "expected_duration": 36000.0},
            ],
            "limits": phase_limits,
        },
        "phases": phases,
        "window": {"start": iso(START), "end": iso(END), "start_ns": START, "end_ns": END},
        "devices": [
            {
                "id": "bioreactor-1",
                "driver": "tct-modbus",
                "model": "TCT-200",
                "serial": "SN-0042",
                "firmware": "4.2.1",
                "calibration": None,
                "transport": "modbus",
            }
        ],
        "software": {"pocd": "0.1.0"},
        "exported": {"t": "2026-09-03T09:15:00.000Z", "by": "qa.bob", "host": "poc-node-3"},
    }
    excursion = {
        "id": "EXC-0001",
        "parameter": "temperature",
        "kind": "action-high",
        "phase": "transduction",
        "protocol_id": "CART-TCT",
        "protocol_version": "3.1",
        "limit": 38.0,
        **timed("start", at(12)),
        **timed("end", at(12.5)),
        "duration_s": 1800.0,
        "worst": 38.6,
        "integral": 540.0,
        "run_id": RUN,
        "line": "main",
    }
    deviations = [
        {
            "id": "DEV-0001",
            **timed("t", at(12.1)),
            "cause": "action-limit",
            "phase": "transduction",
            "parameter": "temperature",
            "excursion_id": "EXC-0001",
            "description": "temperature above its action limit 38.0 C",
            "run_id": RUN,
            "line": "main",
            "state": "closed",
            "changes": [
                {
                    **timed("t", at(14)),
                    "actor": "carl.qa",
                    "state": "assessed",
                    "note": hostile,
                    "disposition": "",
                    "root_cause": "",
                },
                {
                    **timed("t", at(16)),
                    "actor": "dora.qa",
                    "state": "closed",
                    "note": "cells re-counted: viability 91 %",
                    "disposition": "no impact",
                    "root_cause": "incubator door left ajar during a bag change",
                },
            ],
        },
        {
            "id": "DEV-0002",
            **timed("t", at(25)),
            "cause": "data-loss",
            "phase": "expansion",
            "parameter": "ph",
            "excursion_id": None,
            "description": "ph: 12 min without data, beyond the 10 min allowance",
            "run_id": RUN,
            "line": "main",
            "state": "open",
            "changes": [],
        },
    ]
    alarm_base = {
        "alarm_id": "ALM-0001",
        "line": "main",
        "source": "temperature",
        "kind": "action-high",
        "priority": "high",
        **timed("began", at(12)),
        "comment": "",
        **timed("until", None),
        "run_id": RUN,
        "batch_id": BATCH,
        "phase": "transduction",
        "device": "bioreactor-1",
        "value": 38.3,
        "limit": 38.0,
        "unit": "C",
        "first_out": True,
    }
    alarms = [
        alarm_base
        | {**timed("t", at(12)), "transition": "activate", "state": "active-unacked"}
        | {"actor": "system"},
        alarm_base
        | {**timed("t", at(12.2)), "transition": "acknowledge", "state": "active-acked"}
        | {"actor": "anna.op", "comment": hostile},
        alarm_base
        | {**timed("t", at(12.5)), "transition": "return", "state": "normal", "actor": "system"},
    ]
    # Enough alarm events to make the table flow onto another page.
    alarms += [
        alarm_base
        | {
            **timed("t", at(20 + i / 10)),
            "alarm_id": f"ALM-{i + 2:04d}",
            "source": "do",
            "kind": "alert-low",
            "transition": "activate" if i % 2 == 0 else "return",
            "state": "active-unacked" if i % 2 == 0 else "returned-unacked",
            "priority": "low",
            "actor": "system",
            "value": 18.0 if i % 2 == 0 else 21.0,
            "limit": 20.0,
            "unit": "%-sat",
            "first_out": False,
        }
        for i in range(60)
    ]
    signatures = [
        {
            **timed("t", at(16)),
            "utc_offset": "+02:00",
            "login": "dora.qa",
            "name": "Dora Quist",
            "meaning": "approved",
            "action": "deviation.close",
            "record": "DEV-0001",
            "record_hash": "ab" * 32,
            "run_id": RUN,
            "intact": True,
        }
    ]
    incidents = [
        {
            **timed("t", at(25)),
            "kind": "communication",
            "code": "timeout",
            "source": "ph-probe",
            "message": "no answer in 2 s",
        }
    ]
    counts = {
        "action-excursions": ["EXC-0001"],
        "deviations-open": ["DEV-0002"],
        "deviations-closed": ["DEV-0001"],
        "data-gaps-beyond-allowance": ["ph in expansion: 12 min (allowance 10 min)"],
        "incidents": ["timeout ph-probe " + iso(at(25))],  # type: ignore[operator]
    }
    exceptions = {
        "classes": [
            {
                "class": name,
                "title": title,
                "count": len(counts.get(name, [])),
                "where": where,
                "check": f"the exporter counted {name} over the run's records: none found",
                "records": counts.get(name, []),
            }
            for name, title, where in CLASSES
        ]
    }
    audit_records = [
        {
            **timed("t", at(0)),
            "actor": "anna.op",
            "action": "run.start",
            "target": RUN,
            "reason": "",
            "old": None,
            "new": BATCH,
            "details": {"protocol": "CART-TCT 3.1"},
        },
        {
            **timed("t", at(8)),
            "actor": "anna.op",
            "action": "run.phase",
            "target": RUN,
            "reason": "",
            "old": "activation",
            "new": "transduction",
            "details": {},
        },
        {
            **timed("t", at(12.2)),
            "actor": "anna.op",
            "action": "alarm.acknowledge",
            "target": "main/temperature/action-high",
            "reason": hostile,
            "old": "active-unacked",
            "new": "active-acked",
            "details": {"alarm": "ALM-0001"},
        },
        {
            **timed("t", at(14)),
            "actor": "carl.qa",
            "action": "deviation.assessed",
            "target": "DEV-0001",
            "reason": hostile,
            "old": "open",
            "new": "assessed",
            "details": {},
        },
        {
            **timed("t", at(21)),
            "actor": "system",
            "action": "line.standby",
            "target": "main",
            "reason": "",
            "old": None,
            "new": "STANDBY 1",
            "details": {},
        },
    ]
    (folder / "run.json").write_text(json.dumps(release, indent=1))
    (folder / "exceptions.json").write_text(json.dumps(exceptions, indent=1))
    (folder / "excursions.json").write_text(json.dumps([excursion], indent=1))
    (folder / "deviations.json").write_text(json.dumps(deviations, indent=1))
    (folder / "alarms.json").write_text(json.dumps(alarms, indent=1))
    (folder / "incidents.json").write_text(json.dumps(incidents, indent=1))
    (folder / "signatures.json").write_text(json.dumps(signatures, indent=1))
    lines = [{"type": "segment", "run": RUN, "first": 101, "last": 112}]
    for i, record in enumerate(audit_records):
        lines.append(
            {
                "type": "entry",
                "id": 101 + i,
                "kind": "audit",
                "ref": str(900 + i),
                "digest": "d" * 64,
                "hash": "h" * 64,
                "record": record,
            }
        )
    lines += [
        {"type": "entry", "id": 106 + i, "kind": "samples", "ref": str(i), "digest": "e" * 64}
        | {"hash": "f" * 64}
        for i in range(5)
    ]
    lines.append({"type": "checkpoint", "id": 111, "note": "..."})
    (folder / "audit.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    chain = {"verified": True, "entries": 12, "first": 101, "last": 112, "checkpoints": 1}
    (folder / "chain.json").write_text(json.dumps(chain | {"problems": []}))
    with (folder / "gaps.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(GAP_COLUMNS)
        gap_start, gap_end = at(25), at(25.2)
        writer.writerow(
            [
                "ph",
                "ph-probe",
                "ph",
                "expansion",
                "comm-loss",
                iso(gap_start),
                iso(gap_end),
                f"{(gap_end - gap_start) / NS:.3f}",
                gap_start,
                gap_end,
            ]
        )


def sample_batches(rows_per_batch: int = 20_000) -> list[pa.RecordBatch]:
    """Samples of temperature and ph every 5 s (and do, not charted), with the ph gap of
    gaps.csv, a NaN, a null, bad values and uncertain ones, as dictionary and string columns."""
    t = np.arange(START, END, 5 * NS, dtype=np.int64)
    hours = (t - START) / HOUR
    temperature = 37.0 + 0.2 * np.sin(hours) + np.where((hours >= 12) & (hours < 12.5), 1.3, 0)
    ph = 7.2 - 0.01 * hours
    ph_kept = ~((hours >= 25) & (hours < 25.2))  # the gap: no samples at all
    frames = []
    for name, series, kept in (
        ("temperature", temperature, np.ones(len(t), bool)),
        ("ph", ph, ph_kept),
        ("do", np.full(len(t), 40.0), np.ones(len(t), bool)),
    ):
        quality = np.full(len(t), "good", dtype=object)
        quality[(hours >= 3) & (hours < 3.1)] = "uncertain"
        quality[(hours >= 4) & (hours < 4.05)] = "bad"
        values = series.copy()
        values[100] = math.nan
        frames.append((t[kept], np.full(kept.sum(), name), values[kept], quality[kept]))
    t_all = np.concatenate([f[0] for f in frames])
    order = np.argsort(t_all, kind="stable")
    columns = {
        "t": t_all[order],
        "parameter": np.concatenate([f[1] for f in frames])[order],
        "value": np.concatenate([f[2] for f in frames])[order],
        "quality": np.concatenate([f[3] for f in frames])[order],
    }
    batches = []
    for i, at_row in enumerate(range(0, len(order), rows_per_batch)):
        part = {k: v[at_row : at_row + rows_per_batch] for k, v in columns.items()}
        value = pa.array(part["value"], pa.float64())
        if i == 0:  # a null value as well as a NaN
            value = pa.array([None, *part["value"][1:]], pa.float64())
        parameter = pa.array(part["parameter"].astype(str), pa.string())
        quality = pa.array(part["quality"].astype(str), pa.string())
        if i % 2:
            parameter, quality = parameter.dictionary_encode(), quality.dictionary_encode()
        batches.append(
            pa.record_batch(
                {"t": part["t"], "parameter": parameter, "value": value, "quality": quality}
            )
        )
    return batches


@pytest.fixture
def report(tmp_path: Path) -> Path:
    write_payload(tmp_path)
    charts = Charts(["temperature", "ph"], START, END)
    for batch in sample_batches():
        charts.add(batch)
    return write_report(tmp_path, charts)


def pdftotext(pdf: Path) -> str:
    """The PDF's text in reading order, each run of white space as one space."""
    text = subprocess.run(
        ["pdftotext", str(pdf), "-"], check=True, capture_output=True, text=True
    ).stdout
    return " ".join(text.split())


def pages(pdf: Path) -> int:
    info = subprocess.run(["pdfinfo", str(pdf)], check=True, capture_output=True, text=True)
    return int(next(line for line in info.stdout.splitlines() if line.startswith("Pages:"))[6:])


# --- Charts ---------------------------------------------------------------------------------


def test_charts_envelope_matches_a_plain_computation() -> None:
    rng = np.random.default_rng(7)
    start, end, buckets = 1_000, 1_000 + 10_000, 37
    n = 5_000
    t = rng.integers(start - 500, end + 500, n)  # some outside the window
    names = rng.choice(["a", "b", "other"], n)
    values = rng.normal(0, 10, n)
    quality = rng.choice(["good", "uncertain", "bad"], n, p=[0.7, 0.2, 0.1])
    values[rng.choice(n, 50, replace=False)] = np.nan
    nulls = set(rng.choice(n, 50, replace=False).tolist())
    charts = Charts(["a", "b"], start, end, buckets)
    for lo in range(0, n, 1_300):  # batches of both encodings
        hi = min(lo + 1_300, n)
        parameter = pa.array(names[lo:hi])
        if lo % 2600:
            parameter = parameter.dictionary_encode()
        value = pa.array([None if i in nulls else values[i] for i in range(lo, hi)], pa.float64())
        charts.add(
            pa.record_batch(
                {
                    "t": pa.array(t[lo:hi], pa.int64()),
                    "parameter": parameter,
                    "value": value,
                    "quality": pa.array(quality[lo:hi]).dictionary_encode(),
                }
            )
        )
    width = math.ceil((end - start) / buckets)
    for name in ("a", "b"):
        low: dict[int, float] = {}
        high: dict[int, float] = {}
        uncertain: dict[int, int] = {}
        excluded = outside = 0
        for i in range(n):
            if names[i] != name:
                continue
            if not start <= t[i] < end:
                outside += 1
                continue
            if quality[i] == "bad" or i in nulls or math.isnan(values[i]):
                excluded += 1
                continue
            b = (int(t[i]) - start) // width
            low[b] = min(low.get(b, math.inf), values[i])
            high[b] = max(high.get(b, -math.inf), values[i])
            uncertain[b] = uncertain.get(b, 0) + (quality[i] == "uncertain")
        envelope = charts.envelope(name)
        assert len(envelope.low) == buckets
        assert envelope.excluded == excluded
        assert envelope.charted == int(envelope.count.sum())
        for b in range(buckets):
            if b in low:
                assert envelope.low[b] == low[b]
                assert envelope.high[b] == high[b]
                assert envelope.uncertain[b] == uncertain[b]
            else:
                assert math.isnan(envelope.low[b])
                assert math.isnan(envelope.high[b])
        assert list(envelope.starts_ns[:2]) == [start, start + width]
    with pytest.raises(KeyError):
        charts.envelope("other")


def test_charts_leave_a_gap_where_nothing_good_was_sampled() -> None:
    charts = Charts(["ph"], START, END, buckets=30)  # one bucket per hour
    for batch in sample_batches():
        charts.add(batch)
    envelope = charts.envelope("ph")
    assert not math.isnan(envelope.low[25])  # the 12-minute gap leaves 48 minutes of data
    assert envelope.uncertain[3] > 0
    assert envelope.low[4] < envelope.high[4]  # bad for 3 minutes, good the rest of the hour
    charts = Charts(["ph"], at(25), at(25.2), buckets=4)
    for batch in sample_batches():
        charts.add(batch)
    assert np.isnan(charts.envelope("ph").low).all()
    assert charts.outside > 0


# --- the report -----------------------------------------------------------------------------


def test_report_holds_the_exceptions_records_and_signatures(report: Path) -> None:
    text = flat = pdftotext(report)
    assert BATCH in text
    for deviation in ("DEV-0001", "DEV-0002"):
        assert deviation in text
    for _, title, _ in CLASSES:
        assert title in flat, title
    page_one = pdftotext_page(report, 1)
    assert page_one.count("none") >= 7  # the 7 empty classes, each with its check
    assert "the exporter counted clock-jumps over the run's records: none found" in " ".join(
        page_one.split()
    )
    for meaning in ("approved", "reviewed", "released"):
        assert meaning in text
    assert "Dora Quist" in text
    assert "2026-09-01 22:00:00.000 UTC" in flat  # the signature, in UTC
    assert "2026-09-02 00:00:00 +02:00" in flat  # and in the run's zone
    assert "pocd sign" in flat
    assert "pocd verify" in flat
    assert "incubator door left ajar during a bag change" in flat  # a root cause
    assert "Changed since original entry" in flat
    assert "verified" in flat


def test_report_shows_hostile_text_literally(report: Path) -> None:
    flat = pdftotext(report)
    assert '<b>&amp; closed</b> & "re-sealed" <script>x</script> [U+2603]' in flat


def test_every_page_renders_and_has_its_footer(report: Path, tmp_path: Path) -> None:
    total = pages(report)
    assert total >= 5
    out = tmp_path / "png"
    out.mkdir()
    subprocess.run(["pdftoppm", "-png", "-r", "50", str(report), str(out / "p")], check=True)
    rendered = sorted(out.glob("p-*.png"))
    assert len(rendered) == total
    assert all(p.stat().st_size > 2_000 for p in rendered)
    for page in range(1, total + 1):
        text = pdftotext_page(report, page)
        assert f"page {page} of {total}" in text
        assert f"Batch {BATCH}" in text
        assert "exported 2026-09-03 09:15:00.000 UTC" in text


def test_report_metadata_and_deterministic_bytes(report: Path, tmp_path: Path) -> None:
    info = subprocess.run(["pdfinfo", str(report)], check=True, capture_output=True, text=True)
    assert f"Batch release record {BATCH}" in info.stdout
    assert "qa.bob" in info.stdout
    assert RUN in info.stdout
    again = tmp_path / "again"
    again.mkdir()
    write_payload(again)
    charts = Charts(["temperature", "ph"], START, END)
    for batch in sample_batches():
        charts.add(batch)
    assert write_report(again, charts).read_bytes() == report.read_bytes()


def test_a_note_longer_than_a_page_flows_on_whole(tmp_path: Path) -> None:
    note = " ".join(f"w{i:04d}" for i in range(2_500))  # about 5 pages in its column
    write_payload(tmp_path, hostile=note)
    text = pdftotext(write_report(tmp_path, Charts(["ph"], START, END)))
    # The note is in 6 places (deviation step, alarm, audit entries, changed records).
    assert text.count("w0000") == text.count("w2499") == 6
    assert all(f"w{i:04d}" in text for i in range(2_500))
    assert pages(tmp_path / "report.pdf") > 12


def test_report_without_changes_says_so(tmp_path: Path) -> None:
    write_payload(tmp_path)
    deviations = json.loads((tmp_path / "deviations.json").read_text())
    for deviation in deviations:
        deviation["changes"], deviation["state"] = [], "open"
    (tmp_path / "deviations.json").write_text(json.dumps(deviations))
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    for entry in entries:
        if entry.get("kind") == "audit":
            entry["record"]["old"] = None
    (tmp_path / "audit.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    chain = {"verified": False, "entries": 12, "first": 101, "last": 112, "checkpoints": 0}
    problem = "chain entry 104 (audit 903) does not follow the entry before it"
    (tmp_path / "chain.json").write_text(json.dumps(chain | {"problems": [problem]}))
    flat = pdftotext(write_report(tmp_path, Charts(["ph"], START, END)))
    assert "no record was changed after its original entry" in flat.lower()
    assert "did NOT verify" in flat
    assert problem in flat
    assert "not charted" in flat  # temperature: the exporter fed it no samples


def test_a_missing_payload_file_is_named(tmp_path: Path) -> None:
    write_payload(tmp_path)
    (tmp_path / "gaps.csv").unlink()
    with pytest.raises(ReportError) as caught:
        write_report(tmp_path, Charts(["ph"], START, END))
    assert caught.value.file == "gaps.csv"


def pdftotext_page(pdf: Path, page: int) -> str:
    return subprocess.run(
        ["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(pdf), "-"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_poppler_is_here() -> None:
    assert shutil.which("pdftotext") and shutil.which("pdftoppm"), "apt-get install poppler-utils"
