"""The alert engine: every rule's edges, hysteresis, delays, latching, acks, replay and restart.

Times are explicit: `t_s` is the pump's clock (device time) in seconds after T0 and, unless a
test says otherwise, the gateway receives each message at the same instant.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.rules import AlertEngine, RuleOverrides, RulesConfig, RuleSettings
from schemas.models import (
    INTENDED_USE,
    Acknowledgement,
    AlarmState,
    AlertTransition,
    AlertType,
    BatteryState,
    DeviceAlarm,
    DeviceEvent,
    DeviceInfo,
    Drug,
    EventKind,
    Inactivation,
    Phase,
    Prescription,
    Priority,
    PumpState,
    Reading,
)

T0 = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
HOUR_S = 3600.0
DAY_S = 86400.0
REPO = Path(__file__).resolve().parents[2]


def at(t_s: float) -> datetime:
    return T0 + timedelta(seconds=t_s)


@dataclass
class Feed:
    """One simulated pump talking to an engine; delivered volume follows basal x factor."""

    engine: AlertEngine
    pump_id: str = "P0001"
    boot_id: str = "b1"
    drug: Drug = Drug.MORPHINE
    capacity_ml: float = 20.0
    alarm_ml: float = 2.0
    basal_ml_per_day: float = 0.5
    factor: float = 1.0
    seq: int = 0
    delivered_ml: float = 100.0
    last_t_s: float = 0.0
    log: list[AlertTransition] = field(default_factory=list)

    def _ids(self, t_s: float, now_s: float | None) -> dict[str, Any]:
        self.seq += 1
        received = at(t_s if now_s is None else now_s)
        return {"pump_id": self.pump_id, "boot_id": self.boot_id, "seq": self.seq,
                "device_time": at(t_s), "received_at": received}

    def _send(self, message: Reading | DeviceEvent | DeviceInfo,
              now_s: float | None) -> list[AlertTransition]:
        now = message.received_at if now_s is None else at(now_s)
        out = self.engine.on_message(message, now)
        self.log.extend(out)
        return out

    def reading(self, t_s: float, reservoir_ml: float = 10.0, *, now_s: float | None = None,
                delivered_ml: float | None = None, pump_state: PumpState = PumpState.RUNNING,
                **fields: Any) -> list[AlertTransition]:
        if delivered_ml is None:
            if pump_state is PumpState.RUNNING:
                elapsed_d = (t_s - self.last_t_s) / DAY_S
                self.delivered_ml += self.basal_ml_per_day * self.factor * elapsed_d
        else:
            self.delivered_ml = delivered_ml
        self.last_t_s = t_s
        message = Reading(
            **self._ids(t_s, now_s), drug=self.drug, pump_state=pump_state,
            reservoir_ml=reservoir_ml, reservoir_capacity_ml=self.capacity_ml,
            low_reservoir_alarm_ml=self.alarm_ml, basal_rate_ml_per_day=self.basal_ml_per_day,
            delivered_total_ml=self.delivered_ml, **fields,
        )
        return self._send(message, now_s)

    def event(self, t_s: float, kind: EventKind, *, now_s: float | None = None,
              **fields: Any) -> list[AlertTransition]:
        return self._send(DeviceEvent(**self._ids(t_s, now_s), event=kind, **fields), now_s)

    def info(self, t_s: float, *, bolus_dose_ml: float = 0.0,
             boluses_per_day_max: int = 0) -> list[AlertTransition]:
        prescription = Prescription(
            basal_rate_ml_per_day=self.basal_ml_per_day, bolus_dose_ml=bolus_dose_ml,
            boluses_per_day_max=boluses_per_day_max, low_reservoir_alarm_ml=self.alarm_ml,
        )
        message = DeviceInfo(
            **self._ids(t_s, None), model="8637-20", serial="NAB123", firmware="1.0",
            reservoir_capacity_ml=self.capacity_ml, drug=self.drug,
            concentration_mg_per_ml=10.0, prescription=prescription,
        )
        return self._send(message, None)

    def run(self, start_s: float, end_s: float, step_s: float = 900.0,
            reservoir_ml: float = 10.0) -> list[AlertTransition]:
        """Readings every step_s from start_s (exclusive) to end_s (inclusive)."""
        out: list[AlertTransition] = []
        t_s = start_s
        while t_s < end_s:
            t_s = min(t_s + step_s, end_s)
            out += self.reading(t_s, reservoir_ml)
        return out


def ack(engine: AlertEngine, alert_id: str, now_s: float, by: str = "nurse.kim",
        ack_at_s: float | None = None) -> list[AlertTransition]:
    when = None if ack_at_s is None else at(ack_at_s)
    return engine.on_acknowledgement(Acknowledgement(alert_id=alert_id, by=by, at=when),
                                     at(now_s))


def named(alert_id: str) -> str:
    """`{pump}:{key}` of an alert id, after checking its unguessable 16-hex-digit token."""
    name, _, token = alert_id.rpartition(":")
    assert re.fullmatch(r"[0-9a-f]{16}", token), alert_id
    return name


def steps(transitions: list[AlertTransition]) -> list[tuple[str, str, str]]:
    return [(t.alert_kind, t.phase.value, t.state.value) for t in transitions]


def of_kind(transitions: list[AlertTransition], kind: str) -> list[tuple[str, str]]:
    return [(t.phase.value, t.state.value) for t in transitions if t.alert_kind == kind]


def starts(transitions: list[AlertTransition], kind: str) -> list[AlertTransition]:
    return [t for t in transitions if t.alert_kind == kind and t.phase is Phase.START]


@pytest.fixture
def feed() -> Feed:
    return Feed(AlertEngine(RulesConfig()))


def feed_with(pump_id: str = "P0001", **settings: Any) -> Feed:
    return Feed(AlertEngine(RulesConfig(defaults=RuleSettings(**settings))), pump_id=pump_id)


# -- configuration ---------------------------------------------------------------------


def test_rule_overrides_offer_every_rule_setting() -> None:
    assert set(RuleOverrides.model_fields) == set(RuleSettings.model_fields)


def test_every_rule_setting_is_documented_with_a_default() -> None:
    for name, info in RuleSettings.model_fields.items():
        assert info.description, name
        assert not info.is_required(), name


def test_settings_defaults_carry_domain_numbers() -> None:
    s = RuleSettings()
    assert (s.over_infusion_pct, s.under_infusion_pct, s.refill_discrepancy_pct) == (14.5,) * 3
    assert (s.refill_discrepancy_small_ml, s.refill_discrepancy_large_ml) == (1.0, 2.0)
    assert s.low_reservoir_alarm_ml is None
    assert s.pump_stopped_for_s == 600.0


@pytest.mark.parametrize(
    ("pump_id", "drug", "expected_alarm_ml", "expected_refill_days"),
    [
        ("P0009", Drug.MORPHINE, None, 7.0),
        ("P0009", Drug.BACLOFEN, 4.0, 10.0),
        ("P0001", Drug.BACLOFEN, 5.0, 10.0),
        ("P0001", Drug.MORPHINE, 5.0, 7.0),
        ("P0001", None, 5.0, 7.0),
    ],
)
def test_settings_for_prefers_pump_over_drug_over_defaults(
    pump_id: str, drug: Drug | None, expected_alarm_ml: float | None, expected_refill_days: float
) -> None:
    config = RulesConfig(
        per_drug={Drug.BACLOFEN: RuleOverrides(low_reservoir_alarm_ml=4.0, refill_due_days=10.0)},
        per_pump={"P0001": RuleOverrides(low_reservoir_alarm_ml=5.0)},
    )
    s = config.settings_for(pump_id, drug)
    assert (s.low_reservoir_alarm_ml, s.refill_due_days) == (expected_alarm_ml,
                                                             expected_refill_days)


def test_rules_config_reads_the_documented_toml_sections() -> None:
    text = """
    [alerts.defaults]
    telemetry_lost_after_s = 120
    [alerts.per_drug.baclofen]
    low_reservoir_alarm_ml = 4.0
    [alerts.per_pump."P0001"]
    pump_stopped_for_s = 300
    """
    config = RulesConfig.model_validate(tomllib.loads(text)["alerts"])
    s = config.settings_for("P0001", Drug.BACLOFEN)
    assert (s.telemetry_lost_after_s, s.low_reservoir_alarm_ml, s.pump_stopped_for_s) == (
        120.0, 4.0, 300.0)


def test_documented_toml_example_is_a_valid_alerts_section() -> None:
    doc = (REPO / "docs" / "alerts.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    config = RulesConfig.model_validate(tomllib.loads(block)["alerts"])
    assert config.settings_for("P0002", Drug.BACLOFEN).low_reservoir_alarm_ml == 4.0
    assert config.settings_for("P0001", Drug.BACLOFEN).low_reservoir_alarm_ml == 5.0


def test_docs_list_every_setting_with_its_default() -> None:
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
        for line in (REPO / "docs" / "alerts.md").read_text().splitlines()
        if line.startswith("| `")
    }
    for name, value in RuleSettings().model_dump().items():
        shown = rows[name]
        if isinstance(value, bool):
            assert shown == str(value).lower(), name
        else:
            assert shown == "pump's own" if value is None else float(shown) == value, name


@pytest.mark.parametrize(
    "bad",
    [
        {"defaults": {"no_such_rule": 1}},
        {"defaults": {"over_infusion_pct": -1}},
        {"defaults": {"telemetry_lost_after_s": 0}},
        {"defaults": {"empty_reservoir_ml": float("nan")}},
        {"per_drug": {"aspirin": {}}},
        {"per_pump": {"P1": {"refill_due_days": -2}}},
    ],
)
def test_rules_config_rejects_unknown_keys_and_impossible_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RulesConfig.model_validate(bad)


# -- low and empty reservoir -----------------------------------------------------------


@pytest.mark.parametrize(
    ("reservoir_ml", "pump_alarm_ml", "configured_ml", "started"),
    [
        (2.01, 2.0, None, False),
        (2.0, 2.0, None, True),
        (1.5, 2.0, None, True),
        (3.9, 2.0, 4.0, True),
        (4.01, 2.0, 4.0, False),
        (1.9, 2.0, 1.5, True),  # a configured volume below the pump's never lowers it
        (2.9, 3.0, None, True),
    ],
)
def test_low_reservoir_starts_at_or_below_the_alarm_volume(
    reservoir_ml: float, pump_alarm_ml: float, configured_ml: float | None, started: bool
) -> None:
    f = feed_with(low_reservoir_alarm_ml=configured_ml)
    f.alarm_ml = pump_alarm_ml
    out = f.reading(0, reservoir_ml)
    assert bool(starts(out, "low_reservoir")) is started
    if started:
        (t,) = starts(out, "low_reservoir")
        assert (t.priority, t.alert_type, t.latching) == (Priority.MEDIUM, AlertType.TECHNICAL,
                                                           True)
        assert (t.value, t.threshold, t.unit) == (
            reservoir_ml, max(configured_ml or 0.0, pump_alarm_ml), "mL")


def test_low_reservoir_text_says_the_volume_is_an_estimate_not_a_measurement(feed: Feed) -> None:
    (t,) = starts(feed.reading(0, 1.8), "low_reservoir")
    assert "1.8 mL" in t.text
    assert "2.0 mL" in t.text
    assert "estimate computed from the programmed rate" in t.text
    assert "not a measurement" in t.text


@pytest.mark.parametrize(
    ("values_ml", "expected"),
    [
        ([1.9, 2.5, 3.0, 2.1, 1.9], [("start", "active")]),
        ([1.9, 3.01], [("start", "active"), ("update", "latched")]),
        ([1.9, 3.01, 2.5, 1.9], [("start", "active"), ("update", "latched"),
                                 ("update", "active")]),
        ([2.1, 2.0, 2.1, 2.0], [("start", "active")]),
    ],
    ids=["within-margin", "refill", "latched-then-low-again", "noise-at-threshold"],
)
def test_low_reservoir_clears_only_above_alarm_plus_margin(
    feed: Feed, values_ml: list[float], expected: list[tuple[str, str]]
) -> None:
    for i, v in enumerate(values_ml):
        feed.reading(i * 60, v)
    assert of_kind(feed.log, "low_reservoir") == expected


def test_low_reservoir_latches_until_acknowledged_then_ends(feed: Feed) -> None:
    (start,) = starts(feed.reading(0, 1.9), "low_reservoir")
    assert of_kind(feed.reading(60, 18.0), "low_reservoir") == [("update", "latched")]
    out = ack(feed.engine, start.alert_id, 120)
    assert steps(out) == [("low_reservoir", "acknowledged", "latched"),
                          ("low_reservoir", "end", "inactive")]
    assert feed.engine.active_alerts("P0001") == ()


def test_low_reservoir_acknowledged_first_ends_when_refilled(feed: Feed) -> None:
    (start,) = starts(feed.reading(0, 1.9), "low_reservoir")
    assert steps(ack(feed.engine, start.alert_id, 30)) == [
        ("low_reservoir", "acknowledged", "active")]
    assert of_kind(feed.reading(60, 2.5), "low_reservoir") == []
    (end,) = [t for t in feed.reading(120, 18.0) if t.alert_kind == "low_reservoir"]
    assert (end.phase, end.state, end.inactivation) == (
        Phase.END, AlarmState.INACTIVE, Inactivation.ACKNOWLEDGED)
    assert end.acknowledged_by == "nurse.kim"


def test_low_reservoir_waits_out_its_for_duration_in_device_time() -> None:
    f = feed_with(low_reservoir_for_s=300)
    f.reading(0, 1.9, now_s=0)
    assert f.reading(299, 1.9, now_s=0) == []
    (t,) = starts(f.reading(300, 1.9, now_s=0), "low_reservoir")
    assert (t.device_time, t.at) == (at(300), at(0))


@pytest.mark.parametrize(
    ("reservoir_ml", "started"), [(1.01, False), (1.0, True), (0.0, True)]
)
def test_empty_reservoir_is_high_priority_at_or_below_one_ml(
    feed: Feed, reservoir_ml: float, started: bool
) -> None:
    out = starts(feed.reading(0, reservoir_ml), "empty_reservoir")
    assert bool(out) is started
    assert all(t.priority is Priority.HIGH and t.latching for t in out)


def test_empty_reservoir_returns_to_low_above_empty_plus_margin_after_acknowledgement(
    feed: Feed,
) -> None:
    (start,) = starts(feed.reading(0, 0.8), "empty_reservoir")
    ack(feed.engine, start.alert_id, 10)
    assert feed.reading(60, 1.5) + feed.reading(120, 2.0) == []
    (back,) = feed.reading(180, 2.01)  # one alert: the empty level ends, low goes on
    assert (back.alert_id, back.phase, back.alert_kind, back.priority) == (
        start.alert_id, Phase.UPDATE, "low_reservoir", Priority.MEDIUM)
    assert of_kind(feed.reading(240, 3.01), "low_reservoir") == [("end", "inactive")]


# -- refill due ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reservoir_ml", "basal", "bolus_ml", "boluses", "days", "started"),
    [
        (5.5, 0.5, 0.0, 0, 7.0, True),
        (5.6, 0.5, 0.0, 0, 7.2, False),
        (9.0, 0.5, 0.1, 5, 7.0, True),
        (9.0, 0.5, 0.0, 0, 14.0, False),
        (12.0, 0.0, 0.0, 0, None, False),
    ],
    ids=["at-limit", "above", "boluses-count", "boluses-unknown", "no-consumption"],
)
def test_refill_due_projects_days_to_the_alarm_volume(
    reservoir_ml: float, basal: float, bolus_ml: float, boluses: int,
    days: float | None, started: bool,
) -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=basal)
    if boluses:
        f.info(0, bolus_dose_ml=bolus_ml, boluses_per_day_max=boluses)
    out = starts(f.reading(10, reservoir_ml), "refill_due")
    assert bool(out) is started
    for t in out:
        assert (t.priority, t.alert_type, t.latching, t.unit) == (
            Priority.LOW, AlertType.ADVISORY, False, "d")
        assert t.value == pytest.approx(days)


def test_refill_due_is_non_latching_and_clears_with_hysteresis(feed: Feed) -> None:
    feed.reading(0, 5.0)  # (5 - 2) / 0.5 = 6 days
    assert of_kind(feed.reading(60, 6.0), "refill_due") == []  # 8 days: inside the margin
    assert of_kind(feed.reading(120, 6.01), "refill_due") == [("end", "inactive")]
    assert of_kind(feed.reading(180, 5.6), "refill_due") == []  # 7.2 days
    assert of_kind(feed.reading(240, 5.5), "refill_due") == [("start", "active")]  # 7.0 days


# -- motor stall -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["event", "pump_state", "device_alarm"],
)
def test_motor_stall_reported_by_the_pump_starts_at_once(feed: Feed, how: str) -> None:
    feed.reading(0)
    if how == "event":
        out = feed.event(60, EventKind.MOTOR_STALL_START)
    elif how == "pump_state":
        out = feed.reading(60, pump_state=PumpState.STALLED)
    else:
        out = feed.reading(60, alarms=(DeviceAlarm(code="motor_stall", priority=Priority.HIGH),))
    (t,) = starts(out, "motor_stall")
    assert (t.priority, t.latching) == (Priority.HIGH, True)
    assert "reports a motor stall" in t.text


@pytest.mark.parametrize(("idle_h", "started"), [(5.99, False), (6.0, True)])
def test_motor_stall_inferred_when_nothing_is_delivered_for_the_window(
    feed: Feed, idle_h: float, started: bool
) -> None:
    feed.reading(0, delivered_ml=50.0)
    out = feed.reading(idle_h * HOUR_S, delivered_ml=50.0)
    assert bool(starts(out, "motor_stall")) is started


def test_events_sent_after_a_dropout_do_not_look_like_a_stall(feed: Feed) -> None:
    feed.reading(0, delivered_ml=50.0)
    # a bolus logged 7 h later, during a telemetry dropout, arrives before any new reading
    out = feed.event(7 * HOUR_S, EventKind.BOLUS_DELIVERED, bolus_ml=0.1)
    out += feed.reading(8 * HOUR_S, delivered_ml=50.3)
    assert starts(out, "motor_stall") == []


def test_no_delivery_while_stopped_is_not_a_stall(feed: Feed) -> None:
    feed.reading(0, delivered_ml=50.0, pump_state=PumpState.STOPPED)
    out = feed.reading(7 * HOUR_S, delivered_ml=50.0, pump_state=PumpState.STOPPED)
    assert starts(out, "motor_stall") == []


def test_motor_stall_ends_when_delivery_resumes_and_is_acknowledged(feed: Feed) -> None:
    feed.reading(0, delivered_ml=50.0)
    (start,) = starts(feed.event(60, EventKind.MOTOR_STALL_START), "motor_stall")
    assert of_kind(feed.reading(120, delivered_ml=50.0), "motor_stall") == []
    assert of_kind(feed.reading(180, delivered_ml=50.01), "motor_stall") == [
        ("update", "latched")]
    assert of_kind(ack(feed.engine, start.alert_id, 200), "motor_stall") == [
        ("acknowledged", "latched"), ("end", "inactive")]


def test_motor_stall_end_event_resolves_the_stall(feed: Feed) -> None:
    feed.reading(0, delivered_ml=50.0)
    (start,) = starts(feed.event(60, EventKind.MOTOR_STALL_START), "motor_stall")
    ack(feed.engine, start.alert_id, 70)
    assert of_kind(feed.event(90, EventKind.MOTOR_STALL_END), "motor_stall") == [
        ("end", "inactive")]


def test_intermittent_stall_stays_one_alert(feed: Feed) -> None:
    feed.reading(0, delivered_ml=50.0)
    for i in range(1, 6):
        feed.event(i * 600, EventKind.MOTOR_STALL_START)
        feed.event(i * 600 + 60, EventKind.MOTOR_STALL_END)
    assert len(starts(feed.log, "motor_stall")) == 1


# -- over- and under-infusion ------------------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "kind", "started"),
    [
        (1.14, "over_infusion", False),
        (1.15, "over_infusion", True),
        (0.86, "under_infusion", False),
        (0.85, "under_infusion", True),
    ],
)
def test_flow_rules_compare_delivered_with_programmed_over_the_window(
    feed: Feed, factor: float, kind: str, started: bool
) -> None:
    feed.factor = factor
    feed.reading(0)
    out = feed.run(0, 26 * HOUR_S)
    found = starts(out, kind)
    assert bool(found) is started
    if started:
        (t,) = found
        assert t.device_time == at(13 * HOUR_S)  # first verdict at 12 h, then 1 h sustained
        assert t.value == pytest.approx((factor - 1) * 100)
        priority = Priority.HIGH if kind == "over_infusion" else Priority.MEDIUM
        assert (t.priority, t.unit, t.latching) == (priority, "%", True)


def test_flow_deviations_shorter_than_the_for_duration_raise_nothing() -> None:
    f = feed_with(flow_window_h=1.0)
    f.basal_ml_per_day = 2.0
    f.reading(0)
    f.run(0, HOUR_S)
    f.factor = 2.0  # one quarter-hour burst: +25 % over the last hour ...
    f.run(HOUR_S, 1.25 * HOUR_S)
    f.factor = 0.0  # ... then a pause: -25 % and worse, for 45 minutes
    f.run(1.25 * HOUR_S, 1.75 * HOUR_S)
    f.factor = 1.0
    f.run(1.75 * HOUR_S, 4 * HOUR_S)
    assert starts(f.log, "over_infusion") == starts(f.log, "under_infusion") == []
    f.factor = 0.5
    assert starts(f.run(4 * HOUR_S, 6 * HOUR_S), "under_infusion")


def test_boluses_reported_by_events_count_as_programmed_volume(feed: Feed) -> None:
    feed.reading(0)
    feed.run(0, 12 * HOUR_S)
    feed.event(12 * HOUR_S + 1, EventKind.BOLUS_DELIVERED, bolus_ml=0.2)
    feed.delivered_ml += 0.2
    feed.run(12 * HOUR_S, 27 * HOUR_S)
    assert starts(feed.log, "over_infusion") == []


def test_under_infusion_clears_only_inside_tolerance_minus_margin(feed: Feed) -> None:
    feed.factor = 0.8
    feed.reading(0)
    (start,) = starts(feed.run(0, 26 * HOUR_S), "under_infusion")
    ack(feed.engine, start.alert_id, 26 * HOUR_S)
    feed.factor = 0.88  # the window deviation climbs from -20 % to -12 %: still not clear
    assert of_kind(feed.run(26 * HOUR_S, 50 * HOUR_S), "under_infusion") == []
    feed.factor = 1.0
    assert of_kind(feed.run(50 * HOUR_S, 74 * HOUR_S), "under_infusion") == [
        ("end", "inactive")]


# -- pump stopped ------------------------------------------------------------------------


@pytest.mark.parametrize(("stopped_s", "started"), [(599, False), (600, True)])
def test_pump_stopped_waits_out_a_programming_session(
    feed: Feed, stopped_s: float, started: bool
) -> None:
    feed.reading(0)
    feed.reading(60, pump_state=PumpState.STOPPED)
    out = feed.reading(60 + stopped_s, pump_state=PumpState.STOPPED)
    assert bool(starts(out, "pump_stopped")) is started
    for t in starts(out, "pump_stopped"):
        assert (t.priority, t.latching, t.value, t.threshold) == (Priority.HIGH, True, 10.0, 10.0)


def test_short_programming_session_raises_nothing(feed: Feed) -> None:
    feed.reading(0)
    feed.event(60, EventKind.PUMP_STOPPED)
    feed.reading(300, pump_state=PumpState.STOPPED)
    feed.event(400, EventKind.PUMP_STARTED)
    feed.reading(900)
    assert feed.log == []


def test_pump_stopped_without_programmed_therapy_is_not_an_alert() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.0)
    f.reading(0, pump_state=PumpState.STOPPED)
    assert starts(f.reading(3600, pump_state=PumpState.STOPPED), "pump_stopped") == []


def test_pump_stopped_event_counts_from_the_event_time(feed: Feed) -> None:
    feed.reading(0)
    feed.event(100, EventKind.PUMP_STOPPED)
    assert feed.reading(699, pump_state=PumpState.STOPPED) == []
    assert starts(feed.reading(700, pump_state=PumpState.STOPPED), "pump_stopped")


# -- refill discrepancy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity_ml", "expected_ml", "withdrawn_ml", "delivered_since_fill_ml", "outcome"),
    [
        (20.0, 3.0, 2.1, 0.0, None),
        (20.0, 3.0, 1.9, 0.0, "over-infusion or leak"),
        (20.0, 3.0, 4.1, 0.0, "under-infusion, stall or occlusion"),
        (40.0, 3.0, 1.1, 0.0, None),
        (40.0, 3.0, 0.9, 0.0, "over-infusion or leak"),
        (20.0, 5.0, 2.5, 20.0, None),  # tolerance 0.145 x 20 mL = 2.9 mL
        (20.0, 5.0, 2.0, 20.0, "over-infusion or leak"),
    ],
)
def test_refill_discrepancy_beyond_tolerance_names_its_direction(
    capacity_ml: float, expected_ml: float, withdrawn_ml: float,
    delivered_since_fill_ml: float, outcome: str | None,
) -> None:
    f = Feed(AlertEngine(RulesConfig()), capacity_ml=capacity_ml)
    f.reading(0, expected_ml, delivered_ml=10.0)
    f.reading(60, expected_ml, delivered_ml=10.0 + delivered_since_fill_ml)
    out = f.event(120, EventKind.REFILL, withdrawn_ml=withdrawn_ml, filled_ml=18.0)
    found = starts(out, "refill_discrepancy")
    assert bool(found) is (outcome is not None)
    if outcome is not None:
        (t,) = found
        assert outcome in t.text
        assert (t.priority, t.latching) == (Priority.MEDIUM, True)
        # the estimate is projected to the refill's own time (60 s at 0.5 mL/d)
        assert t.value == pytest.approx(withdrawn_ml - expected_ml, abs=0.001)


def test_refill_discrepancy_ends_once_acknowledged(feed: Feed) -> None:
    feed.reading(0, 3.0)
    (start,) = starts(feed.event(60, EventKind.REFILL, withdrawn_ml=1.0, filled_ml=18.0),
                      "refill_discrepancy")
    assert of_kind(ack(feed.engine, start.alert_id, 90), "refill_discrepancy") == [
        ("acknowledged", "active"), ("end", "inactive")]


def test_refill_within_tolerance_latches_an_unacknowledged_discrepancy(feed: Feed) -> None:
    feed.reading(0, 3.0)
    (start,) = starts(feed.event(60, EventKind.REFILL, withdrawn_ml=1.0, filled_ml=18.0),
                      "refill_discrepancy")
    feed.reading(120, 6.0)
    out = feed.event(180, EventKind.REFILL, withdrawn_ml=6.2, filled_ml=18.0)
    assert of_kind(out, "refill_discrepancy") == [("update", "latched")]
    assert of_kind(ack(feed.engine, start.alert_id, 200), "refill_discrepancy")[-1] == (
        "end", "inactive")


def test_refill_clears_a_latched_low_reservoir(feed: Feed) -> None:
    assert starts(feed.reading(0, 1.9), "low_reservoir")
    out = feed.event(60, EventKind.REFILL, withdrawn_ml=1.9, filled_ml=18.0)
    assert of_kind(out, "low_reservoir") == [("update", "latched")]
    assert starts(out, "refill_discrepancy") == []


# -- battery -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "kind", "priority"),
    [
        (BatteryState.ERI, "battery_eri", Priority.MEDIUM),
        (BatteryState.EOS, "battery_eos", Priority.HIGH),
        (BatteryState.LBR, "low_battery_reset", Priority.MEDIUM),
        (BatteryState.SAFE_STATE, "safe_state", Priority.HIGH),
    ],
)
def test_battery_states_raise_latching_alerts(
    feed: Feed, state: BatteryState, kind: str, priority: Priority
) -> None:
    feed.reading(0)
    (t,) = starts(feed.reading(60, battery_state=state), kind)
    assert (t.priority, t.alert_type, t.latching) == (priority, AlertType.TECHNICAL, True)
    assert of_kind(feed.reading(120), kind) == [("update", "latched")]


@pytest.mark.parametrize(
    ("event", "kind"), [(EventKind.ERI, "battery_eri"), (EventKind.EOS, "battery_eos")]
)
def test_battery_events_raise_the_same_alerts(feed: Feed, event: EventKind, kind: str) -> None:
    feed.reading(0)
    assert starts(feed.event(60, event), kind)


# -- telemetry lost ------------------------------------------------------------------------


def test_telemetry_lost_uses_the_gateway_clock_and_ends_on_the_next_message(feed: Feed) -> None:
    feed.reading(0)
    assert feed.engine.on_tick(at(300)) == []
    (t,) = feed.engine.on_tick(at(301))
    assert (t.alert_kind, t.priority, t.latching, t.phase) == (
        "telemetry_lost", Priority.LOW, False, Phase.START)
    assert (t.cause_record_id, t.device_time) == ("P0001:b1:1", None)
    assert feed.engine.on_tick(at(400)) == []
    assert of_kind(feed.reading(10, now_s=500), "telemetry_lost") == [("end", "inactive")]


def test_telemetry_lost_ignores_the_pump_clock(feed: Feed) -> None:
    feed.reading(12 * HOUR_S, now_s=0)  # the pump clock runs hours ahead of the gateway
    assert feed.engine.on_tick(at(200)) == []


def test_telemetry_lost_limit_can_be_set_per_pump() -> None:
    config = RulesConfig(per_pump={"P0002": RuleOverrides(telemetry_lost_after_s=60)})
    engine = AlertEngine(config)
    Feed(engine, pump_id="P0001").reading(0)
    Feed(engine, pump_id="P0002").reading(0)
    assert [t.pump_id for t in engine.on_tick(at(61))] == ["P0002"]


def test_a_replay_does_not_end_telemetry_lost(feed: Feed) -> None:
    feed.reading(0)
    feed.engine.on_tick(at(400))
    replay = Reading(**{**feed_reading_fields(feed), "received_at": at(500)})
    assert feed.engine.on_message(replay, at(500)) == []
    assert [t.alert_kind for t in feed.engine.active_alerts("P0001")] == ["telemetry_lost"]


def feed_reading_fields(feed: Feed) -> dict[str, Any]:
    """The fields of this feed's first reading (seq 1), to build a replay of it."""
    return {"pump_id": feed.pump_id, "boot_id": feed.boot_id, "seq": 1, "device_time": at(0),
            "received_at": at(0), "drug": feed.drug, "pump_state": PumpState.RUNNING,
            "reservoir_ml": 1.0, "reservoir_capacity_ml": 20.0, "low_reservoir_alarm_ml": 2.0,
            "basal_rate_ml_per_day": 0.5, "delivered_total_ml": 100.0}


