"""Every InfluxQL query of the Grafana dashboard runs on InfluxDB 1.6 over data the sink wrote."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.outbox import Outbox
from gateway.points import PointTags
from schemas.models import AlertTransition, DeviceEvent
from tests.integration.test_influx_sink import T0, influxql, make_readings, records, unique
from tests.servers import Influx1

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pumpgw-dashboard.json"
# What Grafana substitutes for its macros and the "All" choice of a variable.
MACROS = {
    "$timeFilter": "time > '2026-01-01T00:00:00Z'",
    "$__interval": "1h",
    "/^$site$/": "/^.*$/",
    "/^$pump$/": "/^.*$/",
}


def grafana_queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    panel_queries = [t["query"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variable_queries = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return panel_queries + variable_queries


def substitute(query: str) -> str:
    for macro, value in MACROS.items():
        query = query.replace(macro, value)
    return query


def test_every_dashboard_query_returns_data(influx1: Influx1, tmp_path: Path) -> None:
    db = unique("t_")
    influx1.create_database(db)
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
    refill = DeviceEvent(
        pump_id="P0001",
        boot_id="b0",
        seq=999,
        device_time=T0,
        received_at=T0,
        event="refill",
        withdrawn_ml=1.5,
        filled_ml=20.0,
    )
    messages = [*make_readings(pumps=2, per_pump=200), refill, alert]
    outbox = Outbox(tmp_path / "outbox.db", ["influx"], durability="normal")
    outbox.append(records(messages, PointTags("north", "bed-1")))
    settings = InfluxSettings(url=influx1.url, api="v1", bucket=db)
    sink = InfluxSink(settings, outbox, on_poison=lambda record, reason: None)
    try:
        sink.drain(threading.Event())
    finally:
        sink.close()
        outbox.close()
    for query in grafana_queries():
        series = influxql(influx1, db, substitute(query))
        assert series, f"no data for: {query}"
