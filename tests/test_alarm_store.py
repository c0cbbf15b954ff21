"""Alarm events in the store (schema v11): kept as written, append-only, in the one event
order the sinks forward, and encoded for InfluxDB as transition points."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pocd.model import AlarmEvent, AlarmPriority, AlarmState, AlarmTransition
from pocd.sinks.lineprotocol import encode_event
from pocd.store import Store

T = 1_796_231_795_892_544_853
RAISED = AlarmEvent(
    T,
    "exc-1",
    "prodigy",
    "temperature",
    "alert-high",
    AlarmTransition.ACTIVATE,
    AlarmState.ACTIVE_UNACKED,
    AlarmPriority.MEDIUM,
    began=T,
    run_id="r1",
    batch_id="B-1",
    phase="expansion",
    device="incubator",
    value=37.9,
    limit=37.5,
    unit="C",
    first_out=True,
)
ACKED = AlarmEvent(
    T + 5,
    "exc-1",
    "prodigy",
    "temperature",
    "alert-high",
    AlarmTransition.ACKNOWLEDGE,
    AlarmState.ACTIVE_ACKED,
    AlarmPriority.MEDIUM,
    began=T,
    actor="olive",
    comment="door opened for a sample",
)


def test_alarm_events_are_kept_as_written_and_append_only(tmp_path: Path) -> None:
    with Store(tmp_path / "pocd.sqlite") as store:
        store.write([RAISED, ACKED])
        assert store.alarm_events() == [RAISED, ACKED]
        assert store.alarm_events(after=1) == [ACKED]
        assert [event for _, event in store.events(0, 10)] == [RAISED, ACKED]
    db = sqlite3.connect(tmp_path / "pocd.sqlite")
    for sql in ("UPDATE alarm_events SET actor = 'x'", "DELETE FROM alarm_events"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(sql)
    db.close()


def test_an_alarm_event_is_one_transition_point_in_influxdb() -> None:
    (line,) = encode_event("site-1", ACKED, {})
    assert line.startswith(
        "pocd_alarm_event,kind=alert-high,line=prodigy,priority=medium,site=site-1,"
        "source=temperature,transition=acknowledge "
    )
    assert 'actor="olive"' in line
    assert 'comment="door opened for a sample"' in line
    assert line.endswith(f" {T + 5}")
    (raised,) = encode_event("site-1", RAISED, {})
    assert ",run=r1," in raised
    assert "value=37.9" in raised and "first_out=true" in raised