# -- the pump's own alarms -------------------------------------------------------------------


def alarms(*pairs: tuple[str, Priority]) -> tuple[DeviceAlarm, ...]:
    return tuple(DeviceAlarm(code=c, priority=p) for c, p in pairs)


def test_device_alarms_pass_through_one_alert_per_code(feed: Feed) -> None:
    out = feed.reading(0, alarms=alarms(("critical_error", Priority.HIGH),
                                        ("refill_needed", Priority.LOW)))
    by_id = {named(t.alert_id): t for t in starts(out, "device_alarm")}
    assert set(by_id) == {"P0001:device_alarm:critical_error", "P0001:device_alarm:refill_needed"}
    assert by_id["P0001:device_alarm:critical_error"].priority is Priority.HIGH
    assert by_id["P0001:device_alarm:refill_needed"].priority is Priority.LOW
    for t in by_id.values():
        assert "pump's own alarm" in t.text
        assert "can neither silence nor clear" in t.text


def test_device_alarm_ids_name_the_code(feed: Feed) -> None:
    (first,) = feed.reading(0, alarms=alarms(("a1", Priority.HIGH)))
    feed.reading(60)
    (t,) = feed.reading(120, alarms=alarms(("a2", Priority.HIGH)))
    assert named(t.alert_id) == "P0001:device_alarm:a2"
    assert t.alert_id.rpartition(":")[2] != first.alert_id.rpartition(":")[2]


