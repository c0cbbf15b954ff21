"""pocd under systemd: the unit and its snippets as systemd's own tools judge them, and the
notification protocol (READY, STATUS, WATCHDOG, STOPPING) as a service manager receives it on
a datagram socket this test owns."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import pocd.status
from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import ROOT, add_test_users, api, login, running, until, write_site

UNITS = ROOT / "systemd"
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


# --- the unit files --------------------------------------------------------------------------


def installed_copy(name: str, folder: Path) -> Path:
    """The unit as a site installs it, its /opt/pocd/bin/pocd being this checkout's pocd (so
    `verify` finds the executable)."""
    pocd = Path(sys.executable).with_name("pocd")
    assert pocd.exists()
    copy = folder / name
    copy.write_text((UNITS / name).read_text().replace("/opt/pocd/bin/pocd", str(pocd)))
    return copy


@needs_systemd
def test_the_units_verify_clean(tmp_path: Path) -> None:
    names = ["pocd.service", "pocd-backup.service", "pocd-backup.timer"]
    copies = [str(installed_copy(name, tmp_path)) for name in names]
    done = subprocess.run(
        ["systemd-analyze", "verify", *copies], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@needs_systemd
def test_the_service_exposure_is_at_most_2() -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNITS / "pocd.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for pocd\.service: (\d+\.\d)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found[1]) <= 2.0, done.stdout


@needs_systemd
def test_the_service_is_notify_with_a_watchdog_and_confined() -> None:
    unit = (UNITS / "pocd.service").read_text()
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=pocd",
        "SupplementaryGroups=dialout",
        "StateDirectory=pocd",
        "UMask=0077",
        "CapabilityBoundingSet=\n",
        "MemoryDenyWriteExecute=yes",
        "DevicePolicy=closed",
    ):
        assert setting in unit


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers or systemd-tmpfiles is not installed",
)
def test_the_snippets_make_the_user_and_its_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("")
    (root / "etc" / "group").write_text("")
    for kind in ("sysusers", "tmpfiles"):
        folder = root / "usr" / "lib" / f"{kind}.d"
        folder.mkdir(parents=True)
        shutil.copy(UNITS / f"pocd.{kind}.conf", folder / "pocd.conf")

    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True)
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create"], check=True, capture_output=True
    )

    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    uid, gid = int(passwd["pocd"][2]), int(passwd["pocd"][3])
    assert passwd["pocd"][5:] == ["/var/lib/pocd", "/usr/sbin/nologin"]
    assert "pocd" in groups["dialout"][3].split(",")
    for path, mode, owner in (
        ("etc/pocd", 0o750, (0, gid)),
        ("var/lib/pocd", 0o700, (uid, gid)),
        ("var/log/pocd", 0o700, (uid, gid)),
        ("var/backups/pocd", 0o700, (uid, gid)),
    ):
        st = (root / path).stat()
        assert (st.st_mode & 0o7777, (st.st_uid, st.st_gid)) == (mode, owner), path


# --- the notifications -----------------------------------------------------------------------


class NotifySocket:
    """The service manager's end: a datagram socket whose every message is kept with its
    arrival time (steady clock), read on a thread of its own so that a blocked event loop in
    this process does not stop the reading."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="pocd-notify-")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, field: str) -> list[float]:
        return [t for t, text in self.messages if field in text.split("\n")]

    def with_field(self, prefix: str) -> list[str]:
        return [
            text for _, text in self.messages if any(f.startswith(prefix) for f in text.split("\n"))
        ]

    def close(self) -> None:
        self._closing = True
        self._thread.join()
        self.sock.close()
        shutil.rmtree(self.folder)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def test_ready_after_the_api_answers_then_pings_then_stopping_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    config = write_site(tmp_path)
    site = load_site(config)
    add_test_users(site)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"}
    with (tmp_path / "pocd.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocd", "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while not notify_socket.times("READY=1"):
            assert proc.poll() is None and time.monotonic() < deadline, "no READY=1"
            time.sleep(0.01)
        # The API already answers when READY=1 arrives.
        health = f"http://{site.config.api.listen}/api/health"
        with urllib.request.urlopen(health, timeout=1) as answer:
            assert answer.status == 200
        (ready_text,) = notify_socket.with_field("READY=1")
        assert re.search(r"STATUS=1 lines, 0 running, \d+ alarms active", ready_text)
        assert not notify_socket.times("WATCHDOG=1")[:1] or (
            notify_socket.times("WATCHDOG=1")[0] >= notify_socket.times("READY=1")[0]
        )

        ready = notify_socket.times("READY=1")[0]
        time.sleep(3.2)
        pings = [t for t in notify_socket.times("WATCHDOG=1") if t > ready]
        # WATCHDOG_USEC=1 s: a ping every half of it
        assert 5 <= len(pings) <= 8, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.9, gaps

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify_socket.times("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_pings_stop_while_the_event_loop_is_blocked(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    site = load_site(write_site(tmp_path))
    async with running(site) as daemon:
        await until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 2)
        blocked = time.monotonic()
        time.sleep(2.5)  # noqa: ASYNC251 (the daemon's loop is this test's: blocked on purpose)
        unblocked = time.monotonic()
        await until(lambda: any(t > unblocked for t in notify_socket.times("WATCHDOG=1")))
        during = [t for t in notify_socket.times("WATCHDOG=1") if blocked + 0.01 < t < unblocked]
        assert during == []
        assert daemon.counts["samples"] > 0


async def test_the_pings_stop_while_the_store_writer_is_stalled(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setattr(pocd.status, "WRITER_STALE_S", 0.5)  # /health's bound, 30 s in use
    site = load_site(write_site(tmp_path))
    async with running(site) as daemon:
        await until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 2)
        assert (await api(site, "GET", "/health"))[0] == 200
        store = daemon.store
        assert store is not None
        write = store.write
        disk = threading.Event()  # a dead disk: every write hangs until it is set
        disk.set()

        def hanging_write(records: object) -> object:
            disk.wait()
            return write(records)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "write", hanging_write)
        disk.clear()
        stalled = time.monotonic()
        await asyncio.sleep(3.5)
        pings = [t for t in notify_socket.times("WATCHDOG=1") if t > stalled]
        # A ping or two may leave before the stall is older than the bound (0.5 s), none after.
        assert all(t < stalled + 1.2 for t in pings), [t - stalled for t in pings]
        said = notify_socket.with_field("STATUS=")[-1]
        assert "the store writer has made no progress" in said
        status, body = await api(site, "GET", "/health")
        assert status == 503, body
        assert "the store writer has committed nothing for" in body["error"]
        disk.set()
        recovered = time.monotonic()
        await until(lambda: any(t > recovered for t in notify_socket.times("WATCHDOG=1")))
        assert (await api(site, "GET", "/health"))[0] == 200
        committed = daemon.writer.last_commit
        await until(lambda: daemon.writer.last_commit != committed)


MDWE = """
import ctypes, runpy, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
sys.argv = ["pocd", *sys.argv[1:]]
runpy.run_module("pocd", run_name="__main__")
"""


def kernel() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])


@pytest.mark.skipif(kernel() < (6, 3), reason="PR_SET_MDWE needs Linux 6.3")
def test_the_daemon_runs_where_no_memory_may_be_writable_and_executable(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes, as the kernel's own MDWE (what systemd's filter does): the
    daemon serves, hashes a login (argon2 through cffi), records samples and stops cleanly."""
    config = write_site(tmp_path)
    site = load_site(config)
    add_test_users(site)
    with (tmp_path / "pocd.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", MDWE, "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "pocd.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(
                    f"http://{site.config.api.listen}/api/health", timeout=1
                ):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the API did not answer"
                time.sleep(0.1)
        token = asyncio.run(login(site.config.api.listen))
        assert token
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "pocd.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Store(site.store_path, readonly=True) as store:
        assert store.sample_count() > 0
