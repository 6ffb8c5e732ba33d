"""Time series end to end: a simulated ward through a gateway process into a real database.

pumpsim (TCP) -> `pumpgw run` with `[influx]` -> VictoriaMetrics (api v2, read back with its
export API) or InfluxDB 1.x (api v1, read back with InfluxQL). Each pump's series must hold
exactly the readings and events the simulator sent intact (its exit summary), at the
device time, with the values a subscriber received on MQTT for the same record id.
A capture replayed twice (`pumpgw replay`, the second time through a fresh outbox so that
every point is written again) must not add a point to InfluxDB 1.x.

Tests keep apart by a unique site tag (VictoriaMetrics) or database (InfluxDB 1.x).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest

from gateway.points import BATTERY_STATE_CODES, PUMP_STATE_CODES
from tests.e2e import Scaffold, delivered, explain, write_config
from tests.servers import Influx1, Mosquitto, VictoriaMetrics

pytestmark = pytest.mark.integration


def argv(words: str) -> tuple[str, ...]:
    """Command-line arguments written as one line."""
    return tuple(words.split())


ARRIVE_S: Final = 60.0
METRICS_S: Final = 30.0
PROCESS_S: Final = 120.0
STATION: Final = "bed-1"
WARD_ARGS: Final = argv(
    "--scenario ward --pumps 13 --seed 3 --count 75 --interval 300 --speed max --wait-for-ack"
)
"""Every scenario once (noisy line, dropout, clock jumps included), 975 readings: fewer than
the 1000 messages Mosquitto queues for a subscriber before it drops (max_queued_messages)."""
COMPARED: Final = (
    "reservoir_ml",
    "reservoir_capacity_ml",
    "low_reservoir_alarm_ml",
    "basal_rate_ml_per_day",
    "delivered_total_ml",
    "bolus_count_24h",
    "battery_remaining_pct",
    "seq",
)
"""Reading fields stored under their own name (received_at_ns is beyond a float's precision
in VictoriaMetrics, so it is not compared there)."""

Point = dict[str, Any]
"""One reading as stored: its fields by name, plus `_pump`, `_boot` and `_time_us`."""


# --- expectations from the simulator and from MQTT ----------------------------------------


def readings_sent(summary: dict[str, Any]) -> dict[str, int]:
    return {p["pump_id"]: int(p["sent"].get("reading", 0)) for p in summary["pumps"]}


def events_sent(summary: dict[str, Any]) -> dict[str, int]:
    return {p["pump_id"]: int(p["sent"].get("event", 0)) for p in summary["pumps"]}


def as_stored(reading: dict[str, Any]) -> dict[str, Any]:
    """What the series should hold for a reading received on MQTT."""
    stored = {name: reading[name] for name in COMPARED if reading.get(name) is not None}
    stored["pump_state_code"] = PUMP_STATE_CODES[reading["pump_state"]]
    stored["battery_state_code"] = BATTERY_STATE_CODES[reading["battery_state"]]
    stored["alarm_count"] = len(reading["alarms"])
    return stored


def time_us(text: str) -> int:
    """Microseconds since the epoch of an RFC 3339 time (fractions of any length)."""
    head, _, fraction = text.rstrip("Z").replace("+00:00", "").partition(".")
    whole = datetime.fromisoformat(head).replace(tzinfo=UTC)
    return int(whole.timestamp()) * 1_000_000 + int((fraction + "000000")[:6])


# --- reading back -------------------------------------------------------------------------


def victoria_points(vm: VictoriaMetrics, site: str, expected: int) -> dict[str, Point]:
    """Record id -> reading point, from every `pump_reading_*` series of one site."""
    series = vm.export(
        f'{{__name__=~"pump_reading_.*",site="{site}"}}',
        min_points=expected * (len(COMPARED) + 3),
        timeout_s=ARRIVE_S,
    )
    by_key: dict[tuple[str, str, int], Point] = {}
    for one in series:
        labels = one["metric"]
        field = labels["__name__"].removeprefix("pump_reading_")
        for value, ms in zip(one["values"], one["timestamps"], strict=True):
            point = by_key.setdefault((labels["pump"], labels["boot"], ms), {})
            point.update({"_pump": labels["pump"], "_boot": labels["boot"], "_time_ms": ms})
            point[field] = value
    return {f"{p['_pump']}:{p['_boot']}:{int(p['seq'])}": p for p in by_key.values()}


def influx_points(influx: Influx1, db: str) -> dict[str, Point]:
    """Record id -> reading point, from `SELECT *` on `pump_reading`."""
    answer = influx.query('SELECT * FROM "pump_reading"', db)
    (series,) = answer["results"][0]["series"]
    out: dict[str, Point] = {}
    for row in series["values"]:
        point = dict(zip(series["columns"], row, strict=True))
        point.update({"_pump": point["pump"], "_boot": point["boot"]})
        point["_time_us"] = time_us(point["time"])
        out[f"{point['pump']}:{point['boot']}:{point['seq']}"] = point
    return out


def count_by_pump(influx: Influx1, db: str, measurement: str) -> dict[str, int]:
    query = f'SELECT count("seq") FROM "{measurement}" GROUP BY "pump"'  # noqa: S608 - InfluxQL
    answer = influx.query(query, db)
    return {
        s["tags"]["pump"]: int(s["values"][0][1]) for s in answer["results"][0].get("series", [])
    }


def measurement_counts(influx: Influx1, db: str) -> dict[str, int]:
    """Points per measurement (counted on a field every point of it has)."""
    counts = {}
    for measurement, field in (
        ("pump_reading", "seq"),
        ("pump_event", "seq"),
        ("pump_alert", "phase_code"),
    ):
        query = f'SELECT count("{field}") FROM "{measurement}"'  # noqa: S608 - InfluxQL
        answer = influx.query(query, db)
        series = answer["results"][0].get("series", [])
        counts[measurement] = int(series[0]["values"][0][1]) if series else 0
    return counts


# --- the ward through a gateway -------------------------------------------------------------


SINKS: Final = ("mqtt", "influx")


def stream_ward(
    scaffold: Scaffold, mosquitto: Mosquitto, influx: dict[str, Any], site: str
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Run the ward through a gateway; return the summary and the readings MQTT delivered."""
    prefix = f"ts-{uuid.uuid4().hex[:8]}"
    topics = f"{prefix}/+/+/pumps/+/telemetry"
    collector = scaffold.collector(mosquitto.port, topics, raw=True)
    ward = scaffold.ward(*WARD_ARGS)
    config = scaffold.station_config(
        ward,
        mosquitto.port,
        prefix,
        influx=influx,
        extra={"gateway": {"site": site, "station": STATION}},
    )
    gateway = scaffold.gateway(config)
    summary = ward.summary()
    assert summary["all_acked"] is True, explain(gateway, ward)
    metrics = gateway.wait_metrics(lambda m: delivered(m, SINKS), METRICS_S)
    assert delivered(metrics, SINKS), explain(gateway, ward)
    total = sum(readings_sent(summary).values())
    assert collector.wait_for(lambda: collector.count("reading") >= total, ARRIVE_S)
    assert gateway.stop() == 0, explain(gateway, ward)
    readings = {
        f"{r['pump_id']}:{r['boot_id']}:{r['seq']}": r for r in collector.payloads["reading"]
    }
    return summary, readings