def test_device_alarm_ends_when_it_disappears_from_the_readings(feed: Feed) -> None:
    feed.reading(0, alarms=alarms(("a1", Priority.HIGH), ("a2", Priority.MEDIUM)))
    out = feed.reading(60, alarms=alarms(("a2", Priority.MEDIUM)))
    assert [(named(t.alert_id), t.phase) for t in out] == [("P0001:device_alarm:a1", Phase.END)]
    assert [named(t.alert_id) for t in feed.engine.active_alerts("P0001")] == [
        "P0001:device_alarm:a2"]


def test_device_alarm_priority_change_is_an_update(feed: Feed) -> None:
    feed.reading(0, alarms=alarms(("a1", Priority.MEDIUM)))
    (t,) = feed.reading(60, alarms=alarms(("a1", Priority.HIGH)))
    assert (t.phase, t.priority) == (Phase.UPDATE, Priority.HIGH)
    assert t.text.startswith("Pump alarm (priority changed):")


def test_acknowledging_a_device_alarm_never_claims_to_clear_it(feed: Feed) -> None:
    (start,) = feed.reading(0, alarms=alarms(("a1", Priority.HIGH)))
    (t,) = ack(feed.engine, start.alert_id, 30)
    assert (t.phase, t.state) == (Phase.ACKNOWLEDGED, AlarmState.ACTIVE)
    assert "recorded here only" in t.text
    assert "neither silence nor clear" in t.text
    assert feed.reading(60, alarms=alarms(("a1", Priority.HIGH))) == []


