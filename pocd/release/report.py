"""The batch-release report, report.pdf: the human-readable true copy of a run's exported record
(EU GMP Annex 11 s8, 21 CFR 11.10(b)), for the Qualified Person who certifies the batch.

It is rendered from the payload files the exporter wrote into the bag before it (run.json,
exceptions.json, the record files, audit.jsonl, chain.json, gaps.csv) and from the charts'
envelopes, so the PDF cannot say anything the machine-readable files do not. Page 1 is the
exception report (review by exception); then the charts of the critical parameters, the
record tables, the audit-trail review, what changed after its original entry, and the
signature page.

Some 1,400 lines in one module on purpose: every section is a part of one document, drawn
with the same styles, table helper and payload reader; the charts themselves are drawn in
pocd.release.plot.

Must not: read the store, judge the data anew (every count comes from the payload), or let
text from devices and operators act as markup (every such text is escaped).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    CondPageBreak,
    Flowable,
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from pocd.errors import PocdError
from pocd.model import NS
from pocd.release import MEANINGS
from pocd.release.charts import Charts, Envelope
from pocd.release.exceptions import GAP_COLUMNS
from pocd.release.plot import CHART_H, CHART_W, Span, chart_png

__all__ = ["REPORT_NAME", "ReportError", "write_report"]

REPORT_NAME: Final = "report.pdf"

_PAGE_W, _PAGE_H = A4
_MARGIN = 15 * mm
_WIDTH = _PAGE_W - 2 * _MARGIN  # the frame's width

_RED = colors.HexColor("#a8001c")
_RED_BG = colors.HexColor("#fbe4e7")
_GREEN = colors.HexColor("#1b6e2c")
_GREY = colors.HexColor("#5a5a5a")
_RULE = colors.HexColor("#b8bec6")
_HEAD_BG = colors.HexColor("#e6eaf0")
_GROUP_BG = colors.HexColor("#f3f5f8")


_BROKEN = "the record changed after it was signed"


class ReportError(PocdError):
    """A payload file the report is rendered from is missing or not as the exporter writes it."""

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


# --- text -----------------------------------------------------------------------------------


def _style(name: str, **kw: Any) -> ParagraphStyle:
    base: dict[str, Any] = {"fontName": "Helvetica", "fontSize": 8.5, "leading": 10.5}
    return ParagraphStyle(name, **(base | kw))


_BODY = _style("body", spaceAfter=4)
_NOTE = _style("note", fontSize=7.5, leading=9.5, textColor=_GREY, spaceAfter=4)
_CELL = _style("cell", fontSize=7.5, leading=9)
_CELL_HEAD = _style("cell-head", fontName="Helvetica-Bold", fontSize=7.5, leading=9)
_MONO = _style("mono", fontName="Courier", fontSize=7, leading=8.5)
_TITLE = _style("title", fontName="Helvetica-Bold", fontSize=15, leading=19, spaceAfter=2)
_H1 = _style("h1", fontName="Helvetica-Bold", fontSize=12, leading=15, spaceBefore=8, spaceAfter=4)
_H2 = _style("h2", fontName="Helvetica-Bold", fontSize=9.5, leading=12, spaceBefore=6, spaceAfter=3)
_ALERT = _style("alert", fontName="Helvetica-Bold", textColor=_RED, spaceAfter=4)
_GOOD = _style("good", fontName="Helvetica-Bold", textColor=_GREEN, spaceAfter=4)
_CAPTION = _style("caption", fontSize=7.5, leading=9.5, spaceAfter=8)


def _printable(text: str) -> str:
    """The text with what the standard PDF fonts cannot show spelled out as [U+XXXX], so a
    character from a device or an operator is never silently drawn as a blank box."""
    out: list[str] = []
    for ch in text:
        if ch in "\n\t" or (ch.isprintable() and _encodable(ch)):
            out.append(ch)
        else:
            out.append(f"[U+{ord(ch):04X}]")
    return "".join(out)


def _encodable(ch: str) -> bool:
    try:
        ch.encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


def _esc(value: object) -> str:
    """Text as Paragraph markup that shows it literally: &, < and > escaped, line breaks kept."""
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    return escape(_printable(str(value))).replace("\n", "<br/>").replace("\t", " ")


def _p(text: object, style: ParagraphStyle = _CELL) -> Paragraph:
    """A paragraph of untrusted text, escaped."""
    return Paragraph(_esc(text), style)


def _m(markup: str, style: ParagraphStyle = _CELL) -> Paragraph:
    """A paragraph of markup made here (any untrusted part already escaped with _esc)."""
    return Paragraph(markup, style)


def _num(value: object) -> str:
    if value is None or isinstance(value, bool):
        return "—" if value is None else str(value)
    if isinstance(value, int | float):
        return "—" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def _duration(seconds: object) -> str:
    """Seconds as a short duration (2 d 3 h, 4 h 12 min, 35 s); text as it is."""
    if seconds is None:
        return "—"
    if not isinstance(seconds, int | float):
        return str(seconds)
    if not math.isfinite(seconds):
        return "—"
    s = round(float(seconds))
    if s < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{s} s"
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    shown = [f"{n} {unit}" for n, unit in parts if n][:2]
    return " ".join(shown)


def _band(limits: dict[str, Any], tier: str, unit: str) -> str:
    """A band of limits, e.g. 36.5 to 37.5 C; a missing side shows as a dash."""
    return f"{_num(limits.get(tier + '_low'))} to {_num(limits.get(tier + '_high'))} {unit}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _chain_summary(chain: dict[str, Any]) -> str:
    """How much of the chain chain.json checked, e.g. 12 entries (101 to 112), 1 checkpoint."""
    entries, checkpoints = chain.get("entries"), chain.get("checkpoints")
    counted = "1 entry" if entries == 1 else f"{_esc(entries)} entries"
    signed = (
        "1 signed checkpoint" if checkpoints == 1 else f"{_esc(checkpoints)} signed checkpoints"
    )
    return f"{counted} ({_esc(chain.get('first'))} to {_esc(chain.get('last'))}) and {signed}"


def _utc(text: object) -> str:
    """An ISO-8601 UTC time of the payload as shown in the tables: date, time, milliseconds."""
    if not text:
        return "—"
    return str(text).replace("T", " ").removesuffix("Z")


# --- the payload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Payload:
    folder: Path
    release: dict[str, Any]
    exceptions: list[dict[str, Any]]
    excursions: list[dict[str, Any]]
    deviations: list[dict[str, Any]]
    alarms: list[dict[str, Any]]
    incidents: list[dict[str, Any]]
    signatures: list[dict[str, Any]]
    audit: list[dict[str, Any]]  # the segment's entries, in order
    chain: dict[str, Any]
    gaps: list[dict[str, str]]

    @property
    def run(self) -> dict[str, Any]:
        run: dict[str, Any] = self.release["run"]
        return run

    @property
    def protocol(self) -> dict[str, Any]:
        protocol: dict[str, Any] = self.release["protocol"]
        return protocol

    @property
    def window(self) -> dict[str, Any]:
        window: dict[str, Any] = self.release["window"]
        return window

    @property
    def exported(self) -> dict[str, Any]:
        exported: dict[str, Any] = self.release["exported"]
        return exported

    @property
    def batch(self) -> str:
        return str(self.run["batch_id"])

    def audit_records(self) -> Iterator[dict[str, Any]]:
        """The audit entries' records (AUDIT_ENTRY form) of the segment, in order."""
        for entry in self.audit:
            if entry.get("kind") == "audit" and isinstance(entry.get("record"), dict):
                yield entry["record"]

    def spans(self) -> list[Span]:
        """The phase timeline as spans, each to the next change or the window's end."""
        changes = self.release.get("phases") or []
        end = int(self.window["end_ns"])
        spans = []
        for i, change in enumerate(changes):
            stop = int(changes[i + 1]["t_ns"]) if i + 1 < len(changes) else end
            spans.append(
                Span(
                    i + 1,
                    str(change["phase"]),
                    int(change["t_ns"]),
                    stop,
                    change.get("in_order", True),
                )
            )
        return spans

    def limits(self, phase: str, parameter: str) -> dict[str, Any] | None:
        found = self.protocol.get("limits", {}).get(phase, {}).get(parameter)
        return found if isinstance(found, dict) else None


