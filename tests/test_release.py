"""The batch-release record end to end, as its users meet it: a real run on the real daemon
(an action excursion and its alarm acknowledged, a data gap, a phase skipped), exported with
`pocd export`, checked by `pocd verify` and by the bagit package's own tool, tampered with in
every way the QP must be protected from, and signed by people with `pocd sign`, a remote QP
included, on a copy of the zip with no config and no store."""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pocd.model import Quality, Sample, now_ns
from pocd.settings import Site, load_site
from pocd.store import Store
from tests.sitekit import (
    PASSWORD,
    add_user,
    api,
    running,
    spawn_bare_daemon,
    until,
    write_site,
)

RELEASE = """
id = "REL"
version = "1"
title = "Release test protocol"
status = "approved"

[parameters.temperature]
unit = "C"
critical = true
[parameters.temperature.limits]
alert_low = 36.5
alert_high = 37.5
action_low = 36.0
action_high = 38.0
max_data_loss = "1m"

[parameters.ph]
unit = "pH"
critical = true
[parameters.ph.limits]
alert_low = 6.9
alert_high = 7.35
action_low = 6.8
action_high = 7.45
max_data_loss = "0s"

[[phases]]
id = "grow"

[[phases]]
id = "harvest"

[[phases]]
id = "final"
"""
DEVICES = """
[[devices]]
id = "incubator"
driver = "sim"
transport = { interval = 0.05, seed = 1 }
points.temperature = { parameter = "temperature", unit = "C", base = 37.0 }

[[devices]]
id = "bioreactor"
driver = "sim"
transport = { interval = 0.05, seed = 2 }
points.ph = { parameter = "ph", unit = "pH", base = 7.1 }
"""
PASSPHRASE = "the QP's long passphrase"
SKIP = {"phase": "final", "reason": "harvest done by hand", "signature": True}


def pocd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pocd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@dataclass(frozen=True)
class Release:
    site: Site
    run_id: str
    open_bag: Path  # exported with its deviations open
    closed_bag: Path  # exported again once QA closed them
    deviations: list[str]
    keyring: Path
    keys: dict[str, Path]  # login -> their key file


async def _make_run(site: Site) -> tuple[str, list[str]]:
    async with running(site) as daemon:
        await until(lambda: ("bioreactor", "ph") in daemon.latest)
        status, run = await api(site, "POST", "/api/runs", {"batch_id": "B-REL", "protocol": "REL"})
        assert status == 201, run
        await asyncio.sleep(0.3)
        await daemon.inbox.put(Sample("incubator", "temperature", now_ns(), 38.6))
        await daemon.inbox.put(Sample("bioreactor", "ph", now_ns(), 7.0, Quality.BAD, reason="crc"))

        async def deviations() -> list[dict[str, object]]:
            return list((await api(site, "GET", f"/api/runs/{run['id']}"))[1]["deviations"])

        for _ in range(100):
            if await deviations():
                break
            await asyncio.sleep(0.05)
        _, alarms = await api(site, "GET", "/api/alarms")
        assert [a for a in alarms["alarms"] if a["alarm_id"] and a["kind"] == "action-high"]
        body = {"source": "temperature", "kind": "action-high", "comment": "door <open> & shut"}
        assert (await api(site, "POST", "/api/alarms/acknowledge", body))[0] == 200
    await asyncio.sleep(0.5)  # the daemon down mid-run: a gap of every parameter
    async with running(site) as daemon:
        await until(lambda: ("bioreactor", "ph") in daemon.latest)
        assert (await api(site, "POST", "/api/run/phase", SKIP))[0] == 200
        await asyncio.sleep(0.3)
        assert (await api(site, "POST", "/api/run/stop", {}))[0] == 200
        found = {str(d["id"]): str(d["cause"]) for d in await deviations()}
    # the action excursion, the phase skipped, and (ph allows no data loss) the restart
    assert set(found.values()) >= {"action-limit", "phase-order"}, found
    return str(run["id"]), list(found)


