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
finite speed with `[alerts.defaults] telemetry_lost_after_s = 1` for its one pump, and
expects the alert again once the run is over and the pump falls silent for good.
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

import pytest

from gateway.points import PHASE_CODES
from simulator.scenarios import WARD_CYCLE
from tests.e2e import (
    Collector,
    GatewayProcess,
    Metrics,
    collecting,
    delivered,
    explain,
    gateway_config,
    gateway_running,
    wait_until,
    ward_running,
)
from tests.mqtt_helpers import publisher
from tests.servers import Influx1, Mosquitto, VictoriaMetrics, free_port

pytestmark = pytest.mark.integration


def argv(words: str) -> tuple[str, ...]:
    """Command-line arguments written as one line."""
    return tuple(words.split())


ARRIVE_S: Final = 60.0
"""Longest wait for the last records to reach the subscriber or the database."""
METRICS_S: Final = 30.0
RETAINED_S: Final = 10.0
SITE_PREFIX: Final = "alerts"
STATION: Final = "bed-1"

# --- the expectation table --------------------------------------------------------------

WARD_ARGS: Final = argv(
    f"--scenario ward --pumps {len(WARD_CYCLE)} --seed 1 --count 576 --interval 300 "
    "--speed max --wait-for-ack"
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
    # One alert per clinical condition: refill due gives way to low reservoir, and the pump's
    # own alarm for a condition a rule covers is evidence in that alert, not a second one.
    "low-reservoir": (
        alert("refill_due", S, E, final=ENDED),  # 0.5 day to the alarm volume: within 7 days
        alert("low_reservoir", S, final=ACTIVE),
    ),
    "empty": (  # a 0.6-day fill is at or below the 1 mL empty level from the first reading:
        alert("empty_reservoir", S, final=ACTIVE),  # one reservoir alert, at its empty level
    ),
    "motor-stall": (  # three stalls and a permanent one: one latching alert throughout
        alert("motor_stall", S, U, *STALL_AGAIN, *STALL_AGAIN, U, final=ACTIVE),
    ),
    "over-infusion": (alert("over_infusion", S, final=ACTIVE),),
    "under-infusion": (  # the occlusion is invisible to the motor: only the refill shows it
        alert("refill_discrepancy", S, final=ACTIVE),
    ),
    "battery-eri": (
        alert("low_battery_reset", S, U, final=LATCHED),
        alert("battery_eri", S, final=ACTIVE),
    ),
    "battery-eos": (  # end of service stops the pump: its alert says so, no pump_stopped
        alert("battery_eri", S, U, final=LATCHED),
        alert("battery_eos", S, final=ACTIVE),
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
    return {f"P{index + 1:04d}": sorted(EXPECTED[name]) for index, name in enumerate(WARD_CYCLE)}


def test_expectation_table_covers_every_scenario() -> None:
    assert set(EXPECTED) == set(WARD_CYCLE)


# --- reading alerts back -----------------------------------------------------------------


def alert_key(transition: dict[str, Any]) -> str:
    """`low_reservoir`, or `device_alarm:eri`: the middle of `{pump}:{key}:{token}`."""
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


def alerts_filter(prefix: str) -> str:
    return f"{prefix}/+/+/pumps/+/alerts"


def run_ward(
    tmp_path: Path,
    mosquitto: Mosquitto,
    influx: dict[str, Any],
    *ward_args: str,
) -> tuple[str, list[dict[str, Any]], Metrics]:
    """Stream a ward through a gateway until all is delivered; return its alert transitions."""
    prefix = f"{SITE_PREFIX}-{uuid.uuid4().hex[:8]}"
    extra: dict[str, dict[str, Any]] = {"gateway": {"site": prefix, "station": STATION}}
    with (
        collecting(mosquitto.port, alerts_filter(prefix), raw=True) as collector,
        ward_running(tmp_path, *ward_args) as ward,
    ):
        config = gateway_config(
            tmp_path,
            sim_port=ward.port,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            influx=influx,
            extra=extra,
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
            min_points=len(transitions),
            timeout_s=ARRIVE_S,
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


# --- 1b. telemetry loss needs gateway time ------------------------------------------------

DROPOUT_ARGS: Final = argv(
    "--scenario dropout --pumps 1 --seed 1 --count 180 --interval 20 --speed 240 --wait-for-ack"
)
"""One simulated hour in 15 s of wall time: frames every 0.08 s, no frames for 3 s (40-60 %)."""
LOST_AFTER_S: Final = 1.0
"""[alerts.defaults] telemetry_lost_after_s: 12 reading intervals, a third of the dropout."""


def test_dropout_at_a_finite_speed_raises_telemetry_lost_and_ends_it_when_frames_return(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = f"{SITE_PREFIX}-{uuid.uuid4().hex[:8]}"
    extra: dict[str, dict[str, Any]] = {
        "gateway": {"site": prefix, "station": STATION},
        "alerts": {"defaults": {"telemetry_lost_after_s": LOST_AFTER_S}},
    }
    with (
        collecting(mosquitto.port, alerts_filter(prefix), raw=True) as collector,
        ward_running(tmp_path, *DROPOUT_ARGS) as ward,
    ):
        config = gateway_config(
            tmp_path, sim_port=ward.port, mqtt_port=mosquitto.port, prefix=prefix, extra=extra
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            assert summary["all_acked"] is True, explain(gateway, ward)
            # After the run the pump is silent for good: telemetry is lost again.
            assert collector.wait_for(
                lambda: [t["phase"] for t in unique_transitions(collector)] == [S, E, S],
                ARRIVE_S,
            ), f"{unique_transitions(collector)}" + explain(gateway, ward)
            transitions = unique_transitions(collector)
            active = retained_active_sets(mosquitto.port, prefix, 1)
            status = retained_payloads(mosquitto.port, f"{prefix}/+/+/pumps/+/status", 1)

    assert {t["alert_kind"] for t in transitions} == {"telemetry_lost"}
    first, ended, again = transitions
    assert first["alert_id"] == ended["alert_id"] != again["alert_id"]
    assert first["priority"] == "PL"
    assert first["latching"] is False
    assert first["device_time"] is None  # raised by the gateway's clock, not by a message
    assert ended["device_time"] is not None
    assert ended["value"] > LOST_AFTER_S  # the gap, in gateway seconds
    assert active == {"P0001": {again["alert_id"]: ACTIVE}}
    assert [s["telemetry"] for s in status] == ["lost"]


def retained_payloads(port: int, topic_filter: str, count: int) -> list[dict[str, Any]]:
    """The retained messages a late subscriber to `topic_filter` gets (waits for `count`)."""
    collector = Collector(port, topic_filter)
    try:
        collector.wait_for(lambda: len(collector.retained) >= count, RETAINED_S)
        return [json.loads(payload) for payload in collector.retained.values()]
    finally:
        collector.close()


# --- 3. operator acknowledgements ---------------------------------------------------------

DAY_WARD_ARGS: Final = argv(
    "--scenario ward --pumps 10 --seed 1 --count 288 --interval 300 --speed max --wait-for-ack"
)
"""One simulated day; P0002 ends with low_reservoir active, P0010 with pump_stopped latched."""
DAY_WARD_PUMPS_WITH_ALERTS: Final = 9
"""All but P0001 (normal); P0005's over-infusion shows within the day (from 12 h of readings)."""
REFILLED_ARGS: Final = argv(
    "--scenario normal --pumps 2 --seed 1 --count 12 --interval 300 --speed max --wait-for-ack"
)
"""P0001 and P0002 again, after a reboot (a new boot id), with well-filled reservoirs."""
ACKED_AT: Final = "2026-01-05T08:30:00Z"


@dataclass
class Station:
    """One gateway with a live alerts subscriber, for tests that act between ward runs."""

    tmp_path: Path
    mosquitto: Mosquitto
    prefix: str
    collector: Collector
    gateway: GatewayProcess
    sim_port: int

    @property
    def ack_topic(self) -> str:
        """The operator's own ack topic: the last level is its MQTT user name."""
        return f"{self.prefix}/{self.prefix}/{STATION}/ack/nurse.jones"

    def stream(self, *args: str) -> None:
        """Run a ward on the station's line until everything it sent is delivered."""
        with ward_running(self.tmp_path, *args, port=self.sim_port) as ward:
            summary = ward.summary()
        assert summary["all_acked"] is True, explain(self.gateway, ward)
        self.wait_delivered()

    def wait_delivered(self) -> Metrics:
        metrics = self.gateway.wait_metrics(lambda m: delivered(m, ("mqtt",)), METRICS_S)
        assert delivered(metrics, ("mqtt",)), explain(self.gateway)
        total = metrics.value("pumpgw_alert_transitions_total")
        # After a restart the counter starts again at 0: wait for at least as many.
        assert self.collector.wait_for(
            lambda: len(unique_transitions(self.collector)) >= total, ARRIVE_S
        ), explain(self.gateway)
        return metrics

    def acknowledge(self, payload: bytes) -> None:
        """Publish on the ack topic as an operator's dashboard would (QoS 1)."""
        with publisher(self.mosquitto.port) as client:
            assert client.publish(self.ack_topic, payload, timeout_s=RETAINED_S).accepted

    def alert_id(self, pump_id: str, kind: str) -> str:
        """The id of the first alert of that kind for that pump (ids are keyed: not guessable)."""
        return next(
            str(t["alert_id"])
            for t in unique_transitions(self.collector)
            if t["pump_id"] == pump_id and t["alert_kind"] == kind
        )

    def phases(self, alert_id: str) -> list[str]:
        return [t["phase"] for t in unique_transitions(self.collector) if t["alert_id"] == alert_id]

    def wait_phases(self, alert_id: str, phases: list[str]) -> None:
        assert self.collector.wait_for(lambda: self.phases(alert_id) == phases, ARRIVE_S), (
            f"{alert_id}: {self.phases(alert_id)}, expected {phases}" + explain(self.gateway)
        )

    def active(self) -> dict[str, dict[str, str]]:
        """The retained active sets of the day ward's pumps."""
        return retained_active_sets(self.mosquitto.port, self.prefix, DAY_WARD_PUMPS_WITH_ALERTS)

    def restart(self, how: str) -> None:
        if how == "SIGKILL":
            self.gateway.kill()
        else:
            assert self.gateway.stop() == 0, explain(self.gateway)
        self.gateway = GatewayProcess(self.gateway.config, self.gateway.log_path).start()


@contextmanager
def station(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Station]:
    prefix = f"{SITE_PREFIX}-{uuid.uuid4().hex[:8]}"
    sim_port = free_port()
    config = gateway_config(
        tmp_path,
        sim_port=sim_port,
        mqtt_port=mosquitto.port,
        prefix=prefix,
        extra={"gateway": {"site": prefix, "station": STATION}},
    )
    with collecting(mosquitto.port, alerts_filter(prefix), raw=True) as collector:
        gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
        here = Station(tmp_path, mosquitto, prefix, collector, gateway, sim_port)
        try:
            yield here
        finally:
            if here.gateway.running:
                here.gateway.stop()


def ack(alert_id: str, by: str = "nurse.jones", at: str | None = ACKED_AT) -> bytes:
    body: dict[str, Any] = {"alert_id": alert_id, "by": by}
    if at is not None:
        body["at"] = at
    return json.dumps(body).encode()


def test_acknowledgement_records_who_and_when_and_a_latching_alert_ends_once_also_resolved(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with station(tmp_path, mosquitto) as st:
        st.stream(*DAY_WARD_ARGS)
        low, stopped = st.alert_id("P0002", "low_reservoir"), st.alert_id("P0010", "pump_stopped")
        assert st.phases(stopped) == [S, U]  # resolved, latched: waits for a person
        assert st.phases(low) == [S]  # still low

        st.acknowledge(ack(stopped))
        st.wait_phases(stopped, [S, U, "acknowledged", E])
        st.acknowledge(ack(low))
        st.wait_phases(low, [S, "acknowledged"])  # acknowledged, but the reservoir is still low
        active = st.active()
        assert active["P0010"] == {}
        assert active["P0002"][low] == ACTIVE

        st.stream(*REFILLED_ARGS)  # P0002 reboots with a full reservoir: now it is resolved
        st.wait_phases(low, [S, "acknowledged", E])
        active = st.active()
    by_id = {t["transition_id"]: t for t in unique_transitions(st.collector)}
    acked = [t for t in by_id.values() if t["phase"] == "acknowledged"]
    assert {t["alert_id"] for t in acked} == {stopped, low}
    started = {t["alert_id"]: t["at"] for t in by_id.values() if t["phase"] == S}
    for t in acked:
        assert t["acknowledged_by"] == "nurse.jones"
        # The console's clock said ACKED_AT, before the alert started: the time recorded is
        # bounded to the alert's life, and `at` is when the gateway received it.
        assert started[t["alert_id"]] > ACKED_AT
        assert t["acknowledged_at"] == started[t["alert_id"]]
        assert t["at"] > t["acknowledged_at"]
        assert t["inactivation"] == "alert-acknowledged"
        assert t["device_time"] is None  # a person did it, not a pump message
        assert "recorded here only" in t["text"]  # never presented as clearing the pump
    ended_low = next(t for t in by_id.values() if t["alert_id"] == low and t["phase"] == E)
    assert ended_low["acknowledged_by"] == "nurse.jones"
    assert low not in active["P0002"]
    assert active["P0010"] == {}


def test_malformed_acknowledgements_change_nothing_and_are_logged_clearly(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with station(tmp_path, mosquitto) as st:
        st.stream(*DAY_WARD_ARGS)
        low = st.alert_id("P0002", "low_reservoir")
        before = unique_transitions(st.collector)
        active_before = st.active()

        st.acknowledge(ack("P0010:pump_stopped:1", by="dr.who"))  # not the publishing user
        st.acknowledge(b"ack P0010")
        st.acknowledge(ack("P0010:pump_stopped:99"))  # valid, but no such alert
        metrics = st.gateway.wait_metrics(
            lambda m: m.value("pumpgw_operator_acks_total", result="rejected") >= 3, METRICS_S
        )
        st.acknowledge(ack(low))  # a valid one afterwards: the earlier ones left no change
        st.wait_phases(low, [S, "acknowledged"])
        after = unique_transitions(st.collector)
        active_after = st.active()
        log = st.gateway.log()

    assert metrics.value("pumpgw_operator_acks_total", result="rejected") == 3
    assert metrics.value("pumpgw_operator_acks_total", result="accepted") == 0
    assert [t["transition_id"] for t in after[: len(before)]] == [
        t["transition_id"] for t in before
    ]
    assert [(t["alert_id"], t["phase"]) for t in after[len(before) :]] == [(low, "acknowledged")]
    assert active_after == active_before  # an acknowledgement does not change the state
    refused = [line for line in log.splitlines() if "refused" in line and "acknowledgement" in line]
    assert len(refused) == 3, log[-2000:]  # each kind of refusal logged, at WARNING
    assert all("WARNING" in line for line in refused)
    assert "'by' is 'dr.who' but the message was published by MQTT user 'nurse.jones'" in refused[0]
    assert "no active alert 'P0010:pump_stopped:99'" in refused[2]


# --- 4. a restart in the middle of an alert -----------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_restart_mid_alert_neither_repeats_a_start_nor_loses_the_end_and_keeps_the_active_set(
    tmp_path: Path, mosquitto: Mosquitto, how: str
) -> None:
    with station(tmp_path, mosquitto) as st:
        st.stream(*DAY_WARD_ARGS)
        low = st.alert_id("P0002", "low_reservoir")
        active_before = st.active()
        assert set(active_before["P0002"]) == {low}  # refill due gave way to low reservoir
        before = {t["transition_id"] for t in unique_transitions(st.collector)}

        st.restart(how)
        assert wait_until(lambda: st.gateway.health() is not None, METRICS_S), explain(st.gateway)
        # After a SIGKILL the MQTT cursor on disk lags (it is written once a second), so the
        # restarted gateway sends the tail again, older retained sets included: at least once.
        st.wait_delivered()
        assert st.active() == active_before

        st.stream(*REFILLED_ARGS)  # after the restart P0002 reboots with a full reservoir
        st.wait_phases(low, [S, U])  # resolved, latched until acknowledged
        st.acknowledge(ack(low))
        st.wait_phases(low, [S, U, "acknowledged", E])
        active_after = st.active()
        transitions = unique_transitions(st.collector)

    assert not st.collector.conflicting_ids("alert"), "a transition id sent with two payloads"
    new = sorted(
        (t["alert_id"], t["phase"]) for t in transitions if t["transition_id"] not in before
    )
    assert new == sorted([(low, U), (low, "acknowledged"), (low, E)])
    assert active_after == {**active_before, "P0002": {}}