def _read(folder: Path) -> _Payload:
    def load(name: str) -> Any:
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ReportError(name, f"missing from {folder}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(name, f"not JSON: {e}") from None

    release = load("run.json")
    if not isinstance(release, dict) or release.get("format") != "pocd-release/1":
        raise ReportError("run.json", "not a pocd-release/1 run description")
    for key in ("run", "protocol", "window", "exported"):
        if not isinstance(release.get(key), dict):
            raise ReportError("run.json", f"no {key!r} object")
    exceptions = load("exceptions.json")
    if not isinstance(exceptions, dict) or not isinstance(exceptions.get("classes"), list):
        raise ReportError("exceptions.json", "no 'classes' list")
    lists = {}
    for name in ("excursions", "deviations", "alarms", "incidents", "signatures"):
        value = load(f"{name}.json")
        if not isinstance(value, list):
            raise ReportError(f"{name}.json", "not a list of records")
        lists[name] = value
    chain = load("chain.json")
    if not isinstance(chain, dict) or "verified" not in chain:
        raise ReportError("chain.json", "no 'verified' in the chain check")
    return _Payload(
        folder=folder,
        release=release,
        exceptions=exceptions["classes"],
        chain=chain,
        audit=_read_audit(folder / "audit.jsonl"),
        gaps=_read_gaps(folder / "gaps.csv"),
        **lists,
    )


def _read_audit(path: Path) -> list[dict[str, Any]]:
    entries = []
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ReportError(path.name, f"line {number} is not JSON: {e}") from None
                if isinstance(item, dict) and item.get("type") == "entry":
                    entries.append(item)
    except FileNotFoundError:
        raise ReportError(path.name, f"missing from {path.parent}") from None
    return entries


def _read_gaps(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(encoding="utf-8", newline="") as text:
            reader = csv.DictReader(text)
            if tuple(reader.fieldnames or ()) != GAP_COLUMNS:
                raise ReportError(path.name, f"the header is not {','.join(GAP_COLUMNS)}")
            return list(reader)
    except FileNotFoundError:
        raise ReportError(path.name, f"missing from {path.parent}") from None


# --- times in the run's zone ---------------------------------------------------------------


class _Clock:
    """Shows times in UTC and in the run's time zone."""

    def __init__(self, zone: str) -> None:
        self.name = zone
        try:
            self.zone: ZoneInfo | None = ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            self.zone = None

    def local(self, t_ns: object) -> str:
        """A time (ns) in the run's zone with its offset, e.g. 2026-09-01 10:00:00 +02:00."""
        if not isinstance(t_ns, int):
            return "—"
        if self.zone is None:
            return f"(time zone {self.name} unknown here)"
        when = datetime.fromtimestamp(t_ns / NS, UTC).astimezone(self.zone)
        offset = when.strftime("%z")
        return f"{when:%Y-%m-%d %H:%M:%S} {offset[:3]}:{offset[3:]}"


# --- the document ---------------------------------------------------------------------------


def write_report(folder: Path, charts: Charts) -> Path:
    """Renders folder/report.pdf from the payload files in `folder` and the charts' envelopes.
    Returns its path. Raises ReportError if a payload file is missing or malformed."""
    payload = _read(folder)
    clock = _Clock(str(payload.run.get("timezone") or "UTC"))
    story: list[Flowable] = []
    story += _exception_report(payload, clock)
    story.append(PageBreak())
    story += _run_section(payload, clock)
    story += _chart_section(payload, charts)
    story += _excursion_section(payload)
    story += _deviation_section(payload)
    story += _alarm_section(payload)
    story += _gap_section(payload)
    story += _incident_section(payload)
    story += _audit_section(payload)
    story += _changed_section(payload)
    story.append(PageBreak())
    story += _signature_section(payload, clock)

    path = folder / REPORT_NAME
    run, protocol = payload.run, payload.protocol
    doc = SimpleDocTemplate(
        str(path),
        pagesize=A4,
        leftMargin=_MARGIN,
        rightMargin=_MARGIN,
        topMargin=_MARGIN + 4 * mm,
        bottomMargin=_MARGIN + 4 * mm,
        title=_printable(f"Batch release record {payload.batch}"),
        author=_printable(f"{payload.exported.get('by') or 'pocd'} (pocd export)"),
        subject=_printable(
            f"Run {run.get('id')}, batch {payload.batch}, protocol {protocol.get('id')} "
            f"{protocol.get('version')}: exception report, charts, records, audit-trail "
            "review and signatures (true copy of the bundle's payload)"
        ),
        creator=_printable(f"pocd {payload.release.get('software', {}).get('pocd', '')}".strip()),
        keywords=["batch release", "GMP", "true copy", payload.batch],
        invariant=1,
    )
    # Images as binary streams: the ASCII85 text form costs a pure-Python pass over every
    # chart's pixels (a second per twenty charts) and makes the file larger.
    rl_config.useA85 = 0
    header = _printable(
        f"Batch release record  |  batch {payload.batch}  |  run {run.get('id')}  |  "
        f"protocol {protocol.get('id')} {protocol.get('version')}"
    )
    footer = _printable(f"Batch {payload.batch}")
    exported = _printable(f"exported {_utc(payload.exported.get('t'))} UTC")
    doc.build(story, canvasmaker=_numbered_canvas(header, footer, exported))
    return path


def _numbered_canvas(header: str, footer: str, exported: str) -> type[Canvas]:
    """A canvas that holds its pages until the end, to print 'page X of Y' on each."""

    class NumberedCanvas(Canvas):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for page in self._pages:
                self.__dict__.update(page)
                self._frame(total)
                super().showPage()
            super().save()

        def _frame(self, total: int) -> None:
            self.saveState()
            self.setStrokeColor(_RULE)
            self.setLineWidth(0.5)
            top = _PAGE_H - _MARGIN
            self.setFont("Helvetica", 7)
            self.setFillColor(_GREY)
            self.drawString(_MARGIN, top, header)
            self.drawRightString(_PAGE_W - _MARGIN, top, "true copy of the bundle's payload")
            self.line(_MARGIN, top - 2.5, _PAGE_W - _MARGIN, top - 2.5)
            bottom = _MARGIN - 2
            self.line(_MARGIN, bottom + 9, _PAGE_W - _MARGIN, bottom + 9)
            self.setFillColor(colors.black)
            self.drawString(_MARGIN, bottom, footer)
            self.drawCentredString(_PAGE_W / 2, bottom, f"page {self._pageNumber} of {total}")
            self.drawRightString(_PAGE_W - _MARGIN, bottom, exported)
            self.restoreState()

    return NumberedCanvas


_SECTION_ROOM = 45 * mm  # a section starts on a new page unless this much is left
_PAD = 3  # points of padding left and right in a table cell
_ROW_MOST = 150.0  # points: a cell taller than this goes on in continuation rows


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[Flowable | str]],
    widths: Sequence[float],
    marks: Iterable[tuple[Any, ...]] = (),
) -> Table:
    """A table that flows across pages, its header repeated on each, its cells wrapping.

    A row is never split by reportlab (its splitInRow misplaces the rest of a row and can
    lose what is taller than a page); a cell too tall for a page goes on in continuation rows
    instead. `marks` are style commands of single data rows (1 = the first); they apply to
    the row's continuations too."""
    total = sum(widths)
    columns = [w * _WIDTH / total for w in widths]
    data: list[list[Flowable | str]] = [[_m(_esc(h), _CELL_HEAD) for h in header]]
    where = [(0, 0)]  # data row -> its first and last table row
    for row in rows:
        pieces = [_pieces(cell, width - 2 * _PAD) for cell, width in zip(row, columns, strict=True)]
        first = len(data)
        data += [[p[k] if k < len(p) else "" for p in pieces] for k in range(max(map(len, pieces)))]
        where.append((first, len(data) - 1))
    style: list[tuple[Any, ...]] = [
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("BACKGROUND", (0, 0), (-1, 0), _HEAD_BG),
        ("LINEBELOW", (0, 0), (-1, 0), 0.6, _RULE),
        ("TOPPADDING", (0, 0), (-1, -1), 2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
        ("LEFTPADDING", (0, 0), (-1, -1), _PAD),
        ("RIGHTPADDING", (0, 0), (-1, -1), _PAD),
    ]
    style += [("LINEBELOW", (0, last), (-1, last), 0.25, _RULE) for _, last in where[1:]]
    for command, (c0, r0), (c1, r1), *rest in marks:
        first, last = where[r0][0], where[r1][1]
        style.append((command, (c0, first), (c1, first if command == "LINEABOVE" else last), *rest))
    table = Table(data, colWidths=columns, repeatRows=1, hAlign="LEFT")
    table.setStyle(TableStyle(style))
    return table


def _pieces(cell: Flowable | str, width: float) -> list[Flowable | str]:
    """A cell as pieces each at most _ROW_MOST tall: a tall paragraph split where its lines
    break, anything else as it is."""
    if not isinstance(cell, Paragraph):
        return [cell]
    pieces: list[Flowable | str] = []
    rest = cell
    while rest.wrap(width, 1e9)[1] > _ROW_MOST:
        parts = rest.split(width, _ROW_MOST)
        if len(parts) < 2:  # nothing to split at: keep it whole
            break
        pieces.append(parts[0])
        rest = parts[1]
    pieces.append(rest)
    return pieces


def _none(text: str) -> Paragraph:
    return _m(f"<b>None.</b> {_esc(text)}", _BODY)


def _class(payload: _Payload, name: str) -> dict[str, Any]:
    for item in payload.exceptions:
        if item.get("class") == name:
            return item
    return {}


def _check(payload: _Payload, name: str, fallback: str) -> str:
    """The automated check of an exception class, to say why a table is empty."""
    return str(_class(payload, name).get("check") or fallback)


# --- page 1: the exception report ----------------------------------------------------------


def _exception_report(payload: _Payload, clock: _Clock) -> list[Flowable]:
    run, protocol, window = payload.run, payload.protocol, payload.window
    out: list[Flowable] = [
        _m(f"Batch release record: {_esc(payload.batch)}", _TITLE),
        _m(
            "Exception report (review by exception). Each class of exception in the run's "
            "record is listed with its count and where its records are; a class without "
            "records says <b>none</b> with the automated check that proves it. This report is "
            "rendered from the bundle's payload files, which hold the same records.",
            _NOTE,
        ),
    ]
    status = str(run.get("status") or "")
    if run.get("end_reason"):
        status += f" ({run['end_reason']})"
    start_ns, end_ns = window.get("start_ns"), window.get("end_ns")
    length = (
        _duration((end_ns - start_ns) / NS)
        if isinstance(start_ns, int) and isinstance(end_ns, int)
        else "—"
    )
    exported = payload.exported
    identity = [
        ("Batch", _m(f"<b>{_esc(payload.batch)}</b>"), "Run", _p(run.get("id"))),
        (
            "Protocol",
            _m(
                f"<b>{_esc(protocol.get('id'))} {_esc(protocol.get('version'))}</b> "
                f"{_esc(protocol.get('title') or '')}"
            ),
            "Status",
            _p(status),
        ),
        ("Protocol hash", _p(protocol.get("hash") or run.get("protocol_hash"), _MONO), "", ""),
        ("Site", _p(run.get("site_id")), "Control site", _p(payload.release.get("control_site"))),
        ("Line", _p(run.get("line")), "Operator", _p(run.get("operator"))),
        (
            "Window (UTC)",
            _p(f"{_utc(window.get('start'))} to {_utc(window.get('end'))} ({length})"),
            "Time zone",
            _p(clock.name),
        ),
        (
            "Window (local)",
            _p(f"{clock.local(start_ns)} to {clock.local(end_ns)} ({clock.name})"),
            "",
            "",
        ),
        (
            "Exported",
            _p(
                f"{_utc(exported.get('t'))} UTC by {exported.get('by')} on "
                f"{exported.get('host')}, pocd "
                f"{payload.release.get('software', {}).get('pocd', '?')}"
            ),
            "",
            "",
        ),
    ]
    spans: list[tuple[Any, ...]] = []
    for i, (_, _, label, _) in enumerate(identity):
        if label:
            spans.append(("BACKGROUND", (2, i), (2, i), _GROUP_BG))
        else:
            spans.append(("SPAN", (1, i), (3, i)))
    table = Table(
        [
            [_m(f"<b>{_esc(a)}</b>"), b, _m(f"<b>{_esc(c)}</b>") if c else "", d]
            for a, b, c, d in identity
        ],
        colWidths=[0.16 * _WIDTH, 0.44 * _WIDTH, 0.14 * _WIDTH, 0.26 * _WIDTH],
        hAlign="LEFT",
    )
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("BOX", (0, 0), (-1, -1), 0.5, _RULE),
                ("LINEBELOW", (0, 0), (-1, -2), 0.25, _RULE),
                ("BACKGROUND", (0, 0), (0, -1), _GROUP_BG),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
                *spans,
            ]
        )
    )
    out += [table, Spacer(1, 3 * mm)]

    found = [c for c in payload.exceptions if int(c.get("count") or 0) > 0]
    if found:
        names = ", ".join(_esc(c.get("title")) for c in found)
        out.append(
            _m(
                f"Exceptions in {len(found)} of {len(payload.exceptions)} classes: {names}. "
                "Review their records before certifying the batch.",
                _ALERT,
            )
        )
    else:
        out.append(_m(f"No exception in any of the {len(payload.exceptions)} classes.", _GOOD))

    rows: list[list[Flowable | str]] = []
    marks: list[tuple[Any, ...]] = []
    for i, item in enumerate(payload.exceptions, 1):
        count = int(item.get("count") or 0)
        where = _esc(item.get("where"))
        if count:
            records = [str(r) for r in item.get("records") or []]
            shown = ", ".join(_esc(r) for r in records[:8])
            more = len(records) - 8
            if more > 0:
                shown += f" and {more} more"
            detail = f"<b>In {where}</b>" + (f": {shown}" if shown else "")
            rows.append(
                [
                    _m(f"<b>{_esc(item.get('title'))}</b>"),
                    _m(f'<font color="#a8001c"><b>{count}</b></font>'),
                    _m(detail),
                ]
            )
            marks += [
                ("BACKGROUND", (0, i), (-1, i), _RED_BG),
                ("LINEBEFORE", (0, i), (0, i), 2.5, _RED),
            ]
        else:
            rows.append(
                [
                    _p(item.get("title")),
                    _m('<font color="#1b6e2c">none</font>'),
                    _m(f'<font color="#5a5a5a">Checked: {_esc(item.get("check"))}</font>'),
                ]
            )
    out.append(
        _table(
            ("Exception class", "Count", "Where the records are / how none is proven"),
            rows,
            (30, 8, 62),
            marks,
        )
    )
    out.append(Spacer(1, 3 * mm))
    out += _page_one_integrity(payload)
    return out


