"""The control API against the real daemon on loopback: what a web page may not do (Host,
Origin, content type), typed request bodies, reads that do not wait for the writer, and
answers that are always valid JSON."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pocd.model import Quality, RunStatus, Sample, SiteStatus, now_ns
from pocd.settings import Site, load_site
from pocd.store import Store
from tests.sitekit import DEFAULT_USER, SIGNATURE, bearer, running, until, write_site

NO_DEVICES = ""
CONTROL_ACTIONS = ("run.start", "run.phase", "run.stop", "run.abort", "site.status")


def strict_json(text: str) -> Any:
    """JSON as RFC 8259 has it: `Infinity` and `NaN` are not JSON."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"invalid JSON: {constant} in {text[:200]!r}")

    return json.loads(text, parse_constant=refuse)


async def send(
    site: Site | str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    user: str | None = DEFAULT_USER,
) -> tuple[int, Any]:
    """One request as given (bytes and headers) to a site's API (or a host:port), with the
    bearer token of `user` (None: none); the answer must be valid JSON."""
    listen = site if isinstance(site, str) else site.config.api.listen
    url = f"http://{listen}{path}"
    auth = {} if user is None else await bearer(listen, user)
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers={**auth, **(headers or {})}) as resp,
    ):
        text = await resp.text()
        assert resp.content_type == "application/json", (resp.status, text)
        return resp.status, strict_json(text)


async def post(
    site: Site | str,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
    *,
    user: str | None = DEFAULT_USER,
) -> tuple[int, Any]:
    return await send(
        site,
        "POST",
        path,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", **(headers or {})},
        user=user,
    )


def control_actions(site: Site) -> list[str]:
    with Store(site.store_path, readonly=True) as store:
        return [a.action for a in store.audit() if a.action in CONTROL_ACTIONS]


CEASE = {"status": "ceased", "reason": "a web page said so", "signature": SIGNATURE}


# --- item 5: cross-site requests ------------------------------------------------------------


async def test_a_web_page_cannot_cease_the_site(tmp_path: Path) -> None:
    """A page in a browser on the pocd host can POST text/plain or a form without a CORS
    preflight; it cannot make the browser send application/json. A DNS-rebinding page
    sends its own name as Host; a cross-site page its own Origin."""
    site = load_site(write_site(tmp_path, NO_DEVICES))
    port = site.config.api.port
    cease = json.dumps(CEASE).encode()
    async with running(site):
        for content_type in (
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ):
            status, body = await send(
                site, "POST", "/api/site/status", cease, {"Content-Type": content_type}
            )
            assert status == 415, (content_type, body)
            assert "application/json" in body["error"]
        status, body = await send(site, "POST", "/api/site/status", cease)  # no Content-Type
        assert status == 415

        for origin in ("https://evil.example", "null", f"http://evil.example:{port}"):
            status, body = await post(site, "/api/site/status", CEASE, {"Origin": origin})
            assert status == 403, (origin, body)
            assert origin in body["error"]

        # DNS rebinding: evil.example now resolves to 127.0.0.1, so the page is "same
        # origin" to the browser and may read answers too; its Host gives it away.
        for host in (f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "evil.example"):
            rebound = {"Host": host, "Origin": f"http://{host}"}
            status, body = await post(site, "/api/site/status", CEASE, rebound)
            assert status == 400, (host, body)
            assert body["fields"] == ["Host"]
            status, body = await send(site, "GET", "/api/status", headers={"Host": host})
            assert status == 400, "a rebinding page must not read the live status either"
            status, _ = await send(site, "GET", "/api/runs", headers={"Host": host})
            assert status == 400
    with Store(site.store_path, readonly=True) as store:
        assert store.site_status() is SiteStatus.ACTIVE
    assert control_actions(site) == []


