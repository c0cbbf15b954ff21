"""The InfluxDB line-protocol encoder, the run/phase timeline, and the store's forwarder API
(cursors, event log): plain values and real SQLite files, no InfluxDB needed."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from pocd.errors import StoreError
from pocd.model import (
    NS,
    AuditEntry,
    Deviation,
    DeviationCause,
    Excursion,
    ExcursionChange,
    ExcursionEvent,
    ExcursionKind,
    Incident,
    IncidentKind,
    PhaseChange,
    Quality,
    Run,
    RunStatus,
    Sample,
)
from pocd.sinks.lineprotocol import (
    SampleEncoder,
    Segment,
    Timeline,
    Timelines,
    encode_change,
    encode_event,
    field_string,
    tag_value,
)
from pocd.store import SAMPLE_KEY_BITS, Change, Event, SampleRow, Store, schema
from pocd.store.recordtypes import DEVIATION, EXCURSION, PHASE_CHANGE, RUN

T0 = 1_767_225_600 * NS


def make_run(run_id: str = "r1", started: int = T0, ended: int | None = None) -> Run:
    return Run(
        id=run_id,
        batch_id=f"B {run_id}",
        site_id="s",
        timezone="Europe/London",
        protocol_id="CART-TCT",
        protocol_version="3.1",
        protocol_hash="ab" * 32,
        operator="alice",
        started=started,
        status=RunStatus.RUNNING if ended is None else RunStatus.COMPLETED,
        ended=ended,
    )


def test_tag_and_string_escaping() -> None:
    assert tag_value("plain-id_1.2") == "plain-id_1.2"
    assert tag_value("B 0042,x=y") == "B\\ 0042\\,x\\=y"
    # a backslash cannot be escaped in a 1.x tag and a trailing one breaks the line
    assert tag_value("a\\b\n") == "a/b\\ "
    assert field_string('say "hi"\\\nnext') == '"say \\"hi\\"\\\\\\nnext"'


def test_timeline_segments_by_rowid_of_runs_and_phases() -> None:
    # marks: the rowid of the first sample committed after each record
    runs = [(make_run("r1", T0, T0 + 100), 11, 40), (make_run("r2", T0 + 200), 51, None)]
    phases = [
        (PhaseChange("r1", T0, "enrichment", None, "op"), 11),
        (PhaseChange("r1", T0 + 50, "activation", "enrichment", "op"), 21),
        (PhaseChange("r2", T0 + 200, "enrichment", None, "op"), 51),
    ]
    timeline = Timeline(runs, phases)
    assert timeline.at(10) is None  # before the run
    assert timeline.at(11) == Segment("r1", "B r1", "enrichment")
    assert timeline.at(20) == Segment("r1", "B r1", "enrichment")
    assert timeline.at(21) == Segment("r1", "B r1", "activation")
    assert timeline.at(40) is None  # the run ended
    assert timeline.at(10**12) == Segment("r2", "B r2", "enrichment")  # still running
    enrichment, activation = timeline.at(11), timeline.at(21)
    assert timeline.spans(11, 20) == [(11, 20, enrichment)]
    assert timeline.spans(15, 25) == [(15, 20, enrichment), (21, 25, activation)]
    assert timeline.spans(41, 45) == [(41, 45, None)]  # in the gap
    assert timeline.spans(1, 60)[-1] == (51, 60, timeline.at(51))
    assert timeline.batches == {"r1": "B r1", "r2": "B r2"}


def test_several_records_before_one_sample_the_last_one_counts() -> None:
    run = make_run("r1", T0)
    # a run, its first phase and an out-of-order second, all before sample 5
    timeline = Timeline(
        [(run, 5, None)],
        [
            (PhaseChange("r1", T0, "enrichment", None, "op"), 5),
            (PhaseChange("r1", T0 + 1, "harvest", "enrichment", "op", False, "why"), 5),
        ],
    )
    assert timeline.at(4) is None
    assert timeline.at(5) == Segment("r1", "B r1", "harvest")
    # a run stored already ended holds no sample; its phases change nothing
    ended = make_run("r0", T0, T0 + 1)
    timeline = Timeline(
        [(ended, 3, 3), (run, 5, None)], [(PhaseChange("r0", T0, "x", None, "op"), 3)]
    )
    assert timeline.at(3) is None
    assert timeline.at(5) == Segment("r1", "B r1", "")


def test_a_run_left_running_by_a_crash_ends_where_the_next_begins() -> None:
    first, second = make_run("r1", T0), make_run("r2", T0 + 100)
    timeline = Timeline(
        [(first, 1, None), (second, 100, None)], [(PhaseChange("r1", T0, "a", None, "op"), 1)]
    )
    assert timeline.at(99) == Segment("r1", "B r1", "a")
    assert timeline.at(100) == Segment("r2", "B r2", "")
    # a late phase change of the old run no longer applies
    timeline = Timeline(
        [(first, 1, None), (second, 100, None)],
        [(PhaseChange("r1", T0 + 200, "b", "a", "op"), 150)],
    )
    assert timeline.at(150) == Segment("r2", "B r2", "")


def row(channel: int, quality: int, value: float | None, t: int) -> SampleRow:
    return (channel << SAMPLE_KEY_BITS | quality, value, str(t))


def test_sample_lines() -> None:
    encoder = SampleEncoder("site 1")
    encoder.set_codes(
        {1: ("bio", "ph", "ph", "main"), 2: ("bio", "raw,count", "", "main")},
        {0: (Quality.GOOD, ""), 3: (Quality.BAD, "nan"), 4: (Quality.UNCERTAIN, 'say "x"')},
    )
    run = make_run("r1", T0)
    # rowids 100..103; the run and its phase were committed before rowid 101
    phase = PhaseChange("r1", T0, "expansion", None, "op")
    encoder.set_timeline(Timelines([(run, 101, None)], [(phase, 101)]))
    rows = [row(1, 0, 7.1, T0 - 5), row(1, 0, 7.25, T0 + 5), row(2, 3, None, T0 + 6)]
    rows.append(row(2, 4, 1e-05, T0 + 7))
    assert encoder.encode(rows, 100) == [
        "pocd_sample,device=bio,line=main,parameter=ph,point=ph,site=site\\ 1 quality=0i,"
        f"value=7.1 {T0 - 5}",
        "pocd_sample,batch=B\\ r1,device=bio,line=main,parameter=ph,phase=expansion,point=ph,"
        f"run=r1,site=site\\ 1 quality=0i,value=7.25 {T0 + 5}",
        "pocd_sample,batch=B\\ r1,device=bio,line=main,phase=expansion,point=raw\\,count,"
        f'run=r1,site=site\\ 1 quality=2i,reason="nan" {T0 + 6}',
        "pocd_sample,batch=B\\ r1,device=bio,line=main,phase=expansion,point=raw\\,count,"
        "run=r1,"
        f'site=site\\ 1 quality=1i,reason="say \\"x\\"",value=1e-05 {T0 + 7}',
    ]
    # one segment for the whole batch: the same lines by the fast path
    assert encoder.encode(rows[1:], 101) == encoder.encode(rows, 100)[1:]
    assert encoder.encode([], 7) == []
    with pytest.raises(KeyError):  # a channel interned since: the caller refreshes the codes
        encoder.encode([row(9, 0, 1.0, T0)], 1)


def test_runs_on_two_lines_at_once_tag_only_their_lines_samples() -> None:
    """Two batches run at once on lines a and b; a sample takes the run and phase of the one
    line its point belonged to, and a point shared by both lines takes neither."""
    encoder = SampleEncoder("s")
    encoder.set_codes(
        {1: ("ra", "ph", "ph", "a"), 2: ("rb", "ph", "ph", "b"), 3: ("inc", "t", "t", "")},
        {0: (Quality.GOOD, "")},
    )
    run_a = replace(make_run("ra1", T0), line="a")
    run_b = replace(make_run("rb1", T0), line="b")
    encoder.set_timeline(
        Timelines(
            [(run_a, 10, None), (run_b, 12, None)],
            [(PhaseChange("ra1", T0, "load", None, "op"), 10)],
        )
    )
    rows = [row(1, 0, 7.0, T0 + 1), row(2, 0, 7.1, T0 + 2), row(3, 0, 37.0, T0 + 3)]
    lines = encoder.encode(rows * 2, 10)  # rowids 10..15: run b starts at 12
    assert "run=ra1" in lines[0] and "phase=load" in lines[0]
    assert "run=" not in lines[1]  # before run b started
    assert "run=rb1" in lines[4] and "line=b" in lines[4]
    assert "run=ra1" in lines[3]
    assert "run=" not in lines[2] and "run=" not in lines[5] and "line=" not in lines[5]


def test_values_keep_every_bit() -> None:
    encoder = SampleEncoder("s")
    encoder.set_codes({1: ("d", "p", "", "")}, {0: (Quality.GOOD, "")})
    values = [0.1 + 0.2, -0.0, 1e300, 5e-324, 123456789.123456789, 37.0, math.pi]
    rows = [row(1, 0, v, T0 + i) for i, v in enumerate(values)]
    lines = encoder.encode(rows, 1)
    parsed = [float(line.split("value=")[1].split(" ")[0]) for line in lines]
    assert [math.copysign(1, v) for v in parsed] == [math.copysign(1, v) for v in values]
    assert parsed == values


def test_changes_are_points_keyed_by_what_never_changes() -> None:
    batches = {"r1": "B-1"}
    opened = Excursion(
        "e1",
        "r1",
        "temperature",
        ExcursionKind.ACTION_HIGH,
        "CART-TCT",
        "3.1",
        "expansion",
        38.0,
        T0,
        worst=38.4,
        integral=math.nan,
    )
    closed = Excursion(
        "e1",
        "r1",
        "temperature",
        ExcursionKind.ACTION_HIGH,
        "CART-TCT",
        "3.1",
        "expansion",
        38.0,
        T0,
        T0 + 90 * NS,
        38.9,
        12.5,
    )
    line_open = encode_change("s", opened, batches)
    line_closed = encode_change("s", closed, batches)
    key = (
        "pocd_excursion,batch=B-1,kind=action-high,line=main,parameter=temperature,"
        "phase=expansion,"
        "run=r1,site=s"
    )
    assert line_open == (
        f'{key} id="e1",protocol="CART-TCT",protocol_version="3.1",limit=38.0,worst=38.4,'
        f"open=true {T0}"
    )
    assert line_closed == (
        f'{key} id="e1",protocol="CART-TCT",protocol_version="3.1",limit=38.0,'
        f"end={T0 + 90 * NS}i,duration_s=90.0,worst=38.9,integral=12.5,open=false {T0}"
    )
    deviation = Deviation(
        "d1", "r1", T0 + 5, DeviationCause.PHASE_ORDER, "harvest", 'skipped "expansion"\nby op'
    )
    assert encode_change("s", deviation, batches) == (
        "pocd_deviation,batch=B-1,cause=phase-order,line=main,phase=harvest,run=r1,site=s "
        f'id="d1",description="skipped \\"expansion\\"\\nby op",status="open" {T0 + 5}'
    )
    run = make_run("r1", T0, T0 + 10)
    assert encode_change("s", run, batches) == (
        "pocd_run,batch=B\\ r1,line=main,protocol=CART-TCT,protocol_version=3.1,run=r1,"
        "site=s "
        f'timezone="Europe/London",protocol_hash="{"ab" * 32}",operator="alice",'
        f'status="completed",ended={T0 + 10}i {T0}'
    )
    change = PhaseChange("r1", T0 + 3, "activation", "enrichment", "op", in_order=False, reason="r")
    assert encode_change("s", change, batches) == (
        "pocd_phase,batch=B-1,phase=activation,run=r1,site=s "
        f'previous="enrichment",actor="op",in_order=false,reason="r" {T0 + 3}'
    )


def _split(text: str, separator: str) -> list[str]:
    """`text` split at each `separator` that is neither escaped nor inside a quoted string."""
    parts: list[str] = []
    quoted, escaped, start = False, False, 0
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _keys(line: str) -> tuple[set[str], set[str], str]:
    """(tag keys, field keys, timestamp) of a line-protocol line."""
    head, fields, timestamp = _split(line, " ")
    return (
        {tag.split("=", 1)[0] for tag in _split(head, ",")[1:]},
        {field.split("=", 1)[0] for field in _split(fields, ",")},
        timestamp,
    )


# What the encoder adds beyond the record's own fields: the sink's site, the run's batch, and
# the state a point shows (an excursion still open, a deviation not yet dispositioned).
_ADDED: dict[type, tuple[set[str], set[str]]] = {
    Run: ({"site"}, set()),
    PhaseChange: ({"site", "batch"}, set()),
    Excursion: ({"site", "batch"}, {"open"}),
    Deviation: ({"site", "batch"}, {"status"}),
}


@pytest.mark.parametrize(
    "record",
    [
        make_run("r1", T0, T0 + 10),
        replace(make_run("r1", T0, T0 + 10), end_reason="done"),
        PhaseChange("r1", T0 + 3, "b", "a", "op", in_order=False, reason="r"),
        PhaseChange("r1", T0 + 3, "a", None, "op"),
        Excursion(
            "e1", "r1", "t", ExcursionKind.ALERT_HIGH, "P", "1", "a", 38.0, T0, T0 + NS, 39.0, 1.5
        ),
        Deviation("d1", "r1", T0 + 5, DeviationCause.ACTION_LIMIT, "a", "text", "t", "e1"),
    ],
)
def test_the_record_descriptions_say_what_the_encoder_writes(record: Change) -> None:
    description = {Run: RUN, PhaseChange: PHASE_CHANGE, Excursion: EXCURSION, Deviation: DEVIATION}
    kind = description[type(record)]
    added_tags, added_fields = _ADDED[type(record)]
    tags, fields, timestamp = _keys(encode_change("s", record, {"r1": "B-1"}))
    assert set(kind.influx_keys("tag").values()) == tags - added_tags
    # a field without a value (None, '') is left out of the line
    present = {
        key
        for attr, key in kind.influx_keys("field").items()
        if getattr(record, attr) not in (None, "")
    }
    assert present == fields - added_fields
    (time_attr,) = kind.influx_keys("time")
    assert timestamp == str(getattr(record, time_attr))


def test_each_transition_is_a_point_of_its_own_beside_the_current_state() -> None:
    batches = {"r1": "B-1"}
    opened = Excursion(
        "e1", "r1", "t", ExcursionKind.ALERT_HIGH, "P", "1", "a", 37.5, T0, worst=37.8
    )
    closed = replace(opened, end=T0 + 9 * NS, worst=38.1, integral=1.5)
    key = "batch=B-1,{}kind=alert-high,line=main,parameter=t,phase=a,run=r1,site=s"
    state, transition = encode_event(
        "s", ExcursionEvent(ExcursionChange.CLOSED, closed, T0 + 11 * NS), batches
    )
    assert state == encode_change("s", closed, batches)
    assert transition == (
        f"pocd_excursion_event,{key.format('change=closed,')} "
        f'id="e1",protocol="P",protocol_version="1",limit=37.5,end={T0 + 9 * NS}i,'
        f"duration_s=9.0,worst=38.1,integral=1.5,open=false,start={T0}i {T0 + 11 * NS}"
    )
    # every transition: the record's point with a change tag, at the time it was made
    started = make_run("r1", T0)
    ended = replace(started, status=RunStatus.ABORTED, ended=T0 + NS, end_reason="power")
    events: list[tuple[Event, Change, str, int]] = [
        (
            ExcursionEvent(ExcursionChange.OPENED, opened, T0 + 2 * NS),
            opened,
            "opened",
            T0 + 2 * NS,
        ),
        (
            ExcursionEvent(ExcursionChange.UPDATED, opened, T0 + 3 * NS),
            opened,
            "updated",
            T0 + 3 * NS,
        ),
        (ExcursionEvent(ExcursionChange.OPENED, opened), opened, "opened", T0),  # t unknown
        (started, started, "started", T0),
        (ended, ended, "ended", T0 + NS),
        (replace(ended, ended=None), replace(ended, ended=None), "ended", T0),
    ]
    for event, record, change, at in events:
        state, transition = encode_event("s", event, batches)
        assert state == encode_change("s", record, batches)
        tags, fields, timestamp = _keys(state)
        measurement = state.split(",", 1)[0]
        assert transition.startswith(f"{measurement}_event,")
        (time_key,) = {Run: RUN, Excursion: EXCURSION}[type(record)].influx_keys("time").values()
        assert _keys(transition) == (tags | {"change"}, fields | {time_key}, str(at))
        assert f",change={change}," in transition
        assert f"{time_key}={timestamp}i" in transition
    # the other events are their record's point alone; audit entries stay in the store
    phase = PhaseChange("r1", T0 + 3, "a", None, "op")
    deviation = Deviation("d1", "r1", T0 + 5, DeviationCause.ACTION_LIMIT, "a", "high")
    assert encode_event("s", phase, batches) == [encode_change("s", phase, batches)]
    assert encode_event("s", deviation, batches) == [encode_change("s", deviation, batches)]
    assert encode_event("s", AuditEntry(T0, "op", "run.start", "r1"), batches) == []


# -- the store's side: event log, cursors, raw rows ---------------------------------------------


def test_the_event_log_records_every_change_in_the_same_transaction(tmp_path: Path) -> None:
    run = make_run("r1", T0)
    opened = Excursion(
        "e1", "r1", "ph", ExcursionKind.BAD_QUALITY, "CART-TCT", "3.1", "expansion", None, T0
    )
    deviation = Deviation("d1", "r1", T0, DeviationCause.DATA_LOSS, "expansion", "lost")
    with Store(tmp_path / "s.db") as store:
        assert store.event_count() == 0
        store.write([run, PhaseChange("r1", T0, "expansion", None, "op")])
        store.write([ExcursionEvent(ExcursionChange.OPENED, opened), Sample("d", "p", T0, 1.0)])
        closed = replace(opened, end=T0 + NS)
        store.write([ExcursionEvent(ExcursionChange.CLOSED, closed), deviation])
        ended = replace(run, status=RunStatus.COMPLETED, ended=T0 + 2 * NS)
        store.write([ended])
        events = store.events(0, 100)
        assert [i for i, _ in events] == [1, 2, 3, 4, 5, 6]
        # each event is the record as it was written, not as it is now
        assert [e for _, e in events] == [
            run,
            PhaseChange("r1", T0, "expansion", None, "op"),
            ExcursionEvent(ExcursionChange.OPENED, opened),
            ExcursionEvent(ExcursionChange.CLOSED, closed),
            deviation,
            ended,
        ]
        assert store.events(4, 1) == [(5, deviation)]
        assert store.event_count() == 6
        # a failed batch leaves no event behind
        with pytest.raises(StoreError):
            store.write([deviation])  # duplicate id
        assert store.event_count() == 6
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            store._db.execute("DELETE FROM events")


def test_cursors_only_move_forward_and_carry_incidents(tmp_path: Path) -> None:
    incident = Incident(T0, IncidentKind.DATA, "influx-rejected", "sink:x", "bad", b"m v=inf 1")
    with Store(tmp_path / "s.db") as store:
        assert store.cursors("x") == {}
        store.advance_cursors("x", {"samples": 10, "events": 2}, [incident])
        store.advance_cursors("y", {"samples": 3})
        assert store.cursors("x") == {"samples": 10, "events": 2}
        assert store.incidents() == [incident]
        with pytest.raises(StoreError, match="cannot move back: samples 10 -> 9"):
            store.advance_cursors("x", {"samples": 9, "events": 5}, [incident])
        assert store.cursors("x") == {"samples": 10, "events": 2}  # nothing of it kept
        assert store.incidents() == [incident]
        # compare and set: refused, with nothing kept, if another process moved it
        with pytest.raises(StoreError, match="moved meanwhile: quarantine is at 0, not 4"):
            store.advance_cursors("x", {"quarantine": 7}, [incident], expected={"quarantine": 4})
        store.advance_cursors("x", {"quarantine": 7}, expected={"quarantine": 0})
        assert store.cursors("x") == {"samples": 10, "events": 2, "quarantine": 7}
        assert store.incidents() == [incident]


def test_sample_rows_are_the_raw_columns_by_rowid(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.write(
            [
                Sample("d", "a", T0, 1.5),
                Sample("d", "b", T0 + 1, math.nan),
                Sample("e", "a", T0 + 2, 2.0, Quality.UNCERTAIN, None, "drift"),
            ]
        )
        channels, qualities = store.sample_codes()
        rows = store.sample_rows(2, 3)
        mask = (1 << SAMPLE_KEY_BITS) - 1
        assert [
            (channels[key >> SAMPLE_KEY_BITS], qualities[key & mask], v, t) for key, v, t in rows
        ] == [
            (("d", "b", "", ""), (Quality.BAD, "nan"), None, str(T0 + 1)),
            (("e", "a", "", ""), (Quality.UNCERTAIN, "drift"), 2.0, str(T0 + 2)),
        ]
        assert store.sample_time_range(2, 3) == (T0 + 1, T0 + 2)
        assert store.sample_time_range(4, 9) is None
        assert store.sample_time(3) == T0 + 2
        assert store.sample_time(4) is None


def test_a_v2_store_gets_its_history_as_events(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    db = sqlite3.connect(path, isolation_level=None)
    schema.migrate(db, path, target=2)
    db.execute(
        "INSERT INTO runs VALUES ('r1', 'B', 's', 'UTC', 'P', '1', 'h', 'op', 1, 'running', "
        "NULL, '')"
    )
    db.execute(
        "INSERT INTO phases (run_id, t, phase, previous, actor, in_order, reason) "
        "VALUES ('r1', 1, 'a', NULL, 'op', 1, '')"
    )
    db.close()
    with Store(path) as store:
        kinds = [type(e).__name__ for _, e in store.events(0, 10)]
        assert kinds == ["Run", "PhaseChange"]
        assert store.cursors("influxdb") == {}
