"""The on-disk schema of the store: ordered migrations, and the checks made before using a file.

`PRAGMA user_version` is the number of migrations applied; `PRAGMA application_id` marks the
file as a pocd store. A released migration is never edited: a change is a new migration appended
to `MIGRATIONS`. Nothing here reads or writes records; that is `pocd.store.sqlite`.

A store migrated to v8 or later forwards from its event log (v7), not from the outbox of v3
(gone in v9): a sink's `events` cursor, a position in the outbox, cannot map onto the log, so
v8 starts it again and the sink sends the site's history once more (InfluxDB overwrites the
points it already held). Samples cursors stay.

Some 700 lines in one module: every migration ever released, in order, since none may change
and each is read against the ones before it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pocd.errors import StoreError
from pocd.store.chain import CHAINED, LATER_CHAINED, UPDATED
from pocd.store.chain import seed as seed_chain

__all__ = [
    "APPLICATION_ID",
    "BLOCK_BITS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "migrate",
    "read_version",
    "statements",
]

APPLICATION_ID: Final = 0x706F6364  # "pocd": tells our files from any other SQLite database

# Samples are grouped into blocks of 2**BLOCK_BITS consecutive rowids; `sample_blocks` keeps the
# time range of each block, so a time window needs no index on t (which would cost ~20 B per
# sample). Part of the on-disk format: changing it needs a migration that rebuilds the blocks.
BLOCK_BITS: Final = 12

# Tables whose rows are original records: never updated, never deleted.
_APPEND_ONLY: Final = (
    "channels",
    "qualities",
    "samples",
    "deviations",
    "incidents",
    "phases",
    "audit",
)


def _append_only_trigger(table: str, verb: str) -> str:
    return (
        f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table}\n"
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END;"
    )


def _append_only_triggers(tables: tuple[str, ...]) -> str:
    return "\n".join(
        _append_only_trigger(table, verb) for table in tables for verb in ("UPDATE", "DELETE")
    )


# Samples are deleted only by a prune (Store.prune_samples), which drops this trigger and makes
# it again in the transaction that deletes them.
SAMPLES_NO_DELETE: Final = _append_only_trigger("samples", "DELETE")


# v1: the records. Interned channel and quality codes keep a sample row near 30 bytes.
# No foreign keys: a dangling reference must not abort a batch that also carries samples;
# referential sense is the engine's job. Column names avoid SQL keywords (limit, end, new, old).
_V1: Final = """
CREATE TABLE channels (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    point TEXT NOT NULL,
    UNIQUE (device, point)
);
CREATE TABLE qualities (
    id INTEGER PRIMARY KEY,
    quality INTEGER NOT NULL,
    reason TEXT NOT NULL,
    UNIQUE (quality, reason)
);
INSERT INTO qualities (id, quality, reason) VALUES (0, 0, '');
CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    ch INTEGER NOT NULL,
    t INTEGER NOT NULL,
    dt INTEGER,
    v REAL,
    q INTEGER NOT NULL
);
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    timezone TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    protocol_hash TEXT NOT NULL,
    operator TEXT NOT NULL,
    started INTEGER NOT NULL,
    status TEXT NOT NULL,
    ended INTEGER,
    end_reason TEXT NOT NULL
);
CREATE INDEX runs_batch ON runs (batch_id);
CREATE TABLE phases (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    t INTEGER NOT NULL,
    phase TEXT NOT NULL,
    previous TEXT,
    actor TEXT NOT NULL,
    in_order INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX phases_run ON phases (run_id);
CREATE TABLE excursions (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    parameter TEXT NOT NULL,
    kind TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    phase TEXT NOT NULL,
    limit_value REAL,
    start_t INTEGER NOT NULL,
    end_t INTEGER,
    worst REAL,
    integral REAL  -- NULL is a NaN integral: SQLite stores NaN as NULL
);
CREATE INDEX excursions_run ON excursions (run_id);
CREATE TABLE deviations (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    t INTEGER NOT NULL,
    cause TEXT NOT NULL,
    phase TEXT NOT NULL,
    description TEXT NOT NULL,
    parameter TEXT,
    excursion_id TEXT
);
CREATE INDEX deviations_run ON deviations (run_id);
CREATE TABLE incidents (
    id INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    kind TEXT NOT NULL,
    code TEXT NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL,
    raw BLOB NOT NULL
);
CREATE INDEX incidents_t ON incidents (t);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    old_value TEXT,
    new_value TEXT,
    details TEXT NOT NULL
);
CREATE INDEX audit_action ON audit (action);

-- Excursions and runs are snapshots updated in place, but what identifies them is fixed,
-- a finished run is final, and neither is ever deleted.
CREATE TRIGGER excursions_identity BEFORE UPDATE ON excursions
WHEN NEW.id IS NOT OLD.id OR NEW.run_id IS NOT OLD.run_id OR NEW.parameter IS NOT OLD.parameter
    OR NEW.kind IS NOT OLD.kind OR NEW.start_t IS NOT OLD.start_t
