"""The embedded store: SQLite, the site's system of record (see `pocd.store.sqlite`).

Everything the daemon keeps goes through `Store`; readers open their own read-only `Store`.
Every change is an append-only event, read in one order by cursor (`Store.events`); how each
record type maps to columns, JSON and InfluxDB is described once, in
`pocd.store.recordtypes`. Nothing outside this package writes SQL against the store file.
"""

from pocd.store.schema import SCHEMA_VERSION
from pocd.store.sqlite import (
    SAMPLE_KEY_BITS,
    AmbiguousRunError,
    Attempt,
    Change,
    Channel,
    Event,
    Queued,
    Record,
    SampleRow,
    Store,
)

__all__ = [
    "SAMPLE_KEY_BITS",
    "SCHEMA_VERSION",
    "AmbiguousRunError",
    "Attempt",
    "Change",
    "Channel",
    "Event",
    "Queued",
    "Record",
    "SampleRow",
    "Store",
]
