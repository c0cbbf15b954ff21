"""The API's own read-only connection to the store (`StoreReader`).

Every read runs in the API's one reader thread: a read neither waits for the writer's lock
nor holds up the event loop (and so the devices), and a burst of reads queues there instead
of taking the worker threads the store writer commits in. Must not write.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pocd.store import Store

__all__ = ["StoreReader"]

T = TypeVar("T")


class StoreReader:
    """Reads of the store at `path`. The connection is opened at the first read (so the API
    listens at once) and closed by `close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: Store | None = None
        self._opening = threading.Lock()
        # One thread: the connection serves one query at a time anyway.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pocd-api-read")

    async def read(self, query: Callable[[Store], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._read, query)

    def _read(self, query: Callable[[Store], T]) -> T:
        with self._opening:
            if self._store is None:
                self._store = Store(self.path, readonly=True)
            store = self._store
        return query(store)

    def close(self) -> None:
        self._thread.shutdown(wait=True)  # the reads under way finish first
        with self._opening:
            if self._store is not None:
                self._store.close()
                self._store = None