def _page_one_integrity(payload: _Payload) -> list[Flowable]:
    """The integrity facts a reviewer needs before turning the page."""
    chain = payload.chain
    lines: list[Flowable] = []
    if chain.get("verified"):
        lines.append(
            _m(
                "<b>Audit trail:</b> the chain of the run's segment verified: "
                f"{_chain_summary(chain)}.",
                _BODY,
            )
        )
    else:
        problems = chain.get("problems") or []
        lines.append(
            _m(
                "Audit trail: the chain of the run's segment did NOT verify "
                f"({_plural(len(problems), 'problem')}, listed in the audit-trail review).",
                _ALERT,
            )
        )
    steps, others = _changed_records(payload)
    if steps or others:
        lines.append(
            _m(
                "<b>Changed after original entry:</b> "
                f"{_plural(len(steps) + len(others), 'change')} recorded "
                "(listed under 'Changed since original entry').",
                _BODY,
            )
        )
    else:
        lines.append(
            _m(
                "<b>Changed after original entry:</b> "
                "no record was changed after its original entry.",
                _BODY,
            )
        )
    broken = [s for s in payload.signatures if not s.get("intact")]
    text = f"<b>Electronic signatures made during the run:</b> {len(payload.signatures)}"
    if broken:
        lines.append(_m(f"{text}; {len(broken)} NOT intact (signature page).", _ALERT))
    else:
        lines.append(_m(text + (", all intact." if payload.signatures else "."), _BODY))
    return lines


