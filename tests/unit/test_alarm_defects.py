"""Issue 10 defects 1-10 and the unguessable alert ids: each reproduces the situation found.

Times: `t_s` is seconds after T0 on the pump's clock; unless a test says otherwise the gateway
receives each message at the true time (`now_s`), which a device clock step does not move.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import pytest

from gateway.alert_settings import DRUG_PROFILES, RuleOverrides, RulesConfig
from gateway.cli import main
from gateway.pipeline import pseudonym
from gateway.rules import AlertEngine
from schemas.models import (
    Acknowledgement,
    AlertTransition,
    BatteryState,
    DeviceAlarm,
    DeviceEvent,
    Drug,
    EventKind,
    Priority,
    PumpState,
)
from tests.unit.test_rules import DAY_S, HOUR_S, Feed, at, feed_with, starts

MINUTE_S = 60.0


def kinds(transitions: list[AlertTransition], phase: str = "start") -> set[str]:
    return {t.alert_kind for t in transitions if t.phase.value == phase}


def run_readings(
    f: Feed,
    start_s: float,
    end_s: float,
    step_s: float = 900.0,
    *,
    skew_s: float = 0.0,
    reservoir_ml: float = 10.0,
) -> list[AlertTransition]:
    """Readings every step_s of true time; the pump's clock shows true time + skew_s."""
    out: list[AlertTransition] = []
    t_s = start_s
    while t_s < end_s:
        t_s = min(t_s + step_s, end_s)
        f.delivered_ml += f.basal_ml_per_day * f.factor * step_s / DAY_S
        out += f.reading(t_s + skew_s, reservoir_ml, now_s=t_s, delivered_ml=f.delivered_ml)
    return out


# -- 1. resent frames ---------------------------------------------------------------------


def test_1_a_resent_refill_that_fills_a_gap_is_checked() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    f.reading(0, 10.0)
    refill_seq = f.seq + 1
    f.seq += 1  # the refill frame is damaged on the line; the next reading arrives
    f.reading(60, 18.0)
    late = DeviceEvent(
        pump_id="P0001",
        boot_id="b1",
        seq=refill_seq,
        device_time=at(30),
        received_at=at(120),
        event=EventKind.REFILL,
        withdrawn_ml=5.0,
        filled_ml=18.0,
    )
    (t,) = starts(f.engine.on_message(late, at(120)), "refill_discrepancy")
    assert t.value == pytest.approx(5.0 - 10.0, abs=0.01)
    assert f.engine.on_message(late, at(130)) == []  # the same resend again: a duplicate


def test_1_a_resent_bolus_counts_once() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.1)
    f.info(0, bolus_dose_ml=0.02, boluses_per_day_max=4)
    f.reading(60)
    bolus_seq = f.seq + 1
    f.seq += 1  # lost
    f.delivered_ml += 0.02
    f.reading(120, delivered_ml=f.delivered_ml, bolus_count_24h=1)  # counts the lost bolus
    late = DeviceEvent(
        pump_id="P0001",
        boot_id="b1",
        seq=bolus_seq,
        device_time=at(90),
        received_at=at(130),
        event=EventKind.BOLUS_DELIVERED,
        bolus_ml=0.02,
    )
    f.engine.on_message(late, at(130))
    state = f.engine.state_rows()["alert_engine/pump/P0001"].decode()
    assert '"bolus_inferred":0' in state  # the resend matched the inferred bolus


# -- 2. lost bolus events ---------------------------------------------------------------------


@pytest.mark.parametrize("lost_every", [1, 2, 3])
def test_2_lost_bolus_events_do_not_raise_over_infusion(lost_every: int) -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.1)
    f.info(0, bolus_dose_ml=0.02, boluses_per_day_max=4)
    bolus_times: list[float] = []
    out: list[AlertTransition] = []
    for i in range(1, 4 * 96):
        t_s = i * 900.0
        f.delivered_ml += 0.1 * 900.0 / DAY_S
        if i % 24 == 0:  # a bolus every 6 h, some of whose event frames are lost
            f.delivered_ml += 0.02
            bolus_times.append(t_s)
            if len(bolus_times) % lost_every:
                out += f.event(t_s, EventKind.BOLUS_DELIVERED, bolus_ml=0.02)
            else:
                f.seq += 1
        count = sum(1 for b in bolus_times if b > t_s - DAY_S)
        out += f.reading(t_s, delivered_ml=f.delivered_ml, bolus_count_24h=count)
    assert kinds(out) == set()


# -- 3. device clock steps -------------------------------------------------------------------


