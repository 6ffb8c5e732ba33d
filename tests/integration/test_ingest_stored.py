"""Delivered means stored: a point the database would take with a 2xx and then drop is refused
(quarantined with its reason), never counted delivered. Real VictoriaMetrics and InfluxDB 1.6."""

from __future__ import annotations

import re
import threading
import urllib.parse
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.outbox import Outbox
from gateway.points import PointTags, line_for
from gateway.records import OutRecord, StoredRecord
from gateway.sink_health import SinkHealth
from schemas.models import Reading
from tests.e2e import wait_until
from tests.servers import Influx1, VictoriaMetrics, http_request

pytestmark = pytest.mark.integration

YEAR_2099 = datetime(2099, 6, 1, tzinfo=UTC)
"""Valid for the schemas (before 2100) and for the worker's window if its clock says so, but
VictoriaMetrics silently ignores points more than two days after its own clock."""


def reading(at: datetime, seq: int) -> Reading:
    return Reading(
        pump_id="P0001", boot_id="b1", seq=seq, device_time=at, received_at=at,
        drug="baclofen", pump_state="running", reservoir_ml=15.0, reservoir_capacity_ml=20.0,
        low_reservoir_alarm_ml=4.0, basal_rate_ml_per_day=0.5, delivered_total_ml=10.0,
    )  # fmt: skip


def store(outbox: Outbox, readings: list[Reading], tags: PointTags) -> None:
    outbox.append(
        [
            OutRecord(
                "reading", r.record_id, r.pump_id, r.model_dump_json().encode(), line_for(r, tags)
            )
            for r in readings
        ]
    )


def drain(settings: InfluxSettings, outbox: Outbox) -> tuple[SinkHealth, list[str]]:
    """Drain the outbox once; (sink health, reasons of the refused points)."""
    refused: list[str] = []

    def on_poison(record: StoredRecord, why: str) -> None:
        refused.append(why)

    sink = InfluxSink(settings, outbox, on_poison=on_poison)
    try:
        sink.drain(threading.Event())
        return sink.health(), refused
    finally:
        sink.close()


def ignored_big_timestamps(vm: VictoriaMetrics) -> int:
    """VictoriaMetrics' own count of points it answered 2xx for and dropped as too far ahead."""
    text = http_request("GET", f"{vm.url}/metrics").data.decode()
    found = re.search(r'vm_rows_ignored_total\{reason="big_timestamp"\} (\d+)', text)
    assert found is not None
    return int(found.group(1))


def test_victoria_metrics_answers_204_for_a_year_2099_point_and_drops_it(
    victoria_metrics: VictoriaMetrics,
) -> None:
    """The premise: a 2xx from VictoriaMetrics does not mean the point was stored."""
    tags = PointTags("north", "bed-12", f"prem{uuid.uuid4().hex[:8]}_")
    before = ignored_big_timestamps(victoria_metrics)
    line = line_for(reading(YEAR_2099, 1), tags)
    assert line is not None
    query = urllib.parse.urlencode({"org": "clinic", "bucket": "pumps"})
    answer = http_request("POST", f"{victoria_metrics.url}/api/v2/write?{query}", body=line)
    assert answer.status == 204
    # One row per field of the point.
    assert wait_until(lambda: ignored_big_timestamps(victoria_metrics) > before, 10)
    match = f'{{__name__="{tags.measurement_prefix}pump_reading_reservoir_ml"}}'
    assert victoria_metrics.export(match, min_points=0) == []


def test_a_point_victoria_metrics_would_drop_is_refused_not_delivered(
    tmp_path: Path, victoria_metrics: VictoriaMetrics
) -> None:
    tags = PointTags("north", "bed-12", f"st{uuid.uuid4().hex[:8]}_")
    now = datetime.now(UTC).replace(microsecond=0)
    outbox = Outbox(tmp_path / "outbox.db", ["influx"], durability="normal")
    try:
        store(outbox, [reading(now - timedelta(minutes=2), 1), reading(YEAR_2099, 2),
                       reading(now - timedelta(minutes=1), 3)], tags)  # fmt: skip
        before = ignored_big_timestamps(victoria_metrics)
        settings = InfluxSettings(url=victoria_metrics.url, api="v2", org="clinic", bucket="pumps")
        health, refused = drain(settings, outbox)
        assert outbox.backlog("influx")[0] == 0
    finally:
        outbox.close()
    assert health.delivered == 2
    assert health.counters["poisoned"] == 1
    assert len(refused) == 1
    assert "influx.max_point_ahead_s" in refused[0]
    match = f'{{__name__="{tags.measurement_prefix}pump_reading_reservoir_ml"}}'
    series = victoria_metrics.export(match, min_points=2)
    assert sum(len(s["timestamps"]) for s in series) == 2
    assert ignored_big_timestamps(victoria_metrics) == before, "the 2099 point was sent"


def test_a_point_older_than_the_configured_retention_is_refused(
    tmp_path: Path, victoria_metrics: VictoriaMetrics
) -> None:
    tags = PointTags("north", "bed-12", f"old{uuid.uuid4().hex[:8]}_")
    now = datetime.now(UTC).replace(microsecond=0)
    outbox = Outbox(tmp_path / "outbox.db", ["influx"], durability="normal")
    try:
        store(outbox, [reading(now - timedelta(days=40), 1), reading(now, 2)], tags)
        settings = InfluxSettings(url=victoria_metrics.url, api="v2", org="clinic",
                                  bucket="pumps", max_point_age_days=31)  # fmt: skip
        health, refused = drain(settings, outbox)
    finally:
        outbox.close()
    assert (health.delivered, health.counters["poisoned"]) == (1, 1)
    assert "influx.max_point_age_days 31" in refused[0]


def test_an_influxdb_partial_write_refuses_only_the_dropped_point(
    tmp_path: Path, influx1: Influx1
) -> None:
    """InfluxDB 1.x answers 400 "partial write: points beyond retention policy dropped=1"."""
    db = f"pw{uuid.uuid4().hex[:8]}"
    influx1.create_database(db)
    influx1.query(f'ALTER RETENTION POLICY "autogen" ON "{db}" DURATION 1h SHARD DURATION 1h', db)
    tags = PointTags("north", "bed-12")
    now = datetime.now(UTC).replace(microsecond=0)
    outbox = Outbox(tmp_path / "outbox.db", ["influx"], durability="normal")
    try:
        store(outbox, [reading(now - timedelta(days=2), 1), reading(now, 2)], tags)
        settings = InfluxSettings(url=influx1.url, api="v1", bucket=db,
                                  retry_initial_s=0.05, retry_max_s=0.3)  # fmt: skip
        health, refused = drain(settings, outbox)
    finally:
        outbox.close()
    assert health.counters["poisoned"] == 1
    assert "partial write" in refused[0]
    answer = influx1.query("SELECT count(reservoir_ml) FROM pump_reading", db)
    assert answer["results"][0]["series"][0]["values"][0][1] == 1