# -- lifecycle and acknowledgement -------------------------------------------------------------


def test_acknowledgement_records_who_and_when(feed: Feed) -> None:
    (start,) = starts(feed.reading(0, 1.9), "low_reservoir")
    (t,) = ack(feed.engine, start.alert_id, 100, by="dr.ruiz", ack_at_s=90)
    assert (t.acknowledged_by, t.acknowledged_at, t.at) == ("dr.ruiz", at(90), at(100))
    assert t.inactivation is Inactivation.ACKNOWLEDGED
    shown = {a.alert_id: a for a in feed.engine.active_alerts("P0001")}
    assert shown[start.alert_id] == t


def test_acknowledgement_without_a_time_uses_now(feed: Feed) -> None:
    (start,) = starts(feed.reading(0, 1.9), "low_reservoir")
    (t,) = ack(feed.engine, start.alert_id, 100)
    assert t.acknowledged_at == at(100)


def test_acknowledging_twice_is_a_no_op(feed: Feed) -> None:
    (start,) = starts(feed.reading(0, 1.9), "low_reservoir")
    ack(feed.engine, start.alert_id, 10)
    assert ack(feed.engine, start.alert_id, 20, by="someone.else") == []
    shown = {a.alert_id: a for a in feed.engine.active_alerts("P0001")}
    assert shown[start.alert_id].acknowledged_by == "nurse.kim"