@pytest.mark.parametrize("step_h", [4.0, 12.0, 24.0, -4.0, -24.0])
@pytest.mark.parametrize("basal", [0.1, 0.5])
def test_3_a_clock_step_is_a_technical_alert_not_a_flow_fault(step_h: float, basal: float) -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=basal)
    out = run_readings(f, 0, 2 * DAY_S)
    out += run_readings(f, 2 * DAY_S, 4 * DAY_S, skew_s=step_h * HOUR_S)
    assert kinds(out) == {"clock_step"}
    (t,) = starts(out, "clock_step")
    assert t.priority is Priority.LOW
    assert t.value == pytest.approx(step_h, abs=0.1)


def test_3_a_clock_step_back_ends_the_clock_alert() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    out = run_readings(f, 0, DAY_S)
    out += run_readings(f, DAY_S, 2 * DAY_S, skew_s=12 * HOUR_S)
    out += run_readings(f, 2 * DAY_S, 3 * DAY_S)
    assert [(t.alert_kind, t.phase.value) for t in out] == [
        ("clock_step", "start"),
        ("clock_step", "end"),
    ]


def test_3_a_small_clock_step_is_neither_corrected_nor_raised() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    out = run_readings(f, 0, DAY_S)
    out += run_readings(f, DAY_S, 3 * DAY_S, skew_s=HOUR_S)
    assert out == []


def test_3_an_accelerated_pump_clock_with_a_dropout_is_not_a_step() -> None:
    """At --speed max the gateway clock stands still; the sequence numbers carry the gap."""
    f = Feed(AlertEngine(RulesConfig()))
    out = [t for i in range(1, 100) for t in f.reading(i * 60.0, now_s=0.0)]
    f.seq += 600  # ten hours of readings the pump made while nobody heard them
    out += f.reading(100 * 60.0 + 10 * HOUR_S, now_s=0.0)
    assert kinds(out) == set()


# -- 4. refill discrepancy against a stale estimate ---------------------------------------------


def test_4_a_refill_during_a_telemetry_gap_uses_the_projected_estimate() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.7)
    f.reading(0, 10.0)
    out = f.event(3 * DAY_S, EventKind.REFILL, withdrawn_ml=10.0 - 2.1, filled_ml=18.0)
    assert "refill_discrepancy" not in kinds(out)


def test_4_the_same_refill_logged_twice_is_checked_once() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    f.reading(0, 10.0)
    assert f.event(60, EventKind.REFILL, withdrawn_ml=10.0, filled_ml=18.0) == []
    assert f.event(90, EventKind.REFILL, withdrawn_ml=10.0, filled_ml=18.0) == []


def test_4_an_over_infusion_is_found_when_estimate_and_truth_are_both_zero() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=1.0)
    f.reading(0, 10.0)
    f.event(60, EventKind.REFILL, withdrawn_ml=10.0, filled_ml=10.0)
    f.delivered_ml += 12.5  # the motor pumped 12.5 mL in 10 days: +25 %, dry at day 8
    f.reading(10 * DAY_S, 0.0, delivered_ml=f.delivered_ml)
    out = f.event(10 * DAY_S + 60, EventKind.REFILL, withdrawn_ml=0.0, filled_ml=20.0)
    (t,) = starts(out, "refill_discrepancy")
    assert t.value is not None
    assert t.value < -2.0
    assert "over-infusion" in t.text


# -- 5. low and empty with evidence of over-infusion ------------------------------------------


def test_5_low_reservoir_projects_with_the_motor_count_during_over_infusion() -> None:
    f = Feed(AlertEngine(RulesConfig()), factor=1.25, basal_ml_per_day=1.0)
    f.reading(0, 12.0)
    out: list[AlertTransition] = []
    for i in range(1, 8 * 24 + 2):
        estimate = 12.0 - i / 24.0
        out += f.reading(i * HOUR_S, estimate)
    (low,) = starts(out, "low_reservoir")
    # truly 12 - 1.25 x days: 2 mL at day 8.0; the pump's own estimate would wait until day 10
    assert low.device_time is not None
    assert low.device_time <= at(8 * DAY_S + HOUR_S)
    assert "projects less than the pump's estimate" in low.text