async def test_the_names_of_the_listen_address_and_a_same_origin_page_are_served(
    tmp_path: Path,
) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    port = site.config.api.port
    async with running(site):
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}"):
            status, live = await send(site, "GET", "/api/status", headers={"Host": host})
            assert (status, live["site"]["id"]) == (200, "test-site"), host
        status, _ = await send(
            site, "GET", "/api/status", headers={"Host": f"127.0.0.1:{port + 1}"}
        )
        assert status == 400, "another port is another service"
        # the console (a later issue) is served by this API: its pages send their own origin
        for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
            status, body = await post(site, "/api/run/stop", {}, {"Origin": origin})
            assert (status, body["error"]) == (409, "no run is active"), origin


async def test_the_clis_own_requests_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pocd run …` talks to the API with urllib: its Host is api.listen, its body JSON, its
    token the one `pocd login` saved."""
    from pocd import tokens
    from pocd.cli import CommandError, _api

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    site = load_site(write_site(tmp_path, NO_DEVICES))
    async with running(site):
        with pytest.raises(CommandError, match="pocd login"):
            await asyncio.to_thread(_api, site, "GET", "/api/status")
        token = (await bearer(site.config.api.listen))["Authorization"].removeprefix("Bearer ")
        tokens.save(site.config.api.listen, tokens.SavedToken("op", token, "s", "never"))
        live = await asyncio.to_thread(_api, site, "GET", "/api/status")
        assert live["site"]["id"] == "test-site"
        body = {"batch_id": "B-1", "protocol": "CART-TCT", "version": None}
        run = await asyncio.to_thread(_api, site, "POST", "/api/runs", body)
        assert run["batch_id"] == "B-1"
        stop = {"abort": False, "reason": ""}
        assert (await asyncio.to_thread(_api, site, "POST", "/api/run/stop", stop))["status"] == (
            "completed"
        )
        with pytest.raises(CommandError, match="refused: no run is active"):
            await asyncio.to_thread(_api, site, "POST", "/api/run/stop", stop)


@pytest.mark.parametrize(
    ("listen", "accepted", "refused"),
    [
        (
            "127.0.0.1:8470",
            ["127.0.0.1:8470", "localhost:8470", "[::1]:8470", "[0:0:0:0:0:0:0:1]:8470"],
            ["evil.example:8470", "127.0.0.1:8471", "127.0.0.1", "10.0.0.5:8470", "", None],
        ),
        ("localhost:8470", ["localhost:8470", "127.0.0.1:8470"], ["localhost.:8470"]),
        ("[::1]:8470", ["[::1]:8470", "localhost:8470", "127.0.0.1:8470"], ["::1:8470"]),
        (
            "0.0.0.0:8470",
            ["0.0.0.0:8470", "10.0.0.5:8470", "[fe80::1]:8470", "localhost:8470", "pocd-host:8470"],
            ["evil.example:8470", "10.0.0.5:80"],
        ),
        ("[::]:80", ["10.0.0.5", "[::1]", "pocd-host:80"], ["evil.example"]),
        ("10.0.0.5:8470", ["10.0.0.5:8470"], ["127.0.0.1:8470", "localhost:8470"]),
        (
            "pocd.rfh.example:8470",
            ["pocd.rfh.example:8470", "POCD.rfh.example:8470"],
            ["127.0.0.1:8470", "user@pocd.rfh.example:8470", "pocd.rfh.example:8470/x"],
        ),
    ],
)
def test_a_host_names_the_api_as_api_listen_means_it(
    listen: str, accepted: list[str], refused: list[str | None]
) -> None:
    from pocd.api.authority import Authority

    authority = Authority.of_listen(listen, machine_names=["pocd-host"])
    for host in accepted:
        assert authority.accepts_host(host), (listen, host)
    for other in refused:
        assert not authority.accepts_host(other), (listen, other)


def test_an_origin_is_this_apis_only_with_its_scheme_host_and_port() -> None:
    from pocd.api.authority import Authority

    authority = Authority.of_listen("127.0.0.1:8470")
    for origin in ("http://127.0.0.1:8470", "http://localhost:8470", "http://[::1]:8470"):
        assert authority.accepts_origin(origin), origin
    for origin in (
        "null",
        "http://127.0.0.1",  # port 80
        "https://127.0.0.1:8471",
        "http://evil.example:8470",
        "file://",
        "ftp://127.0.0.1:8470",
        "127.0.0.1:8470",
    ):
        assert not authority.accepts_origin(origin), origin
    assert Authority.of_listen("127.0.0.1:80").accepts_origin("http://localhost")


# --- item 14: typed, length-limited bodies --------------------------------------------------


async def test_a_body_that_is_not_json_in_utf8_is_refused_naming_why(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    json_type = {"Content-Type": "application/json"}
    async with running(site):
        cases: list[tuple[bytes, dict[str, str], int, list[str]]] = [
            (b'{"reason": "op\xff"}', json_type, 400, ["body"]),  # invalid UTF-8
            (
                b'{"reason": "op"}',
                {"Content-Type": "application/json; charset=klingon"},
                415,
                ["Content-Type"],
            ),
            (
                b'{"reason": "op"}',
                {"Content-Type": "application/json; charset=latin-1"},
                415,
                ["Content-Type"],
            ),
            (b'{"reason": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", json_type, 400, ["body"]),
            (b"", json_type, 400, ["body"]),
            (b"{", json_type, 400, ["body"]),
            (b'["reason", "op"]', json_type, 400, ["body"]),
            (b'"op"', json_type, 400, ["body"]),
        ]
        for raw, headers, expected, fields in cases:
            status, body = await send(site, "POST", "/api/run/stop", raw, headers)
            assert (status, body.get("fields")) == (expected, fields), (raw[:40], body)
        # a charset of utf-8, spelled either way, is JSON's own
        for charset in ("utf-8", "UTF-8", "utf8"):
            status, body = await send(
                site,
                "POST",
                "/api/run/stop",
                b'{"reason": ""}',
                {"Content-Type": f"application/json; charset={charset}"},
            )
            assert (status, body["error"]) == (409, "no run is active")


async def test_values_are_typed_not_coerced(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    start = {"batch_id": "B-1", "protocol": "CART-TCT"}
    async with running(site):
        status, body = await post(site, "/api/runs", {**start, "batch_id": {"name": "x"}})
        assert (status, body["fields"]) == (400, ["batch_id"])
        assert body["error"] == "batch_id: Input should be a valid string"
        for batch in (7, ["B-1"], True, None, "", "   ", "B\n1", "B\u202e1"):
            status, body = await post(site, "/api/runs", {**start, "batch_id": batch})
            assert (status, body["fields"]) == (400, ["batch_id"]), batch
        status, body = await post(site, "/api/runs", {"batch_id": "B-1", "protokol": "CART-TCT"})
        assert status == 400
        assert body["fields"] == ["protocol", "protokol"]
        assert "protokol: is not a field of this request" in body["error"]
        assert "protocol: is required" in body["error"]
        # who acts is the session's user, never a field of the body
        status, body = await post(site, "/api/runs", {**start, "operator": "mallory"})
        assert (status, body["fields"]) == (400, ["operator"])
        assert "operator: is not a field of this request" in body["error"]

        status, run = await post(site, "/api/runs", {**start, "batch_id": "  B-1 "})
        assert (status, run["batch_id"], run["operator"]) == (201, "B-1", DEFAULT_USER)
        for abort in ("y", "true", 1, "no"):
            status, body = await post(site, "/api/run/stop", {"abort": abort, "reason": "r"})
            assert (status, body["fields"]) == (400, ["abort"]), abort
        status, body = await post(site, "/api/run/stop", {"abort": True, "signature": SIGNATURE})
        assert (status, body["fields"]) == (400, ["reason"])
        status, body = await post(site, "/api/site/status", {"status": "closed", "reason": "r"})
        assert (status, body["fields"]) == (400, ["status"])
        assert "'active', 'suspended' or 'ceased'" in body["error"]
        abort = {"abort": True, "reason": "kit leak", "signature": SIGNATURE}
        status, ended = await post(site, "/api/run/stop", abort)
        assert (status, ended["status"]) == (200, "aborted")
    with Store(site.store_path, readonly=True) as store:
        (stored,) = store.runs()
        assert (stored.status, stored.operator, stored.end_reason) == (
            RunStatus.ABORTED,
            DEFAULT_USER,
            "kit leak",
        )
    assert control_actions(site) == ["run.start", "run.abort"]


async def test_lengths_are_limited(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    cease = {"status": "suspended", "signature": SIGNATURE}
    async with running(site):
        status, body = await post(site, "/api/site/status", {**cease, "reason": "x" * 900_000})
        assert status == 413
        assert "larger than 65536 bytes" in body["error"]
        status, body = await post(site, "/api/site/status", {**cease, "reason": "x" * 2001})
        assert (status, body["fields"]) == (400, ["reason"])
        assert "at most 2000 characters" in body["error"]
        status, body = await post(site, "/api/run/phase", {"phase": "p" * 129})
        assert (status, body["fields"]) == (400, ["phase"])
        # the longest of each is taken, in any script, escaped or not
        reason = "\U0001f9ea" * 2000  # a test tube: 4 bytes in UTF-8, 12 as \\ud83e\\uddea
        status, body = await post(site, "/api/site/status", {**cease, "reason": reason})
        assert (status, body) == (200, {"status": "suspended"})
    with Store(site.store_path, readonly=True) as store:
        (change,) = [a for a in store.audit() if a.action == "site.status"]
        assert change.reason == reason


async def test_every_answer_is_json_even_for_a_wrong_path_or_method(tmp_path: Path) -> None:
    site = load_site(write_site(tmp_path, NO_DEVICES))
    async with running(site):
        status, body = await send(site, "GET", "/api/nothing-here")
        assert (status, body["error"]) == (404, "no such path: /api/nothing-here")
        status, body = await send(site, "DELETE", "/api/runs")
        assert status == 405
        assert "DELETE" in body["error"]
        status, body = await send(site, "GET", "/api/runs/no-such-run")
        assert status == 404
        assert "no-such-run" in body["error"]


# --- item 15: reads of the record ------------------------------------------------------------


async def test_run_reads_do_not_wait_for_the_writers_commit(tmp_path: Path) -> None:
    """While the writer's store is busy (a commit holds its lock), GET /api/runs and
    /api/runs/{id} answer from the API's own read-only connection, and the event loop,
    which the device runners share, keeps turning."""
    site = load_site(write_site(tmp_path))
    async with running(site) as daemon:
        status, run = await post(site, "/api/runs", {"batch_id": "B-1", "protocol": "CART-TCT"})
        assert status == 201
        assert daemon.store is not None
        writer_lock = daemon.store._lock  # what a commit holds for its whole length
        holding, release = threading.Event(), threading.Event()

        def long_commit() -> None:
            with writer_lock:
                holding.set()
                release.wait(10)

        commit = threading.Thread(target=long_commit, name="long-commit")
        commit.start()
        ticks: list[float] = []

        async def ticker() -> None:
            while not release.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(ticker())
        try:
            await asyncio.to_thread(holding.wait, 5)
            status, runs = await send(site, "GET", "/api/runs")
            assert (status, [r["id"] for r in runs]) == (200, [run["id"]])
            status, detail = await send(site, "GET", f"/api/runs/{run['id']}")
            assert (status, detail["batch_id"]) == (200, "B-1")
            assert [p["phase"] for p in detail["phases"]] == ["enrichment"]
            assert writer_lock.locked(), "the reads answered only after the commit ended"
            gaps = [b - a for a, b in itertools.pairwise(ticks)]
            assert max(gaps, default=0.0) < 0.5, "the event loop stalled during the commit"
        finally:
            release.set()
            await beat
            await asyncio.to_thread(commit.join)
        await post(site, "/api/run/stop", {})
    readers = [t.name for t in threading.enumerate() if t.name.startswith("pocd-api-read")]
    assert readers == [], "the API's reader thread ends with the API"


# --- item 18: valid JSON whatever reaches the API ------------------------------------------


SLOW_DEVICE = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 3600 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }
"""


async def test_status_is_valid_json_when_a_device_says_infinity(tmp_path: Path) -> None:
    """The transports make an infinite reading BAD now; the API must not depend on it."""
    site = load_site(write_site(tmp_path, SLOW_DEVICE))
    async with running(site) as daemon:
        await until(lambda: ("incubator", "temperature") in daemon.latest)
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns() + 10**9, math.inf))
        await until(lambda: math.isinf(daemon.latest["incubator", "temperature"].value))
        status, live = await send(site, "GET", "/api/status")
        assert status == 200
        (point,) = [p for p in live["points"] if p["point"] == "temperature"]
        assert point["value"] is None
        assert point["quality"] == Quality.GOOD.name.lower()
        assert all("text" in p for p in live["points"])


def test_json_bytes_writes_non_finite_numbers_as_null() -> None:
    from pocd.records import json_bytes

    data = {"worst": math.inf, "low": -math.inf, "nested": [{"v": math.nan}], "ok": 37.659903}
    text = json_bytes(data).decode()
    assert strict_json(text) == {
        "worst": None,
        "low": None,
        "nested": [{"v": None}],
        "ok": 37.659903,
    }
    assert strict_json(json_bytes(data, indent=2).decode())["ok"] == 37.659903


# --- run control's errors -------------------------------------------------------------------


class FakeRunControlWithoutAStore:
    """Run control whose store never commits in time (a fake: the daemon's commit deadline
    belongs to the daemon), and whose phase change has a bug. It keeps the guard's audit
    entries in a list (the daemon's writer commits them)."""

    def __init__(self) -> None:
        self.recorded: list[Any] = []

    async def record(self, records: Any) -> None:
        self.recorded += records

    async def start_run(self, *args: Any, **kwargs: Any) -> Any:
        from pocd.errors import PocdError

        raise PocdError("the store has not committed the run start within 5 s")

    async def advance_phase(self, *args: Any, **kwargs: Any) -> Any:
        return {}["no such key"]

    async def stop_run(self, *args: Any, **kwargs: Any) -> Any:
        from pocd.errors import RunError

        raise RunError("no run is active")

    async def set_site_status(self, *args: Any, **kwargs: Any) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"points": [{"value": math.inf}, {"value": math.nan}]}

    def line_status(self) -> list[dict[str, Any]]:
        return []


async def test_run_controls_errors_are_409_503_and_a_bug_is_a_json_500(tmp_path: Path) -> None:
    from aiohttp import web

    from pocd.api.authority import Authority
    from pocd.api.http import make_app
    from pocd.settings import AccessSection
    from tests.sitekit import add_user, free_port

    port = free_port()
    store_path = tmp_path / "pocd.sqlite"
    add_user(store_path, "op", ["operator"])
    control = FakeRunControlWithoutAStore()
    app = make_app(
        control=control,
        view=control,
        store_path=store_path,
        metrics=lambda: b"",
        authorities=[Authority.of_listen(f"127.0.0.1:{port}")],
        access=AccessSection(),
        recorder=control,
        public=["status"],
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        site = f"127.0.0.1:{port}"
        start = {"batch_id": "B", "protocol": "CART-TCT"}
        status, body = await post(site, "/api/runs", start)
        assert (status, body) == (
            503,
            {"error": "the store has not committed the run start within 5 s"},
        )
        status, body = await post(site, "/api/run/stop", {})
        assert (status, body) == (409, {"error": "no run is active"})
        status, body = await post(site, "/api/run/phase", {"phase": "p"})
        assert status == 500
        assert body["error"].startswith("internal error: KeyError")
        status, live = await send(site, "GET", "/api/status", user=None)  # opened: public
        assert (status, live) == (200, {"points": [{"value": None}, {"value": None}]})
        assert [a.action for a in control.recorded] == ["login"]
    finally:
        await runner.cleanup()
