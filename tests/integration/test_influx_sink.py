"""InfluxSink against real servers: VictoriaMetrics (v2 API) and InfluxDB 1.6 (v1 API).

Every test writes under its own measurement prefix (VictoriaMetrics) or database
(InfluxDB 1.x) and reads back what landed through the server's own query API.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import urllib3

from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.outbox import Outbox
from gateway.points import PointTags, epoch_ns, line_for, point_time_ns
from gateway.records import OutRecord, StoredRecord
from gateway.sink_health import SinkHealth
from schemas.models import AlertTransition, DeviceEvent, Reading
from tests.servers import Influx1, VictoriaMetrics

pytestmark = pytest.mark.integration

T0 = datetime(2026, 2, 1, 6, 0, 0, 250_000, tzinfo=UTC)
WAIT_S = 30.0
FAST_RETRY: dict[str, Any] = {"retry_initial_s": 0.05, "retry_max_s": 0.3}


# --- building data ----------------------------------------------------------------------


def make_readings(pumps: int, per_pump: int, boot: str = "b0") -> list[Reading]:
    """Readings every 10 minutes per pump, values changing, some without battery percentage."""
    out = []
    for n in range(per_pump):
        for p in range(pumps):
            device_time = T0 + timedelta(minutes=10 * n, microseconds=p * 17 + n % 7)
            out.append(
                Reading(
                    pump_id=f"P{p:04d}",
                    boot_id=boot,
                    seq=n,
                    device_time=device_time,
                    received_at=device_time + timedelta(milliseconds=40 + p),
                    drug=("morphine", "ziconotide", "baclofen")[p % 3],
                    pump_state="running",
                    reservoir_ml=round(20.0 - n * 0.00347 - p * 0.1, 6),
                    reservoir_capacity_ml=20.0,
                    low_reservoir_alarm_ml=2.0,
                    basal_rate_ml_per_day=0.5,
                    delivered_total_ml=100.0 + n * 0.00347,
                    bolus_count_24h=n % 4,
                    battery_remaining_pct=None if n % 5 == 4 else 90.0 - n * 0.01,
                )
            )
    return out


def records(messages: list[Any], tags: PointTags) -> list[OutRecord]:
    return [
        OutRecord(
            m.kind,
            m.record_id,
            getattr(m, "pump_id", None),
            m.model_dump_json().encode(),
            line_for(m, tags),
        )
        for m in messages
    ]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", ["influx", "replay"], durability="normal")
    yield box
    box.close()


class Poisoned:
    """Collects on_poison calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[StoredRecord, str]] = []

    def __call__(self, record: StoredRecord, reason: str) -> None:
        self.calls.append((record, reason))


@contextmanager
def sink_for(
    settings: InfluxSettings, outbox: Outbox, name: str = "influx"
) -> Iterator[tuple[InfluxSink, Poisoned]]:
    poisoned = Poisoned()
    sink = InfluxSink(settings, outbox, on_poison=poisoned, name=name)
    try:
        yield sink, poisoned
    finally:
        sink.close()


@contextmanager
def running(sink: InfluxSink) -> Iterator[threading.Event]:
    """Run the sink on its own thread; yields the wake event; stops and joins after."""
    stop, wake = threading.Event(), threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop, wake), name="influx sink under test")
    thread.start()
    try:
        yield wake
    finally:
        stop.set()
        thread.join(WAIT_S)
        assert not thread.is_alive()


def sent_up_to(seq: int) -> Callable[[SinkHealth], bool]:
    """A wait_for predicate: the sink has delivered every row up to seq."""
    return lambda health: health.gauges["sent_up_to"] == seq


def vm_settings(server: VictoriaMetrics, **changes: Any) -> InfluxSettings:
    return InfluxSettings(url=server.url, api="v2", org="clinic", bucket="pumps", **changes)


def influx1_settings(server: Influx1, db: str, **changes: Any) -> InfluxSettings:
    return InfluxSettings(url=server.url, api="v1", bucket=db, **changes)


# --- reading back -----------------------------------------------------------------------


VM_RELATIVE_PRECISION = 1e-12
"""VictoriaMetrics stores values as decimals of about 15 significant digits."""


