"""People's signing keys and the site's keyring.

A person signs a finished bundle with their own Ed25519 key (`pocd keys create`): the private
half is a PKCS#8 PEM file encrypted with their passphrase, which never leaves them; the public
half is a small JSON file they hand to the site. The site's keyring lists each holder's public
key with their printed name, login and roles (taken from their named user), and is itself a
DSSE envelope signed by the site key, so a verifier holding the keyring knows both who may
sign and which site key the bundles must come from.

Must not: write a private key unencrypted, or to a file others can read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pocd.errors import PocdError
from pocd.model import now_ns
from pocd.release.attest import KEYRING_TYPE, EnvelopeError, open_envelope, seal
from pocd.sitekey import SiteKey, key_id
from pocd.store.recordtypes import iso

__all__ = [
    "Holder",
    "KeyProblem",
    "Keyring",
    "create_key",
    "keyring_file",
    "load_private",
    "read_keyring",
    "read_public",
    "write_keyring",
]

KEYRING_FORMAT: Final = "https://pocd.dev/keyring/v1"


class KeyProblem(PocdError):
    """A key or keyring that cannot be made, read or trusted; the message names the file."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a key in the site's keyring."""

    keyid: str
    public: bytes
    name: str  # printed with their signatures (21 CFR 11.50)
    login: str
    roles: tuple[str, ...]

    def json(self) -> dict[str, Any]:
        return {
            "keyid": self.keyid,
            "public_key": self.public.hex(),
            "name": self.name,
            "login": self.login,
            "roles": list(self.roles),
        }


@dataclass(frozen=True, slots=True)
class Keyring:
    site_id: str
    site_key: bytes
    holders: Mapping[str, Holder]  # keyid -> holder
    t: str  # when the site signed it


def keyring_file(data_dir: Path) -> Path:
    return data_dir / "keyring.json"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "key"


def create_key(folder: Path, name: str, passphrase: str) -> tuple[Path, Path]:
    """A new key for `name`: (the encrypted private key, the public key file) in `folder`."""
    if len(passphrase) < 8:
        raise KeyProblem("the passphrase must be at least 8 characters")
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    stem = f"{_slug(name)}-{key_id(public)[:8]}"
    key_path, public_path = folder / f"{stem}.key", folder / f"{stem}.pub.json"
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.encode()),
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public_path.write_text(
            json.dumps(
                {"name": name, "keyid": key_id(public), "public_key": public.hex()}, indent=2
            )
            + "\n"
        )
    except OSError as exc:
        raise KeyProblem(f"{folder}: cannot write the key: {exc}") from exc
    return key_path, public_path


def load_private(path: Path, passphrase: str) -> Ed25519PrivateKey:
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), passphrase.encode())
    except OSError as exc:
        raise KeyProblem(f"{path}: cannot read the key: {exc}") from exc
    except (ValueError, TypeError):
        raise KeyProblem(f"{path}: wrong passphrase, or not a pocd key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise KeyProblem(f"{path}: not an Ed25519 key")
    return loaded


def read_public(path: Path) -> tuple[str, bytes]:
    """(name, public key) of a public key file made by `create_key`."""
    try:
        found = json.loads(path.read_text())
        public = bytes.fromhex(found["public_key"])
        name = str(found["name"])
    except OSError as exc:
        raise KeyProblem(f"{path}: cannot read: {exc}") from exc
    except (ValueError, KeyError, TypeError):
        raise KeyProblem(f"{path}: not a public key file of `pocd keys create`") from None
    if len(public) != 32:
        raise KeyProblem(f"{path}: public_key: not an Ed25519 key (32 bytes)")
    return name, public


def write_keyring(path: Path, site_id: str, site_key: SiteKey, holders: Iterable[Holder]) -> None:
    payload = {
        "_type": KEYRING_FORMAT,
        "site": {"id": site_id, "keyid": site_key.id, "public_key": site_key.public.hex()},
        "holders": sorted((h.json() for h in holders), key=lambda h: h["keyid"]),
        "t": iso(now_ns()),
    }
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_bytes(seal(payload, KEYRING_TYPE, site_key.private_key()))
        temporary.replace(path)
    except OSError as exc:
        raise KeyProblem(f"{path}: cannot write the keyring: {exc}") from exc


def read_keyring(path: Path, site_key: bytes | None = None) -> Keyring:
    """The keyring in `path`, checked to be signed by the site key it names (and, given
    `site_key`, to name that one)."""
    try:
        data = path.read_bytes()
        payload = open_envelope(data, KEYRING_TYPE, None)
        site = payload["site"]
        public = bytes.fromhex(site["public_key"])
        open_envelope(data, KEYRING_TYPE, public)
        holders = {
            h["keyid"]: Holder(
                h["keyid"], bytes.fromhex(h["public_key"]), h["name"], h["login"], tuple(h["roles"])
            )
            for h in payload["holders"]
        }
    except OSError as exc:
        raise KeyProblem(f"{path}: cannot read the keyring: {exc}") from exc
    except EnvelopeError as exc:
        raise KeyProblem(f"{path}: not a keyring signed by its site key: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyProblem(f"{path}: not a pocd keyring: {exc!r}") from None
    if payload.get("_type") != KEYRING_FORMAT:
        raise KeyProblem(f"{path}: not a pocd keyring ({payload.get('_type')!r})")
    if any(key_id(h.public) != k for k, h in holders.items()):
        raise KeyProblem(f"{path}: a holder's keyid does not match their key")
    if site_key is not None and public != site_key:
        raise KeyProblem(f"{path}: signed by site key {key_id(public)}, not {key_id(site_key)}")
    return Keyring(str(site["id"]), public, holders, str(payload.get("t", "")))
