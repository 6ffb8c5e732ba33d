"""Properties of the alert engine: noise never flaps an alert, and the lifecycle always holds.

Every start is acknowledged at once, so latching cannot hide flapping: only hysteresis and
for-durations stand between a noisy value and a second start.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.rules import AlertEngine, RulesConfig
from schemas.models import (
    Acknowledgement,
    AlarmState,
    AlertTransition,
    BatteryState,
    DeviceAlarm,
    DeviceEvent,
    EventKind,
    Phase,
    Priority,
    PumpState,
    Reading,
)

T0 = datetime(2024, 3, 1, tzinfo=UTC)
ALARM_ML = 2.0
MARGIN_ML = 1.0  # RuleSettings.low_reservoir_clear_margin_ml default
EMPTY_ML = 1.0
BASAL_ML_PER_DAY = 0.5
STEP_S = 900.0


class Pump:
    """Feeds one pump's messages to an engine and acknowledges every start at once."""

    def __init__(self, engine: AlertEngine | None = None) -> None:
        self.engine = engine or AlertEngine(RulesConfig())
        self.seq = 0
        self.t_s = 0.0
        self.delivered_ml = 100.0
        self.log: list[AlertTransition] = []

    def _ids(self) -> dict[str, Any]:
        self.seq += 1
        when = T0 + timedelta(seconds=self.t_s)
        return {"pump_id": "P1", "boot_id": "b1", "seq": self.seq, "device_time": when,
                "received_at": when}

    def send(self, message: Reading | DeviceEvent, auto_ack: bool = True) -> None:
        out = self.engine.on_message(message, message.received_at)
        self.log += out
        if auto_ack:
            for t in out:
                if t.phase is Phase.START:
                    self.ack(t.alert_id)

    def ack(self, alert_id: str) -> None:
        now = T0 + timedelta(seconds=self.t_s)
        self.log += self.engine.on_acknowledgement(Acknowledgement(alert_id=alert_id, by="rn"),
                                                   now)

    def reading(self, reservoir_ml: float = 10.0, factor: float = 1.0, *,
                state: PumpState = PumpState.RUNNING, auto_ack: bool = True,
                step_s: float = STEP_S, **fields: Any) -> None:
        self.t_s += step_s
        if state is PumpState.RUNNING:
            self.delivered_ml += BASAL_ML_PER_DAY * factor * step_s / 86400.0
        self.send(Reading(
            **self._ids(), drug="morphine", pump_state=state, reservoir_ml=reservoir_ml,
            reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=ALARM_ML,
            basal_rate_ml_per_day=BASAL_ML_PER_DAY, delivered_total_ml=self.delivered_ml,
            **fields,
        ), auto_ack)

    def starts(self, kind: str) -> int:
        return sum(1 for t in self.log if t.alert_kind == kind and t.phase is Phase.START)


def genuine_clears(values: list[float], enter: float, leave: float) -> int:
    """How often the values went from the alarm side past the clear edge."""
    clears, on = 0, False
    for v in values:
        if not on and v <= enter:
            on = True
        elif on and v > leave:
            on, clears = False, clears + 1
    return clears


noisy_low = st.lists(st.floats(ALARM_ML - 0.9, ALARM_ML + MARGIN_ML), min_size=1, max_size=80)
any_volume = st.lists(st.floats(0.0, 8.0), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(noisy_low)
def test_noise_around_the_low_reservoir_threshold_starts_at_most_once(
    values: list[float],
) -> None:
    pump = Pump()
    for v in values:
        pump.reading(v)
    assert pump.starts("low_reservoir") == (1 if min(values) <= ALARM_ML else 0)


@settings(max_examples=150, deadline=None)
@given(any_volume)
def test_each_new_reservoir_alert_needs_a_genuine_clear(values: list[float]) -> None:
    pump = Pump()
    for v in values:
        pump.reading(v)
    low_clears = genuine_clears(values, ALARM_ML, ALARM_ML + MARGIN_ML)
    empty_clears = genuine_clears(values, EMPTY_ML, EMPTY_ML + MARGIN_ML)
    assert pump.starts("low_reservoir") <= 1 + low_clears
    assert pump.starts("empty_reservoir") <= 1 + empty_clears


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(6.0, 8.0), min_size=1, max_size=80))
def test_noise_around_the_refill_due_horizon_starts_at_most_once(days: list[float]) -> None:
    pump = Pump()
    for d in days:
        pump.reading(ALARM_ML + d * BASAL_ML_PER_DAY)
    assert pump.starts("refill_due") <= 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1.10, 1.19), min_size=200, max_size=200))
def test_delivery_noise_around_the_over_infusion_limit_starts_at_most_once(
    factors: list[float],
) -> None:
    pump = Pump()
    for f in factors:
        pump.reading(factor=f)
    assert pump.starts("over_infusion") <= 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.81, 0.90), min_size=200, max_size=200))
def test_delivery_noise_around_the_under_infusion_limit_starts_at_most_once(
    factors: list[float],
) -> None:
    pump = Pump()
    for f in factors:
        pump.reading(factor=f)
    assert pump.starts("under_infusion") <= 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=80), st.integers(1, 9))
