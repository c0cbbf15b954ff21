"""`pocd login`, `pocd logout` and the control commands as a named user, against the real
daemon, as a new site would start: the README's bootstrap, then a run started and aborted
with an electronic signature given on stdin, every action in the audit trail under the name
of who did it. The saved token lives in a tmp XDG_CONFIG_HOME, never in the real home."""

from __future__ import annotations

import getpass
import json
import stat
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import (
    PASSWORD,
    cli_as,
    cli_env,
    cli_login,
    spawn_bare_daemon,
    spawn_daemon,
    write_site,
)

ADMIN_PASSWORD = "the keeper of accounts"
OLIVE_PASSWORD = "her shift passphrase"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(timeout=20) == 0


@pytest.fixture
def site_with_op(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A running daemon whose store holds the test user `op`, and the env of CLI calls."""
    config = write_site(tmp_path)
    proc = spawn_daemon(config)
    try:
        yield config, cli_env(tmp_path)
    finally:
        _stop(proc)


def _tokens(env: dict[str, str]) -> Path:
    return Path(env["XDG_CONFIG_HOME"]) / "pocd" / "tokens.json"


def _saved(env: dict[str, str]) -> dict[str, str]:
    """The one saved token, from a file only its owner may read, in a folder only they open."""
    tokens = _tokens(env)
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert stat.S_IMODE(tokens.parent.stat().st_mode) == 0o700
    (saved,) = json.loads(tokens.read_text()).values()
    return dict(saved)


Pocd = Callable[..., subprocess.CompletedProcess[str]]


def _readme_bootstrap(pocd: Pocd) -> None:
    """The README's bootstrap, before the daemon ever ran: the first admin, then an
    operator made by them."""
    add_admin = ("user", "add", "admin", "--name", "Ada Admin", "--role", "admin")
    done = pocd(*add_admin, stdin=f"{ADMIN_PASSWORD}\n")
    assert done.returncode == 0, done.stderr
    add_olive = ("user", "add", "olive", "--name", "Olive Operator", "--role", "operator")
    done = pocd(*add_olive, "--as", "admin", stdin=f"{OLIVE_PASSWORD}\n{ADMIN_PASSWORD}\n")
    assert done.returncode == 0, done.stderr


def test_a_new_site_from_the_first_admin_to_a_signed_abort(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    listen = load_site(config).config.api.listen
    env = cli_env(tmp_path)
    c = ("-c", str(config))

    def pocd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return cli_as(env, *args, *c, stdin=stdin)

    _readme_bootstrap(pocd)
    proc = spawn_bare_daemon(config)
    try:
        done = pocd("run", "start", "--batch", "B-1", "--protocol", "CART-TCT")
        assert done.returncode == 1
        assert f"not logged in at {listen}" in done.stderr
        assert f"run `pocd login -c {config}`" in done.stderr

        done = pocd("login", "--user", "olive", stdin="not her password\n")
        assert (done.returncode, done.stderr) == (
            1,
            "pocd: login refused: wrong login or password\n",
        )
        done = pocd("login", "--user", "olive", stdin=f"{OLIVE_PASSWORD}\n")
        assert done.returncode == 0, done.stderr
        assert "as Olive Operator (olive: operator)" in done.stdout
        saved = _saved(env)
        assert saved["login"] == "olive" and saved["expires"].endswith("Z")

        done = pocd("run", "start", "--batch", "B-1", "--protocol", "CART-TCT")
        assert done.returncode == 0, done.stderr
        # the signature's password on stdin: a wrong one first, then hers
        done = pocd("run", "stop", "--abort", "--reason", "bag leak", stdin="a guess\n")
        assert done.returncode == 1
        assert "refused: signature refused: wrong password; nothing was done" in done.stderr
        done = pocd("run", "stop", "--abort", "--reason", "bag leak", stdin=f"{OLIVE_PASSWORD}\n")
        assert done.returncode == 0, done.stderr
        assert done.stdout.endswith(" aborted\n")
        # the signature is asked for up front, the role refused all the same
        done = pocd("site", "set", "suspended", "--reason", "audit", stdin=f"{OLIVE_PASSWORD}\n")
        assert done.returncode == 1
        assert "refused: user 'olive' (operator) may not site.status" in done.stderr

        shown = pocd("run", "show", "B-1")
        assert shown.returncode == 0, shown.stderr
        signatures = shown.stdout.split("signatures: 1\n")[1]
        assert signatures.startswith("  performed by Olive Operator (olive) at ")
        assert " run.abort run:" in signatures and signatures.rstrip().endswith("intact")

        done = pocd("logout")
        assert (done.returncode, done.stdout) == (0, f"logged out olive at {listen}\n")
        assert json.loads(_tokens(env).read_text()) == {}
        done = pocd("run", "start", "--batch", "B-2", "--protocol", "CART-TCT")
        assert done.returncode == 1 and "pocd login -c" in done.stderr
    finally:
        _stop(proc)

    with Store(load_site(config).store_path, readonly=True) as store:
        entries = store.audit()
        (run,) = store.runs()
    operations = {
        "user.add",
        "login",
        "login.failed",
        "signature.failed",
        "access.denied",
        "logout",
    }
    assert [
        (e.actor, e.action)
        for e in entries
        if e.action in operations or e.action.startswith("run.")
    ] == [
        (f"local:{getpass.getuser()}", "user.add"),
        ("admin", "user.add"),
        ("olive", "login.failed"),
        ("olive", "login"),
        ("olive", "run.start"),
        ("olive", "signature.failed"),
        ("olive", "run.abort"),
        ("olive", "access.denied"),
        ("olive", "logout"),
    ]
    assert (run.operator, run.status.value, run.end_reason) == ("olive", "aborted", "bag leak")


def test_a_revoked_token_is_refused_and_logout_forgets_it_all_the_same(
    site_with_op: tuple[Path, dict[str, str]],
) -> None:
    config, env = site_with_op
    listen = load_site(config).config.api.listen
    cli_login(config, env)
    saved = _saved(env)
    assert cli_as(env, "status", "-c", str(config)).returncode == 0
    # the session ends on the daemon's side (another client logs it out)
    request = urllib.request.Request(
        f"http://{listen}/api/logout",
        method="POST",
        headers={"Authorization": f"Bearer {saved['token']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.load(answer) == {"logged_out": "op"}

    done = cli_as(env, "status", "-c", str(config))
    assert done.returncode == 1
    assert done.stderr == (
        "pocd: the daemon refused the session of op (no such session (logged out, or the "
        f"daemon restarted): log in again): run `pocd login -c {config}`\n"
    )
    done = cli_as(env, "logout", "-c", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"logged out op at {listen} (the daemon said: no such session")
    assert json.loads(_tokens(env).read_text()) == {}
    done = cli_as(env, "logout", "-c", str(config))
    assert (done.returncode, done.stdout) == (0, f"not logged in at {listen}\n")

    # without --user, the login is the OS user's name
    done = cli_as(env, "login", "-c", str(config), stdin="no such password\n")
    assert done.returncode == 1
    with Store(load_site(config).store_path, readonly=True) as store:
        failed = [e for e in store.audit() if e.action == "login.failed"]
    assert [e.actor for e in failed] == [getpass.getuser()]


def test_an_override_and_a_site_status_change_are_signed_on_stdin(
    site_with_op: tuple[Path, dict[str, str]],
) -> None:
    config, env = site_with_op
    c = ("-c", str(config))

    def pocd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return cli_as(env, *args, *c, stdin=stdin)

    done = pocd("site", "set", "suspended", "--reason", "audit", stdin=f"{PASSWORD}\n")
    assert done.returncode == 1 and "not logged in" in done.stderr  # nothing asked first
    cli_login(config, env)
    assert pocd("run", "start", "--batch", "B-3", "--protocol", "CART-TCT").returncode == 0
    # the daemon answers 428: the signature is asked for, and stdin has none
    done = pocd("run", "phase", "harvest", "--reason", "expansion done on the bench")
    assert done.returncode == 1
    assert "phase 'harvest' is out of protocol order: the override needs your electronic" in (
        done.stderr
    )
    assert "stdin has no line for it" in done.stderr
    done = pocd(
        "run",
        "phase",
        "harvest",
        "--reason",
        "expansion done on the bench",
        "--meaning",
        "approved",
        stdin=f"{PASSWORD}\n",
    )
    assert (done.returncode, done.stdout) == (
        0,
        "phase enrichment -> harvest (out of order: recorded as a deviation)\n",
    ), done.stderr
    done = pocd("run", "stop", "--abort")
    assert (done.returncode, done.stderr) == (2, "pocd: run stop --abort needs --reason\n")
    done = pocd("run", "stop")  # completing a run is not signed
    assert done.returncode == 0, done.stderr

    done = pocd("site", "set", "suspended", "--reason", "audit", stdin=f"{PASSWORD}\n")
    assert (done.returncode, done.stdout) == (0, "site status: suspended\n"), done.stderr
    status, signed = pocd("site", "status").stdout.splitlines()
    assert status == "suspended"
    assert signed.startswith("  performed by Olive Operator (op) at ")
    assert signed.endswith("intact")

    shown = pocd("run", "show", "B-3")
    (line,) = shown.stdout.split("signatures: 1\n")[1].splitlines()
    assert line.startswith("  approved by Olive Operator (op) at ")
    assert " run.phase.override phase:" in line and line.endswith("intact")
    with Store(load_site(config).store_path, readonly=True) as store:
        signatures = store.signatures()
    assert [(s.login, s.meaning, s.action) for s in signatures] == [
        ("op", "approved", "run.phase.override"),
        ("op", "performed", "site.status"),
    ]
