"""The embedded store: SQLite, the site's system of record (see `pocd.store.sqlite`).

Everything the daemon keeps goes through `Store`; readers open their own read-only `Store`.
Nothing outside this package writes SQL against the store file.
"""

from pocd.store.schema import SCHEMA_VERSION
from pocd.store.sqlite import AmbiguousRunError, Record, Store

__all__ = ["SCHEMA_VERSION", "AmbiguousRunError", "Record", "Store"]
