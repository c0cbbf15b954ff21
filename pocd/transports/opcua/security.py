"""OPC UA security for the client: certificates, the server's trust, and the user's password.

The server certificate is judged here, before a secure channel is opened with it: it must be
the pinned file, or be (or be issued by) a certificate in the trust folder. Files are read at
every connect, so replacing a certificate needs no restart. The password comes from a file or
an environment variable and is never put into a message, a log line or an exception: errors
name where it came from, not what it is. This module must not log; errors carry the data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pocd.errors import DeviceError
from pocd.transports.opcua.config import OpcuaSettings

__all__ = [
    "AuthenticationFailed",
    "ClientIdentity",
    "SecuritySetupError",
    "ServerCertificateUntrusted",
    "ServerTrust",
    "application_uri_of",
    "describe",
    "fingerprint",
    "load_certificate",
    "load_client_identity",
    "load_password",
    "load_private_key",
]

_CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


class SecuritySetupError(DeviceError):
    """The client's own security material is missing or unusable (files, endpoint, policy)."""

    def __init__(self, message: str, *, device: str, code: str = "security-setup") -> None:
        self.detail = message  # without the "device 'x':" prefix, for incidents of the device
        super().__init__(message, device=device, code=code)


class ServerCertificateUntrusted(DeviceError):
    """The server presented a certificate that is neither pinned nor in the trust folder."""

    def __init__(self, message: str, *, device: str, fingerprint: str, subject: str) -> None:
        self.fingerprint = fingerprint
        self.subject = subject
        self.detail = message
        super().__init__(message, device=device, code="server-certificate-untrusted")


class AuthenticationFailed(DeviceError):
    """The server refused the user. Holds the user name and the status, never the password."""

    def __init__(self, message: str, *, device: str, username: str, status: str) -> None:
        self.username = username
        self.status = status
        self.detail = message
        super().__init__(message, device=device, code="authentication-failed")


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as colon-separated hex, as servers' admin pages show it."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def describe(cert: x509.Certificate) -> str:
    """Subject, SHA-256 and validity, enough for a person to find the certificate."""
    until = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    return f"{cert.subject.rfc4514_string()} (SHA-256 {fingerprint(cert)}, valid until {until})"


def application_uri_of(cert: x509.Certificate) -> str | None:
    """The application URI in a certificate's subjectAltName, which OPC UA requires."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _read(path: Path, what: str, device: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecuritySetupError(
            f"cannot read the {what} {path}: {exc.strerror}", device=device
        ) from None


def load_certificate(path: Path, device: str, what: str = "certificate") -> x509.Certificate:
    """A certificate from a PEM or DER file (told apart by content, not by name)."""
    data = _read(path, what, device)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise SecuritySetupError(
            f"the {what} {path} is not a PEM or DER certificate", device=device
        ) from None


def load_private_key(path: Path, device: str) -> rsa.RSAPrivateKey:
    data = _read(path, "private key", device)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError):
        # TypeError: the key is encrypted; pocd keeps its key unencrypted, readable by it only.
        raise SecuritySetupError(
            f"the private key {path} is not an unencrypted PEM or DER key", device=device
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SecuritySetupError(f"the private key {path} is not an RSA key", device=device)
    return key


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """This client's certificate and key, as DER for asyncua, and its application URI."""

    certificate_der: bytes
    private_key_der: bytes
    application_uri: str


