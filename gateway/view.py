"""The live terminal view of `pumpgw demo`: pumps, latest readings, active alerts, backlog.

Rendering only: it reads the gateway's observation and pump views and returns a
rich renderable; the demo redraws it in place.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gateway.health import Observation
from gateway.pipeline import PumpView
from schemas.models import INTENDED_USE, AlertTransition

PRIORITY_STYLE = {"PH": "bold white on red", "PM": "bold black on yellow", "PL": "cyan", "PN": ""}


def _reservoir(view: PumpView) -> Text:
    if view.reservoir_ml is None:
        return Text("-")
    style = ""
    if view.low_reservoir_alarm_ml is not None and view.reservoir_ml <= view.low_reservoir_alarm_ml:
        style = "bold red"
    return Text(f"{view.reservoir_ml:6.2f} mL", style=style)


def _alerts_cell(alerts: Sequence[AlertTransition]) -> Text:
    text = Text()
    for alert in alerts:
        if text:
            text.append(" ")
        label = alert.alert_kind + (" ✓" if alert.acknowledged_by else "")
        text.append(f" {label} ", style=PRIORITY_STYLE.get(alert.priority.value, ""))
    return text


def pump_table(
    pumps: Iterable[PumpView], active: Mapping[str, Sequence[AlertTransition]], now_s: float
) -> Table:
    table = Table(title="Pumps", expand=True, title_justify="left")
    for column in (
        "Pump",
        "Drug",
        "Reservoir (pump est.)",
        "Pump state",
        "Battery",
        "Seen",
        "Readings",
        "Active alerts",
    ):
        table.add_column(column)
    for view in sorted(pumps, key=lambda p: p.pump_id):
        seen = f"{now_s - view.last_received_s:4.0f} s ago" if view.last_received_s else "-"
        state = Text(
            view.pump_state or "-",
            style="bold red" if view.pump_state in ("stopped", "stalled") else "",
        )
        if view.telemetry != "ok":
            state = Text("telemetry lost", style="bold magenta")
        table.add_row(
            view.pump_id,
            view.drug,
            _reservoir(view),
            state,
            view.battery_state or "-",
            seen,
            str(view.readings),
            _alerts_cell(active.get(view.pump_id, ())),
        )
    return table


def status_line(obs: Observation) -> Text:
    parts = [
        f"frames {obs.frames_in}",
        f"accepted {sum(obs.accepted_by_kind.values())}",
        f"quarantined {sum(obs.quarantined_by_reason.values())}",
        f"duplicates {obs.duplicates}",
        f"alert transitions {obs.alert_transitions}",
    ]
    for sink in obs.sinks:
        state = "up" if sink.connected else "DOWN"
        parts.append(f"{sink.name} {state} backlog {sink.backlog_records}")
    for src in obs.sources:
        parts.append(f"line {'up' if src.connected else 'DOWN'}")
    return Text("  |  ".join(parts))


def recent_table(recent: Iterable[AlertTransition]) -> Table:
    table = Table(title="Recent alert transitions", expand=True, title_justify="left")
    for column in ("Time", "Pump", "Priority", "Phase", "Alert", "Text"):
        table.add_column(column, overflow="fold")
    for alert in reversed(list(recent)):
        table.add_row(
            alert.at.strftime("%H:%M:%S"),
            alert.pump_id,
            Text(alert.priority.value, style=PRIORITY_STYLE.get(alert.priority.value, "")),
            alert.phase.value
            + (f" by {alert.acknowledged_by}" if alert.phase.value == "acknowledged" else ""),
            alert.alert_kind,
            alert.text,
        )
    return table


def render(
    obs: Observation,
    pumps: Iterable[PumpView],
    active: Mapping[str, Sequence[AlertTransition]],
    recent: Iterable[AlertTransition],
    header: str,
) -> Group:
    now_s = time.time()
    return Group(
        Panel(Text(header + "\n" + INTENDED_USE, style="dim"), title="pumpgw demo"),
        pump_table(pumps, active, now_s),
        recent_table(recent),
        status_line(obs),
    )
