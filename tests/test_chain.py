"""The store's tamper-evident chain (pocd.store.chain, schema v13), attacked the way someone
with the file and the sqlite3 shell would: triggers dropped, rows edited, deleted, inserted.
`pocd audit verify` names each change."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pocd.model import AuditEntry, Quality, Sample, User, UserChange
from pocd.settings import load_site
from pocd.store import Store
from tests.sitekit import cli, write_site

T0 = 1_780_000_000_000_000_000


def filled(folder: Path) -> Path:
    """A site whose store holds samples (NaN, bad quality, no device time among them), audit
    entries and a user changed in place."""
    config = write_site(folder)
    site = load_site(config)
    samples = [
        Sample("incubator", "temperature", T0 + i, math.nan if i % 9 == 0 else 37 + i / 100)
        for i in range(200)
    ]
    samples.append(Sample("incubator", "co2", T0 + 300, 5.0, Quality.BAD, reason="crc"))
    user = User("olive", "Olive", ("operator",), "hash", False, T0, T0)
    with Store(site.store_path) as store:
        store.write([*samples[:120], AuditEntry(T0, "op", "run.start", "r1", "")])
        store.write([*samples[120:], AuditEntry(T0 + 1, "op", "run.stop", "r1", "done"), user])
        store.write([Sample("incubator", "temperature", T0 + 400, 36.5, device_t=T0 + 399)])
        store.write([UserChange(replace(user, roles=("operator", "qa"), changed=T0 + 2))])
    return config


def verify(config: Path) -> tuple[int, str]:
    done = cli("audit", "verify", "-c", str(config))
    return done.returncode, done.stdout + done.stderr


def tamper(config: Path, *sql: str) -> None:
    db = sqlite3.connect(load_site(config).store_path)
    for triggers in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {triggers[0]}")  # what an attacker does first
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()


def test_an_untouched_store_verifies(tmp_path: Path) -> None:
    code, out = verify(filled(tmp_path))
    assert code == 0, out
    assert "the chain holds" in out and "202 samples" in out


CASES: dict[str, tuple[Callable[[], tuple[str, ...]], str]] = {
    "edited-audit": (
        lambda: ("UPDATE audit SET reason = 'nothing happened' WHERE action = 'run.stop'",),
        "audit row 2 differs from what was recorded (edited)",
    ),
    "deleted-audit": (
        lambda: ("DELETE FROM audit WHERE action = 'run.start'",),
        "audit row 1 is gone (deleted since it was recorded)",
    ),
    "inserted-audit": (
        lambda: (
            "INSERT INTO audit (t, actor, action, target, reason, old_value, new_value, details)"
            " VALUES (1, 'qa', 'run.release', 'r1', '', NULL, NULL, '{}')",
        ),
        "audit row 3 is not in the chain (inserted around it)",
    ),
    "edited-sample": (
        lambda: ("UPDATE samples SET v = 37.0 WHERE id = 150",),
        "samples 121..201 differ from what was recorded (edited)",
    ),
    "deleted-sample": (
        lambda: ("DELETE FROM samples WHERE id = 5",),
        "samples 1..120: 1 deleted",
    ),
    "inserted-sample": (
        lambda: ("INSERT INTO samples (ch, t, dt, v, q) VALUES (1, 1, NULL, 1.0, 0)",),
        "samples 203..203 are not in the chain (inserted)",
    ),
    "edited-user": (
        lambda: ("UPDATE users SET roles = 'operator admin qa' WHERE login = 'olive'",),
        "users row olive differs from what was recorded (edited)",
    ),
    "removed-chain-entry": (
        lambda: ("DELETE FROM chain WHERE id = 3",),
        "does not follow the entry before it",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_change_is_named(case: str, tmp_path: Path) -> None:
    config = filled(tmp_path)
    statements, expected = CASES[case]
    tamper(config, *statements())
    code, out = verify(config)
    assert code == 1
    assert "the chain does NOT hold" in out
    assert expected in out, out


def test_a_connection_without_pocd_cannot_append_to_a_chained_table(tmp_path: Path) -> None:
    config = filled(tmp_path)
    db = sqlite3.connect(load_site(config).store_path)
    with pytest.raises(sqlite3.OperationalError, match="pocd_digest"):
        db.execute("INSERT INTO incidents (t, kind, code, source, message, raw) "
                   "VALUES (1, 'data', 'x', 'y', 'z', X'')")  # fmt: skip
    db.close()


def checkpointed(folder: Path) -> Path:
    """`filled`, with the chain's head signed by the site key (as the daemon does)."""
    from pocd.sitekey import SiteKey

    config = filled(folder)
    site = load_site(config)
    key = SiteKey.open(site.data_dir)
    with Store(site.store_path) as store:
        assert store.checkpoint("pocd/test-site", key.sign, key.id, T0) is not None
        assert store.checkpoint("pocd/test-site", key.sign, key.id, T0) is None  # unchanged
    return config