def test_pump_stops_shorter_than_the_delay_never_start(
    pattern: list[bool], stop_minutes: int
) -> None:
    pump = Pump()
    for stopped in pattern:  # each stop lasts stop_minutes, then the pump runs again
        if stopped:
            pump.send(DeviceEvent(**pump._ids(), event=EventKind.PUMP_STOPPED))
            pump.reading(state=PumpState.STOPPED, step_s=stop_minutes * 60)
            pump.t_s += 1
            pump.send(DeviceEvent(**pump._ids(), event=EventKind.PUMP_STARTED))
        pump.reading()
    assert pump.starts("pump_stopped") == 0


# -- lifecycle invariants over random mixed sequences --------------------------------------

step = st.one_of(
    st.tuples(st.just("reading"), st.floats(0.0, 8.0), st.sampled_from(list(PumpState)),
              st.sampled_from(list(BatteryState)),
              st.sets(st.sampled_from(["a1", "a2", "motor_stall"]), max_size=2),
              st.floats(0.0, 2.0)),
    st.tuples(st.just("event"), st.sampled_from(list(EventKind)), st.floats(0.0, 6.0)),
    st.tuples(st.just("ack"), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.floats(0.0, 2000.0)),
)


def play(pump: Pump, s: tuple[Any, ...]) -> None:
    if s[0] == "reading":
        _, volume, state, battery, codes, factor = s
        alarms = tuple(DeviceAlarm(code=c, priority=Priority.HIGH) for c in sorted(codes))
        pump.reading(volume, factor, state=state, auto_ack=False, battery_state=battery,
                     alarms=alarms)
    elif s[0] == "event":
        _, kind, volume = s
        pump.t_s += 60
        extra: dict[str, Any] = {}
        if kind is EventKind.REFILL:
            extra = {"withdrawn_ml": volume, "filled_ml": 18.0}
        elif kind is EventKind.BOLUS_DELIVERED:
            extra = {"bolus_ml": 0.1}
        pump.send(DeviceEvent(**pump._ids(), event=kind, **extra), auto_ack=False)
    elif s[0] == "ack":
        active = pump.engine.active_alerts("P1")
        if active:
            pump.ack(active[s[1] % len(active)].alert_id)
    else:
        now = T0 + timedelta(seconds=pump.t_s + s[1])
        pump.log += pump.engine.on_tick(now)


RANK = {Priority.LOW: 1, Priority.MEDIUM: 2, Priority.HIGH: 3}


def acknowledgements_per_priority_rise(ts: list[AlertTransition]) -> int:
    """The most acknowledgements between two priority rises: an alert escalated in place
    (low to empty reservoir) needs, and takes, one new acknowledgement."""
    most = acks = 0
    for before, t in zip([None, *ts], ts, strict=False):
        rose = before is not None and RANK.get(t.priority, 0) > RANK.get(before.priority, 0)
        if rose and before is not None and t.alert_kind != before.alert_kind:
            acks = 0
            assert t.acknowledged_by is None, t
        acks += t.phase is Phase.ACKNOWLEDGED
        most = max(most, acks)
    return most


def check_lifecycle(log: list[AlertTransition]) -> dict[str, list[AlertTransition]]:
    by_alert: dict[str, list[AlertTransition]] = defaultdict(list)
    for t in log:
        by_alert[t.alert_id].append(t)
    for alert_id, ts in by_alert.items():
        phases = [t.phase for t in ts]
        assert phases[0] is Phase.START, alert_id
        assert Phase.END not in phases[:-1], alert_id
        assert acknowledgements_per_priority_rise(ts) <= 1, alert_id
        assert phases.count(Phase.START) == 1, alert_id
        for t in ts:
            assert t.state is not AlarmState.LATCHED or t.latching, alert_id
        if phases[-1] is Phase.END and ts[-1].latching:
            assert ts[-1].acknowledged_by is not None, alert_id
    return by_alert


@settings(max_examples=200, deadline=None)
@given(st.lists(step, min_size=1, max_size=60))
def test_random_sequences_keep_the_alert_lifecycle(steps: list[tuple[Any, ...]]) -> None:
    pump = Pump()
    for s in steps:
        play(pump, s)
    ids = [t.transition_id for t in pump.log]
    assert len(ids) == len(set(ids))
    by_alert = check_lifecycle(pump.log)
    still_open = {a for a, ts in by_alert.items() if ts[-1].phase is not Phase.END}
    assert {t.alert_id for t in pump.engine.active_alerts("P1")} == still_open


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=40), st.lists(step, min_size=1, max_size=20))
def test_a_restored_engine_behaves_identically(
    before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]
) -> None:
    original = Pump()
    for s in before:
        play(original, s)
    restored = Pump(AlertEngine(RulesConfig(), original.engine.state_rows()))
    restored.seq, restored.t_s, restored.delivered_ml = (
        original.seq, original.t_s, original.delivered_ml)
    assert restored.engine.active_alerts("P1") == original.engine.active_alerts("P1")
    original.log, restored.log = [], []
    for s in after:
        play(original, s)
        play(restored, s)
    assert restored.log == original.log