@pytest.mark.parametrize("alert_id", ["P0001:low_reservoir:7", "P0002:low_reservoir:1", "x"])
def test_acknowledging_an_unknown_alert_changes_nothing(feed: Feed, alert_id: str) -> None:
    assert starts(feed.reading(0, 1.9), "low_reservoir")
    before = feed.engine.state_rows()
    assert ack(feed.engine, alert_id, 10) == []
    assert feed.engine.state_rows() == before


def test_acknowledging_an_ended_alert_changes_nothing(feed: Feed) -> None:
    (start,) = starts(feed.reading(0, 1.9), "low_reservoir")
    ack(feed.engine, start.alert_id, 10)
    feed.reading(60, 18.0)
    before = feed.engine.state_rows()
    assert ack(feed.engine, start.alert_id, 70) == []
    assert feed.engine.state_rows() == before


def test_transitions_carry_ids_times_cause_and_intended_use(feed: Feed) -> None:
    (t,) = starts(feed.reading(30, 1.9, now_s=45), "low_reservoir")
    assert named(t.alert_id) == "P0001:low_reservoir"
    assert t.transition_id == f"{t.alert_id}:start:1"
    assert (t.at, t.device_time, t.cause_record_id) == (at(45), at(30), "P0001:b1:1")
    assert t.intended_use == INTENDED_USE


