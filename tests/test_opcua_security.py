"""OPC UA security against an asyncua server on 127.0.0.1 with generated certificates: secured
channels, the server certificate judged against a pin or a trust folder, the user's password,
and `pocd certs create`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from cryptography import x509

from pocd.settings import check_files, load_driver, load_site
from pocd.sim.opcua import OpcuaSimulator
from pocd.transports.opcua.security import fingerprint
from tests.opcuakit import Certs, make_certs, opcua_device, running
from tests.sitekit import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

USER, PASSWORD = "operator", "correct horse battery"
WRONG = "wrong-secret-4711"
FAST = {"publishing_interval": 0.05, "sampling_interval": 0.05, "backoff_min": 0.1}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "opcua-password"
    path.write_text(PASSWORD + "\n")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(certs: Certs) -> AsyncIterator[OpcuaSimulator]:
    """Secured endpoints only, and a user with a password."""
    sim = OpcuaSimulator(
        load_driver("thermo-rotea"),
        f"opc.tcp://127.0.0.1:{free_port()}",
        interval=0.1,
        certificate=certs.server_cert,
        private_key=certs.server_key,
        policies=[
            "Basic256Sha256/SignAndEncrypt",
            "Basic256Sha256/Sign",
            "Aes128_Sha256_RsaOaep/SignAndEncrypt",
        ],
        users={USER: PASSWORD},
    )
    async with sim:
        yield sim


@pytest.fixture
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, object]]]:
    """structlog events of the test; asserts afterwards that no password is in any log."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        yield events
    text = caplog.text + repr(events)
    assert WRONG not in text and PASSWORD not in text


def secured(certs: Certs, secret: Path, endpoint: str, **overrides: object) -> dict[str, object]:
    settings: dict[str, object] = {
        "endpoint": endpoint,
        "security_policy": "Basic256Sha256",
        "security_mode": "SignAndEncrypt",
        "certificate": str(certs.client_cert),
        "private_key": str(certs.client_key),
        "server_certificate": str(certs.server_cert),
        "username": USER,
        "password_file": str(secret),
        **FAST,
    }
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


@pytest.mark.parametrize(
    ("policy", "mode", "trust"),
    [
        ("Basic256Sha256", "SignAndEncrypt", "pinned"),
        ("Basic256Sha256", "Sign", "folder"),
        ("Aes128_Sha256_RsaOaep", "SignAndEncrypt", "folder"),
    ],
)
async def test_a_secured_channel_with_generated_certificates(
    server: OpcuaSimulator,
    certs: Certs,
    password_file: Path,
    policy: str,
    mode: str,
    trust: str,
    no_secret_in_logs: list[dict[str, object]],
) -> None:
    pin = (
        {"server_certificate": None, "trust_dir": str(certs.trust_dir)} if trust == "folder" else {}
    )
    settings = secured(
        certs, password_file, server.endpoint, security_policy=policy, security_mode=mode, **pin
    )
    device = opcua_device("thermo-rotea", only=["protocol_step_number"], **settings)
    async with running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.samples()) >= 1)
        assert runner.session is not None
        channel = runner.session.client.security_policy
        assert channel.URI.endswith("#" + policy)
        assert channel.Mode.name == mode
    assert inbox.samples()[0].value == 1.0
    assert inbox.comm() == [] and inbox.incidents() == []


@pytest.mark.parametrize("trust", ["pinned", "folder"])
async def test_an_untrusted_server_certificate_is_refused_clearly(
    server: OpcuaSimulator,
    certs: Certs,
    password_file: Path,
    trust: str,
    no_secret_in_logs: list[dict[str, object]],
) -> None:
    wrong = (
        {"server_certificate": str(certs.stranger_cert)}
        if trust == "pinned"
        else {"server_certificate": None, "trust_dir": str(certs.stranger_dir)}
    )
    device = opcua_device("thermo-rotea", **secured(certs, password_file, server.endpoint, **wrong))
    async with running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.incidents()) >= 1)
        await inbox.wait_for(lambda: runner.counts["attempts"] >= 3)  # retried, reported once
    (incident,) = inbox.incidents()
    assert incident.code == "server-certificate-untrusted"
    server_sha = fingerprint(x509.load_der_x509_certificate(certs.server_cert.read_bytes()))
    assert server_sha in incident.message and "is not trusted" in incident.message
    where = str(certs.stranger_cert) if trust == "pinned" else str(certs.stranger_dir)
    assert where in incident.message
    assert [(c.ok, c.reason) for c in inbox.comm()] == [(False, incident.message)]
    assert inbox.samples() == []


