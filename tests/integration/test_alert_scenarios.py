"""The alert engine end to end: simulator scenarios through a real gateway process.

pumpsim (TCP) -> `pumpgw run` (a child process) -> a private Mosquitto and a time-series
database. The alert transitions are read back from MQTT (`.../pumps/{pump}/alerts`), the
retained active set from a late subscriber (`.../alerts/active`), and the `pump_alert`
points from VictoriaMetrics (v2 API, export) or InfluxDB 1.x (v1 API, InfluxQL).

Fast runs and two clocks. The engine judges for-durations, windows and rates on the
pump's clock (`device_time`), which `--speed max` runs about 10^5 times faster than the
wall, so those rules behave as in a real day; the rule defaults are used unchanged.
Telemetry loss is judged on the gateway's clock (`received_at`, `now`): at `--speed max`
a simulated dropout lasts milliseconds and raises nothing (the ward table says so), and
the default 300 s limit never passes during a test. The dropout test therefore runs at a
finite speed with `[alerts.per_pump.<id>] telemetry_lost_after_s = 1` for its one pump,
and expects the alert again once the run is over and the pump falls silent for good.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.points import PHASE_CODES
from simulator.scenarios import WARD_CYCLE
from tests.e2e import (
    Collector,
    GatewayProcess,
    Metrics,
    Ward,
    gateway_config,
    wait_until,
)
from tests.servers import Influx1, Mosquitto, VictoriaMetrics, log_tail

pytestmark = pytest.mark.integration

ARRIVE_S: Final = 60.0
"""Longest wait for the last records to reach the subscriber or the database."""
METRICS_S: Final = 30.0
RETAINED_S: Final = 10.0
SITE_PREFIX: Final = "alerts"
STATION: Final = "bed-1"

# --- the expectation table --------------------------------------------------------------

WARD_ARGS: Final = (
    "--scenario", "ward", "--pumps", str(len(WARD_CYCLE)), "--seed", "1",
    "--count", "576", "--interval", "300", "--speed", "max", "--wait-for-ack",
)
"""Pump i runs scenario i. Two simulated days at 300 s: the 24 h flow window must fill
before over-infusion can show (the engine's default, docs/alerts.md)."""

S, U, E = "start", "update", "end"
ACTIVE, LATCHED, ENDED = "active", "latched", "ended"


@dataclass(frozen=True, order=True)
class Alert:
    """One alert (one alert_id): its kind, its phases in order, its state at the end."""

    key: str
    """The alert kind; for the pump's own alarms `device_alarm:<code>`."""
    phases: tuple[str, ...]
    final: str
    """State in the retained active set after the run, or `ended` when it is not there."""


def alert(key: str, *phases: str, final: str) -> Alert:
    return Alert(key, phases, final)


STALL_AGAIN: Final = (U, U)
"""A latched motor stall that comes back: `update` (present again), then `update` (latched)."""
EXPECTED: Final[dict[str, tuple[Alert, ...]]] = {
    "normal": (),
    "low-reservoir": (
        alert("refill_due", S, final=ACTIVE),  # 0.5 day to the alarm volume: within 7 days
        alert("low_reservoir", S, final=ACTIVE),
        alert("device_alarm:low_reservoir", S, final=ACTIVE),
    ),
    "empty": (  # a 0.6-day fill is at or below the 1 mL empty level from the first reading
        alert("refill_due", S, final=ACTIVE),
        alert("low_reservoir", S, final=ACTIVE),
        alert("empty_reservoir", S, final=ACTIVE),
        alert("device_alarm:low_reservoir", S, final=ACTIVE),
    ),
    "motor-stall": (  # three stalls and a permanent one: one latching alert throughout
        alert("motor_stall", S, U, *STALL_AGAIN, *STALL_AGAIN, U, final=ACTIVE),
        alert("device_alarm:motor_stall", S, E, final=ENDED),
        alert("device_alarm:motor_stall", S, E, final=ENDED),
        alert("device_alarm:motor_stall", S, E, final=ENDED),
        alert("device_alarm:motor_stall", S, final=ACTIVE),
    ),
    "over-infusion": (alert("over_infusion", S, final=ACTIVE),),
    "under-infusion": (  # the occlusion is invisible to the motor: only the refill shows it
        alert("refill_discrepancy", S, final=ACTIVE),
    ),
    "battery-eri": (
        alert("low_battery_reset", S, U, final=LATCHED),
        alert("battery_eri", S, final=ACTIVE),
        alert("device_alarm:eri", S, final=ACTIVE),
    ),
    "battery-eos": (
        alert("battery_eri", S, U, final=LATCHED),
        alert("device_alarm:eri", S, E, final=ENDED),
        alert("battery_eos", S, final=ACTIVE),
        alert("device_alarm:eos", S, final=ACTIVE),
        alert("pump_stopped", S, final=ACTIVE),  # end of service stops the pump
    ),
    "refill-discrepancy": (  # it over-infuses all along, so over_infusion shows too
        alert("refill_discrepancy", S, final=ACTIVE),
        alert("over_infusion", S, final=ACTIVE),
    ),
    "pump-stopped": (alert("pump_stopped", S, U, final=LATCHED),),
    "dropout": (),  # at --speed max the gap lasts milliseconds of gateway time
    "clock-faults": (),
    "noisy-line": (),
}


def ward_expectation() -> dict[str, list[Alert]]:
    """Pump id -> its expected alerts, sorted."""
    return {
        f"P{index + 1:04d}": sorted(EXPECTED[name]) for index, name in enumerate(WARD_CYCLE)
    }


def test_expectation_table_covers_every_scenario() -> None:
    assert set(EXPECTED) == set(WARD_CYCLE)


# --- reading alerts back -----------------------------------------------------------------


def alert_key(transition: dict[str, Any]) -> str:
    """`low_reservoir`, or `device_alarm:eri`: the middle of `{pump}:{key}:{n}`."""
    key = str(transition["alert_id"]).split(":", 1)[1].rsplit(":", 1)[0]
    assert key.split(":")[0] == transition["alert_kind"], transition
    return key


def unique_transitions(collector: Collector) -> list[dict[str, Any]]:
    """Alert transitions in arrival order, each transition id once."""
    seen: dict[str, dict[str, Any]] = {}
    for payload in list(collector.payloads["alert"]):
        seen.setdefault(str(payload["transition_id"]), payload)
    return list(seen.values())


def alerts_seen(
    transitions: list[dict[str, Any]], active: dict[str, dict[str, str]]
) -> dict[str, list[Alert]]:
    """Pump id -> its alerts (phases in arrival order, final state from the active set)."""
    phases: dict[str, list[str]] = defaultdict(list)
    owner: dict[str, tuple[str, str]] = {}
    for t in transitions:
        phases[t["alert_id"]].append(t["phase"])
        owner[t["alert_id"]] = (t["pump_id"], alert_key(t))
    out: dict[str, list[Alert]] = defaultdict(list)
    for alert_id, (pump_id, key) in owner.items():
        final = active.get(pump_id, {}).get(alert_id, ENDED)
        out[pump_id].append(Alert(key, tuple(phases[alert_id]), final))
    return {pump_id: sorted(alerts) for pump_id, alerts in out.items()}


def retained_active_sets(port: int, prefix: str, pumps: int) -> dict[str, dict[str, str]]:
    """What a late subscriber gets: pump id -> {alert id: state} of each retained set."""
    collector = Collector(port, f"{prefix}/+/+/pumps/+/alerts/active")
    try:
        collector.wait_for(lambda: len(collector.retained) >= pumps, RETAINED_S)
        retained = dict(collector.retained)
    finally:
        collector.close()
    out: dict[str, dict[str, str]] = {}
    for payload in retained.values():
        data = json.loads(payload)
        out[data["pump_id"]] = {a["alert_id"]: a["state"] for a in data["alerts"]}
    return out


def phase_codes_by_series(transitions: list[dict[str, Any]]) -> Counter[tuple[str, str, int]]:
    """(pump, alert kind, phase code) -> how many transitions: what the series must hold."""
    return Counter((t["pump_id"], t["alert_kind"], PHASE_CODES[t["phase"]]) for t in transitions)


# --- processes ---------------------------------------------------------------------------


@contextmanager
def collecting(port: int, topic_filter: str) -> Iterator[Collector]:
    """A subscriber from before the first publish.

    Only the topics a test reads: Mosquitto drops messages for a subscriber that has more
    than 1000 queued (max_queued_messages), which the telemetry of a fast ward can reach.
    """
    collector = Collector(port, topic_filter)
    try:
        yield collector
    finally:
        collector.close()


@contextmanager
def ward_running(workdir: Path, *args: str, port: int | None = None) -> Iterator[Ward]:
    ward = Ward.start(workdir, *args, port=port)
    try:
        yield ward
    finally:
        if ward.proc.poll() is None:
            ward.proc.kill()
            ward.proc.wait()


@contextmanager
def gateway_running(config: Path, log_path: Path) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(config, log_path).start()
    try:
        yield gateway
    finally:
        if gateway.running:
            try:
                gateway.stop()
            except Exception:
                gateway.kill()
                raise


def alerts_filter(prefix: str) -> str:
    return f"{prefix}/+/+/pumps/+/alerts"


def explain(gateway: GatewayProcess, ward: Ward | None = None) -> str:
    text = f"\n--- gateway log\n{gateway.log()[-4000:]}"
    if ward is not None:
        text += f"\n--- pumpsim log\n{log_tail(ward.stderr_path)}"
    return text


def delivered(metrics: Metrics, sinks: tuple[str, ...]) -> bool:
    return metrics.value("pumpgw_outbox_pending_records") == 0 and all(
        metrics.value("pumpgw_sink_backlog_records", sink=sink) == 0 for sink in sinks
    )


def run_ward(
    tmp_path: Path,
    mosquitto: Mosquitto,
    influx: dict[str, Any],
    *ward_args: str,
    alerts: dict[str, Any] | None = None,
) -> tuple[str, list[dict[str, Any]], Metrics]:
    """Stream a ward through a gateway until everything is delivered; return what it sent."""
    prefix = f"{SITE_PREFIX}-{uuid.uuid4().hex[:8]}"
    extra: dict[str, dict[str, Any]] = {"gateway": {"site": prefix, "station": STATION}}
    if alerts is not None:
        extra["alerts"] = alerts
    with (
        collecting(mosquitto.port, alerts_filter(prefix)) as collector,
        ward_running(tmp_path, *ward_args) as ward,
    ):
        config = gateway_config(
            tmp_path, sim_port=ward.port, mqtt_port=mosquitto.port, prefix=prefix,
            influx=influx, extra=extra,
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            assert summary["all_acked"] is True, explain(gateway, ward)  # all stored
            metrics = gateway.wait_metrics(lambda m: delivered(m, ("mqtt", "influx")), METRICS_S)
            assert delivered(metrics, ("mqtt", "influx")), explain(gateway, ward)
            total = metrics.value("pumpgw_alert_transitions_total")
            assert collector.wait_for(
                lambda: len(unique_transitions(collector)) >= total, ARRIVE_S
            ), explain(gateway, ward)
            transitions = unique_transitions(collector)
    return prefix, transitions, metrics


# --- 1. every scenario yields exactly its alerts ----------------------------------------


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_each_ward_scenario_yields_exactly_its_alert_transitions_on_mqtt_and_in_the_series(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    influx1: Influx1,
    api: str,
) -> None:
    db = f"alerts_{uuid.uuid4().hex[:8]}"
    if api == "v2":
        influx = {"url": victoria_metrics.url, "api": "v2", "org": "test", "bucket": "pumps"}
    else:
        influx1.create_database(db)
        influx = {"url": influx1.url, "api": "v1", "bucket": db}
    prefix, transitions, metrics = run_ward(tmp_path, mosquitto, influx, *WARD_ARGS)

    expected = ward_expectation()
    pumps_with_alerts = sum(1 for alerts in expected.values() if alerts)
    active = retained_active_sets(mosquitto.port, prefix, pumps_with_alerts)
    seen = alerts_seen(transitions, active)
    for pump_id, scenario in zip(expected, WARD_CYCLE, strict=True):
        assert seen.get(pump_id, []) == expected[pump_id], f"{pump_id} runs {scenario}"
    assert set(seen) <= set(expected), "alerts for a pump that is not in the ward"
    assert len(transitions) == metrics.value("pumpgw_alert_transitions_total")
    for pump_id, alerts in active.items():  # the active set holds exactly the unended alerts
        unended = {t["alert_id"] for t in transitions if t["pump_id"] == pump_id} - {
            t["alert_id"] for t in transitions if t["phase"] == E
        }
        assert set(alerts) == unended, pump_id

    want = phase_codes_by_series(transitions)
    if api == "v2":
        series = victoria_metrics.export(
            f'{{__name__="pump_alert_phase_code",site="{prefix}"}}',
            min_points=len(transitions), timeout_s=ARRIVE_S,
        )
        got: Counter[tuple[str, str, int]] = Counter()
        for one in series:
            labels = one["metric"]
            for value in one["values"]:
                got[(labels["pump"], labels["alert_kind"], int(value))] += 1
        assert got == want
    else:
        answer = influx1.query(
            'SELECT "transition_id", "phase_code", "alert_kind", "pump" FROM "pump_alert"', db
        )
        rows = answer["results"][0]["series"][0]["values"]
        assert sorted(r[1] for r in rows) == sorted(t["transition_id"] for t in transitions)
        got = Counter((r[4], r[3], int(r[2])) for r in rows)
        assert got == want