def test_a_new_occurrence_gets_the_next_alert_number(feed: Feed) -> None:
    feed.reading(0, 5.0)
    feed.reading(60, 9.0)
    (second,) = starts(feed.reading(120, 5.0), "refill_due")
    first = feed.log[0]
    assert named(second.alert_id) == named(first.alert_id) == "P0001:refill_due"
    assert second.alert_id != first.alert_id


def test_transition_ids_are_unique(feed: Feed) -> None:
    for i, v in enumerate([5.0, 9.0, 5.0, 1.9, 9.0, 0.5, 18.0]):
        feed.reading(i * 60, v)
        for t in feed.engine.active_alerts("P0001"):
            if t.inactivation is Inactivation.ENABLED:
                feed.log += ack(feed.engine, t.alert_id, i * 60 + 1)
    ids = [t.transition_id for t in feed.log]
    assert len(ids) > 8
    assert len(ids) == len(set(ids))


# -- replay and duplicates -------------------------------------------------------------------------


def test_replayed_and_duplicate_messages_produce_nothing(feed: Feed) -> None:
    feed.reading(0, 10.0)
    feed.reading(60, 10.0)
    low = {**feed_reading_fields(feed), "reservoir_ml": 1.0}
    assert feed.engine.on_message(Reading(**low), at(120)) == []  # seq 1 again
    assert feed.engine.on_message(Reading(**{**low, "seq": 2}), at(120)) == []
    assert feed.engine.active_alerts("P0001") == ()