BEGIN SELECT RAISE(ABORT, 'excursions: id, run_id, parameter, kind and start are fixed'); END;
CREATE TRIGGER excursions_no_delete BEFORE DELETE ON excursions
BEGIN SELECT RAISE(ABORT, 'excursions are never deleted: DELETE refused'); END;
CREATE TRIGGER runs_identity BEFORE UPDATE ON runs
WHEN NEW.id IS NOT OLD.id OR NEW.batch_id IS NOT OLD.batch_id OR NEW.site_id IS NOT OLD.site_id
    OR NEW.timezone IS NOT OLD.timezone OR NEW.protocol_id IS NOT OLD.protocol_id
    OR NEW.protocol_version IS NOT OLD.protocol_version
    OR NEW.protocol_hash IS NOT OLD.protocol_hash OR NEW.operator IS NOT OLD.operator
    OR NEW.started IS NOT OLD.started
BEGIN SELECT RAISE(ABORT, 'runs: only status, ended and end_reason change after start'); END;
CREATE TRIGGER runs_final BEFORE UPDATE ON runs
WHEN OLD.status <> 'running' AND (NEW.status IS NOT OLD.status OR NEW.ended IS NOT OLD.ended
    OR NEW.end_reason IS NOT OLD.end_reason)
BEGIN SELECT RAISE(ABORT, 'runs: a finished run is final'); END;
CREATE TRIGGER runs_no_delete BEFORE DELETE ON runs
BEGIN SELECT RAISE(ABORT, 'runs are never deleted: DELETE refused'); END;
""" + _append_only_triggers(_APPEND_ONLY)

# v2: derived lookup aids, rebuilt here from samples and kept current by every write:
# the latest sample of each channel, and the time range of each block of rowids.
# (An index on samples(ch, t) would answer both but costs ~20 B per sample and halves the
# insert rate.) The backfill makes this a real data migration, exercised by the tests.
_V2: Final = f"""
CREATE TABLE channel_latest (
    ch INTEGER PRIMARY KEY,
    sample_id INTEGER NOT NULL,
    t INTEGER NOT NULL
);
CREATE TABLE sample_blocks (
    block INTEGER PRIMARY KEY,
    t_min INTEGER NOT NULL,
    t_max INTEGER NOT NULL
);
INSERT INTO channel_latest (ch, sample_id, t)
    SELECT ch, max(id), t FROM samples GROUP BY ch;
INSERT INTO sample_blocks (block, t_min, t_max)
    SELECT id >> {BLOCK_BITS}, min(t), max(t) FROM samples GROUP BY id >> {BLOCK_BITS};
"""

# v3: what the forwarders (pocd.sinks) need. `cursors` holds each sink's positions; a sink
# advances them only after the far side confirmed. Samples are cursored by their rowid.
# Runs and excursions change in place, so a rowid cannot say what changed since a cursor:
# triggers append to `outbox` in the transaction that inserts or updates a run, phase
# change, excursion or deviation, and a sink cursors the outbox instead. An outbox row names
# the record (the phases rowid for a phase change); the sink reads its current state, so
# several changes of one excursion forward as one point. Existing records are backfilled so a
# migrated store forwards its history too.
_V3: Final = """
CREATE TABLE cursors (
    sink TEXT NOT NULL,
    stream TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (sink, stream)
) WITHOUT ROWID;
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL
);
CREATE TRIGGER runs_outbox_insert AFTER INSERT ON runs
BEGIN INSERT INTO outbox (kind, ref) VALUES ('run', NEW.id); END;
CREATE TRIGGER runs_outbox_update AFTER UPDATE ON runs
BEGIN INSERT INTO outbox (kind, ref) VALUES ('run', NEW.id); END;
CREATE TRIGGER phases_outbox_insert AFTER INSERT ON phases
BEGIN INSERT INTO outbox (kind, ref) VALUES ('phase', NEW.id); END;
CREATE TRIGGER excursions_outbox_insert AFTER INSERT ON excursions
BEGIN INSERT INTO outbox (kind, ref) VALUES ('excursion', NEW.id); END;
CREATE TRIGGER excursions_outbox_update AFTER UPDATE ON excursions
BEGIN INSERT INTO outbox (kind, ref) VALUES ('excursion', NEW.id); END;
CREATE TRIGGER deviations_outbox_insert AFTER INSERT ON deviations
BEGIN INSERT INTO outbox (kind, ref) VALUES ('deviation', NEW.id); END;
INSERT INTO outbox (kind, ref) SELECT 'run', id FROM runs ORDER BY rowid;
INSERT INTO outbox (kind, ref) SELECT 'phase', id FROM phases ORDER BY rowid;
INSERT INTO outbox (kind, ref) SELECT 'excursion', id FROM excursions ORDER BY rowid;
INSERT INTO outbox (kind, ref) SELECT 'deviation', id FROM deviations ORDER BY rowid;
CREATE TRIGGER outbox_no_update BEFORE UPDATE ON outbox
BEGIN SELECT RAISE(ABORT, 'outbox is append-only: UPDATE refused'); END;
CREATE TRIGGER outbox_no_delete BEFORE DELETE ON outbox
BEGIN SELECT RAISE(ABORT, 'outbox is append-only: DELETE refused'); END;
"""

# v4: what a sample's InfluxDB tags come from, fixed when the sample is committed (a point
# sent again then overwrites itself instead of starting a second series).
# - A channel is (device, point, parameter): the protocol parameter the point fed when its
#   samples were recorded ('' for none). A config edit that maps a point elsewhere interns a
#   new channel; the samples recorded before keep theirs. The channels of a migrated store
#   take the mapping the migrating process was given (`migrate(parameters=)`: the daemon's
#   config, which is what the sink of v3 tagged them with), from the temporary table
#   `migration_parameters` that `migrate` fills.
# - Runs and phase changes mark where they fall in the samples' commit order: `first_sample`
#   (and a run's `end_sample`) is the rowid of the first sample committed after the record,
#   so the run and phase of a sample follow from its rowid, the order the engine judged it
#   in, and a record committed later (a late, device-stamped phase change) cannot move a
#   committed sample into another segment. Existing records are marked by time (the first
#   sample at or after their time), which is what the v3 timeline derived.
_MARK_AT = """coalesce(
    (SELECT s.id FROM samples AS s
     WHERE s.id >= (SELECT min(b.block) FROM sample_blocks AS b WHERE b.t_max >= {t})
                   << {bits}
       AND s.t >= {t}
     ORDER BY s.id LIMIT 1),
    (SELECT coalesce(max(id), 0) + 1 FROM samples))"""
_V4: Final = f"""
CREATE TABLE channels_v4 (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    point TEXT NOT NULL,
    parameter TEXT NOT NULL,
    UNIQUE (device, point, parameter)
);
INSERT INTO channels_v4 (id, device, point, parameter)
    SELECT c.id, c.device, c.point, coalesce(m.parameter, '') FROM channels AS c
    LEFT JOIN temp.migration_parameters AS m ON m.device = c.device AND m.point = c.point
    ORDER BY c.id;
