"""The store's files on disk: GMP records readable by the service's user only (issue 11, item
20). A new data folder is made 0700 and a new store 0600, with its WAL files; the modes of a
folder or store that already exists are left as their owner set them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pocd.store import Store


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_store_and_its_folder_are_for_the_service_user_only(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "site-1"
    path = folder / "pocd.sqlite"
    with Store(path) as store:
        assert store.sample_count() == 0
        assert mode(folder) == 0o700
        for name in ("pocd.sqlite", "pocd.sqlite-wal", "pocd.sqlite-shm"):
            assert mode(folder / name) == 0o600, name


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o750)  # e.g. a backup group may list it: the operator's choice
    with Store(folder / "pocd.sqlite"):
        pass
    assert mode(folder) == 0o750
    assert mode(folder / "pocd.sqlite") == 0o600
