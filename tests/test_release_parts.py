"""The parts of the release record on their own: the audit segment and its offline check, the
signed envelopes, people's keys and the site's keyring, and the gaps."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from pathlib import Path

import pytest

from pocd.model import NS, AuditEntry, Excursion, ExcursionKind, PhaseChange, User
from pocd.release.exceptions import find_gaps
from pocd.release.keys import (
    Holder,
    KeyProblem,
    create_key,
    load_private,
    read_keyring,
    read_public,
    write_keyring,
)
from pocd.release.segment import verify_segment, write_segment
from pocd.sitekey import SiteKey, key_id
from pocd.store import Store

T0 = 1_780_000_000_000_000_000


def _segment(tmp_path: Path) -> tuple[list[str], SiteKey]:
    """The segment (from entry 2) of a store holding audit entries, a user, a checkpoint in
    the middle and one at the end."""
    key = SiteKey.open(tmp_path)
    with Store(tmp_path / "pocd.sqlite") as store:
        store.write([AuditEntry(T0 + i, "op", "run.start", f"r{i}", "") for i in range(5)])
        store.write([User("olive", "Olive", ("qa",), "secret-hash", False, T0, T0)])
        store.checkpoint("pocd/test", key.sign, key.id, T0)
        store.write([AuditEntry(T0 + 9, "op", "run.stop", "r1", "done", old="a", new="b")])
        store.checkpoint("pocd/test", key.sign, key.id, T0 + 10)
    db = sqlite3.connect(tmp_path / "pocd.sqlite")
    out = io.StringIO()
    report = write_segment(db, 2, out)
    db.close()
    assert report.problems == []
    return out.getvalue().splitlines(), key


def test_a_segment_verifies_with_the_site_key_and_shows_no_password_hash(tmp_path: Path) -> None:
    lines, key = _segment(tmp_path)
    report = verify_segment(lines, key.public)
    assert report.problems == []
    assert (report.first, report.entries, report.checkpoints) == (2, report.last - 1, 2)
    assert "secret-hash" not in "\n".join(lines)
    audit = [json.loads(x) for x in lines if '"kind":"audit"' in x]
    assert audit[-1]["record"]["reason"] == "done"
    (tmp_path / "other").mkdir()
    other = SiteKey.open(tmp_path / "other")
    assert "does not verify with the site key" in " ".join(
        verify_segment(lines, other.public).problems
    )


def _edit(line: str, **changes: object) -> str:
    obj = json.loads(line)
    obj.update(changes)
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("delete", "entries deleted or reordered"),
        ("insert", "does not link to the line before it"),
        ("reorder", "entries deleted or reordered"),
        ("edit-row", "its row differs from what was recorded"),
        ("edit-record", "its record does not show its row"),
        ("truncate", "entries were cut off or added"),
        ("drop-checkpoints", "no signed checkpoint covers the segment"),
    ],
)
def test_each_change_of_a_segment_is_named(tmp_path: Path, case: str, expected: str) -> None:
    lines, key = _segment(tmp_path)
    entries = [i for i, x in enumerate(lines) if '"type":"entry"' in x]
    i = entries[1]
    match case:
        case "delete":
            del lines[i]
        case "insert":
            lines.insert(i, _edit(lines[i], ref="r99"))
        case "reorder":
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        case "edit-row":
            obj = json.loads(lines[i])
            obj["row"][4] = "r-forged"
            lines[i] = json.dumps(obj)
        case "edit-record":
            obj = json.loads(lines[i])
            obj["record"]["reason"] = "forged"
            lines[i] = json.dumps(obj)
        case "truncate":
            lines = [x for x in lines if '"type":"entry"' not in x or x != lines[entries[-1]]]
        case "drop-checkpoints":
            lines = [x for x in lines if '"type":"checkpoint"' not in x]
    problems = verify_segment(lines, key.public).problems
    assert any(expected in p for p in problems), problems


def test_a_person_key_is_encrypted_and_the_keyring_is_signed_by_the_site(tmp_path: Path) -> None:
    key_path, public_path = create_key(tmp_path / "keys", "Dr Quinn QP", "a long passphrase")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED" in key_path.read_bytes()
    with pytest.raises(KeyProblem, match="wrong passphrase"):
        load_private(key_path, "not the passphrase")
    private = load_private(key_path, "a long passphrase")
    name, public = read_public(public_path)
    assert (name, private.public_key().public_bytes_raw()) == ("Dr Quinn QP", public)
    with pytest.raises(KeyProblem, match="at least 8"):
        create_key(tmp_path, "Short", "short")

    site = SiteKey.open(tmp_path)
    ring = tmp_path / "keyring.json"
    write_keyring(ring, "site-1", site, [Holder(key_id(public), public, name, "quinn", ("qp",))])
    keyring = read_keyring(ring, site.public)
    assert keyring.holders[key_id(public)].roles == ("qp",)
    # a role added by hand breaks the site's signature
    envelope = json.loads(ring.read_text())
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["holders"][0]["roles"] = ["qp", "admin"]
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    ring.write_text(json.dumps(envelope))
    with pytest.raises(KeyProblem, match="not a keyring signed by its site key"):
        read_keyring(ring)


def test_gaps_are_the_data_loss_excursions_and_each_daemon_downtime() -> None:
    def excursion(kind: ExcursionKind, start: int, end: int | None) -> Excursion:
        return Excursion(f"e{start}", "r1", "temperature", kind, "P", "1", "a", None, start, end)

    excursions = [
        excursion(ExcursionKind.COMM_LOSS, T0 + 10 * NS, T0 + 20 * NS),
        excursion(ExcursionKind.ACTION_HIGH, T0 + 30 * NS, T0 + 40 * NS),
        excursion(ExcursionKind.STALE, T0 + 50 * NS, None),
    ]
    phases = [
        PhaseChange("r1", T0, "a", None, "op", True),
        PhaseChange("r1", T0 + 25 * NS, "b", "a", "op"),
    ]
    sources = {"temperature": ("incubator", "t"), "ph": ("bioreactor", "ph")}
    gaps = find_gaps(excursions, [(T0 + 22 * NS, T0 + 28 * NS)], sources, phases, T0 + 60 * NS)
    assert [(g.parameter, g.cause, g.seconds, g.phase, g.device) for g in gaps] == [
        ("temperature", "comm-loss", 10.0, "a", "incubator"),
        ("ph", "daemon-down", 6.0, "a", "bioreactor"),
        ("temperature", "daemon-down", 6.0, "a", "incubator"),
        ("temperature", "stale", 10.0, "a", "incubator"),
    ]
