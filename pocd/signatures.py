"""Electronic signatures (21 CFR 11.50, 11.70, 11.200; Annex 11 s14): who signs, with what
meaning, bound to the exact record signed.

A signature is made where the record it signs is made (run control), so that the record, the
signature and the audit entry saying so are committed together or not at all. It holds the
SHA-256 of the record's stored content (pocd.store.recordtypes.digest): `verify` reads the
record back and recomputes it, so any later change of the record breaks the link.

Checking the signer's password is the caller's (the API): what reaches here has been signed.
No I/O here but the store reads of `verify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from pocd.model import NS, AuditEntry, PhaseChange, Run, Signature
from pocd.store import Store
from pocd.store.recordtypes import digest

__all__ = ["SignedRecord", "Signer", "reference", "sign", "utc_offset", "verify"]

SignedRecord = Run | PhaseChange | AuditEntry


@dataclass(frozen=True, slots=True)
class Signer:
    """A user who has just given their password again to sign, and what their signature
    means (a pocd.access.Meaning value)."""

    login: str
    name: str
    meaning: str


def reference(record: SignedRecord) -> str:
    """How a signature names the record it signs (see Store.signed_record)."""
    match record:
        case Run():
            return f"run:{record.id}"
        case PhaseChange():
            return f"phase:{record.run_id}:{record.t}"
        case AuditEntry():
            return f"audit:{record.action}:{record.t}"


def utc_offset(t: int, timezone: str) -> str:
    """The offset from UTC of the site's time zone at `t`, as +HH:MM."""
    local = datetime.fromtimestamp(t / NS, UTC).astimezone(ZoneInfo(timezone))
    text = local.strftime("%z")  # +0100
    return f"{text[:3]}:{text[3:]}"


def sign(
    signer: Signer,
    action: str,
    record: SignedRecord,
    *,
    t: int,
    timezone: str,
    run_id: str | None,
) -> tuple[Signature, AuditEntry]:
    """The signature of `record` by `signer`, and the audit entry that enters it in the
    trail; both go into the transaction that stores the record."""
    signature = Signature(
        t=t,
        utc_offset=utc_offset(t, timezone),
        login=signer.login,
        name=signer.name,
        meaning=signer.meaning,
        action=action,
        record=reference(record),
        record_hash=digest(record),
        run_id=run_id,
    )
    audit = AuditEntry(
        t,
        signer.login,
        "signature",
        signature.record,
        new=signer.meaning,
        details={"action": action, "name": signer.name, "sha256": signature.record_hash},
    )
    return signature, audit


def verify(store: Store, signature: Signature) -> bool:
    """Whether the record signed is still in the store exactly as it was signed."""
    record = store.signed_record(signature.record)
    return record is not None and digest(record) == signature.record_hash
