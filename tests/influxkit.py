"""A real InfluxDB 1.x (`influxd`, Debian's influxdb package) for the tests and the bench,
and what the sink tests share: a site config with a sink, and a wait until a sink has
forwarded everything.

`Influxd` writes a minimal config with every directory under a temporary folder, HTTP and the
RPC service on free loopback ports, reporting, monitoring and logging off, then starts it and
waits for /ping. Authentication is on, with one admin user, so the sinks' password path is
exercised for real. It can be killed (kill -9) and started again on the same data and ports.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pocd.settings import Site, load_site
from pocd.sinks.influxdb import InfluxSink
from pocd.store import Store
from tests.sitekit import until, write_site

__all__ = [
    "ADMIN",
    "Influxd",
    "drained",
    "free_port",
    "running_influxd",
    "sink_toml",
    "site_with_sink",
]

ADMIN = ("pocd-admin", "s3cret-admin-password")

_CONFIG = """
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{root}/meta"
  logging-enabled = false

[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
  trace-logging-enabled = false

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false

[retention]
  enabled = false

[http]
  bind-address = "127.0.0.1:{port}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def influxd_binary() -> str:
    found = shutil.which("influxd") or (
        "/usr/bin/influxd" if Path("/usr/bin/influxd").exists() else None
    )
    if found is None:
        raise RuntimeError("influxd is missing: apt-get install -y influxdb (or `make debs`)")
    return found


class Influxd:
    """One influxd process on loopback, its files under `root`."""

    def __init__(self, root: Path, *, auth: bool = True) -> None:
        self.root = root
        self.auth = auth
        self.port = free_port()
        self.rpc_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._admin_made = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "influxdb.conf"
        config.write_text(
            _CONFIG.format(
                root=self.root,
                port=self.port,
                rpc_port=self.rpc_port,
                auth="true" if self.auth else "false",
            )
        )
        log = (self.root / "influxd.log").open("ab")
        self.proc = subprocess.Popen(
            [influxd_binary(), "run", "-config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                text = (self.root / "influxd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"influxd did not start on {self.url}:\n{text}")
            time.sleep(0.02)
        if self.auth and not self._admin_made:
            # With auth on and no user yet, InfluxDB accepts exactly this first statement.
            user, password = ADMIN
            self.query(f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES")
            self._admin_made = True

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=1) as resp:
                return bool(resp.status == 204)
        except (OSError, urllib.error.URLError):
            return False

    def version(self) -> str:
        with urllib.request.urlopen(f"{self.url}/ping", timeout=5) as resp:
            return str(resp.headers.get("X-Influxdb-Version", "unknown"))

    def cpu_seconds(self) -> float:
        """User + system CPU time the running influxd has used (Linux /proc)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        return ticks / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """kill -9: no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def _request(self, path: str, data: bytes | None, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, data=data, method="POST")
        if self.auth:
            token = base64.b64encode(":".join(ADMIN).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=60) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def query(self, q: str, db: str | None = None) -> list[dict[str, Any]]:
        """The series of a single InfluxQL statement; AssertionError on an error."""
        params = {"q": q, "epoch": "ns"}
        if db is not None:
            params["db"] = db
        answer = self._request("/query", None, params)
        (result,) = answer["results"]
        if "error" in result:
            raise AssertionError(f"{q}: {result['error']}")
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def write(self, db: str, body: bytes) -> None:
        self._request("/write", body, {"db": db, "precision": "n"})

    def count(self, db: str, measurement: str = "pocd_sample", field: str = "quality") -> int:
        series = self.query(f'SELECT count("{field}") FROM "{measurement}"', db)
        return int(series[0]["values"][0][1]) if series else 0


@contextlib.contextmanager
def running_influxd(root: Path, *, auth: bool = True) -> Iterator[Influxd]:
    server = Influxd(root, auth=auth)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- for the sink tests -------------------------------------------------------------------------


def sink_toml(
    influxd: Influxd,
    database: str,
    *,
    name: str = "influxdb",
    password: str = "password.txt",
    **settings: str | int,
) -> str:
    """A [[sinks.influxdb]] table for the test influxd, its password in a file."""
    options = {"flush_interval": '"100ms"', "backoff_max": '"1s"'}
    options |= {k: json.dumps(v) for k, v in settings.items()}
    lines = "\n".join(f"{k} = {v}" for k, v in options.items())
    return f"""
[[sinks.influxdb]]
name = "{name}"
url = "{influxd.url}"
api = "v1"
database = "{database}"
username = "{ADMIN[0]}"
password = {{ file = "{password}" }}
{lines}
"""


def site_with_sink(folder: Path, extra: str, devices: str = "") -> Site:
    config = write_site(folder, devices=devices, extra=extra)
    (folder / "password.txt").write_text(ADMIN[1] + "\n")
    return load_site(config)


async def drained(sink: InfluxSink, site: Site, within: float = 60.0) -> None:
    """Until the sink has confirmed everything the store holds (read from the store)."""
    with Store(site.store_path, readonly=True) as store:

        def caught_up() -> bool:
            status = sink.status()
            cursors = status["cursors"]
            head = store.sample_count()
            return bool(
                cursors["samples"] == cursors["samples.live"] == head
                and cursors["events"] == store.event_count()
                and status["state"] == "idle"
            )

        await until(caught_up, within)