def test_5_a_leak_found_at_refill_makes_the_next_low_reservoir_earlier() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=1.0)
    f.reading(0, 10.0)
    f.event(60, EventKind.REFILL, withdrawn_ml=10.0, filled_ml=20.0)
    f.reading(10 * DAY_S, 10.0)
    out = f.event(10 * DAY_S + 60, EventKind.REFILL, withdrawn_ml=7.0, filled_ml=20.0)
    assert kinds(out) == {"refill_discrepancy"}  # 13 mL out where 10 were programmed
    out = f.reading(13 * DAY_S, 17.0)  # the pump says 17 mL; at 1.3x it is 16.1 mL
    out += f.reading(24 * DAY_S, 6.0)  # pump 6 mL, projected 20 - 1.3 x 14 = 1.8 mL
    assert "low_reservoir" in kinds(out)


# -- 6. projection during a telemetry gap --------------------------------------------------------


def test_6_a_silent_baclofen_pump_is_projected_empty_and_escalates() -> None:
    f = Feed(AlertEngine(RulesConfig()), drug=Drug.BACLOFEN, basal_ml_per_day=1.0, alarm_ml=2.0)
    f.reading(0, 5.0)  # 4 days to empty at 1 mL/day (1 mL empty level)
    out: list[AlertTransition] = []
    for minute in range(1, 5 * 24 * 60, 5):
        out += f.engine.on_tick(at(minute * MINUTE_S))
    by_kind: dict[str, AlertTransition] = {}
    for t in out:
        by_kind.setdefault(t.alert_kind, t)
    assert set(by_kind) >= {"telemetry_lost", "low_reservoir", "empty_reservoir"}
    low, empty = by_kind["low_reservoir"], by_kind["empty_reservoir"]
    assert (empty.alert_id, empty.phase.value) == (low.alert_id, "update")  # in place
    assert empty.at <= at(4 * DAY_S + HOUR_S)
    assert "Projected by the gateway" in empty.text
    escalated = [t for t in out if t.alert_kind == "telemetry_lost" and "escalated" in t.text]
    assert escalated
    assert escalated[0].priority is Priority.HIGH  # baclofen: withdrawal risk


def test_6_telemetry_lost_escalates_to_medium_for_other_drugs() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.1)
    f.reading(0, 15.0)
    f.engine.on_tick(at(400))
    (t,) = f.engine.on_tick(at(3700))
    assert (t.alert_kind, t.phase.value, t.priority) == (
        "telemetry_lost",
        "update",
        Priority.MEDIUM,
    )


# -- 7. rate fallback after a reset ---------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "priority"),
    [("reset", Priority.HIGH), ("nothing", Priority.MEDIUM), ("session", None)],
)
def test_7_a_large_rate_drop_without_programming_alerts(
    before: str, priority: Priority | None
) -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.5)
    f.reading(0)
    if before == "reset":
        f.event(60, EventKind.LOW_BATTERY_RESET)
    elif before == "session":
        f.reading(60, pump_state=PumpState.STOPPED)
        f.reading(120)
    f.basal_ml_per_day = 0.048
    fields: dict[str, Any] = {"battery_state": BatteryState.LBR} if before == "reset" else {}
    out = f.reading(180, **fields)
    found = starts(out, "rate_drop")
    assert [t.priority for t in found] == ([] if priority is None else [priority])


def test_7_a_rate_drop_announced_in_device_info_first_still_alerts() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.5)
    f.info(0)
    f.reading(60)
    f.event(120, EventKind.LOW_BATTERY_RESET)
    f.basal_ml_per_day = 0.048
    out = f.info(120)
    out += f.reading(180, battery_state=BatteryState.LBR)
    assert [t.priority for t in starts(out, "rate_drop")] == [Priority.HIGH]


# -- 8. repeated reboots during a stall ----------------------------------------------------


def test_8_reboots_do_not_hide_an_inferred_stall() -> None:
    f = Feed(AlertEngine(RulesConfig()), basal_ml_per_day=0.5)
    out = f.reading(0, delivered_ml=100.0)
    for i in range(1, 72 * 4):
        t_s = i * 900.0
        if i % 20 == 0:  # a reboot every 5 h
            f.boot_id, f.seq = f"b{i}", 0
        out += f.reading(t_s, delivered_ml=100.0)
        if starts(out, "motor_stall"):
            break
    (t,) = starts(out, "motor_stall")
    assert t.device_time is not None
    assert t.device_time <= at(6 * HOUR_S + 900)


# -- 9. drug profiles --------------------------------------------------------------------------


def test_9_baclofen_ships_with_a_4_ml_alarm_and_withdrawal_risk() -> None:
    s = RulesConfig().settings_for("P0001", Drug.BACLOFEN)
    assert (s.low_reservoir_alarm_ml, s.withdrawal_risk) == (4.0, True)
    assert RulesConfig().settings_for("P0001", Drug.ZICONOTIDE).withdrawal_risk is False
    assert (
        RulesConfig(drug_profiles=False).settings_for("P1", Drug.BACLOFEN).withdrawal_risk is False
    )
    assert Drug.BACLOFEN in DRUG_PROFILES


