"""`pocd certs create`: a self-signed OPC UA application certificate and its private key.

The certificate follows OPC 10000-6 6.2.2 (asyncua's generator): the application URI and the
host names in subjectAltName, key and extended key usage for a client (or a server, for the
simulator). The key is written readable by its owner only. The command prints what a server's
administrator needs to trust the client: the application URI and the SHA-256 fingerprint.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from pocd.transports.opcua.security import describe

__all__ = ["add_arguments", "create_certificate", "default_application_uri", "main", "run"]


def default_application_uri(hostname: str | None = None) -> str:
    """`urn:<host>:pocd`: unique per machine, as OPC UA wants an application URI to be."""
    return f"urn:{hostname or socket.gethostname()}:pocd"


def create_certificate(
    certificate: Path,
    private_key: Path,
    *,
    application_uri: str | None = None,
    common_name: str = "pocd",
    hostnames: Sequence[str] = (),
    days: int = 730,
    server: bool = False,
    overwrite: bool = False,
) -> x509.Certificate:
    """Write a new RSA-2048 key and a self-signed certificate for it; return the certificate.

    The certificate is DER unless its file name ends in .pem; the key is PEM (PKCS#8), mode
    0600. `hostnames` (default: this machine's name) go into subjectAltName as DNS names or
    IP addresses. `server` adds the serverAuth usage (the simulator's certificate). Raises
    FileExistsError rather than replace a pair a server may already trust, unless `overwrite`.
    """
    from asyncua.crypto import cert_gen  # deferred: the CLI starts faster without asyncua

    for path in (certificate, private_key):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (use --force to replace it)")
    uri = application_uri or default_application_uri()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in hostnames or [socket.gethostname()]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, common_name, {}, names, extended=usages, days=days
    )
    encoding = (
        serialization.Encoding.PEM
        if certificate.suffix.lower() == ".pem"
        else serialization.Encoding.DER
    )
    certificate.parent.mkdir(parents=True, exist_ok=True)
    private_key.parent.mkdir(parents=True, exist_ok=True)
    certificate.write_bytes(cert.public_bytes(encoding))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 rather than chmod-ed afterwards, so the key is never readable by others.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(private_key, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    os.chmod(private_key, 0o600)  # O_CREAT's mode does not apply to a file that existed
    return cert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--certificate", required=True, type=Path, help="certificate file to write (.der or .pem)"
    )
    parser.add_argument(
        "--private-key", required=True, type=Path, help="private key file to write (PEM)"
    )
    parser.add_argument(
        "--application-uri",
        help="the client's application URI (default: urn:<hostname>:pocd)",
    )
    parser.add_argument("--common-name", default="pocd")
    parser.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="DNS name or IP address for subjectAltName (repeatable; default: this host)",
    )
    parser.add_argument("--days", type=int, default=730, help="validity in days (default 730)")
    parser.add_argument(
        "--server", action="store_true", help="also usable as a server certificate (simulator)"
    )
    parser.add_argument("--force", action="store_true", help="replace existing files")


def run(args: argparse.Namespace) -> int:
    """Carry out `certs create` with parsed arguments. Exit code 0, or 1 with a message."""
    if args.days < 1:
        print("pocd: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        cert = create_certificate(
            args.certificate,
            args.private_key,
            application_uri=args.application_uri,
            common_name=args.common_name,
            hostnames=args.hostname,
            days=args.days,
            server=args.server,
            overwrite=args.force,
        )
    except (FileExistsError, OSError) as exc:
        print(f"pocd: {exc}", file=sys.stderr)
        return 1
    uri = args.application_uri or default_application_uri()
    print(f"certificate  {args.certificate}")
    print(f"private key  {args.private_key} (mode 0600)")
    print(f"application  {uri}")
    print(f"identity     {describe(cert)}")
    print(
        "Give the certificate to the server's administrator to trust, and set in the device's "
        "transport table: certificate, private_key (and application_uri if you chose one)."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pocd.transports.opcua.certs create ...` (the same as `pocd certs create`)."""
    parser = argparse.ArgumentParser(prog="pocd certs", description=__doc__)
    sub = parser.add_subparsers(dest="certs_command", required=True)
    add_arguments(sub.add_parser("create", help="make a self-signed certificate and key"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
