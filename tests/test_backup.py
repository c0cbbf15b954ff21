"""`pocd backup` while the daemon writes, and `pocd restore --check` of what it made."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
from pathlib import Path

from pocd.model import AuditEntry, now_ns
from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import cli, running, until, write_site


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


async def test_a_backup_under_load_holds_what_was_committed_and_restores(tmp_path: Path) -> None:
    config = write_site(tmp_path / "site")
    site = load_site(config)
    backups = tmp_path / "backups"
    backups.mkdir()
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] >= 50)
        ((samples_before, audit_before),) = rows(
            site.store_path, "SELECT (SELECT max(id) FROM samples), (SELECT max(id) FROM audit)"
        )
        done = await asyncio.to_thread(cli, "backup", "-c", str(config), "-o", str(backups))
        assert done.returncode == 0, done.stderr
        taken = daemon.counts["samples"]
        await until(lambda: daemon.counts["samples"] >= taken + 20)  # it went on writing
    (backup,) = backups.glob("pocd-*.sqlite")
    assert not list(backups.glob("*.partial"))

    # Every record committed before the backup began is in it, as it is in the store.
    for table, before in (("samples", samples_before), ("audit", audit_before)):
        query = f"SELECT * FROM {table} WHERE id <= {before} ORDER BY id"
        assert rows(backup, query) == rows(site.store_path, query)
        assert len(rows(backup, query)) == before
    # The backup is audited in the live store, with the file's hash.
    with Store(site.store_path, readonly=True) as store:
        (entry,) = [e for e in store.audit() if e.action == "backup.create"]
    assert entry.target == str(backup)
    assert entry.new == hashlib.sha256(backup.read_bytes()).hexdigest()

    checked = cli("restore", "--check", str(backup), "-c", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "integrity: ok; schema version" in checked.stdout
    assert "checkpoint signatures checked" in checked.stdout
    assert checked.stdout.strip().endswith("the backup holds")
    assert rows(backup, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file

    # Restored as a site's store, it opens and its chain holds.
    restored = tmp_path / "restored" / "pocd.sqlite"
    restored.parent.mkdir()
    shutil.copy(backup, restored)
    with Store(restored) as store:
        assert store.verify_chain().holds


def test_a_damaged_backup_fails_the_check_and_a_backup_never_replaces_a_file(
    tmp_path: Path,
) -> None:
    config = write_site(tmp_path / "site")
    site = load_site(config)
    with Store(site.store_path) as store:
        store.write([AuditEntry(now_ns(), "local:test", "test.entry", "x")])
    target = tmp_path / "b.sqlite"
    assert cli("backup", "-c", str(config), "-o", str(target)).returncode == 0
    refused = cli("backup", "-c", str(config), "-o", str(target))
    assert refused.returncode == 1 and "already exists" in refused.stderr

    # One changed value in an audit row: the chain names it.
    damaged = tmp_path / "damaged.sqlite"
    shutil.copy(target, damaged)
    db = sqlite3.connect(damaged)
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET actor = 'mallory' WHERE id = 1")
    db.commit()
    db.close()
    checked = cli("restore", "--check", str(damaged), "-c", str(config))
    assert checked.returncode == 1
    assert "FAIL: audit chain: audit row 1" in checked.stdout

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    checked = cli("restore", "--check", str(garbage))
    assert checked.returncode == 1
    assert "not an SQLite database" in checked.stdout