# --- the run, its protocol and devices -----------------------------------------------------


def _run_section(payload: _Payload, clock: _Clock) -> list[Flowable]:
    protocol = payload.protocol
    out: list[Flowable] = [_m("Run, protocol and equipment", _H1), _m("Phase timeline", _H2)]
    titles = {str(p.get("id")): p for p in protocol.get("phases") or []}
    rows: list[list[Flowable | str]] = []
    marks: list[tuple[Any, ...]] = []
    changes = {i + 1: c for i, c in enumerate(payload.release.get("phases") or [])}
    for span in payload.spans():
        change = changes[span.number]
        title = titles.get(span.phase, {}).get("title", "")
        expected = _duration(titles.get(span.phase, {}).get("expected_duration"))
        order = "yes" if span.in_order else "NO"
        rows.append(
            [
                _p(span.number),
                _m(f"<b>{_esc(span.phase)}</b><br/>{_esc(title)}"),
                _m(f"{_esc(_utc(change.get('t')))}<br/>{_esc(clock.local(span.start_ns))}"),
                _p(f"{_duration((span.end_ns - span.start_ns) / NS)} (expected {expected})"),
                _p(change.get("actor")),
                _m(order if span.in_order else f'<font color="#a8001c"><b>{order}</b></font>'),
                _p(change.get("reason") or ""),
            ]
        )
        if not span.in_order:
            marks.append(("BACKGROUND", (0, len(rows)), (-1, len(rows)), _RED_BG))
    if rows:
        out.append(
            _table(
                (
                    "#",
                    "Phase",
                    f"Entered (UTC / {clock.name})",
                    "Duration",
                    "By",
                    "In order",
                    "Reason",
                ),
                rows,
                (4, 22, 22, 16, 10, 7, 19),
                marks,
            )
        )
    else:
        out.append(_none("The run has no phase change in run.json."))

    out.append(_m("Limits in force", _H2))
    out.append(
        _m(
            "From the protocol file named by its hash; per phase and parameter. Durations are "
            "how long a value may be stale, and how much data a critical parameter may lose.",
            _NOTE,
        )
    )
    parameters = {str(p.get("id")): p for p in protocol.get("parameters") or []}
    rows = []
    for phase, per_parameter in (protocol.get("limits") or {}).items():
        for parameter, limits in per_parameter.items():
            unit = parameters.get(parameter, {}).get("unit", "")
            critical = parameters.get(parameter, {}).get("critical")
            if limits.get("monitored") is False:
                bands = _m('<font color="#5a5a5a">not monitored</font>')
                rows.append(
                    [_p(phase), _p(f"{parameter}{' *' if critical else ''}"), bands, "", "", ""]
                )
                continue
            rows.append(
                [
                    _p(phase),
                    _p(f"{parameter}{' *' if critical else ''}"),
                    _p(_band(limits, "alert", unit)),
                    _p(_band(limits, "action", unit)),
                    _p(_duration(limits.get("stale_after"))),
                    _p(_duration(limits.get("max_data_loss"))),
                ]
            )
    out.append(
        _table(
            (
                "Phase",
                "Parameter (* critical)",
                "Alert band",
                "Action band",
                "Stale after",
                "Max data loss",
            ),
            rows,
            (18, 18, 20, 20, 12, 12),
        )
    )

    out.append(_m("Devices", _H2))
    devices = payload.release.get("devices") or []
    if devices:
        keys = ("id", "driver", "model", "serial", "firmware", "calibration", "transport")
        rows = [
            [
                _p(d.get(k))
                if d.get(k) is not None
                else _m('<i><font color="#5a5a5a">unknown</font></i>')
                for k in keys
            ]
            for d in devices
        ]
        out.append(
            _table(
                ("Device", "Driver", "Model", "Serial", "Firmware", "Calibration", "Transport"),
                rows,
                (14, 14, 16, 14, 12, 16, 14),
            )
        )
    else:
        out.append(_none("run.json lists no device."))
    return out