async def _close(site: Site, deviations: list[str]) -> None:
    close = {
        "disposition": "no impact",
        "reason": "within the validated range on review",
        "root_cause": "door opened for a sample",
        "signature": {"password": PASSWORD, "meaning": "approved"},
    }
    async with running(site):
        for deviation in deviations:
            path = f"/api/deviations/{deviation}"
            assert (await api(site, "POST", f"{path}/assess", {"note": "none"}, user="sam"))[
                0
            ] == 200
            assert (await api(site, "POST", f"{path}/close", close))[0] == 200


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    folder = tmp_path_factory.mktemp("release")
    config = write_site(folder, DEVICES)
    (folder / "protocols" / "rel.toml").write_text(RELEASE)
    site = load_site(config)
    add_user(site.store_path, "sam", ["supervisor"], "Sam Supervisor")
    add_user(site.store_path, "quinn", ["qp"], "Quinn Qualified-Person")
    add_user(site.store_path, "otto", ["operator"], "Otto Operator")
    add_user(site.store_path, "ada", ["admin"], "Ada Admin")
    run_id, deviations = asyncio.run(_make_run(site))

    open_bag = folder / "open" / "B-REL"
    done = pocd("export", run_id, "-c", str(config), "-o", str(open_bag))
    assert done.returncode == 0, done.stderr
    asyncio.run(_close(site, deviations))
    closed_bag = folder / "closed" / "B-REL"
    done = pocd("export", "B-REL", "-c", str(config), "-o", str(closed_bag))
    assert done.returncode == 0, done.stderr

    keys = {}
    for login in ("quinn", "otto"):
        made = pocd(
            "keys",
            "create",
            "--name",
            login.title(),
            "-o",
            str(folder / "keys" / login),
            stdin=PASSPHRASE + "\n",
        )
        assert made.returncode == 0, made.stderr
        (keys[login],) = (folder / "keys" / login).glob("*.key")
        added = pocd(
            "keys",
            "add",
            str(keys[login].with_suffix(".pub.json")),
            "--user",
            login,
            "--as",
            "ada",
            "-c",
            str(config),
            stdin=PASSWORD + "\n",
        )
        assert added.returncode == 0, added.stderr
    keyring = site.data_dir / "keyring.json"
    return Release(site, run_id, open_bag, closed_bag, deviations, keyring, keys)


@pytest.fixture
def bag(release: Release, tmp_path: Path) -> Path:
    """A copy of the bag exported with its deviations open, to tamper with."""
    copy = tmp_path / release.open_bag.name
    shutil.copytree(release.open_bag, copy)
    return copy


def verify(bundle: Path, keyring: Path | None = None) -> tuple[int, str]:
    args = ["verify", str(bundle), *(["--keyring", str(keyring)] if keyring else [])]
    done = pocd(*args)
    return done.returncode, done.stdout + done.stderr


def bagit_validate(bundle: Path) -> int:
    bagit_py = Path(sys.executable).with_name("bagit.py")
    return subprocess.run(
        [sys.executable, str(bagit_py), "--validate", str(bundle)],
        capture_output=True,
        check=False,
        timeout=120,
    ).returncode


def sign(bundle: Path, key: Path, meaning: str, keyring: Path | None = None) -> tuple[int, str]:
    args = ["sign", str(bundle), "--meaning", meaning, "--key", str(key)]
    done = pocd(*args, *(["--keyring", str(keyring)] if keyring else []), stdin=PASSPHRASE + "\n")
    return done.returncode, done.stdout + done.stderr


# --- the bundle as exported -------------------------------------------------------------------


def test_the_bundle_verifies_and_any_bagit_tool_validates_it(release: Release) -> None:
    for bundle in (release.open_bag, release.open_bag.with_name("B-REL.zip")):
        code, out = verify(bundle, release.keyring)
        assert code == 0, out
        assert "audit segment: entries" in out
    assert bagit_validate(release.open_bag) == 0
    names = {p.relative_to(release.open_bag).as_posix() for p in release.open_bag.rglob("*")}
    for payload in (
        "run.json",
        "samples.parquet",
        "samples.csv.gz",
        "audit.jsonl",
        "gaps.csv",
        "report.pdf",
        "deviations.json",
        "alarms.json",
        "excursions.json",
        "incidents.json",
        "signatures.json",
        "exceptions.json",
        "protocol/REL-1.toml",
        "config/pocd.toml",
    ):
        assert f"data/{payload}" in names, payload
    run = json.loads((release.open_bag / "data" / "run.json").read_text())
    assert run["run"]["batch_id"] == "B-REL"
    assert [p["phase"] for p in run["phases"]] == ["grow", "final"]
    assert {d["id"] for d in run["devices"]} == {"incubator", "bioreactor"}
    with Store(release.site.store_path, readonly=True) as store:
        exports = [a for a in store.audit() if a.action == "run.export"]
    assert [a.target for a in exports][:2] == [release.run_id, release.run_id]