def assert_series_hold_what_was_sent(
    points: dict[str, Point],
    summary: dict[str, Any],
    readings: dict[str, dict[str, Any]],
    same_time: Callable[[Point, dict[str, Any]], bool],
) -> None:
    """Per pump the intact readings, no more; each with the values MQTT delivered."""
    assert Counter(p["_pump"] for p in points.values()) == Counter(readings_sent(summary))
    assert set(points) == set(readings)
    for record_id, reading in readings.items():
        point = points[record_id]
        assert {k: point.get(k) for k in as_stored(reading)} == as_stored(reading), record_id
        assert same_time(point, reading), record_id


# --- the tests ----------------------------------------------------------------------------


def test_ward_series_in_victoria_metrics_hold_exactly_the_readings_sent_with_their_values(
    scaffold: Scaffold, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    site = f"ts-{uuid.uuid4().hex[:8]}"
    influx = {"url": victoria_metrics.url, "api": "v2", "org": "test", "bucket": "pumps"}
    summary, readings = stream_ward(scaffold, mosquitto, influx, site)
    points = victoria_points(victoria_metrics, site, len(readings))

    def same_ms(point: Point, reading: dict[str, Any]) -> bool:  # VictoriaMetrics keeps ms
        return bool(point["_time_ms"] == time_us(reading["device_time"]) // 1000)

    assert_series_hold_what_was_sent(points, summary, readings, same_ms)
    want = Counter(events_sent(summary))
    events = victoria_metrics.export(  # one series per pump, boot and event kind
        f'{{__name__="pump_event_seq",site="{site}"}}', min_points=want.total()
    )
    got: Counter[str] = Counter()
    for one in events:
        got[one["metric"]["pump"]] += len(one["values"])
    assert +got == +want


def test_ward_series_in_influxdb1_hold_exactly_the_readings_sent_with_their_values(
    scaffold: Scaffold, mosquitto: Mosquitto, influx1: Influx1
) -> None:
    db = f"ts_{uuid.uuid4().hex[:8]}"
    influx1.create_database(db)
    influx = {"url": influx1.url, "api": "v1", "bucket": db}
    summary, readings = stream_ward(scaffold, mosquitto, influx, site="ts")
    points = influx_points(influx1, db)

    def same_us(point: Point, reading: dict[str, Any]) -> bool:
        return bool(point["_time_us"] == time_us(reading["device_time"]))

    assert_series_hold_what_was_sent(points, summary, readings, same_us)
    assert count_by_pump(influx1, db, "pump_event") == {
        pump: n for pump, n in events_sent(summary).items() if n
    }


def test_capture_replayed_twice_adds_no_point_to_influxdb1(
    tmp_path: Path, mosquitto: Mosquitto, influx1: Influx1
) -> None:
    capture = tmp_path / "ward.frames"
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator",
            "--transport",
            "file",
            "--output",
            str(capture),
            "--scenario",
            "ward",
            "--pumps",
            "13",
            "--seed",
            "1",
            "--count",
            "300",
            "--interval",
            "300",
            "--speed",
            "max",
        ],
        capture_output=True,
        check=True,
        timeout=PROCESS_S,
    )
    summary = json.loads(sim.stdout.splitlines()[-1])
    db = f"replay_{uuid.uuid4().hex[:8]}"
    influx1.create_database(db)

    def replay(outbox: str) -> dict[str, int]:
        config = write_config(
            tmp_path / f"{outbox}.toml",
            {
                "gateway": {"site": "replay", "station": STATION},
                "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto.port}", "topic_prefix": db},
                "store": {"path": str(tmp_path / f"{outbox}.db"), "durability": "normal"},
                "influx": {"url": influx1.url, "api": "v1", "bucket": db},
                "health": {"listen": ""},
            },
        )
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "replay", str(capture), "--config", str(config)],
            capture_output=True,
            check=True,
            timeout=PROCESS_S,
        )
        counts: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
        return counts

    first = replay("first")
    after_first = measurement_counts(influx1, db)
    second = replay("second")  # a fresh outbox: every point is written again
    after_second = measurement_counts(influx1, db)

    assert first["accepted"] == second["accepted"] > 0
    assert first["alert_transitions"] == second["alert_transitions"] > 0
    assert after_first == after_second
    assert after_first == {
        "pump_reading": sum(readings_sent(summary).values()),
        "pump_event": sum(events_sent(summary).values()),
        "pump_alert": first["alert_transitions"],
    }