# --- the charts ----------------------------------------------------------------------------


def _chart_section(payload: _Payload, charts: Charts) -> list[Flowable]:
    critical = [p for p in payload.protocol.get("parameters") or [] if p.get("critical")]
    out: list[Flowable] = [
        CondPageBreak(90 * mm),
        _m("Critical parameters", _H1),
        _m(
            "Each chart shows the parameter's values as an envelope: in each time bucket, from "
            "the lowest to the highest good or uncertain value. Bad and missing values are not "
            "charted; the gaps of gaps.csv are hatched. Alert limits are dashed amber, action "
            "limits solid red, each drawn for the phase it applies in; phases are numbered as "
            "in the timeline. Times are UTC.",
            _NOTE,
        ),
    ]
    if not critical:
        out.append(_none("The protocol names no critical parameter."))
    spans = payload.spans()
    window = int(payload.window["start_ns"]), int(payload.window["end_ns"])
    for parameter in critical:
        name = str(parameter["id"])
        try:
            envelope = charts.envelope(name)
        except KeyError:
            out.append(
                _m(f"<b>{_esc(name)}</b>: not charted (the export fed no samples of it).", _ALERT)
            )
            continue
        gaps = [g for g in payload.gaps if g.get("parameter") == name]
        png = chart_png(parameter, envelope, spans, gaps, window, payload.limits)
        image = Image(io.BytesIO(png), width=_WIDTH, height=_WIDTH * CHART_H / CHART_W)
        out.append(KeepTogether([image, _chart_caption(parameter, envelope, spans, gaps)]))
    return out