def test_the_samples_are_the_stored_rows_and_the_gaps_the_data_loss_excursions(
    release: Release,
) -> None:
    with Store(release.site.store_path, readonly=True) as store:
        run = store.run(release.run_id)
        assert run is not None
        excursions = store.excursions(run.id)
    table = pq.read_table(release.open_bag / "data" / "samples.parquet").to_pylist()
    with gzip.open(release.open_bag / "data" / "samples.csv.gz", "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(table) == len(rows) > 20
    db = sqlite3.connect(release.site.store_path)
    ids = {r["id"] for r in table}
    stored = [
        row
        for row in db.execute(
            "SELECT s.id, s.t, s.dt, c.device, c.point, c.parameter, s.v, q.reason FROM samples s "
            "JOIN channels c ON c.id = s.ch JOIN qualities q ON q.id = s.q "
            "WHERE s.id BETWEEN ? AND ? ORDER BY s.id",
            (min(ids), max(ids)),
        )
        if row[0] in ids
    ]
    db.close()
    assert [
        (r["id"], r["t"], r["dt"], r["device"], r["point"], r["parameter"], r["value"], r["reason"])
        for r in table
    ] == stored
    assert [int(r["id"]) for r in rows] == [r["id"] for r in table]
    assert [r["t"] for r in rows] == [str(r["t"]) for r in table]
    assert any(r["quality"] == "bad" and r["reason"] == "crc" for r in table)
    with (release.open_bag / "data" / "gaps.csv").open() as fh:
        gaps = list(csv.DictReader(fh))
    lost = [(e.parameter, e.kind.value, e.start) for e in excursions if e.kind.is_data_loss]
    found = [(g["parameter"], g["cause"], int(g["start_ns"])) for g in gaps]
    assert [g for g in found if g[1] != "daemon-down"] == sorted(lost, key=lambda g: (g[2], g[0]))
    assert ("ph", "bad-quality") in {g[:2] for g in lost}
    down = [g for g in gaps if g["cause"] == "daemon-down"]
    assert {g["parameter"] for g in down} == {"temperature", "ph"}
    assert all(0.4 < float(g["seconds"]) < 30 for g in down), down


def test_the_report_shows_every_exception_class_deviation_and_signature_meaning(
    release: Release, tmp_path: Path
) -> None:
    pdf = release.open_bag / "data" / "report.pdf"
    text = subprocess.run(
        ["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    classes = json.loads((release.open_bag / "data" / "exceptions.json").read_text())["classes"]
    assert "B-REL" in text
    for deviation in release.deviations:
        assert deviation in text
    for exception in classes:
        assert exception["title"] in " ".join(text.split()), exception["title"]
    counts = {c["class"]: c["count"] for c in classes}
    assert counts["action-excursions"] == 1
    assert counts["deviations-open"] == len(release.deviations)
    assert counts["phases-out-of-order"] == 1 and counts["clock-jumps"] == 0
    for meaning in ("performed", "reviewed", "approved", "released"):
        assert meaning in text
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(pdf), str(tmp_path / "page")], check=True)
    assert len(list(tmp_path.glob("page*.png"))) >= 3


# --- tampering --------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["samples.csv.gz", "samples.parquet", "report.pdf"])
def test_one_changed_byte_is_named_by_verify_and_fails_bagit(bag: Path, name: str) -> None:
    _flip_byte(bag / "data" / name)
    code, out = verify(bag)
    assert code == 1
    assert f"data/{name}: changed" in out
    assert bagit_validate(bag) != 0


@pytest.mark.parametrize("how", ["delete", "insert", "reorder"])
def test_a_changed_audit_line_is_named(bag: Path, how: str) -> None:
    path = bag / "data" / "audit.jsonl"
    lines = path.read_text().splitlines()
    i = len(lines) // 2
    if how == "delete":
        del lines[i]
    elif how == "insert":
        lines.insert(i, lines[i])
    else:
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    path.write_text("\n".join(lines) + "\n")
    code, out = verify(bag)
    assert code == 1
    assert "data/audit.jsonl: changed" in out
    assert "audit.jsonl line" in out  # the segment's own check names the line too


def test_a_replaced_attestation_is_named(bag: Path, release: Release) -> None:
    shutil.copyfile(release.closed_bag / "attestation.dsse.json", bag / "attestation.dsse.json")
    code, out = verify(bag, release.keyring)
    assert code == 1
    assert "attestation.dsse.json: changed" in out
    assert "its SHA-256 is not the attested one" in out


def test_a_file_added_to_the_bag_is_named(bag: Path) -> None:
    (bag / "data" / "extra.csv").write_text("a,b\n")
    (bag / "notes.txt").write_text("nothing to see\n")
    code, out = verify(bag)
    assert code == 1
    assert "data/extra.csv: added" in out
    assert "notes.txt: added to the bag" in out


def test_people_sign_and_each_bad_signature_is_named(bag: Path, release: Release) -> None:
    # an operator's review, from a key in the keyring: the bag still validates everywhere
    code, out = sign(bag, release.keys["otto"], "reviewed", release.keyring)
    assert code == 0, out
    assert bagit_validate(bag) == 0
    code, out = verify(bag, release.keyring)
    assert code == 0, out
    assert "reviewed by Otto Operator" in out
    # released by a key without the qp role, and with deviations open: refused by sign...
    code, out = sign(bag, release.keys["otto"], "released", release.keyring)
    assert code == 1 and "deviations not closed" in out
    # ...and named by verify when made anyway (a signature file written by other means)
    (signature,) = (bag / "signatures").glob("*.json")
    forged = bag / "signatures" / "02-released.json"
    from pocd.release.attest import SIGNATURE_TYPE, open_envelope, seal
    from pocd.release.keys import load_private

    payload = open_envelope(signature.read_bytes(), SIGNATURE_TYPE, None)
    otto = load_private(release.keys["otto"], PASSPHRASE)
    forged.write_bytes(seal({**payload, "meaning": "released"}, SIGNATURE_TYPE, otto))
    code, out = verify(bag, release.keyring)
    assert code == 1
    assert "whose key does not hold the qp role" in out
    assert "released with deviations not closed" in out
    forged.unlink()
    # a person's signature replaced by one made over another bundle
    shutil.rmtree(bag / "signatures")
    other = bag.parent / "other"
    shutil.copytree(release.closed_bag, other)
    assert sign(other, release.keys["otto"], "reviewed", release.keyring)[0] == 0
    shutil.copytree(other / "signatures", bag / "signatures")
    code, out = verify(bag, release.keyring)
    assert code == 1 and "signs another attestation" in out
    # a key that is not in the keyring
    shutil.rmtree(bag / "signatures")
    assert (
        pocd(
            "keys",
            "create",
            "--name",
            "Mallory",
            "-o",
            str(bag.parent / "m"),
            stdin=PASSPHRASE + "\n",
        ).returncode
        == 0
    )
    (mallory,) = (bag.parent / "m").glob("*.key")
    assert sign(bag, mallory, "approved")[0] == 0  # without the keyring, sign cannot tell
    code, out = verify(bag, release.keyring)
    assert code == 1 and "which is not in the site's keyring" in out


def test_a_remote_qp_verifies_and_releases_the_zip_with_no_config_and_no_store(
    release: Release, tmp_path: Path
) -> None:
    scratch = tmp_path / "qp-laptop"
    scratch.mkdir()
    bundle = scratch / "B-REL.zip"
    shutil.copyfile(release.closed_bag.with_name("B-REL.zip"), bundle)
    keyring = scratch / "keyring.json"
    shutil.copyfile(release.keyring, keyring)
    code, out = verify(bundle, keyring)
    assert code == 0, out
    code, out = sign(bundle, release.keys["quinn"], "released", keyring)
    assert code == 0, out
    code, out = verify(bundle, keyring)
    assert code == 0, out
    assert "released by Quinn Qualified-Person" in out
    with zipfile.ZipFile(bundle) as zf:
        assert any(n.startswith("B-REL/signatures/") for n in zf.namelist())


def test_export_refuses_an_unknown_run_and_an_existing_folder_and_leaves_nothing(
    release: Release,
) -> None:
    config = str(release.site.path)
    done = pocd("export", release.run_id, "-c", config, "-o", str(release.open_bag))
    assert done.returncode == 1 and "already exists" in done.stderr
    done = pocd("export", "no-such-run", "-c", config, "-o", str(release.open_bag) + "-x")
    assert done.returncode == 1 and "no run 'no-such-run'" in done.stderr
    assert not Path(str(release.open_bag) + "-x").exists()
    assert not Path(str(release.open_bag) + "-x.partial").exists()


def test_the_config_in_the_bundle_is_the_one_in_force_not_the_file_as_edited_since(
    release: Release, tmp_path: Path
) -> None:
    config = release.site.path
    as_run = config.read_text()
    config.write_text(as_run.replace('name = "Test site"', 'name = "Renamed since"'))
    try:
        done = pocd("export", release.run_id, "-c", str(config), "-o", str(tmp_path / "B"))
    finally:
        config.write_text(as_run)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "B" / "data" / "config" / "pocd.toml").read_text() == as_run
    files = json.loads((tmp_path / "B" / "data" / "run.json").read_text())["files"]
    (kept,) = [f for f in files if f["kind"] == "config"]
    assert kept["from"] == "the store, as loaded" and kept["hash_now"] != kept["hash_in_force"]
    assert [f["file"] for f in files if f["kind"] == "driver"] == ["config/drivers/sim.toml"]
    assert (tmp_path / "B" / "data" / "config" / "drivers" / "sim.toml").is_file()


