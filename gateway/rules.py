"""The alert engine: pump messages in, IHE PCD ACM alert transitions out.

Pure: imports only the standard library, pydantic and `schemas`; no logging, no
clock, no I/O. Time is passed in. For-durations, windows and rates run on the
pump's own clock (`device_time`: the simulator accelerates it and it is the
physics axis); telemetry loss compares the gateway clock `now` with the pump's
last `received_at`. docs/alerts.md lists every rule, its default and its source.

Lifecycle of one alert (`alert_id` is stable from start to end):

    start (active) --condition resolves--> update (latched)   [latching, not yet acknowledged]
          |  ^-------condition returns-----/
          +--on_acknowledgement--> acknowledged --resolved--> end (inactive)

A latching alert ends only when its condition has resolved and it has been
acknowledged; a non-latching alert ends when its condition resolves.
Acknowledging records that a person has seen the alert; it never clears the
pump's own alarm.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import BaseModel, Field
from pydantic.dataclasses import dataclass as state_class

from gateway.alert_settings import RuleOverrides, RulesConfig, RuleSettings
from schemas.models import (
    Acknowledgement,
    AlarmState,
    AlertTransition,
    AlertType,
    BatteryState,
    DeviceEvent,
    DeviceInfo,
    Drug,
    EventKind,
    Inactivation,
    Phase,
    Priority,
    PumpState,
    Reading,
)

__all__ = ["AlertEngine", "RuleOverrides", "RuleSettings", "RulesConfig"]

SECONDS_PER_DAY: Final = 86_400.0
SECONDS_PER_HOUR: Final = 3_600.0
FLOW_SAMPLES_PER_WINDOW: Final = 96
"""[D] Flow-window resolution: memory per pump stays bounded whatever the reading rate."""
BOOTS_REMEMBERED: Final = 8
"""Recent boot sessions per pump whose messages are recognised as replays."""
MAX_TEXT_CHARS: Final = 500
_KIND_PATTERN: Final = re.compile(r"[a-z0-9_]{1,40}")
_PUMP_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_UNIT_CHARS: Final = 16

# -- engine state (serialised by snapshot()) ----------------------------------------


@state_class(slots=True)
class _Alert:
    """One alert that has started and not yet ended."""

    alert_id: str
    kind: str
    priority: Priority
    alert_type: AlertType
    latching: bool
    one_shot: bool
    unit: str | None
    title: str
    details: str
    value: float | None
    threshold: float | None
    state: AlarmState = AlarmState.ACTIVE
    acked_by: str | None = None
    acked_at: datetime | None = None
    transitions: int = 0
    last: AlertTransition | None = None


@state_class(slots=True)
class _Pump:
    """What the engine knows about one pump; runtime state and snapshot at once."""

    pump_id: str
    boots: dict[str, int] = Field(default_factory=dict)
    boot_id: str | None = None
    seq: int = -1
    received_s: float | None = None
    drug: Drug | None = None
    reservoir_ml: float | None = None
    capacity_ml: float | None = None
    alarm_ml: float = 2.0
    alarm_used_ml: float = 2.0
    basal_ml_per_day: float = 0.0
    bolus_dose_ml: float = 0.0
    boluses_per_day_max: int = 0
    delivered_ml: float | None = None
    delivered_at_fill_ml: float | None = None
    pump_state: PumpState = PumpState.RUNNING
    battery_state: BatteryState = BatteryState.OK
    device_alarms: dict[str, Priority] = Field(default_factory=dict)
    delivery_s: float | None = None
    reading_s: float | None = None
    stall_resumed: bool = False
    stopped_since_s: float | None = None
    flow_s: float | None = None
    flow_rate_ml_per_day: float = 0.0
    flow_running: bool = False
    expected_total_ml: float = 0.0
    samples: deque[tuple[float, float, float]] = Field(default_factory=deque)
    refill_withdrawn_ml: float = 0.0
    refill_expected_ml: float = 0.0
    on: set[str] = Field(default_factory=set)
    since: dict[str, float] = Field(default_factory=dict)
    alerts: dict[str, _Alert] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)
    settings: RuleSettings | None = Field(default=None, exclude=True)


class _Snapshot(BaseModel):
    version: Literal[1] = 1
    pumps: dict[str, _Pump]


# -- rule table --------------------------------------------------------------------

Describe = Callable[[_Pump, str, float | None, float | None], str]


@dataclass(frozen=True, slots=True)
class _Spec:
    """The fixed part of one rule: IEC 60601-1-8 / IHE ACM allocation and wording."""

    kind: str
    title: str
    priority: Priority
    alert_type: AlertType
    latching: bool
    unit: str | None
    describe: Describe
    one_shot: bool = False


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "unknown" if value is None else format(value, spec)


def _low_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"reservoir {_fmt(v)} mL, alarm volume {_fmt(thr)} mL. The volume is the pump's "
        "estimate computed from the programmed rate, not a measurement; an over-infusing "
        "pump can be emptier than it reports."
    )


def _empty_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"reservoir {_fmt(v)} mL, empty level {_fmt(thr)} mL. The volume is the pump's "
        "estimate computed from the programmed rate, not a measurement; therapy may stop."
    )


def _refill_due_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"about {_fmt(v)} days until the estimated reservoir reaches the alarm volume "
        f"{p.alarm_used_ml:.1f} mL (advisory at {_fmt(thr)} days; assumes the basal rate plus "
        "every allowed bolus)."
    )


def _stall_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    if p.pump_state is PumpState.STALLED or "motor_stall" in p.device_alarms:
        return "the pump reports a motor stall; drug delivery has stopped."
    return (
        f"no delivered volume for {_fmt(v)} h while running at {p.basal_ml_per_day:.3f} mL/d "
        f"(window {_fmt(thr)} h); delivery may have stopped."
    )


def _flow_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    hours = (p.settings or RuleSettings()).flow_window_h
    return (
        f"delivered {_fmt(v, '+.1f')} % against the programmed volume over the last "
        f"{hours:g} h (limit {_fmt(thr, '+.1f')} %)."
    )


def _stopped_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"pump stopped for {_fmt(v, '.0f')} min with therapy programmed at "
        f"{p.basal_ml_per_day:.3f} mL/d (delay {_fmt(thr, '.0f')} min); an unfinished "
        "programming session leaves the pump stopped."
    )


def _discrepancy_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    sign = (
        "suspected over-infusion or leak"
        if (v or 0.0) < 0
        else "suspected under-infusion, stall or occlusion"
    )
    return (
        f"withdrawn {p.refill_withdrawn_ml:.1f} mL, pump estimate {p.refill_expected_ml:.1f} "
        f"mL (difference {_fmt(v, '+.1f')} mL, tolerance {_fmt(thr)} mL): {sign}."
    )


def _fixed(text: str) -> Describe:
    return lambda p, key, v, thr: text


def _device_alarm_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    code = key.partition(":")[2]
    priority = p.device_alarms.get(code)
    shown = f" (priority {priority.value})" if priority is not None else ""
    return (
        f"'{code}'{shown} is the pump's own alarm, passed through as the pump reports it. "
        "This gateway can neither silence nor clear it; attend to the pump."
    )


def _telemetry_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"no message from the pump for {_fmt(v, '.0f')} s (limit {_fmt(thr, '.0f')} s). "
        "The pump's own alarms are unaffected but are not visible here."
    )


PH, PM, PL = Priority.HIGH, Priority.MEDIUM, Priority.LOW
ST, SA = AlertType.TECHNICAL, AlertType.ADVISORY
LOW_RESERVOIR = _Spec("low_reservoir", "Low reservoir", PM, ST, True, "mL", _low_text)
EMPTY_RESERVOIR = _Spec("empty_reservoir", "Empty reservoir", PH, ST, True, "mL", _empty_text)
REFILL_DUE = _Spec("refill_due", "Refill due", PL, SA, False, "d", _refill_due_text)
MOTOR_STALL = _Spec("motor_stall", "Motor stall", PH, ST, True, "h", _stall_text)
OVER_INFUSION = _Spec("over_infusion", "Over-infusion", PH, ST, True, "%", _flow_text)
UNDER_INFUSION = _Spec("under_infusion", "Under-infusion", PM, ST, True, "%", _flow_text)
PUMP_STOPPED = _Spec("pump_stopped", "Pump stopped", PH, ST, True, "min", _stopped_text)
REFILL_DISCREPANCY = _Spec(
    "refill_discrepancy",
    "Refill discrepancy",
    PM,
    ST,
    True,
    "mL",
    _discrepancy_text,
    one_shot=True,
)
BATTERY_ERI = _Spec(
    "battery_eri",
    "Battery ERI",
    PM,
    ST,
    True,
    None,
    _fixed(
        "the pump reports its elective replacement indicator; it stops about 90 days "
        "after ERI. Schedule a replacement."
    ),
)
BATTERY_EOS = _Spec(
    "battery_eos",
    "Battery end of service",
    PH,
    ST,
    True,
    None,
    _fixed("the pump reports battery end of service; drug delivery may have stopped."),
)
LOW_BATTERY_RESET = _Spec(
    "low_battery_reset",
    "Low battery reset",
    PM,
    ST,
    True,
    None,
    _fixed(
        "the pump reports a low battery reset; repeated resets can mean a failing "
        "pump. Review replacement."
    ),
)
SAFE_STATE = _Spec(
    "safe_state",
    "Safe state",
    PH,
    ST,
    True,
    None,
    _fixed("the pump reports safe state; drug delivery may be reduced or stopped."),
)
TELEMETRY_LOST = _Spec("telemetry_lost", "Telemetry lost", PL, ST, False, "s", _telemetry_text)
DEVICE_ALARM_KIND: Final = "device_alarm"
_DEVICE_ALARM_SPECS: Final = {
    priority: _Spec(DEVICE_ALARM_KIND, "Pump alarm", priority, ST, False, None, _device_alarm_text)
    for priority in Priority
}
_BATTERY_RULES: Final = (
    (BATTERY_ERI, BatteryState.ERI),
    (BATTERY_EOS, BatteryState.EOS),
    (LOW_BATTERY_RESET, BatteryState.LBR),
    (SAFE_STATE, BatteryState.SAFE_STATE),
)
_BATTERY_BY_EVENT: Final = {
    EventKind.ERI: BatteryState.ERI,
    EventKind.EOS: BatteryState.EOS,
    EventKind.LOW_BATTERY_RESET: BatteryState.LBR,
}
_BATTERY_KINDS: Final = frozenset(spec.kind for spec, _ in _BATTERY_RULES)
_LOW, _EMPTY, _DUE = LOW_RESERVOIR.kind, EMPTY_RESERVOIR.kind, REFILL_DUE.kind
_STALL, _STOPPED, _LOST = MOTOR_STALL.kind, PUMP_STOPPED.kind, TELEMETRY_LOST.kind
_OVER, _UNDER = OVER_INFUSION.kind, UNDER_INFUSION.kind
_PUMP_STATE_BY_EVENT: Final = {
    EventKind.MOTOR_STALL_START: PumpState.STALLED,
    EventKind.MOTOR_STALL_END: PumpState.RUNNING,
    EventKind.PUMP_STOPPED: PumpState.STOPPED,
    EventKind.PUMP_STARTED: PumpState.RUNNING,
}
_PHASE_WORDS: Final = {
    (Phase.START, AlarmState.ACTIVE): "",
    (Phase.UPDATE, AlarmState.LATCHED): " (condition resolved; latched until acknowledged)",
    (Phase.END, AlarmState.INACTIVE): " ended",
}


# -- the engine ----------------------------------------------------------------------


class AlertEngine:
    """Evaluates pump messages against the rules; single-threaded, clock passed in."""

    def __init__(self, config: RulesConfig, state: bytes | None = None) -> None:
        self._config = config
        self._pumps: dict[str, _Pump] = {}
        self._by_id: dict[str, tuple[_Pump, str]] = {}
        self._out: list[AlertTransition] = []
        self._now = datetime.fromtimestamp(0.0, UTC)
        self._message: Reading | DeviceInfo | DeviceEvent | None = None
        self._cause: str | None = None
        if state is not None:
            self._pumps = dict(_Snapshot.model_validate_json(state).pumps)
            self._by_id = {
                alert.alert_id: (pump, key)
                for pump in self._pumps.values()
                for key, alert in pump.alerts.items()
            }

    # -- public API ------------------------------------------------------------------

    def on_message(
        self, message: Reading | DeviceInfo | DeviceEvent, now: datetime
    ) -> list[AlertTransition]:
        """Evaluate one validated device message; replays and duplicates yield nothing."""
        p = self._pumps.get(message.pump_id) or self._add_pump(message.pump_id)
        seq = message.seq
        if message.boot_id == p.boot_id and seq > p.seq:
            p.seq = seq  # the usual case, without a call
        elif not _is_new(p, message.boot_id, seq):
            return []
        self._now, self._message, self._cause = now, message, None
        out = self._out = []
        t = message.device_time.timestamp()
        received_s = message.received_at.timestamp()
        if _LOST in p.on:
            gap_s = received_s - (p.received_s or received_s)
            s = self._settings(p)
            self._drive(p, TELEMETRY_LOST, _LOST, False, 0.0, t, gap_s, s.telemetry_lost_after_s)
        p.received_s = received_s
        if isinstance(message, Reading):
            self._on_reading(p, message, t)
        elif isinstance(message, DeviceEvent):
            self._on_event(p, message, t)
        else:
            self._on_info(p, message, t)
        return out

    def on_tick(self, now: datetime) -> list[AlertTransition]:
        """Wall-clock checks: telemetry lost."""
        out = self._begin(now, None)
        now_s = now.timestamp()
        for p in self._pumps.values():
            if p.received_s is None or _LOST in p.on:
                continue
            limit_s = self._settings(p).telemetry_lost_after_s
            gap_s = now_s - p.received_s
            if gap_s > limit_s:
                self._cause = f"{p.pump_id}:{p.boot_id}:{p.seq}"
                self._drive(p, TELEMETRY_LOST, _LOST, True, 0.0, now_s, gap_s, limit_s)
        return out

    def on_acknowledgement(self, ack: Acknowledgement, now: datetime) -> list[AlertTransition]:
        """Record an operator's acknowledgement; unknown, ended or acknowledged ids: nothing."""
        found = self._by_id.get(ack.alert_id)
        if found is None:
            return []
        p, key = found
        alert = p.alerts[key]
        if alert.acked_by is not None:
            return []
        out = self._begin(now, None)
        alert.acked_by, alert.acked_at = ack.by, ack.at or now
        self._emit(p, alert, Phase.ACKNOWLEDGED, alert.state)
        if alert.one_shot:
            p.on.discard(key)
        if key not in p.on:
            self._end(p, key, alert)
        return out

    def set_condition(
        self,
        pump_id: str,
        alert_kind: str,
        active: bool,
        *,
        priority: Priority,
        alert_type: AlertType,
        latching: bool,
        text: str,
        value: float | None,
        threshold: float | None,
        unit: str | None,
        now: datetime,
    ) -> list[AlertTransition]:
        """Raise or resolve a condition the gateway detects itself (e.g. outbox_full)."""
        if not _KIND_PATTERN.fullmatch(alert_kind):
            raise ValueError(f"alert_kind {alert_kind!r} must match {_KIND_PATTERN.pattern}")
        if not _PUMP_ID_PATTERN.fullmatch(pump_id):
            raise ValueError(f"pump_id {pump_id!r} must match {_PUMP_ID_PATTERN.pattern}")
        if unit is not None and len(unit) > MAX_UNIT_CHARS:
            raise ValueError(f"unit {unit!r} is longer than {MAX_UNIT_CHARS} characters")
        p = self._pumps.get(pump_id) or self._add_pump(pump_id)
        out = self._begin(now, None)
        title = alert_kind.replace("_", " ").capitalize()
        spec = _Spec(alert_kind, title, priority, alert_type, latching, unit, _fixed(text))
        self._drive(p, spec, alert_kind, active, 0.0, now.timestamp(), value, threshold)
        return out

    def active_alerts(self, pump_id: str) -> tuple[AlertTransition, ...]:
        """Latest transition of each alert of this pump that has not ended."""
        p = self._pumps.get(pump_id)
        if p is None:
            return ()
        return tuple(a.last for a in p.alerts.values() if a.last is not None)

    def pumps(self) -> list[str]:
        """Every pump the engine has state for, sorted."""
        return sorted(self._pumps)

    def snapshot(self) -> bytes:
        """The whole state as JSON; AlertEngine(config, snapshot) behaves identically."""
        return _Snapshot(pumps=self._pumps).model_dump_json().encode()

    # -- message handling ------------------------------------------------------------

    def _add_pump(self, pump_id: str) -> _Pump:
        p = self._pumps[pump_id] = _Pump(pump_id=pump_id)
        return p

    def _settings(self, p: _Pump) -> RuleSettings:
        if p.settings is None:
            p.settings = self._config.settings_for(p.pump_id, p.drug)
        return p.settings

    def _set_drug(self, p: _Pump, drug: Drug) -> None:
        if drug is not p.drug:
            p.drug = drug
            p.settings = None

    def _begin(
        self, now: datetime, message: Reading | DeviceInfo | DeviceEvent | None
    ) -> list[AlertTransition]:
        self._now, self._message, self._cause = now, message, None
        self._out = []
        return self._out

    def _on_reading(self, p: _Pump, r: Reading, t: float) -> None:
        if r.drug is not p.drug:
            self._set_drug(p, r.drug)
        s = p.settings or self._settings(p)
        p.reading_s = t
        delivered_ml = r.delivered_total_ml
        if p.delivered_ml is None or delivered_ml != p.delivered_ml:
            self._on_delivered(p, delivered_ml, t)
        if r.pump_state is not p.pump_state:
            _set_pump_state(p, r.pump_state, t)
        p.reservoir_ml = r.reservoir_ml
        p.capacity_ml = r.reservoir_capacity_ml
        p.alarm_ml = r.low_reservoir_alarm_ml
        p.basal_ml_per_day = r.basal_rate_ml_per_day
        p.battery_state = r.battery_state
        if r.alarms or p.device_alarms:
            self._device_alarm_rule(p, s, r, t)
        self._flow_rules(p, s, r, t)
        self._state_rules(p, s, t)

    def _on_delivered(self, p: _Pump, delivered_ml: float, t: float) -> None:
        if p.delivered_ml is not None and delivered_ml > p.delivered_ml:
            p.stall_resumed = True
        else:  # first reading, or the counter went back: start the windows afresh
            p.samples.clear()
            p.flow_s = None
        if p.delivered_at_fill_ml is None or delivered_ml < p.delivered_at_fill_ml:
            p.delivered_at_fill_ml = delivered_ml
        p.delivered_ml = delivered_ml
        p.delivery_s = t

    def _on_event(self, p: _Pump, e: DeviceEvent, t: float) -> None:
        s = p.settings or self._settings(p)
        kind = e.event
        if kind in _PUMP_STATE_BY_EVENT:
            _set_pump_state(p, _PUMP_STATE_BY_EVENT[kind], t)
            if kind is EventKind.MOTOR_STALL_END:
                p.stall_resumed = True
        elif kind in _BATTERY_BY_EVENT:
            p.battery_state = _BATTERY_BY_EVENT[kind]
        elif kind is EventKind.BOLUS_DELIVERED:
            p.expected_total_ml += e.bolus_ml or 0.0
        elif kind is EventKind.REFILL:
            self._refill_rule(p, s, e.withdrawn_ml or 0.0, e.filled_ml or 0.0, t)
        self._state_rules(p, s, t)

    def _on_info(self, p: _Pump, info: DeviceInfo, t: float) -> None:
        self._set_drug(p, info.drug)
        prescription = info.prescription
        p.capacity_ml = info.reservoir_capacity_ml
        p.alarm_ml = prescription.low_reservoir_alarm_ml
        p.basal_ml_per_day = prescription.basal_rate_ml_per_day
        p.bolus_dose_ml = prescription.bolus_dose_ml
        p.boluses_per_day_max = prescription.boluses_per_day_max
        self._state_rules(p, self._settings(p), t)

    # -- rules -----------------------------------------------------------------------

    def _state_rules(self, p: _Pump, s: RuleSettings, t: float) -> None:
        # Each `raw or key in on or key in since` skips a _drive that could only say "still off".
        on, since = p.on, p.since
        if p.reservoir_ml is not None:
            self._reservoir_rules(p, s, p.reservoir_ml, t)
        self._stall_rule(p, s, t)
        stopped = p.pump_state is PumpState.STOPPED and p.basal_ml_per_day > 0.0
        if stopped or _STOPPED in on or _STOPPED in since:
            minutes = (t - (p.stopped_since_s or t)) / 60.0
            self._drive(
                p,
                PUMP_STOPPED,
                _STOPPED,
                stopped,
                s.pump_stopped_for_s,
                t,
                minutes,
                s.pump_stopped_for_s / 60.0,
            )
        battery = p.battery_state
        if battery is not BatteryState.OK or not _BATTERY_KINDS.isdisjoint(on) or since:
            for spec, state in _BATTERY_RULES:
                self._drive(p, spec, spec.kind, battery is state, s.battery_for_s, t, None, None)

    def _reservoir_rules(self, p: _Pump, s: RuleSettings, v: float, t: float) -> None:
        configured = s.low_reservoir_alarm_ml
        alarm = p.alarm_used_ml = p.alarm_ml if configured is None else configured
        margin = s.low_reservoir_clear_margin_ml
        on, since = p.on, p.since
        low = v <= alarm + margin if _LOW in on else v <= alarm
        if low or _LOW in on or _LOW in since:
            self._drive(p, LOW_RESERVOIR, _LOW, low, s.low_reservoir_for_s, t, v, alarm)
        empty_ml = s.empty_reservoir_ml
        empty = v <= empty_ml + margin if _EMPTY in on else v <= empty_ml
        if empty or _EMPTY in on or _EMPTY in since:
            self._drive(p, EMPTY_RESERVOIR, _EMPTY, empty, s.empty_reservoir_for_s, t, v, empty_ml)
        use_ml_per_day = p.basal_ml_per_day + p.bolus_dose_ml * p.boluses_per_day_max
        days = (v - alarm) / use_ml_per_day if use_ml_per_day > 0.0 else None
        due = False
        if days is not None:
            limit = s.refill_due_days
            if _DUE in on:
                limit += s.refill_due_clear_margin_days
            due = days <= limit
        if due or _DUE in on:
            self._drive(p, REFILL_DUE, _DUE, due, 0.0, t, days, s.refill_due_days)

    def _stall_rule(self, p: _Pump, s: RuleSettings, t: float) -> None:
        reported = p.pump_state is PumpState.STALLED or "motor_stall" in p.device_alarms
        running = p.pump_state is PumpState.RUNNING and p.basal_ml_per_day > 0.0
        if not running or p.delivery_s is None or p.reading_s is None:
            p.delivery_s = t  # the no-delivery clock runs only while therapy should flow
        # Only readings carry the delivered count: an event long after the last reading
        # (one logged during a dropout, say) is not evidence that nothing was delivered.
        idle_h = max(0.0, (p.reading_s or t) - p.delivery_s) / SECONDS_PER_HOUR
        raw = reported or idle_h >= s.stall_window_h
        if raw:
            p.stall_resumed = False
        elif _STALL in p.on:
            raw = not p.stall_resumed  # ends only when delivery resumes or the pump says so
        if raw or _STALL in p.on:
            self._drive(p, MOTOR_STALL, _STALL, raw, 0.0, t, idle_h, s.stall_window_h)

    def _flow_rules(self, p: _Pump, s: RuleSettings, r: Reading, t: float) -> None:
        window_s = s.flow_window_h * SECONDS_PER_HOUR
        sampled = _integrate_flow(p, r, t, window_s)
        on, since = p.on, p.since
        if not sampled and _OVER not in on and _UNDER not in on and not since:
            return  # verdicts at window/96 resolution; every reading once something is up
        deviation_pct = _flow_deviation_pct(p, s, r.delivered_total_ml, t, window_s)
        over = under = False
        if deviation_pct is not None:
            over_pct, under_pct = s.over_infusion_pct, s.under_infusion_pct
            if _OVER in on:
                over_pct -= s.flow_clear_margin_pct
            if _UNDER in on:
                under_pct -= s.flow_clear_margin_pct
            over = deviation_pct > over_pct
            under = deviation_pct < -under_pct
        if over or _OVER in on or _OVER in since:
            self._drive(
                p,
                OVER_INFUSION,
                _OVER,
                over,
                s.over_infusion_for_s,
                t,
                deviation_pct,
                s.over_infusion_pct,
            )
        if under or _UNDER in on or _UNDER in since:
            self._drive(
                p,
                UNDER_INFUSION,
                _UNDER,
                under,
                s.under_infusion_for_s,
                t,
                deviation_pct,
                -s.under_infusion_pct,
            )

    def _device_alarm_rule(self, p: _Pump, s: RuleSettings, r: Reading, t: float) -> None:
        now_alarms = {alarm.code: alarm.priority for alarm in r.alarms}
        before = p.device_alarms
        p.device_alarms = now_alarms
        for code in {**before, **now_alarms}:
            key = f"{DEVICE_ALARM_KIND}:{code}"
            priority = now_alarms.get(code) or before[code]
            alert = p.alerts.get(key)
            if alert is not None and code in now_alarms and alert.priority is not priority:
                alert.priority = priority
                details = _device_alarm_text(p, key, None, None)
                self._update(p, alert, None, None, details, " (priority changed)")
            self._drive(
                p,
                _DEVICE_ALARM_SPECS[priority],
                key,
                code in now_alarms,
                s.device_alarm_for_s,
                t,
                None,
                None,
            )

    def _refill_rule(
        self, p: _Pump, s: RuleSettings, withdrawn_ml: float, filled_ml: float, t: float
    ) -> None:
        if p.reservoir_ml is not None:
            expected_ml = p.reservoir_ml
            delta_ml = withdrawn_ml - expected_ml
            used_ml = max((p.delivered_ml or 0.0) - (p.delivered_at_fill_ml or 0.0), 0.0)
            small = p.capacity_ml is None or p.capacity_ml <= s.small_reservoir_max_ml
            floor_ml = s.refill_discrepancy_small_ml if small else s.refill_discrepancy_large_ml
            tolerance_ml = max(floor_ml, s.refill_discrepancy_pct / 100.0 * used_ml)
            p.refill_withdrawn_ml, p.refill_expected_ml = withdrawn_ml, expected_ml
            key = REFILL_DISCREPANCY.kind
            outside = abs(delta_ml) > tolerance_ml
            alert = p.alerts.get(key)
            if outside and key in p.on and alert is not None:
                details = _discrepancy_text(p, key, delta_ml, tolerance_ml)
                self._update(p, alert, delta_ml, tolerance_ml, details, " (another refill)")
            else:
                self._drive(p, REFILL_DISCREPANCY, key, outside, 0.0, t, delta_ml, tolerance_ml)
        p.reservoir_ml = filled_ml
        p.delivered_at_fill_ml = p.delivered_ml

    # -- alert lifecycle -------------------------------------------------------------

    def _drive(
        self,
        p: _Pump,
        spec: _Spec,
        key: str,
        raw: bool,
        for_s: float,
        t: float,
        value: float | None,
        threshold: float | None,
    ) -> None:
        """Debounce one condition and move its alert: the only place conditions change."""
        if raw:
            if key in p.on:
                return
            since = p.since.get(key)
            if since is None or t < since:  # a clock that went back restarts the delay
                p.since[key] = since = t
            if t - since < for_s:
                return
            del p.since[key]
            p.on.add(key)
            self._raise(p, spec, key, value, threshold)
        elif key in p.on:
            p.on.discard(key)
            alert = p.alerts.get(key)
            if alert is not None:
                self._resolve(p, spec, key, alert, value, threshold)
        elif key in p.since:
            del p.since[key]

    def _raise(
        self, p: _Pump, spec: _Spec, key: str, value: float | None, threshold: float | None
    ) -> None:
        details = spec.describe(p, key, value, threshold)
        alert = p.alerts.get(key)
        if alert is not None:  # latched and not yet acknowledged: present again
            alert.state = AlarmState.ACTIVE
            self._update(p, alert, value, threshold, details, " (present again)")
            return
        n = p.counters[spec.kind] = p.counters.get(spec.kind, 0) + 1  # per (pump, kind)
        alert = _Alert(
            alert_id=f"{p.pump_id}:{key}:{n}",
            kind=spec.kind,
            priority=spec.priority,
            alert_type=spec.alert_type,
            latching=spec.latching,
            one_shot=spec.one_shot,
            unit=spec.unit,
            title=spec.title,
            details=details,
            value=value,
            threshold=threshold,
        )
        p.alerts[key] = alert
        self._by_id[alert.alert_id] = (p, key)
        self._emit(p, alert, Phase.START, AlarmState.ACTIVE)

    def _resolve(
        self,
        p: _Pump,
        spec: _Spec,
        key: str,
        alert: _Alert,
        value: float | None,
        threshold: float | None,
    ) -> None:
        alert.value, alert.threshold = value, threshold
        alert.details = spec.describe(p, key, value, threshold)
        if alert.latching and alert.acked_by is None:
            self._emit(p, alert, Phase.UPDATE, AlarmState.LATCHED)
        else:
            self._end(p, key, alert)

    def _update(
        self,
        p: _Pump,
        alert: _Alert,
        value: float | None,
        threshold: float | None,
        details: str,
        words: str,
    ) -> None:
        alert.value, alert.threshold, alert.details = value, threshold, details
        self._emit(p, alert, Phase.UPDATE, alert.state, words)

    def _end(self, p: _Pump, key: str, alert: _Alert) -> None:
        del p.alerts[key]
        self._by_id.pop(alert.alert_id, None)
        self._emit(p, alert, Phase.END, AlarmState.INACTIVE)

    def _emit(
        self, p: _Pump, alert: _Alert, phase: Phase, state: AlarmState, words: str = ""
    ) -> None:
        alert.transitions += 1
        alert.state = state
        if phase is Phase.ACKNOWLEDGED:
            words = f" acknowledged by {alert.acked_by} (recorded here only)"
        elif not words:
            words = _PHASE_WORDS.get((phase, state), "")
        message = self._message
        transition = AlertTransition(
            alert_id=alert.alert_id,
            transition_id=f"{alert.alert_id}:{phase.value}:{alert.transitions}",
            pump_id=p.pump_id,
            alert_kind=alert.kind,
            priority=alert.priority,
            alert_type=alert.alert_type,
            state=state,
            phase=phase,
            inactivation=Inactivation.ACKNOWLEDGED if alert.acked_by else Inactivation.ENABLED,
            latching=alert.latching,
            value=alert.value,
            threshold=alert.threshold,
            unit=alert.unit,
            text=f"{alert.title}{words}: {alert.details}"[:MAX_TEXT_CHARS],
            at=self._now,
            device_time=message.device_time if message is not None else None,
            cause_record_id=message.record_id if message is not None else self._cause,
            acknowledged_by=alert.acked_by,
            acknowledged_at=alert.acked_at,
        )
        alert.last = transition
        self._out.append(transition)


