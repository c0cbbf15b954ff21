"""The embedded store: SQLite, the site's system of record (see `pocd.store.sqlite`).

Everything the daemon keeps goes through `Store`; readers open their own read-only `Store`.
Nothing outside this package writes SQL against the store file.
"""

from pocd.store.schema import SCHEMA_VERSION
from pocd.store.sqlite import (
    SAMPLE_KEY_BITS,
    AmbiguousRunError,
    Change,
    Channel,
    Event,
    Record,
    SampleRow,
    Store,
)

__all__ = [
    "SAMPLE_KEY_BITS",
    "SCHEMA_VERSION",
    "AmbiguousRunError",
    "Change",
    "Channel",
    "Event",
    "Record",
    "SampleRow",
    "Store",
]
