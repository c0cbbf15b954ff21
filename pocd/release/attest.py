"""Signed JSON statements of the release record, in standard forms a stranger's tools read: an
in-toto Statement (v1) inside a DSSE envelope, its JSON canonical per RFC 8785 wherever it is
hashed or signed. The site's attestation of a bundle, a person's signature of it and the site's
keyring are all envelopes of this kind, told apart by their payload type.

Must not: sign or accept anything but Ed25519; trust an envelope's own claim of who signed it
(the caller names the key it must verify with).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import CryptoSigner, SSlibKey

from pocd.sitekey import key_id

__all__ = [
    "ATTESTATION_TYPE",
    "KEYRING_TYPE",
    "PREDICATE_TYPE",
    "SIGNATURE_TYPE",
    "STATEMENT_TYPE",
    "EnvelopeError",
    "canonical",
    "open_envelope",
    "seal",
    "sha256_file",
    "statement",
]

# The DSSE payload types: an in-toto statement (the attestation), a person's signature of a
# bundle, the site's keyring.
ATTESTATION_TYPE: Final = "application/vnd.in-toto+json"
SIGNATURE_TYPE: Final = "application/vnd.pocd.signature+json"
KEYRING_TYPE: Final = "application/vnd.pocd.keyring+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://pocd.dev/release/v1"


class EnvelopeError(Exception):
    """An envelope that cannot be read, is not of the type expected, or does not verify with
    the key it must; the message says which."""


def canonical(value: Any) -> bytes:
    """`value` as RFC 8785 canonical JSON: the one byte form that is hashed and signed."""
    return rfc8785.dumps(value)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def statement(subjects: Mapping[str, str], predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement: each subject (file name -> SHA-256) and the release predicate."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": name, "digest": {"sha256": d}} for name, d in sorted(subjects.items())
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": dict(predicate),
    }


def _sslib_key(public: bytes) -> SSlibKey:
    return SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(public), keyid=key_id(public))


def seal(payload: Any, payload_type: str, private: Ed25519PrivateKey) -> bytes:
    """A DSSE envelope of `payload` (canonical JSON) signed with `private`, as the file's bytes."""
    public = private.public_key().public_bytes_raw()
    envelope = Envelope(canonical(payload), payload_type, {})
    envelope.sign(CryptoSigner(private, _sslib_key(public)))
    return json.dumps(envelope.to_dict(), indent=2).encode() + b"\n"


def open_envelope(data: bytes, payload_type: str, public: bytes | None) -> dict[str, Any]:
    """The payload of a DSSE envelope, checked to be of `payload_type` and signed by `public`
    (None: only read it, the caller then verifies it with the key it names). EnvelopeError if
    not."""
    try:
        envelope = Envelope.from_dict(json.loads(data))
        payload = json.loads(envelope.payload)
    except (ValueError, KeyError, TypeError) as exc:
        raise EnvelopeError(f"not a DSSE envelope: {exc}") from None
    if envelope.payload_type != payload_type:
        raise EnvelopeError(f"payload type {envelope.payload_type!r}, not {payload_type!r}")
    if not isinstance(payload, dict):
        raise EnvelopeError("its payload is not a JSON object")
    if public is not None:
        try:
            envelope.verify([_sslib_key(public)], 1)
        except VerificationError:
            raise EnvelopeError(f"not signed by key {key_id(public)}") from None
    return payload
