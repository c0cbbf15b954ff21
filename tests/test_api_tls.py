"""The API's TLS listener (`api.tls_listen`, `tls_cert`, `tls_key`) with a throwaway CA from
trustme: both listeners serve, a browser's session cookie is `Secure` over TLS only, and a
TLS setting that is incomplete, a file that is missing or one that is no certificate is
named by its key, at `pocd check` or at the start of the daemon."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
import trustme

from pocd.settings import load_site
from tests.sitekit import DEFAULT_USER, PASSWORD, cli, free_port, running, write_site

NO_DEVICES = ""


def tls_settings(folder: Path, ca: trustme.CA) -> str:
    """The [api] lines of a TLS listener on loopback, with a certificate `ca` issued for it."""
    folder.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    for pem in issued.cert_chain_pems:
        pem.write_to_path(folder / "cert.pem", append=True)
    issued.private_key_pem.write_to_path(folder / "key.pem")
    return (
        f'tls_listen = "127.0.0.1:{free_port()}"\n'
        'tls_cert = "cert.pem"\n'  # relative: to the config's folder
        'tls_key = "key.pem"\n'
    )


def cookie_attributes(set_cookie: str) -> set[str]:
    """The attributes of a Set-Cookie header, lowercased (`secure`, `samesite=strict`, ...)."""
    _, *attributes = set_cookie.split(";")
    return {a.strip().lower() for a in attributes}


async def browser_login(
    session: aiohttp.ClientSession, base: str, tls: ssl.SSLContext | bool = True
) -> tuple[str, dict[str, str]]:
    """The Set-Cookie header of a browser login at `base`, and the cookie to send back."""
    body = {"login": DEFAULT_USER, "password": PASSWORD}
    async with session.post(f"{base}/api/login", json=body, ssl=tls) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        (set_cookie,) = resp.headers.getall("Set-Cookie")
        return set_cookie, {"Cookie": set_cookie.split(";")[0]}


async def test_a_login_over_tls_gets_a_secure_cookie_and_both_listeners_serve(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    config = write_site(tmp_path, NO_DEVICES, extra=tls_settings(tmp_path, ca))
    site = load_site(config)
    assert site.config.api.tls_listen is not None
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    https = f"https://{site.config.api.tls_listen}"
    http = f"http://{site.config.api.listen}"
    async with running(site), aiohttp.ClientSession() as session:
        for base, tls in ((https, trusting), (http, True)):
            async with session.get(f"{base}/api/health", ssl=tls) as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok"}

        set_cookie, cookie = await browser_login(session, https, trusting)
        assert {"secure", "httponly", "samesite=strict"} <= cookie_attributes(set_cookie)
        async with session.get(f"{https}/api/session", headers=cookie, ssl=trusting) as resp:
            assert resp.status == 200
            assert (await resp.json())["login"] == DEFAULT_USER

        set_cookie, cookie = await browser_login(session, http)
        attributes = cookie_attributes(set_cookie)
        assert "secure" not in attributes  # a browser would not send it back over http
        assert {"httponly", "samesite=strict"} <= attributes
        async with session.get(f"{http}/api/session", headers=cookie) as resp:
            assert resp.status == 200

        # The CA is the one thing that makes the listener trusted: without it, no TLS.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{https}/api/health", ssl=ssl.create_default_context())


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"tls_listen"}, {"tls_cert", "tls_key"}),
        ({"tls_listen", "tls_cert"}, {"tls_key"}),
        ({"tls_cert", "tls_key"}, {"tls_listen"}),
    ],
)
def test_tls_settings_come_together_or_not_at_all(
    tmp_path: Path, given: set[str], missing: set[str]
) -> None:
    lines = tls_settings(tmp_path, trustme.CA()).splitlines()
    extra = "\n".join(line for line in lines if line.split(" =")[0] in given)
    config = write_site(tmp_path, NO_DEVICES, extra=extra)
    checked = cli("check", str(config))
    assert checked.returncode == 2, checked
    assert f"{config}: api: " in checked.stderr
    for key in given | missing:
        assert key in checked.stderr, checked.stderr


def test_a_missing_certificate_is_named_by_pocd_check(tmp_path: Path) -> None:
    config = write_site(tmp_path, NO_DEVICES, extra=tls_settings(tmp_path, trustme.CA()))
    (tmp_path / "cert.pem").unlink()
    checked = cli("check", str(config))
    assert checked.returncode == 2, checked
    assert f"api.tls_cert: no such file: {tmp_path / 'cert.pem'}" in checked.stderr
    assert "api.tls_key" not in checked.stderr


def test_a_file_that_is_no_certificate_stops_the_daemon_naming_it(tmp_path: Path) -> None:
    config = write_site(tmp_path, NO_DEVICES, extra=tls_settings(tmp_path, trustme.CA()))
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    checked = cli("check", str(config))  # the service's gate finds it before it starts
    assert checked.returncode == 2, checked
    assert "api.tls_cert: api.tls_cert / api.tls_key" in checked.stderr
    assert "cannot load" in checked.stderr
    served = cli("serve", "-c", str(config))
    assert served.returncode == 1, served
    assert "api.tls_cert" in served.stderr, served.stderr
    assert str(tmp_path / "cert.pem") in served.stderr
