"""Sending a sink's quarantine again: what `pocd sink resend` does.

An InfluxDB sink quarantines a point InfluxDB refused on its own (beside points it took) as an
incident holding the point's lines (see pocd.sinks.influxdb). `resend` writes those lines
again: the quarantine incidents recorded after the sink's `quarantine` cursor, in order, with
the sink's own settings. The cursor then moves past each incident written. Points InfluxDB
takes now leave the quarantine. Points it refuses on their own again go back into it as a new
incident (the old one stays: incidents are never changed). If InfluxDB takes none of them
(it still refuses the stream), nothing changes. If it stops answering, what was done until
then is kept. An audit entry names the operator and what happened.

It works whether the daemon runs or not: the sink and this command only append incidents and
move their own cursors in the store, and a point written twice overwrites itself.

Must not: change or delete an incident; move the forwarding cursors (samples, events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pocd.errors import StoreError
from pocd.model import AuditEntry, Incident, IncidentKind, now_ns
from pocd.sinks import SinkError
from pocd.sinks.forward import QUARANTINE_CURSOR, Writer, WriteResult, redact, refused_alone
from pocd.sinks.influxdb import QUARANTINE, line_body, open_writer
from pocd.store import Store

if TYPE_CHECKING:
    from pocd.settings import Site
    from pocd.sinks.config import InfluxSettings

__all__ = ["QuarantineEntry", "ResendReport", "quarantine", "resend", "sink_settings"]


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """One quarantine incident not yet sent again."""

    incident_id: int
    t: int
    points: int
    message: str


@dataclass(frozen=True, slots=True)
class ResendReport:
    """What one resend did. `error` says why it stopped early, or why nothing changed."""

    sink: str
    incidents: int  # quarantine incidents it had to send
    points: int  # their points
    sent: int  # points InfluxDB took
    refused: int  # points it refused on their own again: back in quarantine
    unsent: int  # points not sent (InfluxDB stopped answering, or took none)
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.refused == 0 and self.unsent == 0

    def describe(self) -> str:
        if not self.incidents:
            return f"sink {self.sink}: the quarantine is empty"
        text = (
            f"sink {self.sink}: {self.sent} of {self.points} quarantined points sent "
            f"({self.incidents} incidents)"
        )
        if self.refused:
            text += f"; {self.refused} refused again and kept in quarantine"
        if self.unsent:
            text += f"; {self.unsent} not sent"
        return text + (f": {self.error}" if self.error else "")


def sink_settings(site: Site, name: str | None) -> InfluxSettings:
    """The settings of the sink called `name` (or of the one sink); SinkError if there is no
    such sink, or several and no name."""
    sinks = {s.name: s for s in site.config.sinks.influxdb}
    if name is None and len(sinks) == 1:
        return next(iter(sinks.values()))
    if name in sinks:
        return sinks[name]
    known = ", ".join(sinks) or "none"
    which = "name one with --sink" if name is None else f"no sink {name!r}"
    raise SinkError(f"{site.path}: {which} (sinks: {known})")


def quarantine(store: Store, name: str) -> list[QuarantineEntry]:
    """The quarantine of sink `name` in `store`: the incidents not yet sent again."""
    after = store.cursors(name).get(QUARANTINE_CURSOR, 0)
    return [
        QuarantineEntry(incident_id, i.t, i.raw.count(b"\n") + 1, i.message)
        for incident_id, i in store.incidents_of(f"sink:{name}", QUARANTINE, after=after)
    ]


async def resend(site: Site, settings: InfluxSettings, *, operator: str) -> ResendReport:
    """Send the quarantine of one sink again (see the module docstring). SinkError if its
    secrets cannot be read; StoreError if the store cannot be used, or if another resend
    moved the quarantine cursor meanwhile (then nothing of this one is stored)."""
    if not site.store_path.exists():
        raise StoreError(f"no store yet at {site.store_path}: the daemon has not run")
    store = await asyncio.to_thread(
        Store, site.store_path, parameters=site.point_parameters(), lines=site.point_lines()
    )
    try:
        after = store.cursors(settings.name).get(QUARANTINE_CURSOR, 0)
        held = store.incidents_of(f"sink:{settings.name}", QUARANTINE, after=after)
        if not held:
            return ResendReport(settings.name, 0, 0, 0, 0, 0)
        writer, secrets = open_writer(settings, site.path.parent)
        try:
            work = _Resend(settings, writer, secrets)
            await work.send(held)
        finally:
            await writer.close()
        points = sum(len(lines) for lines in work.lines_of(held))
        report = ResendReport(
            settings.name,
            len(held),
            points,
            work.sent,
            work.refused,
            points - work.sent - work.refused,
            work.error,
        )
        if work.sent == 0:
            # InfluxDB took nothing: it still refuses these points (or the stream); keep the
            # quarantine as it is rather than fill it with copies.
            return _unchanged(report)
        audit = AuditEntry(
            now_ns(),
            operator,
            "sink.resend",
            settings.name,
            new=f"{work.sent} sent, {work.refused} refused again, {report.unsent} not sent",
            details={"incidents": f"{held[0][0]}..{work.done}"},
        )
        await asyncio.to_thread(
            store.advance_cursors,
            settings.name,
            {QUARANTINE_CURSOR: work.done},
            work.incidents,
            audit=[audit],
            expected={QUARANTINE_CURSOR: after},
        )
        return report
    finally:
        store.close()


def _unchanged(report: ResendReport) -> ResendReport:
    reason = report.error or "InfluxDB refused every point again"
    return ResendReport(
        report.sink,
        report.incidents,
        report.points,
        0,
        0,
        report.points,
        f"{reason}; the quarantine is unchanged",
    )


class _Resend:
    """One pass over the quarantine: what was sent, refused again, and where it stopped."""

    def __init__(self, settings: InfluxSettings, writer: Writer, secrets: list[str]) -> None:
        self.settings, self.writer, self.secrets = settings, writer, secrets
        self.sent = self.refused = 0
        self.done = 0  # the last incident written (taken or quarantined again)
        self.incidents: list[Incident] = []  # the points refused again
        self.error: str | None = None

    @staticmethod
    def lines_of(held: list[tuple[int, Incident]]) -> list[list[str]]:
        return [i.raw.decode(errors="replace").split("\n") for _, i in held]

    def _body(self, lines: Sequence[str]) -> bytes:
        return line_body(lines, gzipped=self.settings.gzip)

    async def send(self, held: list[tuple[int, Incident]]) -> None:
        for (incident_id, _), lines in zip(held, self.lines_of(held), strict=True):
            answer = await self.writer.write(self._body(lines))
            if not answer.ok and answer.rejected:
                found = await refused_alone(self.writer, lines, self._body, answer)
            else:
                found = answer if not answer.ok else []
            if isinstance(found, WriteResult):  # the far side failed: stop here
                self.error = redact(found.describe(), self.secrets)
                return
            refused = sum(len(span) for span, _ in found)
            self.sent += len(lines) - refused
            self.refused += refused
            self.done = incident_id
            for span, refusal in found:
                self.incidents.append(self._again(incident_id, lines, span, refusal))

    def _again(
        self, incident_id: int, lines: list[str], span: range, refusal: WriteResult
    ) -> Incident:
        error = redact(refusal.describe(), self.secrets)
        what = f"line {span[0] + 1}" if len(span) == 1 else f"{len(span)} points"
        if len(span) > 1:
            what += f", lines {span[0] + 1} to {span[-1] + 1},"
        return Incident(
            now_ns(),
            IncidentKind.DATA,
            QUARANTINE,
            f"sink:{self.settings.name}",
            redact(
                f"{what} of incident {incident_id} refused again by InfluxDB on resend "
                f"({error}); kept in quarantine",
                self.secrets,
            ),
            "\n".join(lines[i] for i in span).encode(),
        )
