"""Every scenario is deterministic for a seed and shows the fault it names."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from schemas.codec import Frame, FrameDecoder, FrameError, message_from_frame
from schemas.models import (
    BatteryState,
    DeviceEvent,
    DeviceMessageModel,
    Drug,
    EventKind,
    PumpState,
    Reading,
)
from simulator.cli import main
from simulator.line import Line
from simulator.model import SECONDS_PER_DAY, Pump
from simulator.scenarios import (
    DEFAULT_COUNT,
    DEFAULT_INTERVAL_S,
    REFILL_TOLERANCE_ML,
    REFILL_TOLERANCE_SHARE,
    SCENARIOS,
    WARD_CYCLE,
    make_fleet,
    scenario_setups,
)

START = datetime(2024, 3, 1, tzinfo=UTC)
SEEDS = (1, 2)
DEFAULT_SPAN_S = DEFAULT_COUNT * DEFAULT_INTERVAL_S
"""The simulated day a scenario is designed for; fault tests cover it in 5-minute steps."""
FAST_INTERVAL_S = 300.0


@dataclass(frozen=True)
class Simulated:
    pumps: list[Pump]
    messages: dict[str, list[DeviceMessageModel]]
    wire: bytes
    line: Line


@functools.cache
def simulate(
    name: str, seed: int, pumps: int = 2, interval_s: float = FAST_INTERVAL_S, span_s: float = 0.0
) -> Simulated:
    """Run a scenario in memory over its default span (or `span_s`), as the simulator would."""
    span_s = span_s or DEFAULT_SPAN_S
    count = round(span_s / interval_s)
    setups = scenario_setups(name, pumps, seed, span_s)
    fleet = make_fleet(setups, seed=seed, start=START,
                       boot_ids=[f"b{i:07x}" for i in range(pumps)], info_every=60)
    line = Line(pump_line for _, pump_line in fleet)
    messages: dict[str, list[DeviceMessageModel]] = {p.spec.pump_id: [] for p, _ in fleet}
    wire = bytearray()
    for k in range(count):
        now = START + timedelta(seconds=k * interval_s)
        for pump, _ in fleet:
            batch = pump.step(now)
            messages[pump.spec.pump_id].extend(batch)
            line.add(pump.spec.pump_id, batch)
        wire += line.take()
    wire += line.take(final=True)
    return Simulated([p for p, _ in fleet], messages, bytes(wire), line)


def each_pump(name: str) -> list[tuple[Pump, list[DeviceMessageModel]]]:
    return [(p, simulate(name, seed).messages[p.spec.pump_id])
            for seed in SEEDS for p in simulate(name, seed).pumps]


def readings(messages: list[DeviceMessageModel]) -> list[Reading]:
    return [m for m in messages if isinstance(m, Reading)]


def events(messages: list[DeviceMessageModel], kind: EventKind) -> list[DeviceEvent]:
    return [m for m in messages if isinstance(m, DeviceEvent) and m.event is kind]


def tolerance_ml(capacity_ml: float, programmed_ml: float) -> float:
    """DOMAIN.md 3: max(14.5 % of what was delivered since the fill, 1 mL / 2 mL)."""
    return max(REFILL_TOLERANCE_SHARE * programmed_ml, REFILL_TOLERANCE_ML[capacity_ml])


def refill_delta_ml(messages: list[DeviceMessageModel], capacity_ml: float,
                    fill_ml: float, rate_ml_per_day: float) -> tuple[float, float]:
    """(withdrawn - the pump's expectation, tolerance) for the one refill in `messages`."""
    (refill,) = events(messages, EventKind.REFILL)
    before = [r for r in readings(messages) if r.seq < refill.seq][-1]
    expected_ml = before.reservoir_ml - rate_ml_per_day * FAST_INTERVAL_S / SECONDS_PER_DAY
    assert refill.withdrawn_ml is not None
    return refill.withdrawn_ml - expected_ml, tolerance_ml(capacity_ml, fill_ml - expected_ml)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_is_deterministic_for_a_seed(name: str) -> None:
    simulate.cache_clear()
    first = simulate(name, 5, interval_s=600.0).wire
    simulate.cache_clear()
    assert simulate(name, 5, interval_s=600.0).wire == first
    assert simulate(name, 6, interval_s=600.0).wire != first


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_intact_frame_of_a_default_run_decodes_and_validates(name: str) -> None:
    sim = simulate(name, 1, pumps=1, interval_s=DEFAULT_INTERVAL_S)
    decoder = FrameDecoder()
    items = decoder.feed(sim.wire) + decoder.flush()
    frames = [i for i in items if isinstance(i, Frame)]
    totals = sim.line.summary()["totals"]
    assert len(frames) == totals["frames_intact"]
    for frame in frames:
        message_from_frame(frame, received_at=START + timedelta(days=2))


def test_normal_pumps_run_without_alarms() -> None:
    for _, messages in each_pump("normal"):
        rs = readings(messages)
        assert len(rs) == DEFAULT_SPAN_S / FAST_INTERVAL_S
        assert all(r.pump_state is PumpState.RUNNING and not r.alarms for r in rs)
        assert rs[-1].delivered_total_ml > rs[0].delivered_total_ml


REFILL_DUE_DAYS = 7.0
"""The gateway's refill-due advisory horizon (gateway.rules, DOMAIN.md 2.1)."""


@pytest.mark.parametrize("name", ["normal", "dropout", "clock-faults", "noisy-line"])
def test_fault_free_pumps_end_the_run_beyond_the_refill_due_horizon(name: str) -> None:
    # Fault-free scenarios must raise no alert at all, not even the refill-due advisory.
    for seed in range(1, 6):
        for setup in scenario_setups(name, 60, seed, DEFAULT_SPAN_S):
            spec = setup.spec
            use_ml_per_day = spec.basal_rate_ml_per_day + spec.bolus_ml * spec.boluses_per_day_max
            left_ml = setup.status.estimate_ml - use_ml_per_day * DEFAULT_SPAN_S / SECONDS_PER_DAY
            days = (left_ml - spec.low_reservoir_alarm_ml) / use_ml_per_day
            assert days > REFILL_DUE_DAYS, (seed, spec)


def test_low_reservoir_crosses_the_alarm_volume() -> None:
    for pump, messages in each_pump("low-reservoir"):
        rs = readings(messages)
        alarm_ml = pump.spec.low_reservoir_alarm_ml
        assert rs[0].reservoir_ml > alarm_ml
        assert not rs[0].alarms
        low = [r for r in rs if r.reservoir_ml <= r.low_reservoir_alarm_ml]
        assert low
        assert all(any(a.code == "low_reservoir" for a in r.alarms) for r in low)


def test_empty_reaches_zero() -> None:
    for pump, messages in each_pump("empty"):
        assert pump.status.true_ml == 0.0
        assert readings(messages)[-1].reservoir_ml == 0.0


def test_motor_stall_stops_delivery_and_ends_stalled() -> None:
    for _, messages in each_pump("motor-stall"):
        assert len(events(messages, EventKind.MOTOR_STALL_START)) == 4
        assert len(events(messages, EventKind.MOTOR_STALL_END)) == 3
        rs = readings(messages)
        for a, b in itertools.pairwise(rs):
            if a.pump_state is b.pump_state is PumpState.STALLED:
                assert b.delivered_total_ml == a.delivered_total_ml
        assert rs[-1].pump_state is PumpState.STALLED


def test_over_infusion_delivers_more_than_programmed_beyond_the_accuracy_limit() -> None:
    for pump, messages in each_pump("over-infusion"):
        rs = readings(messages)
        late = rs[len(rs) // 5 :]
        delivered_ml = late[-1].delivered_total_ml - late[0].delivered_total_ml
        programmed_ml = late[0].reservoir_ml - late[-1].reservoir_ml
        assert delivered_ml > programmed_ml * 1.145
        assert pump.status.true_ml < pump.status.estimate_ml


def test_under_infusion_shows_only_at_refill_as_more_withdrawn_than_expected() -> None:
    for pump, messages in each_pump("under-infusion"):
        spec = pump.spec
        delta, tolerance = refill_delta_ml(messages, spec.capacity_ml, spec.capacity_ml,
                                           spec.basal_rate_ml_per_day)
        assert delta > tolerance
        rs = [r for r in readings(messages) if r.seq < events(messages, EventKind.REFILL)[0].seq]
        delivered_ml = rs[-1].delivered_total_ml - rs[0].delivered_total_ml
        assert delivered_ml == pytest.approx(rs[0].reservoir_ml - rs[-1].reservoir_ml, abs=1e-3)


def test_refill_discrepancy_withdraws_less_than_expected_beyond_tolerance() -> None:
    for pump, messages in each_pump("refill-discrepancy"):
        spec = pump.spec
        delta, tolerance = refill_delta_ml(messages, spec.capacity_ml, spec.capacity_ml,
                                           spec.basal_rate_ml_per_day)
        assert delta < -tolerance


def test_battery_eri_resets_then_reports_eri() -> None:
    for _, messages in each_pump("battery-eri"):
        (reset,) = events(messages, EventKind.LOW_BATTERY_RESET)
        (eri,) = events(messages, EventKind.ERI)
        assert reset.seq < eri.seq
        last = readings(messages)[-1]
        assert last.battery_state is BatteryState.ERI
        assert [a.code for a in last.alarms] == ["eri"]


def test_battery_eos_stops_the_pump() -> None:
    for _, messages in each_pump("battery-eos"):
        assert len(events(messages, EventKind.EOS)) == 1
        last = readings(messages)[-1]
        assert last.pump_state is PumpState.STOPPED
        assert last.battery_state is BatteryState.EOS


def test_pump_stopped_reports_stop_and_restart() -> None:
    for _, messages in each_pump("pump-stopped"):
        kinds = [e.event for e in messages if isinstance(e, DeviceEvent)
                 and e.event is not EventKind.BOLUS_DELIVERED]
        assert kinds == [EventKind.PUMP_STOPPED, EventKind.PUMP_STARTED]
        assert any(r.pump_state is PumpState.STOPPED for r in readings(messages))


def test_dropout_leaves_a_gap_without_frames() -> None:
    for _, messages in each_pump("dropout"):
        times = [r.device_time for r in readings(messages)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) > timedelta(seconds=0.19 * DEFAULT_SPAN_S)


def test_clock_faults_drift_and_jump_both_ways() -> None:
    for _, messages in each_pump("clock-faults"):
        times = [r.device_time for r in readings(messages)]
        steps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        assert max(steps) > FAST_INTERVAL_S + 3500  # +1 h
        assert min(steps) < FAST_INTERVAL_S - 3500  # -1 h
        true_last = START + timedelta(seconds=DEFAULT_SPAN_S - FAST_INTERVAL_S)
        assert times[-1] - true_last == pytest.approx(timedelta(seconds=17.2), abs=timedelta(1))


def test_noisy_line_damage_gives_exactly_one_decoder_error_each() -> None:
    for seed in SEEDS:
        sim = simulate("noisy-line", seed, interval_s=DEFAULT_INTERVAL_S)
        decoder = FrameDecoder()
        items = decoder.feed(sim.wire) + decoder.flush()
        errors = [i for i in items if isinstance(i, FrameError)]
        totals = sim.line.summary()["totals"]
        assert totals["frames_damaged"] > 20
        assert totals["garbage_runs"] > 10
        assert len(errors) == totals["frames_damaged"] + totals["garbage_runs"]
        assert sum(1 for e in errors if e.kind == "checksum") == totals["damaged"]["bitflip"]
        assert sum(1 for i in items if isinstance(i, Frame)) == totals["frames_intact"]


def test_ward_mixes_the_scenarios_with_realistic_therapy() -> None:
    setups = scenario_setups("ward", 2 * len(WARD_CYCLE), seed=4, duration_s=SECONDS_PER_DAY)
    concentrations = {Drug.BACLOFEN: {0.5, 1.0, 2.0}, Drug.MORPHINE: {10.0, 25.0},
                      Drug.ZICONOTIDE: {0.025}}
    for setup in setups:
        spec = setup.spec
        assert spec.concentration_mg_per_ml in concentrations[spec.drug]
        assert 0.1 <= spec.basal_rate_ml_per_day <= 1.0
        assert spec.capacity_ml in (20.0, 40.0)
        assert spec.low_reservoir_alarm_ml in (2.0, 4.0)
        assert 0.0 <= setup.status.estimate_ml <= spec.capacity_ml
    assert {s.spec.drug for s in setups} == set(concentrations)
    noisy = [s for s in setups if s.damage.any]
    assert len(noisy) == 2  # the noisy-line slot, once per cycle


def test_ward_ten_pumps_run_and_validate() -> None:
    sim = simulate("ward", 1, pumps=10, span_s=SECONDS_PER_DAY / 4)
    assert len(sim.pumps) == 10
    assert {m.pump_id for ms in sim.messages.values() for m in ms} == {
        f"P{i:04d}" for i in range(1, 11)}


def test_scenarios_command_prints_one_line_per_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenarios"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(SCENARIOS)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)


# -- scenarios added for the alarm-burden benchmark (issue 10) ------------------------------


@pytest.mark.parametrize(("name", "sign"), [("clock-step-forward", 1), ("clock-step-back", -1)])
def test_clock_steps_are_4_to_24_hours(name: str, sign: int) -> None:
    for _, messages in each_pump(name):
        times = [r.device_time for r in readings(messages)]
        steps_s = [(b - a).total_seconds() - FAST_INTERVAL_S for a, b in itertools.pairwise(times)]
        step_s = max(steps_s) if sign > 0 else min(steps_s)
        assert 4 * 3600 <= abs(step_s) <= 24 * 3600


def test_a_refill_in_a_gap_arrives_after_it_and_is_correct() -> None:
    for pump, messages in each_pump("refill-in-gap"):
        (refill,) = events(messages, EventKind.REFILL)
        before = [r for r in readings(messages) if r.seq < refill.seq][-1]
        after = next(r for r in readings(messages) if r.seq > refill.seq)
        assert after.device_time - before.device_time > timedelta(seconds=0.39 * DEFAULT_SPAN_S)
        rate = pump.spec.basal_rate_ml_per_day
        gap_days = (refill.device_time - before.device_time).total_seconds() / SECONDS_PER_DAY
        assert refill.withdrawn_ml == pytest.approx(before.reservoir_ml - rate * gap_days, abs=0.3)


def test_a_duplicated_refill_is_logged_twice() -> None:
    for _, messages in each_pump("duplicate-refill"):
        first, second = events(messages, EventKind.REFILL)
        assert (first.withdrawn_ml, first.filled_ml) == (second.withdrawn_ml, second.filled_ml)
        assert second.seq == first.seq + 1


def test_reboot_stall_freezes_delivery_across_new_boots() -> None:
    for _, messages in each_pump("reboot-stall"):
        late = [r for r in readings(messages) if r.device_time > START + timedelta(hours=8)]
        assert len({r.boot_id for r in late}) >= 3
        assert {r.delivered_total_ml for r in late} == {late[0].delivered_total_ml}
        assert all(r.pump_state is PumpState.RUNNING for r in late)


def test_rate_fallback_follows_the_low_battery_reset() -> None:
    for pump, messages in each_pump("rate-fallback"):
        (reset,) = events(messages, EventKind.LOW_BATTERY_RESET)
        rates = {r.basal_rate_ml_per_day for r in readings(messages) if r.seq > reset.seq}
        assert rates == {0.048}
        assert pump.spec.basal_rate_ml_per_day >= 0.2


def test_lost_boluses_leave_gaps_the_count_reveals() -> None:
    lost = 0
    for _, messages in each_pump("lost-boluses"):
        seqs = [m.seq for m in messages]
        lost += seqs[-1] - seqs[0] + 1 - len(seqs)  # numbers used up by lost records
        rs = readings(messages)
        sent = events(messages, EventKind.BOLUS_DELIVERED)
        day_before = rs[-1].device_time - timedelta(days=1)
        assert rs[-1].bolus_count_24h >= len([e for e in sent if e.device_time > day_before])
    assert lost > 0


def test_safe_state_stops_the_pump() -> None:
    for _, messages in each_pump("safe-state"):
        last = readings(messages)[-1]
        assert (last.battery_state, last.pump_state) == (BatteryState.SAFE_STATE,
                                                        PumpState.STOPPED)  # fmt: skip


def test_empty_in_gap_runs_dry_while_silent() -> None:
    for _, messages in each_pump("empty-in-gap"):
        rs = readings(messages)
        gap_start, gap_end = max(itertools.pairwise(rs),
                                 key=lambda ab: ab[1].device_time - ab[0].device_time)  # fmt: skip
        assert gap_start.reservoir_ml > 1.0
        assert gap_end.reservoir_ml <= 1.0