# --- retention (last: it prunes the module's store) -------------------------------------------


def test_exports_while_the_daemon_writes_leave_the_live_chain_whole(
    release: Release, tmp_path: Path
) -> None:
    """The export's reader carries its own SQLite: in the export's process, closing its file
    dropped the locks of the process's other connection, and the daemon then committed over
    the export's audit entry (found live: `run.export` rows missing from the chain)."""
    config = str(release.site.path)
    daemon = spawn_bare_daemon(release.site.path)
    try:
        for k in range(4):
            done = pocd("export", "B-REL", "-c", config, "-o", str(tmp_path / f"again-{k}"))
            assert done.returncode == 0, done.stderr
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
    verified = pocd("audit", "verify", "-c", config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with Store(release.site.store_path, readonly=True) as store:
        exports = [e for e in store.audit() if e.action == "run.export"]
    assert len(exports) >= 6  # the fixture's two, these four


def test_pruning_keeps_unreleased_runs_and_leaves_the_chain_whole(
    release: Release, tmp_path: Path
) -> None:
    config = str(release.site.path)
    later = "2100-01-01"
    done = pocd("prune", "-c", config, "--before", later, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"kept: run {release.run_id} (batch B-REL) is not released" in done.stdout
    # a release is recorded from a bundle this site exported, signed `released` by a QP
    bundle = tmp_path / "B-REL.zip"
    shutil.copyfile(release.closed_bag.with_name("B-REL.zip"), bundle)
    done = pocd("release", str(bundle), "-c", config)
    assert done.returncode == 1 and "no valid `released` signature" in done.stderr
    assert sign(bundle, release.keys["quinn"], "released", release.keyring)[0] == 0
    done = pocd("release", str(bundle), "-c", config)
    assert done.returncode == 0, done.stderr
    with Store(release.site.store_path, readonly=True) as store:
        before = store.sample_count()
    done = pocd("prune", "-c", config, "--before", later)
    assert done.returncode == 0, done.stderr
    assert "pruned" in done.stdout
    with Store(release.site.store_path, readonly=True) as store:
        kept = store.samples()
        prunes = [a for a in store.audit() if a.action == "store.prune"]
        assert store.sample_count() == before  # rowids are never reused
    assert len(prunes) == 1 and int(prunes[0].details["last"]) >= before - len(kept)
    assert all(rowid > int(prunes[0].details["last"]) for rowid, _ in kept)
    verified = pocd("audit", "verify", "-c", config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    done = pocd("export", release.run_id, "-c", config, "-o", str(tmp_path / "again"))
    assert done.returncode == 1 and "its samples were pruned" in done.stderr


def test_verify_names_a_bundle_it_cannot_read(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    code, out = verify(junk)
    assert code == 1 and "junk.zip: not a bundle folder or zip" in out
    (tmp_path / "empty").mkdir()
    code, out = verify(tmp_path / "empty")
    assert code == 1 and "BagIt:" in out
