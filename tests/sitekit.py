"""Helpers to write a site to a temporary folder and run the real daemon on it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from pocd.access import hash_password
from pocd.daemon import Daemon
from pocd.engine import Engine
from pocd.model import Run, User, now_ns
from pocd.settings import Site, load_site
from pocd.store import Store

ROOT = Path(__file__).resolve().parent.parent

FAST_DEVICES = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 0.05, seed = 1 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0, noise = 0.01 }
points.co2 = { parameter = "co2", unit = "%", base = 5.0 }

[[devices]]
id = "bioreactor"
driver = "sim"
transport = { interval = 0.05, seed = 2 }
points.ph = { parameter = "ph", unit = "pH", base = 7.1 }
points.do = { parameter = "do", unit = "%-sat", base = 60.0 }
points.rocking = { parameter = "rocking", unit = "rocks/min", base = 12.0 }
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_site(folder: Path, devices: str = FAST_DEVICES, extra: str = "") -> Path:
    """A site config in `folder` with the example protocols; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "config" / "protocols", folder / "protocols", dirs_exist_ok=True)
    config = folder / "pocd.toml"
    config.write_text(
        f"""
[site]
id = "test-site"
name = "Test site"
timezone = "Europe/London"
control_site = "test-cs"

[store]
data_dir = "data"
flush_interval = "50ms"

[api]
listen = "127.0.0.1:{free_port()}"
{extra}
{devices}
"""
    )
    return config


# Every test user has this password; its hash is computed once (argon2 takes ~50 ms a hash).
PASSWORD = "correct horse battery staple"
# The test users `running` adds to every store: the default one acts on runs and the site.
USERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "op": ("Olive Operator", ("operator", "supervisor", "qa")),
}
DEFAULT_USER = "op"


@functools.cache
def password_hash(password: str = PASSWORD) -> str:
    return hash_password(password)


def add_user(
    store_path: Path, login: str, roles: Sequence[str], name: str = "", *, disabled: bool = False
) -> User:
    """A user with PASSWORD in the store at `store_path` (made if need be), as `pocd user add`
    would make them."""
    t = now_ns()
    user = User(login, name or login.title(), tuple(roles), password_hash(), disabled, t, t)
    with Store(store_path) as store:
        if store.user(login) is None:
            store.write([user])
    return user


def add_test_users(site: Site) -> None:
    for login, (name, roles) in USERS.items():
        add_user(site.store_path, login, roles, name)


@contextlib.asynccontextmanager
async def running(site: Site) -> AsyncIterator[Daemon]:
    """The daemon serving `site` in this event loop, stopped (flushed, closed) on exit. The
    store holds the test users (USERS)."""
    add_test_users(site)
    daemon = Daemon(site)
    task = asyncio.create_task(daemon.serve(handle_signals=False))
    started = asyncio.create_task(daemon.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        await task
    assert started in done, "daemon did not start"
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 20)


def engine_of(daemon: Daemon) -> Engine | None:
    """The engine of the run on the site's only line; None between runs (or unmonitored)."""
    (state,) = daemon.lines.states.values()
    return state.engine if state.run is not None else None


def run_of(daemon: Daemon) -> Run | None:
    """The run on the site's only line, if one is going on."""
    (state,) = daemon.lines.states.values()
    return state.run


# Bearer tokens of the test users, by (API address, login): a login costs an argon2 hash.
_TOKENS: dict[tuple[str, str], str] = {}


async def login(listen: str, user: str = DEFAULT_USER, password: str = PASSWORD) -> str:
    """A bearer token of `user` at the API on `listen`, as `pocd login` gets one."""
    body = {"login": user, "password": password, "client": "cli"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{listen}/api/login", json=body) as resp,
    ):
        answer = await resp.json()
        assert resp.status == 200, answer
        token: str = answer["token"]
        return token


SIGNATURE = {"password": PASSWORD, "meaning": "performed"}


async def bearer(listen: str, user: str = DEFAULT_USER) -> dict[str, str]:
    """The Authorization header of `user` at the API on `listen` (logged in once)."""
    if (listen, user) not in _TOKENS:
        _TOKENS[listen, user] = await login(listen, user)
    return {"Authorization": f"Bearer {_TOKENS[listen, user]}"}


async def api(
    site: Site | str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    user: str | None = DEFAULT_USER,
) -> Any:
    """(status, JSON answer) of one request to the API as `user` (logged in once per daemon;
    None: no session). A body's `signature` of True is the user's signature with PASSWORD."""
    listen = site if isinstance(site, str) else site.config.api.listen
    if body is not None and body.get("signature") is True:
        body = {**body, "signature": SIGNATURE}
    for attempt in range(2):
        headers = {} if user is None else await bearer(listen, user)
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, f"http://{listen}{path}", json=body, headers=headers) as resp,
        ):
            data = await resp.json()
            if resp.status == 401 and user is not None and attempt == 0:
                del _TOKENS[listen, user]  # a daemon restarted on this address: log in again
                continue
            return resp.status, data
    raise AssertionError("unreachable")


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def spawn_daemon(config: Path) -> subprocess.Popen[bytes]:
    """`pocd serve` in its own process, waited for until its API answers. Its log goes to
    `pocd.log` beside the config: a pipe nobody reads would fill and stop the daemon."""
    add_test_users(load_site(config))
    return spawn_bare_daemon(config)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pocd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- the CLI as a user runs it ---------------------------------------------------------------


def cli_env(folder: Path) -> dict[str, str]:
    """The environment of CLI calls whose saved tokens (`pocd login`) live in `folder`, never
    in the real home."""
    import os

    return {**os.environ, "XDG_CONFIG_HOME": str(folder / "xdg")}


def cli_as(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`pocd *args` in `env`, with `stdin` as its input: without a terminal, the CLI reads
    each password it needs as one line of it."""
    return subprocess.run(
        [sys.executable, "-m", "pocd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def cli_login(
    config: Path, env: dict[str, str], user: str = DEFAULT_USER, password: str = PASSWORD
) -> None:
    """`pocd login` as `user`: the CLI calls in `env` act as them from now on."""
    done = cli_as(env, "login", "-c", str(config), "--user", user, stdin=f"{password}\n")
    assert done.returncode == 0, done.stderr


def spawn_bare_daemon(config: Path) -> subprocess.Popen[bytes]:
    """`pocd serve` as spawn_daemon starts it, but on the store as it is: no test users."""
    log = config.parent / "pocd.log"
    with log.open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocd", "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    listen = load_site(config).config.api.listen
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://{listen}/api/health", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"daemon did not start: {log.read_text()}") from None
            time.sleep(0.1)
