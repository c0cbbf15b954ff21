"""The site's Ed25519 key: it signs the checkpoints of the store's chain (pocd.store.chain),
so that a rewritten or truncated history is caught by anyone holding its public key and the
checkpoints (the control site, an auditor).

The private key lives beside the store (`site-key.pem`, mode 0600, made at the daemon's first
start); its public half is `site-key.pub` (raw 32 bytes, hex), which is what verifiers need.
Must not: show or log the private key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pocd.errors import StoreError

__all__ = ["SiteKey", "key_id", "public_key_file", "verify_signature"]

_PRIVATE = "site-key.pem"
_PUBLIC = "site-key.pub"


def public_key_file(data_dir: Path) -> Path:
    return data_dir / _PUBLIC


def key_id(public: bytes) -> str:
    """A short name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:16]


def verify_signature(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class SiteKey:
    """The site's signing key, loaded from `data_dir` or made there."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id = key_id(self.public)

    def __repr__(self) -> str:
        return f"SiteKey({self.id})"

    @classmethod
    def open(cls, data_dir: Path) -> SiteKey:
        """The key in `data_dir`, made (and its public half written) if there is none.
        StoreError naming the file if it cannot be read or written."""
        path = data_dir / _PRIVATE
        try:
            if path.exists():
                loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
                if not isinstance(loaded, Ed25519PrivateKey):
                    raise StoreError(f"{path}: not an Ed25519 private key")
                key = cls(loaded)
            else:
                key = cls(Ed25519PrivateKey.generate())
                pem = key._private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(pem)
            public = data_dir / _PUBLIC
            if not public.exists():
                public.write_text(key.public.hex() + "\n")
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: cannot use the site key: {exc}") from exc
        return key

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def private_key(self) -> Ed25519PrivateKey:
        """The key itself, for signing envelopes (pocd.release.attest); never to be written."""
        return self._private