def _chart_caption(
    parameter: dict[str, Any], envelope: Envelope, spans: list[Span], gaps: list[dict[str, str]]
) -> Paragraph:
    uncertain = int(envelope.uncertain.sum())
    seconds = sum(_float(g.get("seconds")) for g in gaps)
    phases = ", ".join(f"{s.number} {_esc(s.phase)}" for s in spans)
    gap_text = (
        f"{_plural(len(gaps), 'gap')} in gaps.csv, {_duration(seconds)} in all"
        if gaps
        else "no gap in gaps.csv"
    )
    return _m(
        f"<b>{_esc(parameter['id'])}</b> ({_esc(parameter.get('unit'))}): "
        f"{_esc(parameter.get('description') or '')}. {envelope.charted:,} values charted in "
        f"buckets of {_duration(envelope.width_ns / NS)} ({uncertain:,} uncertain, marked "
        f"on the time axis); {envelope.excluded:,} bad or missing values not charted; "
        f"{gap_text}. Phases: {phases}.",
        _CAPTION,
    )


def _float(text: object) -> float:
    try:
        return float(str(text))
    except ValueError:
        return 0.0


def _excursion_section(payload: _Payload) -> list[Flowable]:
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Excursions", _H1)]
    units = {
        str(p.get("id")): p.get("unit") or "" for p in payload.protocol.get("parameters") or []
    }
    rows: list[list[Flowable | str]] = []
    marks: list[tuple[Any, ...]] = []
    for x in payload.excursions:
        unit = units.get(str(x.get("parameter")), "")
        kind = str(x.get("kind") or "")
        rows.append(
            [
                _p(x.get("id")),
                _m(f"<b>{_esc(x.get('parameter'))}</b><br/>{_esc(kind)}"),
                _p(x.get("phase")),
                _p(f"{_num(x.get('limit'))} {unit}".strip()),
                _p(_utc(x.get("start"))),
                _p(_utc(x.get("end")) if x.get("end") else "still open"),
                _p(_duration(x.get("duration_s"))),
                _p(f"{_num(x.get('worst'))} {unit}".strip()),
                _p(_num(x.get("integral"))),
            ]
        )
        if kind.startswith("action"):
            marks.append(("BACKGROUND", (0, len(rows)), (-1, len(rows)), _RED_BG))
    if rows:
        out.append(
            _table(
                (
                    "ID",
                    "Parameter / kind",
                    "Phase",
                    "Limit",
                    "Start (UTC)",
                    "End (UTC)",
                    "Duration",
                    "Worst",
                    "Integral",
                ),
                rows,
                (13, 13, 10, 8, 15, 15, 9, 8, 9),
                marks,
            )
        )
    else:
        out.append(
            _none(_check(payload, "action-excursions", "excursions.json holds no excursion."))
        )
    return out


def _deviation_section(payload: _Payload) -> list[Flowable]:
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Deviations", _H1)]
    rows: list[list[Flowable | str]] = []
    marks: list[tuple[Any, ...]] = []
    for d in payload.deviations:
        state = str(d.get("state") or "open")
        subject = " / ".join(str(v) for v in (d.get("phase"), d.get("parameter")) if v)
        rows.append(
            [
                _m(f"<b>{_esc(d.get('id'))}</b>"),
                _p(_utc(d.get("t"))),
                _p(d.get("cause")),
                _p(subject),
                _m(
                    f'<font color="#a8001c"><b>{_esc(state)}</b></font>'
                    if state != "closed"
                    else f"<b>{_esc(state)}</b>"
                ),
                _m(
                    _esc(d.get("description"))
                    + (f"<br/>Excursion {_esc(d['excursion_id'])}" if d.get("excursion_id") else "")
                ),
            ]
        )
        row = len(rows)
        marks += [
            ("BACKGROUND", (0, row), (-1, row), _GROUP_BG),
            ("LINEABOVE", (0, row), (-1, row), 0.8, _RULE),
        ]
        for change in d.get("changes") or []:
            parts = [f"<b>{_esc(change.get('state'))}</b>: {_esc(change.get('note'))}"]
            if change.get("disposition"):
                parts.append(f"<b>Disposition:</b> {_esc(change['disposition'])}")
            if change.get("root_cause"):
                parts.append(f"<b>Root cause:</b> {_esc(change['root_cause'])}")
            rows.append(
                [
                    _m('<font color="#5a5a5a">lifecycle</font>'),
                    _p(_utc(change.get("t"))),
                    _p(change.get("actor")),
                    "",
                    _p(change.get("state")),
                    _m("<br/>".join(parts)),
                ]
            )
    if rows:
        out.append(
            _m(
                "Each deviation, then each step of its lifecycle (assessed, closed) with who made "
                "it, the note, the disposition and the root cause. An open or assessed deviation "
                "is not yet closed.",
                _NOTE,
            )
        )
        out.append(
            _table(
                (
                    "ID",
                    "Time (UTC)",
                    "Cause / by",
                    "Phase / parameter",
                    "State",
                    "Description / note",
                ),
                rows,
                (13, 15, 13, 13, 8, 38),
                marks,
            )
        )
    else:
        out.append(_none(_check(payload, "deviations-open", "deviations.json holds no deviation.")))
    return out


def _alarm_section(payload: _Payload) -> list[Flowable]:
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Alarms", _H1)]
    rows: list[list[Flowable | str]] = []
    marks: list[tuple[Any, ...]] = []
    for a in payload.alarms:
        notes = []
        if a.get("comment"):
            notes.append(_esc(a["comment"]))
        if a.get("until"):
            notes.append(f"until {_esc(_utc(a['until']))}")
        if a.get("value") is not None:
            value = f"value {_num(a['value'])} {a.get('unit') or ''}".strip()
            if a.get("limit") is not None:
                value += f" (limit {_num(a['limit'])})"
            notes.append(_esc(value))
        if a.get("first_out"):
            notes.append("first out")
        source = f"<b>{_esc(a.get('source'))}</b> {_esc(a.get('kind'))}<br/>"
        identity = " \u00b7 ".join(_esc(v) for v in (a.get("device"), a.get("alarm_id")) if v)
        rows.append(
            [
                _p(_utc(a.get("t"))),
                _m(f'{source}<font color="#5a5a5a">{identity}</font>'),
                _m(f"<b>{_esc(a.get('transition'))}</b><br/>{_esc(a.get('state'))}"),
                _p(a.get("priority")),
                _p(a.get("actor")),
                _m("; ".join(notes)),
            ]
        )
        if a.get("state") in ("shelved", "out-of-service"):
            marks.append(("BACKGROUND", (0, len(rows)), (-1, len(rows)), _RED_BG))
    if rows:
        out.append(_m("Every transition and acknowledgement, in order.", _NOTE))
        out.append(
            _table(
                (
                    "Time (UTC)",
                    "Alarm (source, kind, device, id)",
                    "Transition / state",
                    "Priority",
                    "Actor",
                    "Note",
                ),
                rows,
                (14, 26, 14, 8, 11, 27),
                marks,
            )
        )
    else:
        out.append(_none("alarms.json holds no alarm transition."))
    return out