def vm_points(
    server: VictoriaMetrics, metric: str, min_points: int
) -> dict[str, list[tuple[int, float]]]:
    """(timestamp ms, value) per pump for one metric, sorted."""
    per_pump: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for series in server.export(f'{{__name__="{metric}"}}', min_points=min_points):
        pump = series["metric"]["pump"]
        per_pump[pump] += zip(series["timestamps"], series["values"], strict=True)
    return {pump: sorted(points) for pump, points in per_pump.items()}


def influxql(server: Influx1, db: str, query: str) -> list[dict[str, Any]]:
    """Series of an InfluxQL answer, with nanosecond epoch timestamps."""
    params = urllib.parse.urlencode({"db": db, "q": query, "epoch": "ns"})
    answer = urllib3.request("GET", f"{server.url}/query?{params}", timeout=10.0, retries=False)
    assert answer.status == 200, answer.data
    result = json.loads(answer.data)["results"][0]
    assert "error" not in result, result
    series: list[dict[str, Any]] = result.get("series", [])
    return series


def influx1_rows(server: Influx1, db: str, measurement: str, fields: str) -> dict[str, list[Any]]:
    """Rows [time_ns, *fields] per pump."""
    query = f'SELECT {fields} FROM "{measurement}" GROUP BY "pump"'  # noqa: S608 - InfluxQL
    series = influxql(server, db, query)
    return {s["tags"]["pump"]: s["values"] for s in series}


def expected_vm(readings: list[Reading], field: str) -> dict[str, list[tuple[int, Any]]]:
    """What VictoriaMetrics should hold per pump: ms timestamps, values to its precision."""
    per_pump: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    for r in sorted(readings, key=lambda r: point_time_ns(r.device_time, r.seq)):
        value = getattr(r, field)
        if value is not None:
            timestamp_ms = point_time_ns(r.device_time, r.seq) // 1_000_000
            per_pump[r.pump_id].append(
                (timestamp_ms, pytest.approx(value, rel=VM_RELATIVE_PRECISION))
            )
    return dict(per_pump)


# --- VictoriaMetrics through the v2 API -------------------------------------------------


def test_readings_land_in_victoria_metrics_exactly_as_written(
    victoria_metrics: VictoriaMetrics, outbox: Outbox
) -> None:
    prefix = unique("t")
    readings = make_readings(pumps=3, per_pump=400)
    outbox.append(records(readings, PointTags("north", "bed-1", prefix)))
    with sink_for(vm_settings(victoria_metrics, batch_size=250), outbox) as (sink, poisoned):
        assert sink.drain(threading.Event()) == len(readings)
    assert poisoned.calls == []
    assert outbox.cursor("influx") == len(readings)
    for field in ("reservoir_ml", "delivered_total_ml", "battery_remaining_pct"):
        expected = expected_vm(readings, field)
        total = sum(len(v) for v in expected.values())
        assert vm_points(victoria_metrics, f"{prefix}pump_reading_{field}", total) == expected
    seqs = vm_points(victoria_metrics, f"{prefix}pump_reading_seq", len(readings))
    assert {pump: [v for _, v in pts] for pump, pts in seqs.items()} == {
        f"P{p:04d}": [float(n) for n in range(400)] for p in range(3)
    }


