"""`pocd verify` and `pocd sign`: the bundle checked, and signed by a person, with no daemon and
no store, on any machine (a remote QP's).

Verify checks, and names exactly what fails:
- the BagIt manifests (every payload and tag file, nothing added);
- the site's attestation: its signature by the site key (the keyring's, when one is given;
  else the key the bag names, which proves consistency, not origin), and that its subjects
  are exactly the payload files with their SHA-256;
- the audit segment: its links, rows and signed checkpoints, and that its last checkpoint is
  the one the attestation names;
- every person's signature: made over this attestation, and (with a keyring) by a key the
  site listed, `released` only by a holder of the qp role and only with no deviation open.

A person's signature is a DSSE envelope in `signatures/`, a tag directory no manifest covers,
so signing changes no file that any checksum covers.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import bagit
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pocd.errors import PocdError
from pocd.model import now_ns
from pocd.release import MEANINGS
from pocd.release.attest import (
    ATTESTATION_TYPE,
    PREDICATE_TYPE,
    SIGNATURE_TYPE,
    STATEMENT_TYPE,
    EnvelopeError,
    open_envelope,
    seal,
    sha256_file,
)
from pocd.release.bundle import ATTESTATION, SIGNATURES
from pocd.release.keys import KeyProblem, Keyring, read_keyring
from pocd.release.segment import verify_segment
from pocd.sitekey import key_id
from pocd.store.recordtypes import iso

__all__ = ["MEANINGS", "Verdict", "sign", "verify"]

SIGNATURE_FORMAT: Final = "https://pocd.dev/signature/v1"
_BAG_FILES: Final = frozenset({"bagit.txt", "bag-info.txt", ATTESTATION})

Say = Callable[[str], None]


class BundleError(PocdError):
    """The bundle cannot be read at all, or cannot be signed; the message says why."""


@dataclass(slots=True)
class Verdict:
    """What verify found: each check that held, and each problem."""

    held: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    signatures: list[dict[str, Any]] = field(default_factory=list)
    predicate: dict[str, Any] = field(default_factory=dict)
    attestation_sha256: str = ""

    @property
    def holds(self) -> bool:
        return not self.problems


def _quiet(_: str) -> None:
    pass


@contextmanager
def opened(bundle: Path) -> Iterator[Path]:
    """The bag folder of `bundle`: itself, or a zip's one folder unpacked in a temporary one."""
    if bundle.is_dir():
        yield bundle
        return
    with tempfile.TemporaryDirectory() as scratch:
        try:
            with zipfile.ZipFile(bundle) as zf:
                tops = {Path(n).parts[0] for n in zf.namelist() if n.strip("/")}
                zf.extractall(scratch)  # member names are made safe (no .., no absolute path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{bundle}: not a bundle folder or zip: {exc}") from None
        if len(tops) != 1:
            raise BundleError(f"{bundle}: a bundle zip holds one bag folder, not {sorted(tops)}")
        yield Path(scratch) / tops.pop()


def verify(bundle: Path, keyring_path: Path | None = None, say: Say = _quiet) -> Verdict:
    verdict = Verdict()
    keyring = None
    if keyring_path is not None:
        try:
            keyring = read_keyring(keyring_path)
        except KeyProblem as exc:
            verdict.problems.append(str(exc))
            return verdict
    with opened(bundle) as bag_dir:
        _verify_bag(bag_dir, verdict, say)
        site_key = _site_key(bag_dir, keyring, verdict)
        attestation = (
            (bag_dir / ATTESTATION).read_bytes() if (bag_dir / ATTESTATION).is_file() else b""
        )
        verdict.attestation_sha256 = hashlib.sha256(attestation).hexdigest()
        statement = _verify_attestation(bag_dir, attestation, site_key, verdict)
        say("checking the audit segment")
        _verify_audit(bag_dir, site_key, statement, verdict)
        _verify_signatures(bag_dir, attestation, statement, keyring, verdict)
    return verdict


