"""The pump model's arithmetic against DOMAIN.md: volumes, boluses, battery, refills, clock."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta
from random import Random

import pytest

from schemas.codec import FrameDecoder, encode_message, message_from_frame
from schemas.models import (
    BatteryState,
    DeviceEvent,
    DeviceInfo,
    DeviceMessageModel,
    Drug,
    EventKind,
    Priority,
    PumpState,
    Reading,
)
from simulator.model import (
    ERI_TO_EOS_S,
    SECONDS_PER_DAY,
    ClockJump,
    FaultPlan,
    FlowFault,
    Pump,
    PumpSpec,
    Refill,
    Window,
    status_after_fill,
)

START = datetime(2024, 3, 1, tzinfo=UTC)
DAY = SECONDS_PER_DAY
HOUR = timedelta(hours=1)


def spec(**overrides: object) -> PumpSpec:
    fields: dict[str, object] = {
        "pump_id": "P0001",
        "serial": "SIM-P0001",
        "model": "pumpsim-20mL",
        "capacity_ml": 20.0,
        "drug": Drug.MORPHINE,
        "concentration_mg_per_ml": 10.0,
        "basal_rate_ml_per_day": 0.5,
    }
    fields.update(overrides)
    return PumpSpec(**fields)  # type: ignore[arg-type]


def pump(plan: FaultPlan | None = None, fill_ml: float = 20.0, **spec_fields: object) -> Pump:
    s = spec(**spec_fields)
    return Pump(s, plan or FaultPlan(), status_after_fill(s, fill_ml), rng=Random(7),
                boot_id="b00710aa", start=START, info_every=24)


def run(p: Pump, hours: int, step: timedelta = HOUR) -> list[DeviceMessageModel]:
    """Step hourly from START + step to START + hours * step, collecting every message."""
    out: list[DeviceMessageModel] = []
    for k in range(1, hours + 1):
        out.extend(p.step(START + step * k))
    return out


def readings(messages: list[DeviceMessageModel]) -> list[Reading]:
    return [m for m in messages if isinstance(m, Reading)]


def events(messages: list[DeviceMessageModel], kind: EventKind) -> list[DeviceEvent]:
    return [m for m in messages if isinstance(m, DeviceEvent) and m.event is kind]


def test_reservoir_after_ten_days_is_fill_minus_basal_rate_times_days() -> None:
    p = pump()
    last = readings(run(p, 240))[-1]
    assert p.status.estimate_ml == pytest.approx(20.0 - 0.5 * 10)
    assert p.status.true_ml == pytest.approx(15.0)
    assert last.reservoir_ml == pytest.approx(15.0, abs=1e-3)
    assert last.delivered_total_ml == pytest.approx(5.0, abs=1e-4)


def test_boluses_come_off_the_reservoir_on_top_of_the_basal_rate() -> None:
    p = pump(bolus_ml=0.05, bolus_lockout_min=60, boluses_per_day_max=10)
    assert p.request_bolus(0.0)
    assert p.request_bolus(2 * 3600.0)
    run(p, 48)
    assert p.status.estimate_ml == pytest.approx(20.0 - 0.5 * 2 - 2 * 0.05)
    assert p.status.delivered_total_ml == pytest.approx(0.5 * 2 + 2 * 0.05)


def test_bolus_inside_the_lockout_is_refused() -> None:
    p = pump(bolus_ml=0.02, bolus_lockout_min=120, boluses_per_day_max=10)
    assert p.request_bolus(0.0)
    assert not p.request_bolus(119 * 60.0)
    assert p.request_bolus(120 * 60.0)
    assert p.status.boluses_denied == 1


def test_daily_bolus_limit_counts_the_last_24_hours() -> None:
    p = pump(bolus_ml=0.02, bolus_lockout_min=0, boluses_per_day_max=4)
    granted = [p.request_bolus(t * 3600.0) for t in range(6)]
    assert granted == [True, True, True, True, False, False]
    assert p.request_bolus(DAY)  # the first one has left the 24 h window
    assert len(p.status.bolus_times_s) == 4


def test_patient_boluses_respect_lockout_and_daily_limit_over_a_week() -> None:
    p = pump(bolus_ml=0.02, bolus_lockout_min=120, boluses_per_day_max=4,
             bolus_requests_per_day=48.0)
    messages = run(p, 7 * 24 * 4, step=timedelta(minutes=15))
    times = [e.device_time for e in events(messages, EventKind.BOLUS_DELIVERED)]
    assert len(times) > 7
    assert all(b - a >= timedelta(minutes=120) for a, b in itertools.pairwise(times))
    for i, t in enumerate(times):
        assert sum(1 for u in times[: i + 1] if t - u < timedelta(days=1)) <= 4
    assert max(r.bolus_count_24h for r in readings(messages)) == 4
    assert p.status.boluses_denied > 0


def test_over_infusion_empties_the_reservoir_faster_than_the_pump_believes() -> None:
    plan = FaultPlan(flow=(FlowFault(Window(0.0), 1.25),))
    p = pump(plan)
    run(p, 240)
    assert p.status.estimate_ml == pytest.approx(15.0)
    assert p.status.true_ml == pytest.approx(20.0 - 1.25 * 5.0)
    assert p.status.delivered_total_ml == pytest.approx(1.25 * 5.0)  # the drive sees it


def test_catheter_occlusion_does_not_show_in_delivered_total() -> None:
    plan = FaultPlan(flow=(FlowFault(Window(0.0), 0.6, seen_by_motor=False),))
    p = pump(plan)
    run(p, 240)
    assert p.status.delivered_total_ml == pytest.approx(5.0)
    assert p.status.true_ml == pytest.approx(20.0 - 0.6 * 5.0)
    assert p.status.estimate_ml == pytest.approx(15.0)


def test_motor_stall_delivers_nothing_and_raises_a_high_priority_alarm() -> None:
    plan = FaultPlan(stalls=(Window(10 * 3600.0, 20 * 3600.0),))
    p = pump(plan)
    messages = run(p, 30)
    rs = readings(messages)
    stalled = [r for r in rs if r.pump_state is PumpState.STALLED]
    assert len(stalled) == 10
    assert len({r.delivered_total_ml for r in stalled}) == 1
    assert all(any(a.code == "motor_stall" and a.priority is Priority.HIGH for a in r.alarms)
               for r in stalled)
    assert len(events(messages, EventKind.MOTOR_STALL_START)) == 1
    assert len(events(messages, EventKind.MOTOR_STALL_END)) == 1
    assert rs[-1].delivered_total_ml == pytest.approx(0.5 * 20 / 24, abs=1e-4)


def test_stopped_pump_neither_delivers_nor_counts_down_its_estimate() -> None:
    p = pump(FaultPlan(stops=(Window(5 * 3600.0, 15 * 3600.0),)))
    messages = run(p, 24)
    assert p.status.estimate_ml == pytest.approx(20.0 - 0.5 * 14 / 24)
    assert [e.event for e in messages if isinstance(e, DeviceEvent)] == [
        EventKind.PUMP_STOPPED, EventKind.PUMP_STARTED]


def test_eri_then_end_of_service_ninety_days_later_stops_the_pump() -> None:
    p = pump(FaultPlan(eri_at_s=DAY), fill_ml=20.0, basal_rate_ml_per_day=0.1)
    messages = run(p, 95, step=timedelta(days=1))
    eri, eos = events(messages, EventKind.ERI), events(messages, EventKind.EOS)
    assert [e.device_time for e in eri] == [START + timedelta(days=1)]
    eos_at = START + timedelta(days=1) + timedelta(seconds=ERI_TO_EOS_S)
    assert [e.device_time for e in eos] == [eos_at]
    before, after = readings(messages)[50], readings(messages)[-1]
    assert before.battery_state is BatteryState.ERI
    assert [a.code for a in before.alarms] == ["eri"]
    assert after.battery_state is BatteryState.EOS
    assert after.pump_state is PumpState.STOPPED
    assert [(a.code, a.priority) for a in after.alarms] == [("eos", Priority.HIGH)]
    assert after.battery_remaining_pct == 0.0
    assert p.status.estimate_ml == pytest.approx(20.0 - 0.1 * 91)


def test_low_battery_reset_is_reported_once_as_an_event_and_a_state() -> None:
    p = pump(FaultPlan(battery_resets_s=(3 * 3600.0,)))
    messages = run(p, 6)
    assert len(events(messages, EventKind.LOW_BATTERY_RESET)) == 1
    states = [r.battery_state for r in readings(messages)]
    assert states == [BatteryState.OK] * 2 + [BatteryState.LBR] + [BatteryState.OK] * 3


def test_refill_reports_the_true_residual_withdrawn_and_the_filled_volume() -> None:
    plan = FaultPlan(flow=(FlowFault(Window(0.0), 1.25),), refills=(Refill(10 * DAY, 20.0),))
    p = pump(plan)
    messages = run(p, 10 * 24)
    (refill,) = events(messages, EventKind.REFILL)
    assert refill.filled_ml == 20.0
    assert refill.withdrawn_ml is not None
    assert refill.withdrawn_ml == pytest.approx(20.0 - 1.25 * 5.0, abs=0.25)
    expected_ml = 20.0 - 0.5 * 10  # the pump's own estimate just before the refill
    assert expected_ml - refill.withdrawn_ml > 1.0
    assert p.status.estimate_ml == p.status.true_ml == 20.0
    assert p.status.programmed_since_fill_ml == 0.0


def test_low_reservoir_alarm_follows_the_estimate_not_the_true_volume() -> None:
    p = pump(FaultPlan(flow=(FlowFault(Window(0.0), 1.25),)), fill_ml=3.0)
    rs = readings(run(p, 5 * 24))  # true flow 0.625 mL/day empties 3 mL in 4.8 days
    first_alarm = next(r for r in rs if any(a.code == "low_reservoir" for a in r.alarms))
    assert first_alarm.reservoir_ml <= 2.0
    assert rs[0].reservoir_ml > 2.0
    assert not rs[0].alarms
    assert p.status.true_ml == 0.0  # empty...
    assert rs[-1].reservoir_ml == pytest.approx(0.5, abs=1e-3)  # ...while the pump says 0.5 mL


def test_info_comes_first_then_every_n_readings_and_seq_is_shared() -> None:
    p = pump()
    messages = run(p, 50)
    assert isinstance(messages[0], DeviceInfo)
    infos = [i for i, m in enumerate(messages) if isinstance(m, DeviceInfo)]
    assert len(infos) == 3  # readings 0, 24 and 48
    assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
    assert {m.boot_id for m in messages} == {"b00710aa"}


def test_device_clock_drifts_and_jumps() -> None:
    plan = FaultPlan(clock_drift_ppm=100.0, clock_jumps=(ClockJump(DAY, 3600.0),))
    p = pump(plan)
    now = START + timedelta(days=2)
    expected = now + timedelta(seconds=2 * DAY * 100e-6 + 3600.0)
    assert p.device_time(now) == expected
    assert p.device_time(START + timedelta(hours=12)) == START + timedelta(hours=12, seconds=4.32)


def test_dropout_sends_nothing_then_delivers_held_events() -> None:
    plan = FaultPlan(dropouts=(Window(5 * 3600.0, 10 * 3600.0),),
                     stalls=(Window(6 * 3600.0, 7 * 3600.0),))
    p = pump(plan)
    per_step = [p.step(START + HOUR * k) for k in range(1, 13)]
    assert [len(batch) == 0 for batch in per_step] == [False] * 4 + [True] * 5 + [False] * 3
    after = per_step[9]
    assert [e.event for e in after if isinstance(e, DeviceEvent)] == [
        EventKind.MOTOR_STALL_START, EventKind.MOTOR_STALL_END]
    seqs = [m.seq for batch in per_step for m in batch]
    lost_readings = 5  # made during the dropout, never heard: their numbers are used up
    assert seqs == [*range(1, seqs.index(after[0].seq) + 1),
                    *range(after[0].seq, after[0].seq + len(seqs) - seqs.index(after[0].seq))]
    assert after[0].seq == per_step[3][-1].seq + lost_readings + 1


def test_emitted_messages_survive_encode_decode_and_validation() -> None:
    p = pump(FaultPlan(refills=(Refill(DAY, 20.0),), stalls=(Window(3600.0, 7200.0),)),
             bolus_ml=0.02, bolus_lockout_min=60, boluses_per_day_max=4,
             bolus_requests_per_day=24.0)
    messages = run(p, 30)
    wire = b"".join(encode_message(m) for m in messages)
    frames = FrameDecoder().feed(wire)
    assert len(frames) == len(messages)
    for message, frame in zip(messages, frames, strict=True):
        assert not isinstance(frame, Exception)
        decoded = message_from_frame(frame, received_at=message.device_time)  # type: ignore[arg-type]
        assert decoded == message
    assert {m.kind for m in messages} == {"info", "reading", "event"}


def test_same_seed_gives_the_same_messages() -> None:
    def once() -> list[bytes]:
        p = pump(bolus_ml=0.02, bolus_lockout_min=60, boluses_per_day_max=4,
                 bolus_requests_per_day=12.0, plan=FaultPlan(refills=(Refill(DAY, 20.0),)))
        return [encode_message(m) for m in run(p, 48)]

    assert once() == once()


def test_battery_remaining_falls_to_zero_at_end_of_service() -> None:
    p = pump(FaultPlan(eri_at_s=10 * DAY))
    assert p.battery_remaining_pct == pytest.approx(
        100.0 * (10 * DAY + ERI_TO_EOS_S) / (7 * 365 * DAY))
    p.status.t_s = 10 * DAY + ERI_TO_EOS_S
    assert p.battery_remaining_pct == 0.0
    assert math.isfinite(pump().battery_remaining_pct)
