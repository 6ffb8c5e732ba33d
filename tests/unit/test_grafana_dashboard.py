"""deploy/grafana/pumpgw-dashboard.json: data source variable, pump variable, known fields."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gateway.points import ALERT, EVENT, READING

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pumpgw-dashboard.json"
TIMESERIES_DOC = Path(__file__).resolve().parents[2] / "docs" / "timeseries.md"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[str]:
    return [t["query"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_data_source_is_a_variable_of_type_influxdb() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["DS"]["type"] == "datasource"
    assert variables["DS"]["query"] == "influxdb"
    for panel in dashboard()["panels"]:
        if panel["type"] != "text":
            assert panel["datasource"] == {"type": "influxdb", "uid": "${DS}"}
            assert all(t["datasource"]["uid"] == "${DS}" for t in panel["targets"])


def test_pump_variable_filters_every_query() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["pump"]["multi"] is True
    assert 'WITH KEY = "pump"' in variables["pump"]["query"]
    assert queries()
    for query in queries():
        assert '"pump" =~ /^$pump$/' in query
        assert "$timeFilter" in query


def test_queries_name_only_documented_measurements_and_fields() -> None:
    documented = set(re.findall(r"`([a-z_]+)`", TIMESERIES_DOC.read_text()))
    for query in queries():
        names = set(re.findall(r'"([a-z_]+)"', query))
        assert names <= documented, names - documented
        assert {READING, EVENT, ALERT} & names


def test_panels_cover_reservoir_flow_battery_and_alerts() -> None:
    text = " ".join(queries())
    for field in (
        "reservoir_ml",
        "delivered_total_ml",
        "basal_rate_ml_per_day",
        "battery_remaining_pct",
        "state_code",
    ):
        assert f'"{field}"' in text