DROP TABLE channels;
ALTER TABLE channels_v4 RENAME TO channels;
{_append_only_triggers(("channels",))}

ALTER TABLE phases ADD COLUMN first_sample INTEGER;
DROP TRIGGER phases_no_update;
UPDATE phases SET first_sample = {_MARK_AT.format(t="phases.t", bits=BLOCK_BITS)};
CREATE TRIGGER phases_no_update BEFORE UPDATE ON phases
BEGIN SELECT RAISE(ABORT, 'phases is append-only: UPDATE refused'); END;

ALTER TABLE runs ADD COLUMN first_sample INTEGER;
ALTER TABLE runs ADD COLUMN end_sample INTEGER;
DROP TRIGGER runs_outbox_update;  -- marking is no change to forward
UPDATE runs SET
    first_sample = {_MARK_AT.format(t="runs.started", bits=BLOCK_BITS)},
    end_sample = CASE WHEN runs.ended IS NULL THEN NULL
                 ELSE {_MARK_AT.format(t="runs.ended", bits=BLOCK_BITS)} END;
CREATE TRIGGER runs_outbox_update AFTER UPDATE ON runs
BEGIN INSERT INTO outbox (kind, ref) VALUES ('run', NEW.id); END;
CREATE TRIGGER runs_sample_marks BEFORE UPDATE ON runs
WHEN NEW.first_sample IS NOT OLD.first_sample
    OR (OLD.end_sample IS NOT NULL AND NEW.end_sample IS NOT OLD.end_sample)
BEGIN SELECT RAISE(ABORT, 'runs: the sample marks of a run are fixed once set'); END;
"""

# v5: the text of every protocol loaded, by the hash that identifies it, so that a run resumes
# on the protocol it started with even after the file was superseded, edited or removed.
_V5: Final = """
CREATE TABLE protocols (
    hash TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    version TEXT NOT NULL,
    text TEXT NOT NULL
) WITHOUT ROWID;
""" + _append_only_triggers(("protocols",))

# v6: lines (ISA-88 units). A run names the line it runs on; an excursion or deviation names
# its line, and its run only if it belongs to one (run_id NULL: the line's equipment, judged
# between runs). Records of a migrated store are of the one implicit line, 'main'. A channel
# also records the line its point belonged to alone when its samples were committed ('' for
# none or several), taken for a migrated store from the migrating process's config
# (`migrate(lines=)`, through `temp.migration_lines`), like the parameter of v4.
_V6: Final = f"""
ALTER TABLE runs ADD COLUMN line TEXT NOT NULL DEFAULT 'main';
CREATE INDEX runs_line ON runs (line, status);
CREATE TRIGGER runs_line_fixed BEFORE UPDATE ON runs WHEN NEW.line IS NOT OLD.line
BEGIN SELECT RAISE(ABORT, 'runs: the line of a run is fixed'); END;