def _gap_section(payload: _Payload) -> list[Flowable]:
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Data gaps", _H1)]
    if not payload.gaps:
        out.append(_none(_check(payload, "data-gaps-beyond-allowance", "gaps.csv lists no gap.")))
        return out
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for gap in payload.gaps:
        totals[gap["parameter"], gap["phase"]] += _float(gap["seconds"])
    summary: list[list[Flowable | str]] = []
    for (parameter, phase), seconds in sorted(totals.items()):
        allowance = (payload.limits(phase, parameter) or {}).get("max_data_loss")
        summary.append(
            [
                _p(parameter),
                _p(phase),
                _p(
                    _plural(
                        sum(
                            1
                            for g in payload.gaps
                            if (g["parameter"], g["phase"]) == (parameter, phase)
                        ),
                        "gap",
                    )
                ),
                _p(_duration(seconds)),
                _p(_duration(allowance) if allowance is not None else "none set"),
            ]
        )
    title = _esc(_class(payload, "data-gaps-beyond-allowance").get("title") or "data gaps")
    out.append(
        _m(
            "Per parameter and phase: the gaps listed and the protocol's allowance of data loss. "
            f"Whether a gap is beyond its allowance is the exporter's check, on page 1 ({title}).",
            _NOTE,
        )
    )
    out.append(
        _table(
            ("Parameter", "Phase", "Gaps", "Listed gaps in all", "Allowance"),
            summary,
            (22, 22, 16, 20, 20),
        )
    )
    out.append(Spacer(1, 3 * mm))
    rows = [
        [
            _p(g["parameter"]),
            _p(f"{g['device']} {g['point']}"),
            _p(g["phase"]),
            _p(g["cause"]),
            _p(_utc(g["start"])),
            _p(_utc(g["end"]) if g["end"] else "to the end"),
            _p(_duration(_float(g["seconds"]))),
        ]
        for g in payload.gaps
    ]
    out.append(
        _table(
            ("Parameter", "Device / point", "Phase", "Cause", "Start (UTC)", "End (UTC)", "Length"),
            rows,
            (13, 19, 12, 11, 17, 17, 11),
        )
    )
    return out


def _incident_section(payload: _Payload) -> list[Flowable]:
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Incidents", _H1)]
    rows = [
        [
            _p(_utc(i.get("t"))),
            _p(i.get("kind")),
            _p(i.get("code")),
            _p(i.get("source")),
            _p(i.get("message")),
        ]
        for i in payload.incidents
    ]
    if rows:
        out.append(
            _m(
                "Software, communication and data errors (Annex 11 s13), kept apart from "
                "process deviations.",
                _NOTE,
            )
        )
        out.append(
            _table(("Time (UTC)", "Kind", "Code", "Source", "Message"), rows, (15, 14, 12, 14, 45))
        )
    else:
        out.append(_none(_check(payload, "incidents", "incidents.json holds no incident.")))
    return out


# --- the audit trail -----------------------------------------------------------------------


def _audit_section(payload: _Payload) -> list[Flowable]:
    chain = payload.chain
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Audit-trail review", _H1)]
    if chain.get("verified"):
        out.append(
            _m(
                f"The chain of the run's segment verified: {_chain_summary(chain)}. Every entry "
                "follows the one before it and matches the record it covers.",
                _GOOD,
            )
        )
    else:
        out.append(
            _m(
                f"The chain of the run's segment did NOT verify. Checked: {_chain_summary(chain)}.",
                _ALERT,
            )
        )
        out += [_m(f"- {_esc(problem)}", _BODY) for problem in chain.get("problems") or []]

    by: dict[str, Counter[str]] = defaultdict(Counter)
    for entry in payload.audit:
        if entry.get("kind") == "audit" and isinstance(entry.get("record"), dict):
            record = entry["record"]
            who = "system" if record.get("actor") == "system" else "operator"
            by[f"audit: {record.get('action')}"][who] += 1
        else:
            by[f"{entry.get('kind')}"]["system"] += 1
    rows: list[list[Flowable | str]] = [
        [_p(name), _p(counts["operator"] or ""), _p(counts["system"] or ""), _p(counts.total())]
        for name, counts in sorted(by.items())
    ]
    out.append(_m("Entries of the segment by action", _H2))
    out.append(
        _m(
            "Audit entries by their action; the chain's other entries (records and sample "
            "batches) by the kind of record they cover.",
            _NOTE,
        )
    )
    if rows:
        out.append(
            _table(("Entry", "By operators", "By the system", "Total"), rows, (52, 16, 16, 16))
        )
    else:
        out.append(_none("audit.jsonl holds no entry of the segment."))

    out.append(_m("Operator actions", _H2))
    operator = [r for r in payload.audit_records() if r.get("actor") != "system"]
    if operator:
        out.append(_audit_table(operator))
    else:
        out.append(_none("No audit entry of the segment was made by a person."))
    return out