async def test_a_wrong_password_is_refused_without_the_secret(
    server: OpcuaSimulator,
    certs: Certs,
    password_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_secret_in_logs: list[dict[str, object]],
) -> None:
    monkeypatch.setenv("POCD_TEST_OPCUA_PASSWORD", WRONG)
    settings = secured(
        certs,
        password_file,
        server.endpoint,
        password_file=None,
        password_env="POCD_TEST_OPCUA_PASSWORD",
    )
    device = opcua_device("thermo-rotea", **settings)
    async with running(device) as (runner, inbox):
        await inbox.wait_for(lambda: len(inbox.incidents()) >= 1)
        await inbox.wait_for(lambda: runner.counts["attempts"] >= 2)
    (incident,) = inbox.incidents()
    assert incident.code == "authentication-failed"
    assert f"refused user {USER!r}" in incident.message
    assert "POCD_TEST_OPCUA_PASSWORD" in incident.message  # where it came from, not what it is
    assert all(WRONG not in repr(record) for record in inbox.records)
    assert inbox.samples() == []


async def test_the_client_key_must_belong_to_its_certificate(
    server: OpcuaSimulator, certs: Certs, password_file: Path
) -> None:
    settings = secured(certs, password_file, server.endpoint, private_key=str(certs.server_key))
    async with running(opcua_device("thermo-rotea", **settings)) as (_, inbox):
        await inbox.wait_for(lambda: len(inbox.incidents()) >= 1)
    (incident,) = inbox.incidents()
    assert incident.code == "security-setup"
    assert "does not belong to the certificate" in incident.message


async def test_certificate_and_password_paths_are_relative_to_the_config_file(
    server: OpcuaSimulator,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The files of a secured connection, named relative to the site config, are found
    wherever the daemon was started from (systemd starts it in /)."""
    site_dir = tmp_path / "site"
    (site_dir / "pki" / "trusted").mkdir(parents=True)
    (site_dir / "protocols").mkdir()
    (site_dir / "pki" / "client.der").write_bytes(certs.client_cert.read_bytes())
    (site_dir / "pki" / "client-key.pem").write_bytes(certs.client_key.read_bytes())
    (site_dir / "pki" / "trusted" / "server.der").write_bytes(certs.server_cert.read_bytes())
    (site_dir / "opcua-password").write_text(PASSWORD + "\n")
    (site_dir / "pocd.toml").write_text(
        f"""
[site]
id = "s"
name = "S"
timezone = "UTC"
control_site = "c"

[[devices]]
id = "rotea"
driver = "thermo-rotea"
points.protocol_step_number = {{}}
[devices.transport]
endpoint = "{server.endpoint}"
security_policy = "Basic256Sha256"
certificate = "pki/client.der"
private_key = "pki/client-key.pem"
trust_dir = "pki/trusted"
username = "{USER}"
password_file = "opcua-password"
publishing_interval = 0.05
backoff_min = 0.1
"""
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert check_files([str(site_dir / "pocd.toml")]) == []
    device = load_site(site_dir / "pocd.toml").devices["rotea"]
    async with running(device) as (_, inbox):
        await inbox.wait_for(lambda: len(inbox.samples("protocol_step_number")) >= 1)
    assert inbox.comm() == []
    assert [i.code for i in inbox.incidents()] == ["text"]  # the protocol name, once