def test_a_new_boot_resets_sequence_tracking_but_keeps_alerts(feed: Feed) -> None:
    feed.reading(0, 1.9)
    feed.boot_id, feed.seq = "b2", 0
    assert feed.reading(60, 1.9) == []  # seq 1 of the new boot is new, and nothing changed
    # refill due gives way to low reservoir: one alert per condition
    assert {t.alert_kind for t in feed.engine.active_alerts("P0001")} == {"low_reservoir"}


def test_only_the_last_boots_are_remembered(feed: Feed) -> None:
    for boot in range(10):
        feed.boot_id, feed.seq = f"b{boot}", 0
        feed.reading(boot * 60.0, 10.0)
    late = {**feed_reading_fields(feed), "device_time": at(600), "received_at": at(600),
            "reservoir_ml": 1.9}
    assert feed.engine.on_message(Reading(**{**late, "boot_id": "b1"}), at(600)) == []
    assert starts(feed.engine.on_message(Reading(**{**late, "boot_id": "b0"}), at(600)),
                  "low_reservoir")


def test_messages_of_an_earlier_boot_are_history_and_never_fire(feed: Feed) -> None:
    feed.reading(0, 10.0)
    feed.boot_id, feed.seq = "b2", 0
    feed.reading(60, 10.0)
    late = {**feed_reading_fields(feed), "boot_id": "b1", "seq": 99, "reservoir_ml": 1.0}
    assert feed.engine.on_message(Reading(**late), at(120)) == []