CREATE TABLE excursions_v6 (
    id TEXT PRIMARY KEY,
    run_id TEXT,
    parameter TEXT NOT NULL,
    kind TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    phase TEXT NOT NULL,
    limit_value REAL,
    start_t INTEGER NOT NULL,
    end_t INTEGER,
    worst REAL,
    integral REAL,
    line TEXT NOT NULL
);
INSERT INTO excursions_v6 SELECT *, 'main' FROM excursions ORDER BY rowid;
DROP TABLE excursions;
ALTER TABLE excursions_v6 RENAME TO excursions;
CREATE INDEX excursions_run ON excursions (run_id);
CREATE INDEX excursions_line ON excursions (line, run_id);
CREATE TRIGGER excursions_identity BEFORE UPDATE ON excursions
WHEN NEW.id IS NOT OLD.id OR NEW.run_id IS NOT OLD.run_id OR NEW.parameter IS NOT OLD.parameter
    OR NEW.kind IS NOT OLD.kind OR NEW.start_t IS NOT OLD.start_t OR NEW.line IS NOT OLD.line
BEGIN SELECT RAISE(ABORT, 'excursions: id, run_id, line, parameter, kind and start are fixed');
END;
CREATE TRIGGER excursions_no_delete BEFORE DELETE ON excursions
BEGIN SELECT RAISE(ABORT, 'excursions are never deleted: DELETE refused'); END;
CREATE TRIGGER excursions_outbox_insert AFTER INSERT ON excursions
BEGIN INSERT INTO outbox (kind, ref) VALUES ('excursion', NEW.id); END;
CREATE TRIGGER excursions_outbox_update AFTER UPDATE ON excursions
BEGIN INSERT INTO outbox (kind, ref) VALUES ('excursion', NEW.id); END;

CREATE TABLE deviations_v6 (
    id TEXT PRIMARY KEY,
    run_id TEXT,
    t INTEGER NOT NULL,
    cause TEXT NOT NULL,
    phase TEXT NOT NULL,
    description TEXT NOT NULL,
    parameter TEXT,
    excursion_id TEXT,
    line TEXT NOT NULL
);
INSERT INTO deviations_v6 SELECT *, 'main' FROM deviations ORDER BY rowid;
DROP TABLE deviations;
ALTER TABLE deviations_v6 RENAME TO deviations;
CREATE INDEX deviations_run ON deviations (run_id);
CREATE INDEX deviations_line ON deviations (line, run_id);
CREATE TRIGGER deviations_outbox_insert AFTER INSERT ON deviations
BEGIN INSERT INTO outbox (kind, ref) VALUES ('deviation', NEW.id); END;
{_append_only_triggers(("deviations",))}

CREATE TABLE channels_v6 (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    point TEXT NOT NULL,
    parameter TEXT NOT NULL,
    line TEXT NOT NULL,
    UNIQUE (device, point, parameter, line)
);
INSERT INTO channels_v6 (id, device, point, parameter, line)
    SELECT c.id, c.device, c.point, c.parameter, coalesce(m.line, '') FROM channels AS c
    LEFT JOIN temp.migration_lines AS m ON m.device = c.device AND m.point = c.point
    ORDER BY c.id;
DROP TABLE channels;
ALTER TABLE channels_v6 RENAME TO channels;
{_append_only_triggers(("channels",))}
"""

# v7: every change is an append-only event. A run written (started, or ended) is a row of
# `run_events`, an excursion's transition (opened, updated, closed, with the engine's `t` and
# the whole snapshot after it) a row of `excursion_events`; phase changes, deviations and
# audit entries were append-only already. `events` puts all of them in one order, the order
# they were committed in: its id is the forwarders' cursor, `kind` names the table and `ref`
# the rowid there; triggers append to it in the transaction that stores the record. `runs`
# and `excursions` stay for queries, derived: the triggers that append an event also upsert
# them (so the v3 outbox, whose triggers stay on them, gets the same rows as before), and a
# run event carries its sample mark (v4), from which the run's marks are set.
# Existing records are backfilled as events in time order (at equal times: run start, phase,
# excursion opened, deviation, excursion closed, run end, audit). A migrated run has a
# 'running' event at its start and, if it ended, its final state at its end; a migrated
# excursion has an 'opened' event at its start and, if it ended, a 'closed' one at its end,
# both carrying its final snapshot (the store did not keep the ones in between).
# A deviation's `ref` is its rowid, which VACUUM may renumber (its key is text): the store
# is never vacuumed, and must not be.
_RUN_EVENT_COLUMNS = (
    "run_id, batch_id, site_id, timezone, protocol_id, protocol_version, protocol_hash, "
    "operator, started, status, ended, end_reason, line"
)
_EXCURSION_SNAPSHOT = (
    "run_id, parameter, kind, protocol_id, protocol_version, phase, limit_value, start_t, "
    "end_t, worst, integral, line"
)
_V7: Final = f"""
CREATE TABLE run_events (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    timezone TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    protocol_hash TEXT NOT NULL,
    operator TEXT NOT NULL,
    started INTEGER NOT NULL,
    status TEXT NOT NULL,
    ended INTEGER,
    end_reason TEXT NOT NULL,
    line TEXT NOT NULL,
    sample INTEGER  -- the rowid of the first sample committed after it (v4)
);
CREATE INDEX run_events_run ON run_events (run_id);
CREATE TABLE excursion_events (
    id INTEGER PRIMARY KEY,
    change TEXT NOT NULL,
    t INTEGER,  -- when the engine made it; NULL if the writer did not say
    excursion_id TEXT NOT NULL,
    run_id TEXT,
    parameter TEXT NOT NULL,
    kind TEXT NOT NULL,
    protocol_id TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    phase TEXT NOT NULL,
    limit_value REAL,
    start_t INTEGER NOT NULL,
    end_t INTEGER,
    worst REAL,
    integral REAL,
    line TEXT NOT NULL
);
CREATE INDEX excursion_events_excursion ON excursion_events (excursion_id);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    ref INTEGER NOT NULL
);