@pytest.mark.parametrize(
    ("drug", "reservoir_ml", "started"),
    [(Drug.BACLOFEN, 3.9, True), (Drug.ZICONOTIDE, 3.9, False), (Drug.BACLOFEN, 4.1, False)],
)
def test_9_baclofen_low_reservoir_at_4_ml(drug: Drug, reservoir_ml: float, started: bool) -> None:
    f = Feed(AlertEngine(RulesConfig()), drug=drug)
    assert bool(starts(f.reading(0, reservoir_ml), "low_reservoir")) is started


def test_9_baclofen_under_infusion_is_high_priority() -> None:
    f = Feed(AlertEngine(RulesConfig()), drug=Drug.BACLOFEN, factor=0.5)
    (t,) = starts(f.run(0, 3 * DAY_S), "under_infusion")
    assert t.priority is Priority.HIGH


def test_9_a_configured_alarm_volume_never_lowers_the_pumps() -> None:
    f = feed_with(low_reservoir_alarm_ml=1.0)
    (t,) = starts(f.reading(0, 1.9), "low_reservoir")
    assert t.threshold == 2.0


# -- 10. per-pump overrides with pseudonymised ids ---------------------------------------------


def test_10_per_pump_overrides_match_the_real_id_when_pseudonymising() -> None:
    key = b"k" * 32
    config = RulesConfig(per_pump={"P0001": RuleOverrides(telemetry_lost_after_s=60)})
    station = config.with_pump_ids(lambda pump_id: pseudonym(key, pump_id))
    engine = AlertEngine(station)
    Feed(engine, pump_id=pseudonym(key, "P0001")).reading(0)
    Feed(engine, pump_id=pseudonym(key, "P0002")).reading(0)
    assert [t.pump_id for t in engine.on_tick(at(61))] == [pseudonym(key, "P0001")]


@pytest.mark.parametrize(
    ("key", "pseudonymising", "warned"),
    [
        ("P0001", True, False),
        ("p0123456789abcdef", True, True),
        ("p0123456789abcdef", False, False),
        ("bed 4", False, True),
    ],
)
def test_10_check_config_warns_about_override_keys_that_cannot_match(
    key: str, pseudonymising: bool, warned: bool
) -> None:
    config = RulesConfig(per_pump={key: RuleOverrides(refill_due_days=3)})
    warnings = config.override_warnings(pseudonymising)
    assert bool(warnings) is warned
    if warned:
        assert key in warnings[0]


# -- issue 15: alert ids nobody outside can predict ------------------------------------------------


def test_alert_ids_are_keyed_and_survive_a_restart() -> None:
    first, second = (AlertEngine(RulesConfig()) for _ in range(2))
    (a,) = starts(Feed(first).reading(0, 1.9), "low_reservoir")
    (b,) = starts(Feed(second).reading(0, 1.9), "low_reservoir")
    assert a.alert_id != b.alert_id  # a fresh random salt per engine
    assert a.alert_id != "P0001:low_reservoir:1"
    unkeyed = hmac.new(b"", b"P0001:low_reservoir:1", hashlib.sha256).hexdigest()[:16]
    assert not a.alert_id.endswith(unkeyed)
    restored = AlertEngine(RulesConfig(), first.state_rows())
    f = Feed(restored, seq=1)
    f.reading(60, 18.0)
    f.reading(120, 1.0)
    assert restored.active_alerts("P0001")[0].alert_id.startswith("P0001:")
    assert a.alert_id in {t.alert_id for t in restored.active_alerts("P0001")}
    assert AlertEngine(RulesConfig(), first.state_rows()).state_rows().keys() == {
        "alert_engine/engine", "alert_engine/pump/P0001"}


def test_a_given_salt_gives_repeatable_ids() -> None:
    ids = []
    for _ in range(2):
        engine = AlertEngine(RulesConfig(), salt=b"s" * 16)
        (t,) = starts(Feed(engine).reading(0, 1.9), "low_reservoir")
        ids.append(t.alert_id)
    assert ids[0] == ids[1]


# -- escalation of unacknowledged alerts ----------------------------------------------------