# -- restart -------------------------------------------------------------------------------------


def test_restart_mid_alert_keeps_it_without_a_second_start(feed: Feed) -> None:
    feed.reading(0, 5.0)  # refill_due (non-latching)
    out = feed.reading(60, 1.9)
    (low,) = starts(out, "low_reservoir")
    assert of_kind(out, "refill_due") == [("end", "inactive")]  # one alert per condition
    before = feed.engine.active_alerts("P0001")
    restored = AlertEngine(RulesConfig(), feed.engine.state_rows())
    assert restored.active_alerts("P0001") == before
    assert restored.pumps() == ["P0001"]
    feed.engine = restored
    assert feed.reading(120, 1.8) == []
    out = feed.reading(180, 18.0)
    assert of_kind(out, "low_reservoir") == [("update", "latched")]
    assert ack(restored, low.alert_id, 200)[-1].transition_id == f"{low.alert_id}:end:4"
    (again,) = starts(feed.reading(240, 1.9), "low_reservoir")
    assert named(again.alert_id) == "P0001:low_reservoir" != again.alert_id != low.alert_id


def test_restart_remembers_replays_and_pending_delays() -> None:
    f = feed_with(pump_stopped_for_s=600)
    f.reading(0)
    f.reading(60, pump_state=PumpState.STOPPED)
    f.engine = AlertEngine(RulesConfig(defaults=RuleSettings(pump_stopped_for_s=600)),
                           f.engine.state_rows())
    assert f.engine.on_message(Reading(**feed_reading_fields(f)), at(70)) == []
    assert starts(f.reading(660, pump_state=PumpState.STOPPED), "pump_stopped")


def test_state_rows_are_json_one_per_pump_and_one_for_the_engine(feed: Feed) -> None:
    feed.reading(0, 1.9)
    rows = feed.engine.state_rows()
    assert sorted(rows) == ["alert_engine/engine", "alert_engine/pump/P0001"]
    assert json.loads(rows["alert_engine/engine"])["version"] == 2
    assert json.loads(rows["alert_engine/pump/P0001"])["pump_id"] == "P0001"


# -- per-drug and per-pump overrides --------------------------------------------------------


@pytest.mark.parametrize(
    ("pump_id", "drug", "started"),
    [
        ("P0001", Drug.BACLOFEN, True),
        ("P0001", Drug.MORPHINE, False),
        ("P0002", Drug.MORPHINE, True),
    ],
)
def test_per_drug_and_per_pump_overrides_change_the_threshold(
    pump_id: str, drug: Drug, started: bool
) -> None:
    config = RulesConfig(
        per_drug={Drug.BACLOFEN: RuleOverrides(low_reservoir_alarm_ml=4.0)},
        per_pump={"P0002": RuleOverrides(low_reservoir_alarm_ml=4.5)},
    )
    f = Feed(AlertEngine(config), pump_id=pump_id, drug=drug)
    assert bool(starts(f.reading(0, 3.9), "low_reservoir")) is started


def test_a_drug_change_applies_the_new_drugs_settings() -> None:
    config = RulesConfig(per_drug={Drug.BACLOFEN: RuleOverrides(low_reservoir_alarm_ml=4.0)})
    f = Feed(AlertEngine(config))
    assert starts(f.reading(0, 3.9), "low_reservoir") == []
    f.drug = Drug.BACLOFEN
    assert starts(f.reading(60, 3.9), "low_reservoir")


# -- conditions the gateway detects itself --------------------------------------------------


def gateway_condition(engine: AlertEngine, active: bool, now_s: float,
                      kind: str = "outbox_full") -> list[AlertTransition]:
    return engine.set_condition(
        "_gateway", kind, active, priority=Priority.HIGH, alert_type=AlertType.TECHNICAL,
        latching=False, text="Outbox full: reading paused.", value=1000.0, threshold=1000.0,
        unit="records", now=at(now_s),
    )


def test_set_condition_starts_once_and_ends_when_cleared() -> None:
    engine = AlertEngine(RulesConfig())
    (t,) = gateway_condition(engine, True, 0)
    assert (named(t.alert_id), t.pump_id, t.priority, t.unit) == (
        "_gateway:outbox_full", "_gateway", Priority.HIGH, "records")
    assert "Outbox full: reading paused." in t.text
    assert gateway_condition(engine, True, 1) == []
    assert steps(gateway_condition(engine, False, 2)) == [("outbox_full", "end", "inactive")]
    assert gateway_condition(engine, False, 3) == []
    assert engine.pumps() == ["_gateway"]
    assert engine.on_tick(at(10_000)) == []  # the gateway itself never loses telemetry


@pytest.mark.parametrize("kind", ["Outbox Full", "outbox_full\n", "", "x" * 41])
def test_set_condition_rejects_an_invalid_kind_and_changes_nothing(kind: str) -> None:
    engine = AlertEngine(RulesConfig())
    with pytest.raises(ValueError, match="alert_kind"):
        gateway_condition(engine, True, 0, kind=kind)
    assert engine.pumps() == []


# -- purity ---------------------------------------------------------------------------------------


def test_rules_module_imports_nothing_beyond_stdlib_pydantic_and_schemas() -> None:
    code = (
        "import sys, json\n"
        "import schemas.models\n"
        "before = set(sys.modules)\n"
        "import gateway.rules\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60, cwd=REPO)
    added = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert added <= {"gateway", "tomllib", "pydantic", "pydantic_core", "_decimal", "decimal",
                     "numbers", "dataclasses"}, sorted(added)
    assert "logging" not in json.loads(result.stdout)