def _audit_table(records: Sequence[dict[str, Any]]) -> Table:
    rows: list[list[Flowable | str]] = []
    for r in records:
        change = ""
        if r.get("old") is not None or r.get("new") is not None:
            change = f"{_esc(r.get('old'))} <b>to</b> {_esc(r.get('new'))}"
        details = r.get("details") or {}
        why = _esc(r.get("reason") or "")
        if details:
            why += ("<br/>" if why else "") + "; ".join(
                f"{_esc(k)}: {_esc(v)}" for k, v in sorted(details.items())
            )
        rows.append(
            [
                _p(_utc(r.get("t"))),
                _p(r.get("actor")),
                _p(r.get("action")),
                _p(r.get("target")),
                _m(change),
                _m(why),
            ]
        )
    return _table(
        ("Time (UTC)", "Actor", "Action", "Record", "Old to new", "Reason / details"),
        rows,
        (15, 12, 14, 15, 18, 26),
    )


def _changed_records(
    payload: _Payload,
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[dict[str, Any]]]:
    """What changed after its original entry: each deviation's lifecycle steps (deviation,
    step), and the other audit entries that hold an old value. A step is also an audit entry
    (deviation.<state>, at the step's time): it is listed once, as the deviation's."""
    steps = [(d, change) for d in payload.deviations for change in d.get("changes") or []]
    known = {(str(d.get("id")), change.get("t")) for d, change in steps}
    others = [
        r
        for r in payload.audit_records()
        if r.get("old") is not None
        and not (
            str(r.get("action", "")).startswith("deviation.")
            and (str(r.get("target")), r.get("t")) in known
        )
    ]
    return steps, others


def _changed_section(payload: _Payload) -> list[Flowable]:
    out: list[Flowable] = [CondPageBreak(_SECTION_ROOM), _m("Changed since original entry", _H1)]
    steps, others = _changed_records(payload)
    if not steps and not others:
        out.append(_m("No record was changed after its original entry.", _GOOD))
        return out
    out.append(
        _m(
            f"{len(steps) + len(others)} changes were recorded after the original entry of "
            "their record. Each is an appended, chained audit entry with who, when, the old and "
            "the new value and why; the original entry is kept as it was.",
            _BODY,
        )
    )
    if steps:
        out.append(_m("Deviations changed by their lifecycle", _H2))
        rows: list[list[Flowable | str]] = [
            [
                _p(d.get("id")),
                _p(_utc(change.get("t"))),
                _p(change.get("actor")),
                _m(f"<b>{_esc(change.get('state'))}</b>"),
                _p(change.get("note")),
            ]
            for d, change in steps
        ]
        out.append(
            _table(
                ("Deviation", "Time (UTC)", "By", "To state", "Note"), rows, (15, 16, 14, 11, 44)
            )
        )
    if others:
        out.append(_m("Other records changed (audit entries with an old value)", _H2))
        out.append(_audit_table(others))
    return out


# --- the signatures ------------------------------------------------------------------------


def _signature_section(payload: _Payload, clock: _Clock) -> list[Flowable]:
    out: list[Flowable] = [
        _m("Signatures", _H1),
        _m("Electronic signatures made in pocd during the run (21 CFR 11.50)", _H2),
        _m(
            "Each with the signer's printed name, the date and time of signing in UTC and in "
            f"the run's time zone ({_esc(clock.name)}), and its meaning. Intact: the signed "
            "record still has the content it had when it was signed.",
            _NOTE,
        ),
    ]
    rows: list[list[Flowable | str]] = []
    marks: list[tuple[Any, ...]] = []
    for s in payload.signatures:
        intact = bool(s.get("intact"))
        rows.append(
            [
                _m(f"<b>{_esc(s.get('name'))}</b><br/>{_esc(s.get('login'))}"),
                _m(f"<b>{_esc(s.get('meaning'))}</b>"),
                _m(
                    f"{_esc(_utc(s.get('t')))} UTC<br/>{_esc(clock.local(s.get('t_ns')))}"
                    f"<br/>(offset recorded: {_esc(s.get('utc_offset'))})"
                ),
                _m(
                    f"{_esc(s.get('action'))}: {_esc(s.get('record'))}<br/>"
                    f'<font name="Courier" size="6.5">{_esc(s.get("record_hash"))}</font>'
                ),
                _m("yes" if intact else f'<font color="#a8001c"><b>NO: {_BROKEN}</b></font>'),
            ]
        )
        if not intact:
            marks.append(("BACKGROUND", (0, len(rows)), (-1, len(rows)), _RED_BG))
    if rows:
        out.append(
            _table(
                (
                    "Printed name / login",
                    "Meaning",
                    "Date and time",
                    "Signed action and record (SHA-256)",
                    "Intact",
                ),
                rows,
                (18, 10, 22, 38, 12),
                marks,
            )
        )
    else:
        out.append(_none("No electronic signature was made in pocd during the run."))

    out.append(Spacer(1, 6 * mm))
    out.append(_m("Signatures of this bundle", _H2))
    out.append(
        _m(
            "The people who review, approve and release the batch sign the bundle itself: each "
            'signature is made on the bundle with <font name="Courier">pocd sign</font> (an '
            "electronic signature bound to the bundle's contents, this report and every payload "
            'file included) and is checked by <font name="Courier">pocd verify</font>. The '
            "lines below are for the printed name, the date and time and the meaning of each.",
            _BODY,
        )
    )
    for meaning in MEANINGS:
        block = Table(
            [
                [_m(f"<b>{meaning.capitalize()} by</b> (meaning: {meaning})"), "", ""],
                [
                    _m("Printed name"),
                    _m("Date and time (UTC and " + _esc(clock.name) + ")"),
                    _m("Signature"),
                ],
                ["", "", ""],
            ],
            colWidths=[0.36 * _WIDTH, 0.36 * _WIDTH, 0.28 * _WIDTH],
            rowHeights=[None, None, 12 * mm],
            hAlign="LEFT",
        )
        block.setStyle(
            TableStyle(
                [
                    ("SPAN", (0, 0), (-1, 0)),
                    ("LINEBELOW", (0, 2), (-1, 2), 0.7, colors.black),
                    ("LINEBEFORE", (1, 1), (-1, 2), 0.25, _RULE),
                    ("TEXTCOLOR", (0, 1), (-1, 1), _GREY),
                    ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ]
            )
        )
        out += [KeepTogether([block]), Spacer(1, 5 * mm)]
    return out