def _verify_bag(bag_dir: Path, verdict: Verdict, say: Say) -> None:
    files = [p for p in bag_dir.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    say(f"checking the BagIt manifests: {len(files)} files, {size / 2**20:.1f} MiB")
    try:
        bag = bagit.Bag(str(bag_dir))
        bag.validate(processes=2)
        verdict.held.append(f"BagIt: {len(bag.entries)} files match their manifests")
    except bagit.BagValidationError as exc:
        verdict.problems.append(f"BagIt: {exc.message}")
        # bagit stops at a wrong Payload-Oxum (the bag's size) before it names the files
        details = exc.details or _mismatches(bag_dir, bag)
        verdict.problems += [_bag_detail(d) for d in details]
    except bagit.BagError as exc:
        verdict.problems.append(f"BagIt: {exc}")
        return
    for path in files:
        name = path.relative_to(bag_dir).as_posix()
        parts = path.relative_to(bag_dir).parts
        if (
            parts[0] == "data"
            or name in _BAG_FILES
            or name.startswith(("manifest-", "tagmanifest-"))
            or (len(parts) == 2 and parts[0] == SIGNATURES and name.endswith(".json"))
        ):
            continue
        verdict.problems.append(f"{name}: added to the bag: no manifest or signature covers it")


def _mismatches(bag_dir: Path, bag: bagit.Bag) -> list[Any]:
    """What bagit would name file by file: each file changed, missing or not listed."""
    found: list[Any] = []
    for name, digests in bag.entries.items():
        path = bag_dir / name
        if not path.is_file():
            found.append(bagit.FileMissing(name))
        elif sha256_file(path) != digests.get("sha256"):
            found.append(bagit.ChecksumMismatch(name, "sha256", digests.get("sha256"), ""))
    listed = set(bag.entries)
    found += [bagit.UnexpectedFile(p) for p in bag.payload_files() if p not in listed]
    return found


def _bag_detail(detail: Any) -> str:
    if isinstance(detail, bagit.ChecksumMismatch):
        return f"{detail.path}: changed (its {detail.algorithm} is not the manifest's)"
    if isinstance(detail, bagit.FileMissing):
        return f"{detail.path}: missing (listed in the manifest)"
    if isinstance(detail, bagit.UnexpectedFile):
        return f"{detail.path}: added to the payload (not in the manifest)"
    return f"BagIt: {detail}"


def _site_key(bag_dir: Path, keyring: Keyring | None, verdict: Verdict) -> bytes | None:
    named = ""
    try:
        named = bagit.Bag(str(bag_dir)).info.get("Pocd-Site-Key", "")
        bag_key = bytes.fromhex(str(named)) if named else None
    except (bagit.BagError, ValueError):
        bag_key = None
    if keyring is not None:
        if bag_key is not None and bag_key != keyring.site_key:
            verdict.problems.append(
                f"bag-info.txt names site key {key_id(bag_key)}, the keyring's site "
                f"{keyring.site_id} has {key_id(keyring.site_key)}"
            )
        return keyring.site_key
    if bag_key is None:
        verdict.problems.append("bag-info.txt: no Pocd-Site-Key, and no keyring given")
    else:
        verdict.held.append(
            f"site key {key_id(bag_key)} taken from the bag (no --keyring: that proves the "
            "bundle is consistent, not that it comes from the site)"
        )
    return bag_key


def _verify_attestation(
    bag_dir: Path, attestation: bytes, site_key: bytes | None, verdict: Verdict
) -> dict[str, Any]:
    if not attestation:
        verdict.problems.append(f"{ATTESTATION}: missing")
        return {}
    try:
        statement = open_envelope(attestation, ATTESTATION_TYPE, site_key)
    except EnvelopeError as exc:
        verdict.problems.append(f"{ATTESTATION}: {exc} (replaced or edited)")
        return {}
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        verdict.problems.append(f"{ATTESTATION}: not a pocd release statement")
        return {}
    verdict.predicate = dict(statement.get("predicate") or {})
    claimed = {s["name"]: s["digest"]["sha256"] for s in statement.get("subject", [])}
    try:
        listed = {
            p: d["sha256"]
            for p, d in bagit.Bag(str(bag_dir)).entries.items()
            if p.startswith("data/")
        }
    except bagit.BagError:
        listed = {}
    for name in sorted(claimed.keys() | listed.keys()):
        if name not in listed:
            verdict.problems.append(f"{name}: attested but not in the bag (removed)")
        elif name not in claimed:
            verdict.problems.append(f"{name}: in the bag but not attested (added)")
        elif claimed[name] != listed[name]:
            verdict.problems.append(f"{name}: its SHA-256 is not the attested one (changed)")
    if not verdict.problems:
        verdict.held.append(
            f"attestation signed by site key {key_id(site_key or b'')}: {len(claimed)} files"
        )
    return statement


def _verify_audit(
    bag_dir: Path, site_key: bytes | None, statement: dict[str, Any], verdict: Verdict
) -> None:
    path = bag_dir / "data" / "audit.jsonl"
    if not path.is_file():
        verdict.problems.append("data/audit.jsonl: missing")
        return
    with path.open("rb") as fh:
        report = verify_segment(fh, site_key)
    verdict.problems += report.problems
    attested = (statement.get("predicate") or {}).get("checkpoint")
    if attested is not None and attested != report.checkpoint:
        verdict.problems.append(
            "data/audit.jsonl: its last checkpoint is not the one the attestation names"
        )
    if not report.problems:
        verdict.held.append(
            f"audit segment: entries {report.first}..{report.last} link up, {report.rows} rows "
            f"match their digests, {report.checkpoints} signed checkpoints match"
        )


def _verify_signatures(
    bag_dir: Path,
    attestation: bytes,
    statement: dict[str, Any],
    keyring: Keyring | None,
    verdict: Verdict,
) -> None:
    folder = bag_dir / SIGNATURES
    attested = hashlib.sha256(attestation).hexdigest()
    deviations = _deviation_states(bag_dir)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name = f"{SIGNATURES}/{path.name}"
        data = path.read_bytes()
        try:
            payload = open_envelope(data, SIGNATURE_TYPE, None)
            public = bytes.fromhex(payload["signer"]["public_key"])
        except (EnvelopeError, ValueError, KeyError, TypeError) as exc:
            verdict.problems.append(f"{name}: not a pocd signature: {exc}")
            continue
        holder = keyring.holders.get(key_id(public)) if keyring else None
        problems = _signature_problems(payload, public, data, attested, holder, keyring, deviations)
        shown = {
            "file": name,
            "meaning": payload.get("meaning"),
            "name": holder.name if holder else payload["signer"].get("name"),
            "login": holder.login if holder else None,
            "keyid": key_id(public),
            "t": payload.get("t"),
            "identity_checked": holder is not None,
            "holds": not problems,
        }
        verdict.signatures.append(shown)
        verdict.problems += [f"{name}: {p}" for p in problems]


def _signature_problems(
    payload: dict[str, Any],
    public: bytes,
    data: bytes,
    attested: str,
    holder: Any,
    keyring: Keyring | None,
    deviations: dict[str, str],
) -> list[str]:
    problems = []
    try:
        open_envelope(data, SIGNATURE_TYPE, public)
    except EnvelopeError as exc:
        return [f"its signature does not verify: {exc}"]
    if payload.get("_type") != SIGNATURE_FORMAT:
        problems.append("not a pocd signature statement")
    if (payload.get("attestation") or {}).get("sha256") != attested:
        problems.append("signs another attestation (made for another bundle, or it was replaced)")
    meaning = payload.get("meaning")
    if meaning not in MEANINGS:
        problems.append(f"meaning {meaning!r} is not one of {', '.join(MEANINGS)}")
    if keyring is not None and holder is None:
        problems.append(f"signed by key {key_id(public)}, which is not in the site's keyring")
    if meaning == "released":
        if holder is not None and "qp" not in holder.roles:
            problems.append(
                f"released by {holder.name}, whose key does not hold the qp role "
                f"({', '.join(holder.roles) or 'no role'})"
            )
        still_open = sorted(d for d, s in deviations.items() if s != "closed")
        if still_open:
            problems.append(f"released with deviations not closed: {', '.join(still_open)}")
    return problems


def _deviation_states(bag_dir: Path) -> dict[str, str]:
    try:
        found = json.loads((bag_dir / "data" / "deviations.json").read_text())
        return {str(d["id"]): str(d["state"]) for d in found}
    except (OSError, ValueError, KeyError, TypeError):
        return {"deviations.json": "unreadable"}


def sign(
    bundle: Path,
    private: Ed25519PrivateKey,
    name: str,
    meaning: str,
    keyring_path: Path | None = None,
    say: Say = _quiet,
) -> str:
    """Sign a verified bundle (folder or zip) with `meaning`; answers the signature's name in
    the bag. BundleError, and nothing signed, if the bundle does not verify, or for a release
    the signer may not make or the bundle may not have (an open deviation)."""
    if meaning not in MEANINGS:
        raise BundleError(f"meaning {meaning!r} is not one of {', '.join(MEANINGS)}")
    public = private.public_key().public_bytes_raw()
    verdict = verify(bundle, keyring_path, say)
    if not verdict.holds:
        raise BundleError(
            "the bundle does not verify, so it is not signed:\n"
            + "\n".join(f"  {p}" for p in verdict.problems)
        )
    if meaning == "released":
        still_open = verdict.predicate.get("open_deviations") or []
        if still_open:
            raise BundleError(
                f"batch {verdict.predicate.get('batch_id')} cannot be released: deviations not "
                f"closed: {', '.join(still_open)}"
            )
        if keyring_path is not None:
            holder = read_keyring(keyring_path).holders.get(key_id(public))
            if holder is None or "qp" not in holder.roles:
                raise BundleError("only a key holding the qp role in the keyring may release")
    with opened(bundle) as bag_dir:
        attestation = (bag_dir / ATTESTATION).read_bytes()
        count = (
            len(list((bag_dir / SIGNATURES).glob("*.json")))
            if (bag_dir / SIGNATURES).is_dir()
            else 0
        )
        bag_name = bag_dir.name
    t = now_ns()
    payload = {
        "_type": SIGNATURE_FORMAT,
        "attestation": {"sha256": hashlib.sha256(attestation).hexdigest()},
        "batch_id": verdict.predicate.get("batch_id"),
        "meaning": meaning,
        "signer": {"name": name, "keyid": key_id(public), "public_key": public.hex()},
        "t": iso(t),
    }
    envelope = seal(payload, SIGNATURE_TYPE, private)
    file_name = f"{count + 1:02d}-{meaning}-{key_id(public)}.json"
    if bundle.is_dir():
        (bundle / SIGNATURES).mkdir(exist_ok=True)
        (bundle / SIGNATURES / file_name).write_bytes(envelope)
    else:
        with zipfile.ZipFile(bundle, "a") as zf:
            zf.writestr(f"{bag_name}/{SIGNATURES}/{file_name}", envelope)
    return f"{SIGNATURES}/{file_name}"