# -- pure helpers ----------------------------------------------------------------------


def _is_new(p: _Pump, boot_id: str, seq: int) -> bool:
    """Track (boot_id, seq); False for a replay, a duplicate or an earlier boot session."""
    if boot_id == p.boot_id:
        if seq <= p.seq:
            return False
    elif boot_id in p.boots:
        return False  # a session the pump has already left: historical, never live
    else:
        if p.boot_id is not None:
            p.boots[p.boot_id] = p.seq
        while len(p.boots) > BOOTS_REMEMBERED:
            del p.boots[next(iter(p.boots))]
        p.boot_id = boot_id
        _new_boot(p)
    p.seq = seq
    return True


def _new_boot(p: _Pump) -> None:
    """A reboot may reset the pump clock: restart every device-time window, keep alerts."""
    p.since.clear()
    p.samples.clear()
    p.flow_s = None
    p.delivery_s = None
    p.reading_s = None
    p.stopped_since_s = None


def _set_pump_state(p: _Pump, state: PumpState, t: float) -> None:
    if state is PumpState.STOPPED and p.pump_state is not PumpState.STOPPED:
        p.stopped_since_s = t
    p.pump_state = state


def _integrate_flow(p: _Pump, r: Reading, t: float, window_s: float) -> bool:
    """Add the programmed volume since the last reading; True when a window sample was taken."""
    if p.flow_s is not None:
        if t < p.flow_s:  # the pump clock went back: the window means nothing now
            p.samples.clear()
        elif p.flow_running:
            p.expected_total_ml += p.flow_rate_ml_per_day * (t - p.flow_s) / SECONDS_PER_DAY
    p.flow_s = t
    p.flow_rate_ml_per_day = r.basal_rate_ml_per_day
    p.flow_running = r.pump_state is PumpState.RUNNING
    samples = p.samples
    if samples and t - samples[-1][0] < window_s / FLOW_SAMPLES_PER_WINDOW:
        return False
    samples.append((t, r.delivered_total_ml, p.expected_total_ml))
    start_s = t - window_s
    while len(samples) > 1 and samples[1][0] <= start_s:
        samples.popleft()
    return True


def _flow_deviation_pct(
    p: _Pump, s: RuleSettings, delivered_ml: float, t: float, window_s: float
) -> float | None:
    """Delivered against programmed volume over the window, in %; None without a verdict."""
    first_s, first_delivered_ml, first_expected_ml = p.samples[0]
    if first_s > t - window_s:
        return None
    window_expected_ml = p.expected_total_ml - first_expected_ml
    if window_expected_ml < s.flow_min_expected_ml or window_expected_ml <= 0.0:
        return None
    delivered_in_window_ml = delivered_ml - first_delivered_ml
    return (delivered_in_window_ml - window_expected_ml) / window_expected_ml * 100.0