INSERT INTO run_events ({_RUN_EVENT_COLUMNS}, sample)
SELECT {_RUN_EVENT_COLUMNS}, sample FROM (
    SELECT id AS run_id, batch_id, site_id, timezone, protocol_id, protocol_version,
        protocol_hash, operator, started, 'running' AS status, NULL AS ended,
        '' AS end_reason, line, first_sample AS sample, started AS at, 0 AS rank, rowid AS r
    FROM runs
    UNION ALL
    SELECT id, batch_id, site_id, timezone, protocol_id, protocol_version, protocol_hash,
        operator, started, status, ended, end_reason, line, end_sample,
        coalesce(ended, started), 1, rowid
    FROM runs WHERE status <> 'running'
) ORDER BY at, rank, r;
INSERT INTO excursion_events (change, t, excursion_id, {_EXCURSION_SNAPSHOT})
SELECT change, at, id, {_EXCURSION_SNAPSHOT} FROM (
    SELECT 'opened' AS change, start_t AS at, 0 AS rank, rowid AS r, * FROM excursions
    UNION ALL
    SELECT 'closed', end_t, 1, rowid, * FROM excursions WHERE end_t IS NOT NULL
) ORDER BY at, rank, r;
INSERT INTO events (kind, ref)
SELECT kind, ref FROM (
    SELECT 'run' AS kind, id AS ref,
        CASE status WHEN 'running' THEN started ELSE coalesce(ended, started) END AS at,
        CASE status WHEN 'running' THEN 0 ELSE 5 END AS rank
    FROM run_events
    UNION ALL SELECT 'phase', id, t, 1 FROM phases
    UNION ALL
    SELECT 'excursion', id, t, CASE change WHEN 'opened' THEN 2 ELSE 4 END FROM excursion_events
    UNION ALL SELECT 'deviation', rowid, t, 3 FROM deviations
    UNION ALL SELECT 'audit', id, t, 6 FROM audit
) ORDER BY at, rank, ref;

CREATE TRIGGER run_events_derive AFTER INSERT ON run_events
BEGIN
    INSERT INTO events (kind, ref) VALUES ('run', NEW.id);
    INSERT INTO runs (id, batch_id, site_id, timezone, protocol_id, protocol_version,
        protocol_hash, operator, started, status, ended, end_reason, line, first_sample,
        end_sample)
    VALUES (NEW.run_id, NEW.batch_id, NEW.site_id, NEW.timezone, NEW.protocol_id,
        NEW.protocol_version, NEW.protocol_hash, NEW.operator, NEW.started, NEW.status,
        NEW.ended, NEW.end_reason, NEW.line, NEW.sample,
        CASE WHEN NEW.status = 'running' THEN NULL ELSE NEW.sample END)
    ON CONFLICT (id) DO UPDATE SET
        batch_id = excluded.batch_id, site_id = excluded.site_id,
        timezone = excluded.timezone, protocol_id = excluded.protocol_id,
        protocol_version = excluded.protocol_version, protocol_hash = excluded.protocol_hash,
        operator = excluded.operator, started = excluded.started, status = excluded.status,
        ended = excluded.ended, end_reason = excluded.end_reason, line = excluded.line,
        end_sample = coalesce(runs.end_sample, excluded.end_sample);
END;
CREATE TRIGGER excursion_events_derive AFTER INSERT ON excursion_events
BEGIN
    INSERT INTO events (kind, ref) VALUES ('excursion', NEW.id);
    INSERT INTO excursions (id, {_EXCURSION_SNAPSHOT})
    VALUES (NEW.excursion_id, NEW.run_id, NEW.parameter, NEW.kind, NEW.protocol_id,
        NEW.protocol_version, NEW.phase, NEW.limit_value, NEW.start_t, NEW.end_t, NEW.worst,
        NEW.integral, NEW.line)
    ON CONFLICT (id) DO UPDATE SET
        run_id = excluded.run_id, parameter = excluded.parameter, kind = excluded.kind,
        protocol_id = excluded.protocol_id, protocol_version = excluded.protocol_version,
        phase = excluded.phase, limit_value = excluded.limit_value,
        start_t = excluded.start_t, end_t = excluded.end_t, worst = excluded.worst,
        integral = excluded.integral, line = excluded.line;