def test_a_checkpointed_store_verifies_with_its_signatures(tmp_path: Path) -> None:
    code, out = verify(checkpointed(tmp_path))
    assert code == 0, out
    assert "1 checkpoints match it (signatures checked with" in out


def test_a_truncated_tail_below_the_last_checkpoint_is_caught(tmp_path: Path) -> None:
    config = checkpointed(tmp_path)
    # the last records and their entries removed: what is left links up fine
    tamper(
        config,
        "DELETE FROM users",
        "DELETE FROM chain WHERE id >= (SELECT max(id) - 1 FROM chain)",
        "DELETE FROM samples WHERE id > 201",
    )
    code, out = verify(config)
    assert code == 1
    assert "were cut off (truncated)" in out, out


def test_a_history_rewritten_with_fresh_links_is_caught_by_the_checkpoint(tmp_path: Path) -> None:
    from pocd.store.chain import digest_row, link

    config = checkpointed(tmp_path)
    store_path = load_site(config).store_path
    tamper(config, "UPDATE audit SET reason = 'all fine' WHERE action = 'run.stop'")
    db = sqlite3.connect(store_path)  # the attacker recomputes every entry after the edit
    previous = None
    for entry, kind, ref, stored in db.execute(
        "SELECT id, kind, ref, digest FROM chain ORDER BY id"
    ).fetchall():
        digest = stored
        if kind == "audit":
            row = db.execute(
                "SELECT id, t, actor, action, target, reason, old_value, new_value, details "
                "FROM audit WHERE id = ?",
                (ref,),
            ).fetchone()
            digest = digest_row(*row)
        previous = link(previous, kind, ref, digest)
        db.execute("UPDATE chain SET digest = ?, hash = ? WHERE id = ?", (digest, previous, entry))
    db.commit()
    db.close()
    code, out = verify(config)
    assert code == 1
    assert "is not the one it signed" in out, out
    assert "differs from what was recorded" not in out  # the chain alone was fooled


def test_a_forged_checkpoint_signature_is_caught(tmp_path: Path) -> None:
    config = checkpointed(tmp_path)
    tamper(config, "UPDATE checkpoints SET signature = zeroblob(64)")
    code, out = verify(config)
    assert code == 1
    assert "its signature does not verify with key" in out, out


async def test_the_daemon_signs_the_chain_head_and_its_store_verifies(tmp_path: Path) -> None:
    from tests.sitekit import running, until

    site = load_site(write_site(tmp_path))
    async with running(site) as daemon:
        await until(lambda: daemon.counts["samples"] > 0)
    with Store(site.store_path, readonly=True) as store:
        report = store.verify_chain(
            bytes.fromhex((site.data_dir / "site-key.pub").read_text().strip())
        )
    assert report.holds, report.problems
    assert report.checkpoints >= 1 and report.samples > 0
    assert oct((site.data_dir / "site-key.pem").stat().st_mode & 0o777) == "0o600"


def test_opening_a_second_store_in_a_process_keeps_the_first_ones_locks(tmp_path: Path) -> None:
    """Found live: an export while the daemon ran lost its audit entry's chain row. Opening a
    read-write Store touched the file with a raw open and close, and closing any descriptor of
    a file drops all of the process's POSIX locks on it, the first connection's SQLite locks
    included. Another process closing its store then took itself for the last connection,
    checkpointed and reset the WAL under the first one, whose next commit overwrote it."""
    import subprocess
    import sys

    path = tmp_path / "pocd.db"
    t = 1_767_225_600 * 10**9
    # Another process appends an entry, then says what the store holds and whether it verifies.
    script = (
        "import sys; from pathlib import Path; from pocd.store import Store; "
        "from pocd.model import AuditEntry\n"
        "with Store(Path(sys.argv[1])) as s:\n"
        "    s.write([AuditEntry(int(sys.argv[2]), 'other', 'other', 'x')])\n"
        "with Store(Path(sys.argv[1]), readonly=True) as s:\n"
        "    print(' '.join(e.action for e in s.audit()), s.verify_chain().problems)\n"
    )

    def other(k: int) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(path), str(t + k)],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    with Store(path) as daemon:
        daemon.write([AuditEntry(t, "daemon", "daemon", "x")])
        Store(path).close()  # a sink or the API opening a store of its own in the daemon
        other(1)
        daemon.write([AuditEntry(t + 2, "daemon", "daemon", "x")])
        daemon.write([AuditEntry(t + 3, "daemon", "daemon", "x")])
        seen = other(4)
    assert seen == "daemon other daemon daemon other []"
