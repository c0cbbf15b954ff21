"""What a notification channel delivers: one alarm transition (`Notification`), during a
flood one summary of a consolidation window (`Summary`), or a signed checkpoint of the store's
chain for the control site to keep as a witness (`Witness`), each rendered three ways: a
subject line, a text for people, and JSON for machines.

The id is derived from what it reports, never drawn at random, so that sending it again
(after a crash, a retry) carries the same id and the far side can recognise it.

Must not: do I/O, read the clock or the store; decide who is notified (routing is not here).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any, Final

from pocd.model import AlarmEvent, AlarmPriority, AlarmState, AlarmTransition, Checkpoint
from pocd.records import json_bytes, readable
from pocd.store.recordtypes import iso

__all__ = ["Item", "Notification", "Summary", "SummaryAlarm", "Witness"]

# Hex digits of the sha256 kept in an id: 128 bits, as long as a UUID.
_ID_CHARS: Final = 32


def _digest(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)  # unit separator: no part can fake another
    return hashlib.sha256(text.encode()).hexdigest()[:_ID_CHARS]


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{readable(value)} {unit}".strip()


@dataclass(frozen=True, slots=True)
class Notification:
    """One alarm event for people, at one escalation tier (0: the first to be told).

    The id is the same for the same event and tier on every send: a tier-1 escalation of an
    event is another notification than its tier-0 one (other people, its own delivery)."""

    id: str
    event: AlarmEvent
    site: str
    link: str  # the console page of the alarm
    tier: int = 0

    @classmethod
    def of(cls, event: AlarmEvent, *, site: str, base_url: str, tier: int = 0) -> Notification:
        """The notification of `event`, its id derived from it and its link from `base_url`."""
        ident = _digest(site, event.alarm_id, event.transition.value, event.t, tier)
        link = f"{base_url.rstrip('/')}/alarms/{event.alarm_id}"
        return cls(id=ident, event=event, site=site, link=link, tier=tier)

    def subject(self) -> str:
        e = self.event
        what = f"{e.line} {e.source} {e.kind}"
        value = "" if e.value is None else f" {_number(e.value, e.unit)}"
        return (
            f"[pocd {self.site}] {e.priority.value.upper()} {e.transition.value}: {what}{value}"
            f" ({e.state.value})"
        )

    def text(self) -> str:
        e = self.event
        rows = [
            ("Site", self.site),
            ("Line", e.line),
            ("Batch", e.batch_id or "-"),
            ("Run", e.run_id or "-"),
            ("Phase", e.phase or "-"),
            ("Device", e.device or "-"),
            ("Parameter", e.source),
            ("Kind", e.kind),
            ("Value", _number(e.value, e.unit)),
            ("Limit", _number(e.limit, e.unit)),
            ("Priority", e.priority.value),
            ("Began", iso(e.began) or "-"),
            ("State", e.state.value),
            ("Transition", f"{e.transition.value} at {iso(e.t)}"),
            ("By", e.actor),
            ("Comment", e.comment or "-"),
            ("Escalation tier", str(self.tier)),
            ("Alarm", e.alarm_id or "-"),
            ("Console", self.link),
            ("Notification", self.id),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in rows) + "\n"

    def data(self) -> dict[str, Any]:
        """The JSON of the notification as a JSON-ready dict."""
        e = self.event
        return {
            "type": "alarm",
            "id": self.id,
            "site": self.site,
            "tier": self.tier,
            "link": self.link,
            "alarm_id": e.alarm_id,
            "line": e.line,
            "source": e.source,
            "kind": e.kind,
            "device": e.device,
            "run_id": e.run_id,
            "batch_id": e.batch_id,
            "phase": e.phase,
            "value": e.value,
            "limit": e.limit,
            "unit": e.unit,
            "priority": e.priority.value,
            "state": e.state.value,
            "transition": e.transition.value,
            "actor": e.actor,
            "comment": e.comment,
            "first_out": e.first_out,
            "t": iso(e.t),
            "t_ns": e.t,
            "began": iso(e.began),
            "began_ns": e.began,
            "until": iso(e.until),
            "until_ns": e.until,
        }

    def json(self) -> bytes:
        """The JSON of the notification: one line of UTF-8 (a forwarder unit)."""
        return json_bytes(self.data())

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Notification:
        """The notification `data()` made (KeyError or ValueError if it is not one)."""
        event = AlarmEvent(
            t=int(data["t_ns"]),
            alarm_id=str(data["alarm_id"]),
            line=str(data["line"]),
            source=str(data["source"]),
            kind=str(data["kind"]),
            transition=AlarmTransition(data["transition"]),
            state=AlarmState(data["state"]),
            priority=AlarmPriority(data["priority"]),
            began=data["began_ns"],
            actor=str(data["actor"]),
            comment=str(data["comment"]),
            until=data["until_ns"],
            run_id=data["run_id"],
            batch_id=data["batch_id"],
            phase=data["phase"],
            device=str(data["device"]),
            value=data["value"],
            limit=data["limit"],
            unit=str(data["unit"]),
            first_out=bool(data["first_out"]),
        )
        return cls(
            id=str(data["id"]),
            event=event,
            site=str(data["site"]),
            link=str(data["link"]),
            tier=int(data["tier"]),
        )


@dataclass(frozen=True, slots=True)
class SummaryAlarm:
    """One alarm of a flood summary."""

    alarm_id: str
    source: str
    kind: str
    priority: AlarmPriority
    state: AlarmState

    @classmethod
    def of(cls, event: AlarmEvent) -> SummaryAlarm:
        return cls(event.alarm_id, event.source, event.kind, event.priority, event.state)


@dataclass(frozen=True, slots=True)
class Summary:
    """During a flood on a line: the alarms one route consolidates in one window, sent once
    instead of one notification each. Its id is derived from the site, route, line and
    window."""

    id: str
    site: str
    line: str
    start: int  # the window, ns since the epoch
    end: int
    alarms: tuple[SummaryAlarm, ...]
    link: str  # the console's alarm list of the line

    @classmethod
    def of(
        cls,
        *,
        route: str,
        site: str,
        line: str,
        start: int,
        end: int,
        alarms: tuple[SummaryAlarm, ...],
        base_url: str,
    ) -> Summary:
        link = f"{base_url.rstrip('/')}/alarms?line={line}"
        ident = _digest(site, "summary", route, line, start, end)
        return cls(ident, site, line, start, end, alarms, link)

    @property
    def count(self) -> int:
        return len(self.alarms)

    @property
    def priority(self) -> AlarmPriority:
        """The highest priority among its alarms (LOW if it has none)."""
        order = list(AlarmPriority)
        return max((a.priority for a in self.alarms), key=order.index, default=AlarmPriority.LOW)

    def subject(self) -> str:
        return (
            f"[pocd {self.site}] FLOOD on {self.line}: {self.count} alarms "
            f"from {iso(self.start)} to {iso(self.end)}"
        )

    def text(self) -> str:
        head = [
            f"Site:   {self.site}",
            f"Line:   {self.line}",
            f"Window: {iso(self.start)} to {iso(self.end)}",
            f"Alarms: {self.count} (highest priority {self.priority.value})",
            f"Console: {self.link}",
            f"Summary: {self.id}",
            "",
        ]
        rows = [
            f"  {a.priority.value:<8} {a.state.value:<16} {a.source} {a.kind}  ({a.alarm_id})"
            for a in self.alarms
        ]
        return "\n".join(head + rows) + "\n"

    def data(self) -> dict[str, Any]:
        return {
            "type": "summary",
            "id": self.id,
            "site": self.site,
            "line": self.line,
            "start": iso(self.start),
            "start_ns": self.start,
            "end": iso(self.end),
            "end_ns": self.end,
            "count": self.count,
            "priority": self.priority.value,
            "link": self.link,
            "alarms": [
                {
                    "alarm_id": a.alarm_id,
                    "source": a.source,
                    "kind": a.kind,
                    "priority": a.priority.value,
                    "state": a.state.value,
                }
                for a in self.alarms
            ],
        }

    def json(self) -> bytes:
        return json_bytes(self.data())


@dataclass(frozen=True, slots=True)
class Witness:
    """A signed checkpoint of the store's chain (pocd.model.Checkpoint): with the site's
    public key, whoever keeps it can later tell that the history was rewritten or cut. The
    note signed is `pocd.store.chain.checkpoint_note(origin, size, hash)`."""

    id: str
    site: str
    t: int
    origin: str
    size: int
    hash: str
    signature: str  # base64
    key_id: str

    @classmethod
    def of(cls, checkpoint: Checkpoint, *, site: str) -> Witness:
        origin = checkpoint.note.split(b"\n", 1)[0].decode()
        signature = base64.b64encode(checkpoint.signature).decode()
        ident = _digest(site, "checkpoint", checkpoint.size, checkpoint.hash)
        return cls(
            ident,
            site,
            checkpoint.t,
            origin,
            checkpoint.size,
            checkpoint.hash,
            signature,
            checkpoint.key_id,
        )

    def subject(self) -> str:
        return f"[pocd {self.site}] chain checkpoint {self.size}"

    def text(self) -> str:
        return "".join(f"{k}: {v}\n" for k, v in self.data().items())

    def data(self) -> dict[str, Any]:
        return {
            "type": "checkpoint",
            "id": self.id,
            "site": self.site,
            "t": iso(self.t),
            "t_ns": self.t,
            "origin": self.origin,
            "size": self.size,
            "hash": self.hash,
            "signature": self.signature,
            "key_id": self.key_id,
        }

    def json(self) -> bytes:
        return json_bytes(self.data())

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Witness:
        return cls(
            str(data["id"]),
            str(data["site"]),
            int(data["t_ns"]),
            str(data["origin"]),
            int(data["size"]),
            str(data["hash"]),
            str(data["signature"]),
            str(data["key_id"]),
        )


Item = Notification | Summary | Witness
"""What a channel sends."""