def load_client_identity(settings: OpcuaSettings, device: str) -> ClientIdentity:
    assert settings.certificate is not None and settings.private_key is not None
    cert = load_certificate(Path(settings.certificate), device, "client certificate")
    key = load_private_key(Path(settings.private_key), device)
    cert_key = cert.public_key()
    if not isinstance(cert_key, rsa.RSAPublicKey) or (
        cert_key.public_numbers() != key.public_key().public_numbers()
    ):
        raise SecuritySetupError(
            f"the private key {settings.private_key} does not belong to the certificate "
            f"{settings.certificate}",
            device=device,
        )
    in_cert = application_uri_of(cert)
    uri = settings.application_uri or in_cert
    if uri is None:
        raise SecuritySetupError(
            f"the client certificate {settings.certificate} has no application URI "
            "(subjectAltName URI): make one with `pocd certs create`",
            device=device,
        )
    if in_cert is not None and uri != in_cert:
        raise SecuritySetupError(
            f"application_uri {uri!r} differs from the URI in the client certificate "
            f"({in_cert!r}): servers reject such a client",
            device=device,
        )
    if cert.not_valid_after_utc < datetime.now(UTC):
        raise SecuritySetupError(
            f"the client certificate {settings.certificate} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d}",
            device=device,
        )
    return ClientIdentity(
        certificate_der=cert.public_bytes(serialization.Encoding.DER),
        private_key_der=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        application_uri=uri,
    )


def load_password(settings: OpcuaSettings, device: str) -> str | None:
    """The user's password from its file (first line) or environment variable."""
    if settings.password_file is not None:
        path = Path(settings.password_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SecuritySetupError(
                f"cannot read the password file {path}: {exc.strerror}", device=device
            ) from None
        except UnicodeDecodeError:
            raise SecuritySetupError(
                f"the password file {path} is not UTF-8 text", device=device
            ) from None
        password = text.splitlines()[0] if text else ""
        if not password:
            raise SecuritySetupError(f"the password file {path} is empty", device=device)
        return password
    if settings.password_env is not None:
        from_env = os.environ.get(settings.password_env)
        if not from_env:
            raise SecuritySetupError(
                f"the environment variable {settings.password_env} (the password) is not set",
                device=device,
            )
        return from_env
    return None


class ServerTrust:
    """Judges the server's certificate against a pinned file and/or a trust folder."""

    def __init__(self, pinned: Path | None, trust_dir: Path | None, device: str) -> None:
        self.pinned = pinned
        self.trust_dir = trust_dir
        self.device = device

    def check(self, cert: x509.Certificate) -> None:
        """Return if the certificate is trusted; raise ServerCertificateUntrusted if not."""
        der = cert.public_bytes(serialization.Encoding.DER)
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            self._refuse(
                cert,
                f"it is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d}",
            )
        tried: list[str] = []
        if self.pinned is not None:
            pinned = load_certificate(self.pinned, self.device, "pinned server certificate")
            if pinned.public_bytes(serialization.Encoding.DER) == der:
                return
            tried.append(f"it is not the pinned certificate {self.pinned} ({describe(pinned)})")
        if self.trust_dir is not None:
            trusted = self._trusted()
            if any(t.public_bytes(serialization.Encoding.DER) == der for t in trusted):
                return
            if self._issued_by(cert, trusted):
                return
            tried.append(
                f"neither it nor its issuer is among the {len(trusted)} certificate(s) in the "
                f"trust folder {self.trust_dir}"
            )
        self._refuse(cert, "; ".join(tried))

    def _trusted(self) -> list[x509.Certificate]:
        assert self.trust_dir is not None
        if not self.trust_dir.is_dir():
            raise SecuritySetupError(f"no trust folder {self.trust_dir}", device=self.device)
        return [
            load_certificate(path, self.device, "trusted certificate")
            for path in sorted(self.trust_dir.iterdir())
            if path.suffix.lower() in _CERT_SUFFIXES and path.is_file()
        ]

    @staticmethod
    def _issued_by(cert: x509.Certificate, trusted: list[x509.Certificate]) -> bool:
        cas = [t for t in trusted if _is_ca(t)]
        if not cas:
            return False
        from cryptography.x509 import verification

        builder = verification.PolicyBuilder().store(verification.Store(cas))
        try:
            builder.build_client_verifier().verify(cert, [])
        except (verification.VerificationError, ValueError):
            return False
        return True

    def _refuse(self, cert: x509.Certificate, why: str) -> None:
        raise ServerCertificateUntrusted(
            f"the server certificate {describe(cert)} is not trusted: {why}. If this is the "
            "right server, pin its certificate (server_certificate) or put it in trust_dir",
            device=self.device,
            fingerprint=fingerprint(cert),
            subject=cert.subject.rfc4514_string(),
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