def test_an_unacknowledged_high_alert_is_reannounced_one_level_up() -> None:
    f = feed_with(telemetry_lost_after_s=DAY_S)
    (start,) = f.reading(0, pump_state=PumpState.STALLED)
    assert f.engine.on_tick(at(899)) == []
    (again,) = f.engine.on_tick(at(900))
    assert (again.alert_id, again.phase.value, again.priority) == (
        start.alert_id,
        "update",
        Priority.HIGH,
    )
    assert "escalation level 1: not acknowledged for 15 min" in again.text
    assert f.engine.on_tick(at(1000)) == []
    (second,) = f.engine.on_tick(at(1800))
    assert "escalation level 2" in second.text


def test_acknowledged_and_low_priority_alerts_are_not_reannounced() -> None:
    f = feed_with(telemetry_lost_after_s=DAY_S)
    (start,) = f.reading(0, pump_state=PumpState.STALLED)
    f.reading(0.5, 8.0)  # refill_due (PL) too
    f.engine.on_acknowledgement(Acknowledgement(alert_id=start.alert_id, by="nurse"), at(600))
    ticks = [t for minute in range(1, 90) for t in f.engine.on_tick(at(minute * 60.0 + 1))]
    assert [t for t in ticks if "re-announced" in t.text] == []
    assert f.engine.acknowledgement_delays() == {Priority.HIGH: (1, 600.0, 600.0)}


# -- consolidation: one alert per clinical condition ----------------------------------------


@pytest.mark.parametrize(
    ("code", "kind", "fields"),
    [
        ("low_reservoir", "low_reservoir", {"reservoir_ml": 1.9}),
        ("motor_stall", "motor_stall", {"pump_state": PumpState.STALLED}),
        ("eri", "battery_eri", {"battery_state": BatteryState.ERI}),
        ("eos", "battery_eos", {"battery_state": BatteryState.EOS}),
    ],
)
def test_a_pump_alarm_the_gateway_covers_is_evidence_not_a_second_alert(
    code: str, kind: str, fields: dict[str, Any]
) -> None:
    f = Feed(AlertEngine(RulesConfig()))
    f.reading(0)
    alarms = (DeviceAlarm(code=code, priority=Priority.HIGH),)
    reservoir = fields.pop("reservoir_ml", 10.0)
    out = f.reading(60, reservoir, alarms=alarms, **fields)
    assert kinds(out) == {kind}
    (t,) = starts(out, kind)
    assert f"pump's own alarm '{code}' is on" in t.text


def test_an_empty_pump_shows_one_empty_alert_not_low_refill_due_or_its_alarm() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    f.reading(0, 5.0)
    out = f.reading(60, 0.5, alarms=(DeviceAlarm(code="low_reservoir", priority=Priority.MEDIUM),))
    assert kinds(out) == {"empty_reservoir"}
    assert kinds(out, "end") == {"refill_due"}
    (empty,) = starts(out, "empty_reservoir")
    assert "pump's own alarm 'low_reservoir' is on" in empty.text


def test_end_of_service_is_one_high_alert_not_three() -> None:
    f = Feed(AlertEngine(RulesConfig()))
    f.reading(0)
    eos = (DeviceAlarm(code="eos", priority=Priority.HIGH),)
    out = f.reading(60, battery_state=BatteryState.EOS, alarms=eos, pump_state=PumpState.STOPPED)
    out += f.reading(60 + 3600, battery_state=BatteryState.EOS, alarms=eos,
                     pump_state=PumpState.STOPPED)  # fmt: skip
    assert [t.alert_kind for t in out if t.priority is Priority.HIGH] == ["battery_eos"]


def test_10_check_config_prints_the_override_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n'
        '[alerts.per_pump."bed 4"]\nrefill_due_days = 3\n'
    )
    assert main(["check-config", str(path)]) == 0
    assert "alerts.per_pump.'bed 4': not a valid pump id" in capsys.readouterr().err


# -- pumps without a delivered count (per model) ----------------------------------------------


def test_a_model_without_a_delivered_count_gets_only_the_refill_comparison() -> None:
    config = RulesConfig(per_model={"8637-20": RuleOverrides(delivered_count=False)})
    f = Feed(AlertEngine(config), factor=0.0)  # the count never moves
    f.info(0)
    out = f.run(0, 2 * DAY_S)
    assert kinds(out) == set()  # no inferred stall, no under-infusion from a count it lacks
    f.reading(2 * DAY_S + 60, 9.0)
    out = f.event(2 * DAY_S + 120, EventKind.REFILL, withdrawn_ml=12.0, filled_ml=18.0)
    assert kinds(out) == {"refill_discrepancy"}  # 3 mL more came out than the estimate