END;
CREATE TRIGGER phases_event AFTER INSERT ON phases
BEGIN INSERT INTO events (kind, ref) VALUES ('phase', NEW.id); END;
CREATE TRIGGER deviations_event AFTER INSERT ON deviations
BEGIN INSERT INTO events (kind, ref) VALUES ('deviation', NEW.rowid); END;
CREATE TRIGGER audit_event AFTER INSERT ON audit
BEGIN INSERT INTO events (kind, ref) VALUES ('audit', NEW.id); END;
{_append_only_triggers(("run_events", "excursion_events", "events"))}
"""

# v8: the sinks forward the event log (v7), every transition, instead of the outbox's current
# states. A sink's `events` cursor was a position in the outbox, which means nothing in the
# event log: it starts again from the first event, so the sink sends the site's history once
# more (the current-state points overwrite themselves; the transition points are new).
_V8: Final = """
DELETE FROM cursors WHERE stream = 'events';
"""

# v9: the event log replaces the outbox (v3). Nothing reads the outbox since the sinks forward
# the events (v8); it held only pointers to records, every one of which is an event, so it
# goes with its triggers. And the current state is only ever the events': a row of `runs` or
# `excursions` may be written only as the latest event of its table says (which is what the
# v7 triggers do, inside the INSERT of that event), so a write to them from anywhere else is
# refused.
_RUN_AS_LATEST_EVENT = """NOT EXISTS (
    SELECT 1 FROM run_events AS e WHERE e.id = (SELECT max(id) FROM run_events)
        AND e.run_id = NEW.id AND e.status = NEW.status AND e.ended IS NEW.ended
        AND e.end_reason = NEW.end_reason)"""
_EXCURSION_AS_LATEST_EVENT = """NOT EXISTS (
    SELECT 1 FROM excursion_events AS e WHERE e.id = (SELECT max(id) FROM excursion_events)
        AND e.excursion_id = NEW.id AND e.protocol_id = NEW.protocol_id
        AND e.protocol_version = NEW.protocol_version AND e.phase = NEW.phase
        AND e.limit_value IS NEW.limit_value AND e.end_t IS NEW.end_t AND e.worst IS NEW.worst
        AND e.integral IS NEW.integral)"""
_V9: Final = "\n".join(
    [
        *(
            f"DROP TRIGGER {name};"
            for name in (
                "runs_outbox_insert",
                "runs_outbox_update",
                "phases_outbox_insert",
                "excursions_outbox_insert",
                "excursions_outbox_update",
                "deviations_outbox_insert",
                "outbox_no_update",
                "outbox_no_delete",
            )
        ),
        "DROP TABLE outbox;",
        *(
            f"CREATE TRIGGER {table}_derived_{verb.lower()} BEFORE {verb} ON {table}\n"
            f"WHEN {condition}\n"
            f"BEGIN SELECT RAISE(ABORT, '{table} are derived from {events}: {verb} refused'); END;"
            for table, events, condition in (
                ("runs", "run_events", _RUN_AS_LATEST_EVENT),
                ("excursions", "excursion_events", _EXCURSION_AS_LATEST_EVENT),
            )
            for verb in ("INSERT", "UPDATE")
        ),
    ]
)

# v10: named users and electronic signatures. A user is never deleted and a login never
# changes, so a login in any record names one person for good; their name, roles, password
# and state change in place, each change with an audit entry that keeps the old and new
# value. Signatures are append-only, like the audit trail they are entered in.
_V10: Final = """
CREATE TABLE users (
    login TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    roles TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled INTEGER NOT NULL,
    created INTEGER NOT NULL,
    changed INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER users_no_delete BEFORE DELETE ON users
BEGIN SELECT RAISE(ABORT, 'a user is never deleted: disable them'); END;
CREATE TRIGGER users_login_fixed BEFORE UPDATE OF login ON users
BEGIN SELECT RAISE(ABORT, 'a login never changes: it names one person for good'); END;

CREATE TABLE signatures (
    id INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    utc_offset TEXT NOT NULL,
    login TEXT NOT NULL,
    name TEXT NOT NULL,
    meaning TEXT NOT NULL,
    action TEXT NOT NULL,
    record TEXT NOT NULL,
    record_hash TEXT NOT NULL,
    run_id TEXT
);
CREATE INDEX signatures_run ON signatures (run_id);
CREATE TRIGGER signatures_no_update BEFORE UPDATE ON signatures
BEGIN SELECT RAISE(ABORT, 'signatures are append-only'); END;
CREATE TRIGGER signatures_no_delete BEFORE DELETE ON signatures
BEGIN SELECT RAISE(ABORT, 'signatures are append-only'); END;
"""

# v11: alarm events (pocd.alarms), append-only, in the one event order the sinks forward. An
# alarm's current state is its latest event's.
_V11: Final = """
CREATE TABLE alarm_events (
    id INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    alarm_id TEXT NOT NULL,
    line TEXT NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    transition TEXT NOT NULL,
    state TEXT NOT NULL,
    priority TEXT NOT NULL,
    began INTEGER,
    actor TEXT NOT NULL,
    comment TEXT NOT NULL,
    until_t INTEGER,
    run_id TEXT,
    batch_id TEXT,
    phase TEXT,
    device TEXT NOT NULL,
    value REAL,
    limit_value REAL,
    unit TEXT NOT NULL,
    first_out INTEGER NOT NULL
);
CREATE INDEX alarm_events_alarm ON alarm_events (alarm_id);
CREATE INDEX alarm_events_condition ON alarm_events (line, source, kind);
CREATE TRIGGER alarm_events_no_update BEFORE UPDATE ON alarm_events
BEGIN SELECT RAISE(ABORT, 'alarm events are append-only'); END;
CREATE TRIGGER alarm_events_no_delete BEFORE DELETE ON alarm_events
BEGIN SELECT RAISE(ABORT, 'alarm events are append-only'); END;
CREATE TRIGGER alarm_events_event AFTER INSERT ON alarm_events
BEGIN INSERT INTO events (kind, ref) VALUES ('alarm', NEW.id); END;
"""

# v12: the notification outbox (pocd.sinks.notify): one row per notification and channel it goes
# to, made by the routes from the alarm events (unique: a notification is queued once per
# channel, however often the routes are replayed), read by each channel's cursor; and every
# delivery attempt, failures included. Both append-only.
_V12: Final = """
CREATE TABLE notifications (
    id INTEGER PRIMARY KEY,
    notification TEXT NOT NULL,
    channel TEXT NOT NULL,
    t INTEGER NOT NULL,
    route TEXT NOT NULL,
    tier INTEGER NOT NULL,
    via TEXT,
    item TEXT NOT NULL,
    UNIQUE (notification, channel)
);
CREATE INDEX notifications_channel ON notifications (channel, id);
CREATE TRIGGER notifications_no_update BEFORE UPDATE ON notifications
BEGIN SELECT RAISE(ABORT, 'notifications are append-only'); END;
CREATE TRIGGER notifications_no_delete BEFORE DELETE ON notifications
BEGIN SELECT RAISE(ABORT, 'notifications are append-only'); END;

CREATE TABLE delivery_attempts (
    id INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    notification TEXT NOT NULL,
    channel TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX delivery_attempts_notification ON delivery_attempts (notification);
CREATE TRIGGER delivery_attempts_no_update BEFORE UPDATE ON delivery_attempts
BEGIN SELECT RAISE(ABORT, 'delivery attempts are append-only'); END;
CREATE TRIGGER delivery_attempts_no_delete BEFORE DELETE ON delivery_attempts
BEGIN SELECT RAISE(ABORT, 'delivery attempts are append-only'); END;
"""


def _chain_triggers(*tables: str) -> str:
    """The triggers that chain each record appended to (or, for UPDATED, changed in) the
    tables (pocd.store.chain), through the SQL functions the writing connection registers."""
    return "".join(
        f"""
CREATE TRIGGER chain_{table}_{event.lower()} AFTER {event} ON {table}
BEGIN INSERT INTO chain (kind, ref, digest, hash)
SELECT '{table}', NEW.{CHAINED[table][0]}, d, pocd_link(
    (SELECT hash FROM chain ORDER BY id DESC LIMIT 1), '{table}', NEW.{CHAINED[table][0]}, d)
FROM (SELECT pocd_digest({", ".join(f"NEW.{c}" for c in CHAINED[table][1])}) AS d); END;
"""
        for table in tables
        for event in ("INSERT", *(("UPDATE",) if table in UPDATED else ()))
    )


# v13: the tamper-evident chain (pocd.store.chain): an entry per record appended to a chained
# table (by triggers) and per committed batch of samples (by the store). Append-only. What a
# store held before it is chained by the migration (`seed_chain`).
_V13: Final = """
CREATE TABLE chain (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    digest TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER chain_no_update BEFORE UPDATE ON chain
BEGIN SELECT RAISE(ABORT, 'the chain is append-only'); END;
CREATE TRIGGER chain_no_delete BEFORE DELETE ON chain
BEGIN SELECT RAISE(ABORT, 'the chain is append-only'); END;
""" + _chain_triggers(*(t for t in CHAINED if t not in LATER_CHAINED))
_V13_CHAIN: Final = 13

# v14: signed checkpoints of the chain's head (pocd.store.chain, pocd.sitekey). Append-only.
_V14: Final = """
CREATE TABLE checkpoints (
    id INTEGER PRIMARY KEY,
    t INTEGER NOT NULL,
    size INTEGER NOT NULL,
    hash TEXT NOT NULL,
    note BLOB NOT NULL,
    signature BLOB NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
"""

# v15: the deviation lifecycle (pocd.model.DeviationChange): open -> assessed -> closed, each
# step by a person, append-only and chained.
_V15: Final = """
CREATE TABLE deviation_changes (
    id INTEGER PRIMARY KEY,
    deviation_id TEXT NOT NULL,
    t INTEGER NOT NULL,
    actor TEXT NOT NULL,
    state TEXT NOT NULL,
    note TEXT NOT NULL,
    disposition TEXT NOT NULL,
    root_cause TEXT NOT NULL
);
CREATE INDEX deviation_changes_deviation ON deviation_changes (deviation_id);
CREATE TRIGGER deviation_changes_no_update BEFORE UPDATE ON deviation_changes
BEGIN SELECT RAISE(ABORT, 'deviation changes are append-only'); END;
CREATE TRIGGER deviation_changes_no_delete BEFORE DELETE ON deviation_changes
BEGIN SELECT RAISE(ABORT, 'deviation changes are append-only'); END;
""" + _chain_triggers("deviation_changes")

# v16: each checkpoint is an event too, so the forwarders send it out (a witness at the
# control site); those made before are sent once.
_V16: Final = """
INSERT INTO events (kind, ref) SELECT 'checkpoint', id FROM checkpoints ORDER BY id;
CREATE TRIGGER checkpoints_event AFTER INSERT ON checkpoints
BEGIN INSERT INTO events (kind, ref) VALUES ('checkpoint', NEW.id); END;
"""

# v17: the site config and driver files as loaded (pocd.model.LoadedFile), append-only and
# chained, so an export holds the ones in force during its run.
_V17: Final = """
CREATE TABLE loaded_files (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    text TEXT NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER loaded_files_no_update BEFORE UPDATE ON loaded_files
BEGIN SELECT RAISE(ABORT, 'loaded files are append-only'); END;
CREATE TRIGGER loaded_files_no_delete BEFORE DELETE ON loaded_files
BEGIN SELECT RAISE(ABORT, 'loaded files are append-only'); END;
""" + _chain_triggers("loaded_files")

MIGRATIONS: Final[tuple[str, ...]] = (
    _V1,
    _V2,
    _V3,
    _V4,
    _V5,
    _V6,
    _V7,
    _V8,
    _V9,
    _V10,
    _V11,
    _V12,
    _V13,
    _V14,
    _V15,
    _V16,
    _V17,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def statements(script: str) -> list[str]:
    """Split an SQL script into single statements (sqlite3's execute runs one at a time)."""
    found: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                found.append(pending.strip())
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"incomplete SQL statement: {pending!r}")
    return found


def read_version(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of an open store; StoreError if the file is not a store we can use."""
    try:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a pocd store: {e}") from e
    if version == 0 and application_id == 0 and tables == 0:
        return 0  # a new, empty database
    if application_id != APPLICATION_ID:
        raise StoreError(
            f"{path}: not a pocd store (an SQLite database of something else, "
            f"application_id {application_id:#x})"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {version} is newer than this pocd knows "
            f"({SCHEMA_VERSION}); use the pocd version that wrote it"
        )
    return int(version)


def migrate(
    db: sqlite3.Connection,
    path: Path,
    *,
    target: int = SCHEMA_VERSION,
    parameters: Mapping[tuple[str, str], str] | None = None,
    lines: Mapping[tuple[str, str], str] | None = None,
) -> int:
    """Apply the missing migrations up to `target` in one transaction; return the old version.

    `db` must be in autocommit mode (isolation_level=None). The version is read again under
    the write lock, so two processes opening a new store at once cannot both migrate it.
    `parameters` ((device, point) -> parameter, from the site config) is what the channels
    recorded before v4 are taken to feed, and `lines` ((device, point) -> the one line it
    belongs to) the line of the channels recorded before v6.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        found = read_version(db, path)
        if found < target:
            db.execute(
                "CREATE TEMP TABLE migration_parameters "
                "(device TEXT NOT NULL, point TEXT NOT NULL, parameter TEXT NOT NULL)"
            )
            db.executemany(
                "INSERT INTO temp.migration_parameters VALUES (?, ?, ?)",
                [(d, p, name) for (d, p), name in (parameters or {}).items()],
            )
            db.execute(
                "CREATE TEMP TABLE migration_lines "
                "(device TEXT NOT NULL, point TEXT NOT NULL, line TEXT NOT NULL)"
            )
            db.executemany(
                "INSERT INTO temp.migration_lines VALUES (?, ?, ?)",
                [(d, p, line) for (d, p), line in (lines or {}).items()],
            )
        for version, script in enumerate(MIGRATIONS[found:target], start=found + 1):
            for statement in statements(script):
                db.execute(statement)
            if version == _V13_CHAIN:
                seed_chain(db)  # what the store held before it had a chain
        if found < target:
            db.execute("DROP TABLE temp.migration_parameters")
            db.execute("DROP TABLE temp.migration_lines")
            # Header fields, written inside the transaction: they commit with the tables.
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {target}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return found