def test_events_and_alerts_land_in_victoria_metrics_with_numeric_fields(
    victoria_metrics: VictoriaMetrics, outbox: Outbox
) -> None:
    prefix = unique("t")
    refill = DeviceEvent(
        pump_id="P0001",
        boot_id="b0",
        seq=9,
        device_time=T0,
        received_at=T0,
        event="refill",
        withdrawn_ml=1.5,
        filled_ml=20.0,
    )
    alert = AlertTransition(
        alert_id="P0001:low_reservoir:1",
        transition_id="P0001:low_reservoir:1:start",
        pump_id="P0001",
        alert_kind="low_reservoir",
        priority="PM",
        alert_type="ST",
        state="active",
        phase="start",
        latching=True,
        value=1.9,
        threshold=2.0,
        unit="mL",
        text="Low reservoir",
        at=T0,
    )
    outbox.append(records([refill, alert], PointTags("north", "bed-1", prefix)))
    with sink_for(vm_settings(victoria_metrics), outbox) as (sink, _):
        sink.drain(threading.Event())
    assert vm_points(victoria_metrics, f"{prefix}pump_event_withdrawn_ml", 1) == {
        "P0001": [(epoch_ns(T0) // 1_000_000, 1.5)]
    }
    [series] = victoria_metrics.export(f'{{__name__="{prefix}pump_alert_state_code"}}')
    assert series["metric"]["alert_kind"] == "low_reservoir"
    assert series["metric"]["priority"] == "PM"
    assert series["values"] == [1]


def test_sink_thread_writes_rows_appended_while_it_runs(
    victoria_metrics: VictoriaMetrics, outbox: Outbox
) -> None:
    prefix = unique("t")
    tags = PointTags("north", "bed-1", prefix)
    readings = make_readings(pumps=2, per_pump=50)
    with sink_for(vm_settings(victoria_metrics), outbox) as (sink, _), running(sink) as wake:
        for chunk in (readings[:40], readings[40:]):
            last = outbox.append(records(chunk, tags))
            wake.set()
            assert sink.wait_for(sent_up_to(last), WAIT_S)
    assert vm_points(victoria_metrics, f"{prefix}pump_reading_reservoir_ml", 100) == (
        expected_vm(readings, "reservoir_ml")
    )


def test_victoria_metrics_outage_mid_drain_loses_nothing(
    victoria_metrics: VictoriaMetrics, outbox: Outbox
) -> None:
    prefix = unique("t")
    readings = make_readings(pumps=4, per_pump=500)
    last = outbox.append(records(readings, PointTags("north", "bed-1", prefix)))
    settings = vm_settings(victoria_metrics, batch_size=400, **FAST_RETRY)
    with sink_for(settings, outbox) as (sink, poisoned):
        assert sink.drain_once(threading.Event()) == 400
        victoria_metrics.stop()
        with running(sink):
            assert sink.wait_for(lambda h: h.counters["retries"] >= 3 and not h.connected, WAIT_S)
            assert outbox.cursor("influx") == 400
            victoria_metrics.start()
            assert sink.wait_for(sent_up_to(last), WAIT_S)
        assert sink.health().connected
    assert poisoned.calls == []
    assert vm_points(victoria_metrics, f"{prefix}pump_reading_reservoir_ml", 2000) == (
        expected_vm(readings, "reservoir_ml")
    )


class DedupVictoriaMetrics(VictoriaMetrics):
    """VictoriaMetrics as docs/timeseries.md recommends: one sample per series per ms."""

    def _argv(self) -> list[str]:
        return [*super()._argv(), "-dedup.minScrapeInterval=1ms"]


def test_replay_into_deduplicating_victoria_metrics_adds_no_points(
    tmp_path: Path, outbox: Outbox
) -> None:
    prefix = unique("t")
    readings = make_readings(pumps=2, per_pump=100)
    outbox.append(records(readings, PointTags("north", "bed-1", prefix)))
    with DedupVictoriaMetrics(tmp_path / "vm-dedup") as server:
        for name in ("influx", "replay"):
            with sink_for(vm_settings(server), outbox, name=name) as (sink, _):
                assert sink.drain(threading.Event()) == len(readings)
        metric = f"{prefix}pump_reading_reservoir_ml"
        assert vm_points(server, metric, 200) == expected_vm(readings, "reservoir_ml")


def test_wrong_credentials_are_retried_slowly_and_nothing_is_dropped(
    tmp_path: Path, outbox: Outbox
) -> None:
    class AuthVictoriaMetrics(VictoriaMetrics):
        def _argv(self) -> list[str]:
            return [*super()._argv(), "-httpAuth.username=gw", "-httpAuth.password=right"]

    readings = make_readings(pumps=1, per_pump=10)
    last = outbox.append(records(readings, PointTags("north", "bed-1", unique("t"))))
    with AuthVictoriaMetrics(tmp_path / "vm-auth") as server:
        wrong = InfluxSettings(
            url=server.url,
            api="v1",
            bucket="pumps",
            username="gw",
            password="wrong",
            **FAST_RETRY,
        )
        with sink_for(wrong, outbox) as (sink, poisoned), running(sink):
            assert sink.wait_for(lambda h: h.counters["retries"] >= 2, WAIT_S)
            health = sink.health()
            assert "HTTP 401" in (health.last_error or "")
            assert not health.connected  # /healthz reports the sink as not delivering
            assert outbox.cursor("influx") == 0
            assert poisoned.calls == []
        right = InfluxSettings(
            url=server.url, api="v1", bucket="pumps", username="gw", password="right"
        )
        with sink_for(right, outbox) as (sink, _):
            assert sink.drain(threading.Event()) == len(readings)
    assert outbox.cursor("influx") == last


# --- InfluxDB 1.6 through the v1 API ----------------------------------------------------


def test_readings_land_in_influxdb1_exactly_with_nanosecond_timestamps(
    influx1: Influx1, outbox: Outbox
) -> None:
    db = unique("t_")
    influx1.create_database(db)
    readings = make_readings(pumps=3, per_pump=300)
    outbox.append(records(readings, PointTags("north", "bed-1")))
    with sink_for(influx1_settings(influx1, db, batch_size=200), outbox) as (sink, poisoned):
        assert sink.drain(threading.Event()) == len(readings)
    assert poisoned.calls == []
    rows = influx1_rows(
        influx1, db, "pump_reading", "reservoir_ml, delivered_total_ml, battery_remaining_pct, seq"
    )
    expected: dict[str, list[list[Any]]] = defaultdict(list)
    for r in readings:
        expected[r.pump_id].append(
            [
                point_time_ns(r.device_time, r.seq),
                r.reservoir_ml,
                r.delivered_total_ml,
                r.battery_remaining_pct,
                r.seq,
            ]
        )
    assert rows == {pump: sorted(values) for pump, values in expected.items()}


def test_two_readings_sharing_a_device_time_stay_two_points_in_influxdb1(
    influx1: Influx1, outbox: Outbox
) -> None:
    db = unique("t_")
    influx1.create_database(db)
    [first, second] = make_readings(pumps=1, per_pump=2)
    # The pump clock stepped back: the second reading repeats the first one's device time.
    second = second.model_copy(update={"device_time": first.device_time})
    outbox.append(records([first, second], PointTags("north", "bed-1")))
    with sink_for(influx1_settings(influx1, db), outbox) as (sink, _):
        sink.drain(threading.Event())
    rows = influx1_rows(influx1, db, "pump_reading", "reservoir_ml, seq")
    assert [row[1:] for row in rows["P0000"]] == [[first.reservoir_ml, 0], [second.reservoir_ml, 1]]


def test_replay_into_influxdb1_overwrites_instead_of_adding_points(
    influx1: Influx1, outbox: Outbox
) -> None:
    db = unique("t_")
    influx1.create_database(db)
    readings = make_readings(pumps=2, per_pump=150)
    outbox.append(records(readings, PointTags("north", "bed-1")))
    for name in ("influx", "replay"):  # the replay sink delivers every row a second time
        with sink_for(influx1_settings(influx1, db), outbox, name=name) as (sink, _):
            assert sink.drain(threading.Event()) == len(readings)
    counts = influxql(influx1, db, 'SELECT count("seq") FROM "pump_reading" GROUP BY "pump"')
    assert {s["tags"]["pump"]: s["values"][0][1] for s in counts} == {"P0000": 150, "P0001": 150}
    rows = influx1_rows(influx1, db, "pump_reading", "reservoir_ml")
    assert rows["P0000"] == sorted(
        [point_time_ns(r.device_time, r.seq), r.reservoir_ml]
        for r in readings
        if r.pump_id == "P0000"
    )


def test_rejected_points_are_isolated_reported_and_the_rest_lands(
    influx1: Influx1, outbox: Outbox
) -> None:
    db = unique("t_")
    influx1.create_database(db)
    good = make_readings(pumps=2, per_pump=100)
    conflicting = make_readings(pumps=1, per_pump=1, boot="bad")[0]
    # The bad_ measurement already holds reservoir_ml as a string in the same shard.
    seed_ns = point_time_ns(conflicting.device_time, conflicting.seq) - 1
    influx1.write(db, f'bad_pump_reading,pump=P0000 reservoir_ml="text" {seed_ns}')
    rows = records(good[:77], PointTags("north", "bed-1"))
    rows += records([conflicting], PointTags("north", "bed-1", "bad_"))
    rows += [OutRecord("reading", "garbage:1", None, b"{}", b"not line protocol")]
    rows += records(good[77:], PointTags("north", "bed-1"))
    last = outbox.append(rows)
    with sink_for(influx1_settings(influx1, db), outbox) as (sink, poisoned):
        assert sink.drain(threading.Event()) == len(rows)
        assert sink.health().counters["poisoned"] == 2
    reasons = {record.record_id: reason for record, reason in poisoned.calls}
    assert set(reasons) == {conflicting.record_id, "garbage:1"}
    assert "HTTP 400" in reasons[conflicting.record_id]
    assert "field type conflict" in reasons[conflicting.record_id]
    assert "unable to parse" in reasons["garbage:1"]
    assert outbox.cursor("influx") == last
    landed = influx1_rows(influx1, db, "pump_reading", "reservoir_ml")
    assert {pump: len(values) for pump, values in landed.items()} == {"P0000": 100, "P0001": 100}


def test_influxdb1_outage_mid_drain_loses_nothing(influx1: Influx1, outbox: Outbox) -> None:
    db = unique("t_")
    influx1.create_database(db)
    readings = make_readings(pumps=2, per_pump=600)
    last = outbox.append(records(readings, PointTags("north", "bed-1")))
    settings = influx1_settings(influx1, db, batch_size=300, **FAST_RETRY)
    with sink_for(settings, outbox) as (sink, poisoned):
        assert sink.drain_once(threading.Event()) == 300
        influx1.stop()
        with running(sink):
            assert sink.wait_for(lambda h: h.counters["retries"] >= 3 and not h.connected, WAIT_S)
            assert "cannot reach" in (sink.health().last_error or "")
            influx1.start()
            assert sink.wait_for(sent_up_to(last), WAIT_S)
    assert poisoned.calls == []
    counts = influxql(influx1, db, 'SELECT count("seq") FROM "pump_reading" GROUP BY "pump"')
    assert {s["tags"]["pump"]: s["values"][0][1] for s in counts} == {"P0000": 600, "P0001": 600}


def test_missing_database_is_retried_until_it_exists(influx1: Influx1, outbox: Outbox) -> None:
    db = unique("t_")
    readings = make_readings(pumps=1, per_pump=20)
    last = outbox.append(records(readings, PointTags("north", "bed-1")))
    settings = influx1_settings(influx1, db, **FAST_RETRY)
    with sink_for(settings, outbox) as (sink, poisoned), running(sink):
        assert sink.wait_for(lambda h: h.counters["retries"] >= 2, WAIT_S)
        assert "database not found" in (sink.health().last_error or "")
        influx1.create_database(db)
        assert sink.wait_for(sent_up_to(last), WAIT_S)
    assert poisoned.calls == []
    counts = influxql(influx1, db, 'SELECT count("seq") FROM "pump_reading"')
    assert counts[0]["values"][0][1] == 20


# --- Retry-After from a server that asks for it ------------------------------------------


class BusyThenOk(BaseHTTPRequestHandler):
    """Answers the first write 503 with Retry-After: 1, then 204; notes arrival times."""

    arrivals: ClassVar[list[float]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) == 1:
            self.send_response(503)
            self.send_header("Retry-After", "1")
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def test_retry_after_from_the_server_is_honoured(outbox: Outbox) -> None:
    BusyThenOk.arrivals = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), BusyThenOk)
    serving = threading.Thread(target=server.serve_forever, name="busy server")
    serving.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        last = outbox.append(records(make_readings(1, 3), PointTags("north", "bed-1")))
        settings = InfluxSettings(url=url, api="v1", bucket="pumps", retry_initial_s=0.01)
        with sink_for(settings, outbox) as (sink, _):
            sink.drain(threading.Event())
            assert sink.health().counters["retries"] == 1
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    assert outbox.cursor("influx") == last
    first, second = BusyThenOk.arrivals
    assert second - first >= 0.99  # waited the server's 1 s, not the 0.01 s backoff
