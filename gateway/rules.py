"""The alert engine: pump messages in, IHE PCD ACM alert transitions out.

Pure: imports only the standard library, pydantic and `schemas`; no logging, no
clock, no I/O (the one exception: an engine made without a salt or saved state draws
its alert-id salt from `secrets`). Time is passed in. For-durations, windows and rates
run on the pump's own clock (`device_time`: the simulator accelerates it and it is the
physics axis) with its steps taken out; telemetry loss, its escalation and the reservoir
projected meanwhile use the gateway clock `now` against the pump's last `received_at`.
docs/alerts.md lists every rule, its default and its source.

Lifecycle of one alert (`alert_id` is stable from start to end):

    start (active) --condition resolves--> update (latched)   [latching, not yet acknowledged]
          |  ^-------condition returns-----/
          +--on_acknowledgement--> acknowledged --resolved--> end (inactive)

A latching alert ends only when its condition has resolved and it has been
acknowledged; a non-latching alert ends when its condition resolves. One clinical condition
is one alert: a low reservoir that becomes empty is raised in place by an `update` (PH, kind
`empty_reservoir`, acknowledged anew). Unacknowledged PH/PM alerts are re-announced with a
rising `escalation_level`.
Acknowledging records that a person has seen the alert; it never clears the
pump's own alarm.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from bisect import insort
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import BaseModel, Field, TypeAdapter
from pydantic.dataclasses import dataclass as state_class

from gateway.alert_settings import RuleOverrides, RulesConfig, RuleSettings
from schemas.models import (
    MAX_ESCALATION_LEVEL,
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

__all__ = ["STATE_KEY", "AlertEngine", "RuleOverrides", "RuleSettings", "RulesConfig"]

SECONDS_PER_DAY: Final = 86_400.0
SECONDS_PER_HOUR: Final = 3_600.0
FLOW_SAMPLES_PER_WINDOW: Final = 96
"""[D] Flow-window resolution: memory per pump stays bounded whatever the reading rate."""
BOOTS_REMEMBERED: Final = 8
"""Recent boot sessions per pump whose messages are recognised as replays."""
GAPS_REMEMBERED: Final = 256
"""Missing sequence numbers per pump whose late arrival (a resend) is still evaluated."""
INTERVAL_DECAY: Final = 0.999
"""[D] The learned device seconds per sequence number forget an old maximum slowly."""
BOLUS_EDGE_S: Final = 600.0
"""[D] A bolus stays counted this much past 24 h: the pump's own 24 h edge may fall on the
other side of a reading, and a bolus counted as lost must really be missing."""
SALT_BYTES: Final = 16
ALERT_TOKEN_HEX: Final = 16
MAX_TEXT_CHARS: Final = 500
_KIND_PATTERN: Final = re.compile(r"[a-z0-9_]{1,40}")
_PUMP_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_UNIT_CHARS: Final = 16

STATE_KEY: Final = "alert_engine"
"""The engine's rows in a key-value store: STATE_KEY/engine (the salt) and one
STATE_KEY/pump/<pump id> per pump. Earlier builds kept the whole state in one row,
STATE_KEY itself; the engine reads it and its first save replaces it with rows."""
_ENGINE_ROW: Final = f"{STATE_KEY}/engine"
_PUMP_ROWS: Final = f"{STATE_KEY}/pump/"
ROW_DIGEST_BYTES: Final = 16

# -- engine state (saved by changed_state(), one row per pump) ----------------------


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
    started_s: float | None = None
    announced_s: float | None = None
    level: int = 0


@state_class(slots=True)
class _Pump:
    """What the engine knows about one pump; runtime state and saved row at once."""

    pump_id: str
    boots: dict[str, int] = Field(default_factory=dict)
    boot_id: str | None = None
    seq: int = -1
    missing: set[int] = Field(default_factory=set)
    received_s: float | None = None
    device_s: float | None = None
    reading_received_s: float | None = None
    reading_seq: int = -1
    skew_s: float = 0.0
    seq_interval_s: float = 0.0
    drug: Drug | None = None
    model: str | None = None
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
    samples: deque[tuple[float, float, float, float]] = Field(default_factory=deque)
    bolus_times: deque[float] = Field(default_factory=deque)
    bolus_inferred: int = 0
    bolus_seen_ml: float = 0.0
    fill_ml: float | None = None
    programmed_at_fill_ml: float | None = None
    last_refill: tuple[float, float, float] | None = None
    leak_factor: float = 1.0
    flow_factor: float = 1.0
    shown_ml: float | None = None
    projected: bool = False
    reset_s: float | None = None
    restarted_s: float | None = None
    refill_withdrawn_ml: float = 0.0
    refill_expected_ml: float = 0.0
    on: set[str] = Field(default_factory=set)
    since: dict[str, float] = Field(default_factory=dict)
    alerts: dict[str, _Alert] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)
    settings: RuleSettings | None = Field(default=None, exclude=True)


class _Snapshot(BaseModel):
    """The single row of earlier builds (STATE_KEY): read once, then replaced by rows."""

    version: Literal[1] = 1
    salt: str | None = None
    pumps: dict[str, _Pump]


class _EngineRow(BaseModel):
    """The engine-wide part of the state: what is not any one pump's."""

    version: Literal[2] = 2
    salt: str


_PUMP_ROW: Final = TypeAdapter(_Pump)


def _pump_key(pump_id: str) -> str:
    return f"{_PUMP_ROWS}{pump_id}"


def _is_own_key(key: str) -> bool:
    return key == STATE_KEY or key.startswith(f"{STATE_KEY}/")


def _digest(row: bytes) -> bytes:
    return hashlib.blake2b(row, digest_size=ROW_DIGEST_BYTES).digest()


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


def _basis(p: _Pump) -> str:
    """Where a reservoir figure came from: the pump's estimate, or the gateway's projection."""
    if p.projected:
        return (
            " Projected by the gateway from the last reading and the programmed rate: no "
            "telemetry since; the pump itself may say otherwise."
        )
    if p.shown_ml is not None and p.reservoir_ml is not None and p.shown_ml < p.reservoir_ml:
        return (
            f" The gateway projects less than the pump's estimate {p.reservoir_ml:.1f} mL: it "
            "has evidence of over-infusion or a leak (delivered count or refill)."
        )
    return ""


def _low_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"reservoir {_fmt(v)} mL, alarm volume {_fmt(thr)} mL. The volume is the pump's "
        "estimate computed from the programmed rate, not a measurement; an over-infusing "
        f"pump can be emptier than it reports.{_basis(p)}"
    )


def _empty_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"reservoir {_fmt(v)} mL, empty level {_fmt(thr)} mL. The volume is the pump's "
        f"estimate computed from the programmed rate, not a measurement; therapy may stop."
        f"{_basis(p)}"
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
        "The pump's own alarms are unaffected but are not visible here; the reservoir is "
        "projected from the programmed rate meanwhile."
    )


def _clock_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    return (
        f"the pump's clock has stepped {_fmt(v, '+.1f')} h against its own sequence and the "
        f"gateway's receive time (limit {_fmt(thr, '.1f')} h). Windows and delays use the "
        "corrected time; set the pump's clock at the next session."
    )


def _rate_drop_text(p: _Pump, key: str, v: float | None, thr: float | None) -> str:
    reset = " right after a low battery reset or in safe state" if p.reset_s is not None else ""
    return (
        f"the programmed basal rate fell to {_fmt(v, '.3f')} mL/d{reset} without a "
        f"programming session (more than {_fmt(thr, '.0f')} % lower). Some pumps fall back "
        "to a minimal rate after a reset: check the prescription."
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
CLOCK_STEP = _Spec("clock_step", "Pump clock step", PL, ST, False, "h", _clock_text)
RATE_DROP = _Spec("rate_drop", "Rate drop", PM, ST, True, "mL/d", _rate_drop_text, one_shot=True)
RATE_DROP_AFTER_RESET = _Spec(
    "rate_drop", "Rate drop", PH, ST, True, "mL/d", _rate_drop_text, one_shot=True
)
UNDER_INFUSION_WITHDRAWAL = _Spec("under_infusion", "Under-infusion", PH, ST, True, "%", _flow_text)
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
_RESET_STATES: Final = frozenset((BatteryState.LBR, BatteryState.SAFE_STATE))
_ESCALATED: Final = frozenset((Priority.HIGH, Priority.MEDIUM))
_STOPS_BY_ITSELF: Final = frozenset((BatteryState.EOS, BatteryState.SAFE_STATE))
_LOW_CODE: Final = "low_reservoir"
EVIDENCE_CODES: Final = {
    _LOW_CODE: LOW_RESERVOIR.kind,
    "motor_stall": MOTOR_STALL.kind,
    "eri": BATTERY_ERI.kind,
    "eos": BATTERY_EOS.kind,
}
"""Pump alarm codes a gateway rule already covers: attached to that alert as evidence, never
passed through as a second alert."""
_LOW, _EMPTY, _DUE = LOW_RESERVOIR.kind, EMPTY_RESERVOIR.kind, REFILL_DUE.kind
_EVIDENCE_BY_KIND: Final = {kind: code for code, kind in EVIDENCE_CODES.items()} | {
    _EMPTY: _LOW_CODE
}
_RESERVOIR_LEVELS: Final = {_LOW: LOW_RESERVOIR, _EMPTY: EMPTY_RESERVOIR}
"""The reservoir alert's kind at each level: the MDC, HL7 and FHIR mappings follow the kind."""
_STALL, _STOPPED, _LOST = MOTOR_STALL.kind, PUMP_STOPPED.kind, TELEMETRY_LOST.kind
_OVER, _UNDER = OVER_INFUSION.kind, UNDER_INFUSION.kind
_CLOCK, _RATE_DROP = CLOCK_STEP.kind, RATE_DROP.kind
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

    def __init__(
        self,
        config: RulesConfig,
        state: Mapping[str, bytes] | None = None,
        *,
        salt: bytes | None = None,
        discard: Iterable[str] = (),
    ) -> None:
        """`state`: the rows a `changed_state` stored (keys not under STATE_KEY are ignored).
        `salt` keys alert ids (saved with the state); default: random, or the saved one.
        `discard`: stored rows to delete at the first save (an unusable saved state's).

        Raises ValueError when the rows cannot be read."""
        self._config = config
        self._pumps: dict[str, _Pump] = {}
        self._by_id: dict[str, tuple[_Pump, str]] = {}
        self._out: list[AlertTransition] = []
        self._now = datetime.fromtimestamp(0.0, UTC)
        self._message: Reading | DeviceInfo | DeviceEvent | None = None
        self._cause: str | None = None
        self._stepped = False
        self._ack_delays: dict[Priority, tuple[int, float, float]] = {}
        self._changed: set[str] = set()
        """Pumps whose state may have changed since the last changed_state()."""
        self._saved: dict[str, bytes] = {}
        """Digest of each row as last stored: a pump touched but unchanged is not rewritten."""
        self._stale = {key for key in discard if _is_own_key(key)}
        """Stored rows to delete at the next save."""
        saved_salt = self._load(state) if state else None
        self._salt = saved_salt or salt or secrets.token_bytes(SALT_BYTES)

    # -- public API ------------------------------------------------------------------

    def on_message(
        self, message: Reading | DeviceInfo | DeviceEvent, now: datetime
    ) -> list[AlertTransition]:
        """Evaluate one validated device message; duplicates yield nothing.

        A resent message that fills a gap in the sequence is evaluated as history: a refill
        is checked, a bolus counted; nothing older than the pump's state overwrites it.
        """
        p = self._pumps.get(message.pump_id) or self._add_pump(message.pump_id)
        self._changed.add(p.pump_id)
        seq = message.seq
        if message.boot_id == p.boot_id and seq > p.seq:
            if seq > p.seq + 1:
                _note_gap(p, seq)
            p.seq = seq  # the usual case, without a call
        elif message.boot_id == p.boot_id and seq in p.missing:
            p.missing.discard(seq)
            return self._on_late(p, message, now)
        elif not _is_new(p, message.boot_id, seq):
            return []
        self._now, self._message, self._cause = now, message, None
        out = self._out = []
        received_s = message.received_at.timestamp()
        if isinstance(message, Reading):  # periodic: events may be held and sent late
            t = self._device_time(p, message.device_time.timestamp(), received_s, seq)
            if self._stepped:
                self._clock_rule(p, t)
        else:
            t = message.device_time.timestamp() - p.skew_s
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
        """Wall-clock checks: telemetry lost, its escalation, and the reservoir it hides."""
        out = self._begin(now, None)
        now_s = now.timestamp()
        for p in self._pumps.values():
            if p.alerts:
                self._reannounce(p, p.settings or self._settings(p), now_s)
            if p.received_s is None:
                continue
            s = p.settings or self._settings(p)
            gap_s = now_s - p.received_s
            if gap_s <= s.telemetry_lost_after_s:
                continue
            self._cause = f"{p.pump_id}:{p.boot_id}:{p.seq}"
            self._changed.add(p.pump_id)  # delays and the projection may move
            if _LOST not in p.on:
                limit_s = s.telemetry_lost_after_s
                self._drive(p, TELEMETRY_LOST, _LOST, True, 0.0, now_s, gap_s, limit_s)
            self._escalate_lost(p, s, gap_s)
            self._project(p, s, gap_s)
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
        if alert.started_s is not None:
            self._note_ack_delay(alert.priority, max(0.0, now.timestamp() - alert.started_s))
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
        self._changed.add(pump_id)
        out = self._begin(now, None)
        title = alert_kind.replace("_", " ").capitalize()
        spec = _Spec(alert_kind, title, priority, alert_type, latching, unit, _fixed(text))
        self._drive(p, spec, alert_kind, active, 0.0, now.timestamp(), value, threshold)
        return out

    def acknowledgement_delays(self) -> dict[Priority, tuple[int, float, float]]:
        """Per priority: acknowledgements, their total and their longest delay from start, in s
        (gateway clock; counted since this engine started, for /metrics)."""
        return dict(self._ack_delays)

    def active_alerts(self, pump_id: str) -> tuple[AlertTransition, ...]:
        """Latest transition of each alert of this pump that has not ended."""
        p = self._pumps.get(pump_id)
        if p is None:
            return ()
        return tuple(a.last for a in p.alerts.values() if a.last is not None)

    def pumps(self) -> list[str]:
        """Every pump the engine has state for, sorted."""
        return sorted(self._pumps)

    def changed_state(self) -> dict[str, bytes | None]:
        """The rows changed since the last call, to store in the transaction that stores
        this call's transitions (None: delete that row); the next call returns only what
        changed after this one. Rows as in `state_rows`."""
        rows: dict[str, bytes | None] = dict.fromkeys(self._stale)
        self._stale.clear()
        candidates = [(_ENGINE_ROW, self._engine_row())]
        candidates += [(_pump_key(i), _PUMP_ROW.dump_json(self._pumps[i])) for i in self._changed]
        self._changed.clear()
        for key, row in candidates:
            digest = _digest(row)
            if self._saved.get(key) != digest:
                rows[key] = row
                self._saved[key] = digest
        return rows

    def state_rows(self) -> dict[str, bytes]:
        """Every row of the state, JSON: STATE_KEY/engine and one STATE_KEY/pump/<id> per
        pump. AlertEngine(config, rows) continues exactly where this engine is."""
        rows = {_ENGINE_ROW: self._engine_row()}
        rows.update((_pump_key(i), _PUMP_ROW.dump_json(p)) for i, p in self._pumps.items())
        return rows

    # -- saved state -----------------------------------------------------------------

    def _engine_row(self) -> bytes:
        return _EngineRow(salt=self._salt.hex()).model_dump_json().encode()

    def _load(self, state: Mapping[str, bytes]) -> bytes | None:
        """Take saved rows in (or an earlier build's single row); return the saved salt."""
        rows = {key: row for key, row in state.items() if _is_own_key(key)}
        single = rows.get(STATE_KEY)
        if single is not None:  # written after any rows there are: it is the newer state
            snapshot = _Snapshot.model_validate_json(single)
            pumps, salt = dict(snapshot.pumps), snapshot.salt
            self._stale.update(rows)  # the first save writes rows and deletes the single one
            self._changed.update(pumps)
        else:
            pumps, salt = self._load_rows(rows)
        self._pumps = pumps
        self._by_id = {
            alert.alert_id: (pump, key)
            for pump in pumps.values()
            for key, alert in pump.alerts.items()
        }
        return bytes.fromhex(salt) if salt else None

    def _load_rows(self, rows: Mapping[str, bytes]) -> tuple[dict[str, _Pump], str | None]:
        engine_row = rows.get(_ENGINE_ROW)
        pump_rows = {key: row for key, row in rows.items() if key.startswith(_PUMP_ROWS)}
        if engine_row is None:
            if pump_rows:
                raise ValueError(f"pump rows without the {_ENGINE_ROW} row")
            return {}, None
        salt = _EngineRow.model_validate_json(engine_row).salt
        pumps: dict[str, _Pump] = {}
        for key, row in sorted(pump_rows.items()):  # in pump id order, whatever the store's
            p = _PUMP_ROW.validate_json(row)
            if key != _pump_key(p.pump_id):
                raise ValueError(f"the row {key} holds pump {p.pump_id}")
            pumps[p.pump_id] = p
        self._saved = {key: _digest(row) for key, row in pump_rows.items()}
        self._saved[_ENGINE_ROW] = _digest(engine_row)
        return pumps, salt

    # -- message handling ------------------------------------------------------------

    def _add_pump(self, pump_id: str) -> _Pump:
        p = self._pumps[pump_id] = _Pump(pump_id=pump_id)
        return p

    def _settings(self, p: _Pump) -> RuleSettings:
        if p.settings is None:
            p.settings = self._config.settings_for(p.pump_id, p.drug, p.model)
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

    def _device_time(self, p: _Pump, device_s: float, received_s: float, seq: int) -> float:
        """The pump's clock with its steps taken out: the time base of every window.

        A step is a jump between two readings that neither the gateway's receive time nor
        the sequence numbers (at the learned device seconds per number) can account for.
        """
        self._stepped = False
        last_s, last_received_s = p.device_s, p.reading_received_s
        seq_step = seq - p.reading_seq if seq > p.reading_seq >= 0 else 1
        p.device_s, p.reading_received_s, p.reading_seq = device_s, received_s, seq
        if last_s is None:
            return device_s - p.skew_s
        step_s = device_s - last_s
        limit_s = (p.settings or self._settings(p)).clock_step_limit_s
        if -limit_s <= step_s <= limit_s:
            per_seq_s, learned_s = step_s / seq_step, p.seq_interval_s * INTERVAL_DECAY
            p.seq_interval_s = per_seq_s if per_seq_s > learned_s else learned_s
            return device_s - p.skew_s
        elapsed_s = max(received_s - (last_received_s or received_s), seq_step * p.seq_interval_s)
        if 0.0 < step_s <= elapsed_s + limit_s:
            return device_s - p.skew_s  # a long silence, not a step
        p.skew_s += step_s - (min(elapsed_s, step_s) if step_s > 0.0 else max(elapsed_s, 0.0))
        self._stepped = True
        return device_s - p.skew_s

    def _on_late(
        self, p: _Pump, message: Reading | DeviceInfo | DeviceEvent, now: datetime
    ) -> list[AlertTransition]:
        """A resent message older than the pump's state: only its refill or bolus counts."""
        out = self._begin(now, message)
        if isinstance(message, DeviceEvent):
            t = message.device_time.timestamp() - p.skew_s
            if message.event is EventKind.REFILL:
                s = p.settings or self._settings(p)
                withdrawn_ml, filled_ml = message.withdrawn_ml or 0.0, message.filled_ml or 0.0
                self._refill_rule(p, s, withdrawn_ml, filled_ml, t)
            elif message.event is EventKind.BOLUS_DELIVERED:
                _add_bolus(p, message.bolus_ml or 0.0, t)
        return out

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
        if r.battery_state is not p.battery_state:
            if r.battery_state in _RESET_STATES:
                p.reset_s = t
            p.battery_state = r.battery_state
        rate = r.basal_rate_ml_per_day
        if rate < p.basal_ml_per_day * (1.0 - s.rate_drop_pct / 100.0):
            self._rate_drop_rule(p, s, rate, t)
        p.reservoir_ml = r.reservoir_ml
        p.capacity_ml = r.reservoir_capacity_ml
        p.alarm_ml = r.low_reservoir_alarm_ml
        p.basal_ml_per_day = rate
        if r.bolus_count_24h or p.bolus_times:
            _count_lost_boluses(p, r.bolus_count_24h, t)
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
            p.programmed_at_fill_ml = p.expected_total_ml
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
            if p.battery_state in _RESET_STATES:
                p.reset_s = t
        elif kind is EventKind.BOLUS_DELIVERED:
            _add_bolus(p, e.bolus_ml or 0.0, t)
        elif kind is EventKind.REFILL:
            self._refill_rule(p, s, e.withdrawn_ml or 0.0, e.filled_ml or 0.0, t)
        self._state_rules(p, s, t)

    def _on_info(self, p: _Pump, info: DeviceInfo, t: float) -> None:
        self._set_drug(p, info.drug)
        if info.model != p.model:
            p.model, p.settings = info.model, None
        prescription = info.prescription
        s = self._settings(p)
        rate = prescription.basal_rate_ml_per_day
        if rate < p.basal_ml_per_day * (1.0 - s.rate_drop_pct / 100.0):
            self._rate_drop_rule(p, s, rate, t)  # a pump may announce its new programme first
        p.capacity_ml = info.reservoir_capacity_ml
        p.alarm_ml = prescription.low_reservoir_alarm_ml
        p.basal_ml_per_day = rate
        p.bolus_dose_ml = prescription.bolus_dose_ml
        p.boluses_per_day_max = prescription.boluses_per_day_max
        self._state_rules(p, s, t)

    # -- rules -----------------------------------------------------------------------

    def _state_rules(self, p: _Pump, s: RuleSettings, t: float) -> None:
        # Each `raw or key in on or key in since` skips a _drive that could only say "still off".
        on, since = p.on, p.since
        if p.reservoir_ml is not None:
            v = p.reservoir_ml
            if p.leak_factor > 1.0 or _OVER in on:
                v = _worse_ml(p, v)
            p.shown_ml = v
            self._reservoir_rules(p, s, v, t)
        self._stall_rule(p, s, t)
        stopped = p.pump_state is PumpState.STOPPED and p.basal_ml_per_day > 0.0
        stopped = stopped and p.battery_state not in _STOPS_BY_ITSELF  # said by that alert
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
        # A configured volume may raise the alarm volume, never lower it below the pump's.
        alarm = p.alarm_used_ml = p.alarm_ml if configured is None else max(configured, p.alarm_ml)
        margin = s.low_reservoir_clear_margin_ml
        on, since = p.on, p.since
        low = v <= alarm + margin if _LOW in on else v <= alarm
        low = low or _LOW_CODE in p.device_alarms
        alert = p.alerts.get(_LOW)
        at_empty = alert is not None and alert.kind == _EMPTY
        empty_ml = s.empty_reservoir_ml
        empty = v <= empty_ml + margin if at_empty else v <= empty_ml
        if low or empty or _LOW in on or _LOW in since or _EMPTY in since:
            self._reservoir_alert(p, s, low or empty, empty, t, v, (alarm, empty_ml))
        if _EMPTY in on:  # a state saved before low and empty became one alert: end it
            self._drive(p, EMPTY_RESERVOIR, _EMPTY, False, 0.0, t, v, empty_ml)
        use_ml_per_day = p.basal_ml_per_day + p.bolus_dose_ml * p.boluses_per_day_max
        days = (v - alarm) / use_ml_per_day if use_ml_per_day > 0.0 else None
        due = False
        if days is not None:
            limit = s.refill_due_days
            if _DUE in on:
                limit += s.refill_due_clear_margin_days
            due = days <= limit and _LOW not in on and _EMPTY not in on  # one alert per condition
        if due or _DUE in on:
            self._drive(p, REFILL_DUE, _DUE, due, 0.0, t, days, s.refill_due_days)

    def _reservoir_alert(
        self,
        p: _Pump,
        s: RuleSettings,
        low: bool,
        empty: bool,
        t: float,
        v: float,
        thresholds_ml: tuple[float, float],
    ) -> None:
        """Low and empty reservoir as one alert whose level follows the reservoir.

        Low escalates in place to empty (an `update`: PH, kind `empty_reservoir`, a new
        acknowledgement needed); the empty level holds until acknowledged, then returns to
        low if the reservoir is above empty again; a refill ends the alert.
        """
        empty = _held(p, _EMPTY, empty, s.empty_reservoir_for_s, t)
        level = EMPTY_RESERVOIR if empty else LOW_RESERVOIR
        alert = p.alerts.get(_LOW)
        shown = level if alert is None else _RESERVOIR_LEVELS[alert.kind]
        threshold = thresholds_ml[shown is EMPTY_RESERVOIR]
        self._drive(p, shown, _LOW, low, s.low_reservoir_for_s, t, v, threshold, shown.kind)
        alert = p.alerts.get(_LOW)
        if alert is None or _LOW not in p.on or alert.kind == level.kind:
            return
        if level is LOW_RESERVOIR and alert.acked_by is None:
            return  # the empty level latches until someone has seen it
        threshold = thresholds_ml[level is EMPTY_RESERVOIR]
        if level is EMPTY_RESERVOIR:  # a new, worse condition: acknowledged anew
            alert.acked_by = alert.acked_at = None
            alert.started_s = alert.announced_s = self._now.timestamp()
            words = " (escalated in place: the reservoir is now empty)"
        else:
            words = " (no longer empty; still low)"
        alert.kind, alert.priority, alert.title = level.kind, level.priority, level.title
        details = level.describe(p, _LOW, v, threshold)
        self._update(p, alert, v, threshold, details, words)

    def _clock_rule(self, p: _Pump, t: float) -> None:
        limit_s = self._settings(p).clock_step_limit_s
        stepped = abs(p.skew_s) > limit_s
        offset_h, limit_h = p.skew_s / SECONDS_PER_HOUR, limit_s / SECONDS_PER_HOUR
        alert = p.alerts.get(_CLOCK)
        if stepped and _CLOCK in p.on and alert is not None:
            details = _clock_text(p, _CLOCK, offset_h, limit_h)
            self._update(p, alert, offset_h, limit_h, details, " (stepped again)")
        else:
            self._drive(p, CLOCK_STEP, _CLOCK, stepped, 0.0, t, offset_h, limit_h)

    def _rate_drop_rule(self, p: _Pump, s: RuleSettings, rate: float, t: float) -> None:
        if p.restarted_s is not None and 0.0 <= t - p.restarted_s <= s.programming_session_s:
            return  # reprogrammed: a session stops the pump and starts it again
        recent_reset = p.reset_s is not None and 0.0 <= t - p.reset_s <= s.reset_recent_s
        if not (recent_reset or p.battery_state in _RESET_STATES):
            p.reset_s = None
        high = p.reset_s is not None or s.withdrawal_risk
        spec = RATE_DROP_AFTER_RESET if high else RATE_DROP
        alert = p.alerts.get(_RATE_DROP)
        if _RATE_DROP in p.on and alert is not None:
            details = _rate_drop_text(p, _RATE_DROP, rate, s.rate_drop_pct)
            self._update(p, alert, rate, s.rate_drop_pct, details, " (dropped again)")
        else:
            self._drive(p, spec, _RATE_DROP, True, 0.0, t, rate, s.rate_drop_pct)

    def _escalate_lost(self, p: _Pump, s: RuleSettings, gap_s: float) -> None:
        alert = p.alerts.get(_LOST)
        if alert is None or gap_s <= s.telemetry_lost_escalate_after_s:
            return
        priority = Priority.HIGH if s.withdrawal_risk else Priority.MEDIUM
        if alert.priority is not priority:
            alert.priority = priority
            limit_s = s.telemetry_lost_escalate_after_s
            details = _telemetry_text(p, _LOST, gap_s, limit_s)
            self._update(p, alert, gap_s, limit_s, details, " (escalated)")

    def _note_ack_delay(self, priority: Priority, delay_s: float) -> None:
        count, total_s, longest_s = self._ack_delays.get(priority, (0, 0.0, 0.0))
        self._ack_delays[priority] = (count + 1, total_s + delay_s, max(longest_s, delay_s))

    def _reannounce(self, p: _Pump, s: RuleSettings, now_s: float) -> None:
        """Announce an unacknowledged PH or PM alert again, one escalation level higher."""
        every_s = s.reannounce_after_s
        if every_s <= 0.0:
            return
        for alert in list(p.alerts.values()):
            if alert.acked_by is not None or alert.priority not in _ESCALATED:
                continue
            if alert.announced_s is None or now_s - alert.announced_s < every_s:
                continue
            alert.level = min(alert.level + 1, MAX_ESCALATION_LEVEL)
            alert.announced_s = now_s
            self._cause = alert.last.cause_record_id if alert.last is not None else None
            minutes = (now_s - (alert.started_s or now_s)) / 60.0
            words = (
                f" (re-announced, escalation level {alert.level}: not acknowledged for "
                f"{minutes:.0f} min)"
            )
            self._emit(p, alert, Phase.UPDATE, alert.state, words)

    def _project(self, p: _Pump, s: RuleSettings, gap_s: float) -> None:
        """During a telemetry gap: the reservoir at the programmed rate, marked projected."""
        last_ml = p.shown_ml if p.shown_ml is not None else p.reservoir_ml
        if last_ml is None or p.reading_s is None or p.pump_state is not PumpState.RUNNING:
            return
        use_ml_per_day = p.basal_ml_per_day + p.bolus_dose_ml * p.boluses_per_day_max
        rate_ml_per_day = use_ml_per_day * max(p.leak_factor, p.flow_factor, 1.0)
        projected_ml = max(0.0, last_ml - rate_ml_per_day * gap_s / SECONDS_PER_DAY)
        p.projected = True
        try:
            self._reservoir_rules(p, s, projected_ml, p.reading_s + gap_s)
        finally:
            p.projected = False

    def _stall_rule(self, p: _Pump, s: RuleSettings, t: float) -> None:
        reported = p.pump_state is PumpState.STALLED or "motor_stall" in p.device_alarms
        running = p.pump_state is PumpState.RUNNING and p.basal_ml_per_day > 0.0
        if not running or p.delivery_s is None or p.reading_s is None:
            p.delivery_s = t  # the no-delivery clock runs only while therapy should flow
        # Only readings carry the delivered count: an event long after the last reading
        # (one logged during a dropout, say) is not evidence that nothing was delivered.
        idle_h = max(0.0, (p.reading_s or t) - p.delivery_s) / SECONDS_PER_HOUR
        raw = reported or (s.delivered_count and idle_h >= s.stall_window_h)
        if raw:
            p.stall_resumed = False
        elif _STALL in p.on:
            raw = not p.stall_resumed  # ends only when delivery resumes or the pump says so
        if raw or _STALL in p.on:
            self._drive(p, MOTOR_STALL, _STALL, raw, 0.0, t, idle_h, s.stall_window_h)

    def _flow_rules(self, p: _Pump, s: RuleSettings, r: Reading, t: float) -> None:
        window_s = s.flow_window_h * SECONDS_PER_HOUR
        sampled = _integrate_flow(p, r, t, window_s)
        if not s.delivered_count:
            return  # this model reports no motor count: only the refill comparison runs
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
            p.flow_factor = max(1.0, 1.0 + deviation_pct / 100.0)
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
                UNDER_INFUSION_WITHDRAWAL if s.withdrawal_risk else UNDER_INFUSION,
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
            if code in EVIDENCE_CODES and alert is None and key not in p.since:
                continue  # the gateway's own rule carries it, as evidence (see _emit)
            if alert is not None and code in now_alarms and alert.priority is not priority:
                alert.priority = priority
                details = _device_alarm_text(p, key, None, None)
                self._update(p, alert, None, None, details, " (priority changed)")
            self._drive(
                p,
                _DEVICE_ALARM_SPECS[priority],
                key,
                code in now_alarms and code not in EVIDENCE_CODES,
                s.device_alarm_for_s,
                t,
                None,
                None,
            )

    def _refill_rule(
        self, p: _Pump, s: RuleSettings, withdrawn_ml: float, filled_ml: float, t: float
    ) -> None:
        """Compare what came out with what should be left at the refill's own time."""
        last = p.last_refill
        if (
            last is not None
            and (last[1], last[2]) == (withdrawn_ml, filled_ml)
            and abs(t - last[0]) <= s.refill_duplicate_within_s
        ):
            return  # the same refill logged twice
        p.last_refill = (t, withdrawn_ml, filled_ml)
        ref = _volumes_at(p, t)
        if ref is not None:
            programmed_ml, delivered_ml, estimate_ml = ref
            self._refill_check(p, s, withdrawn_ml, programmed_ml, delivered_ml, estimate_ml, t)
            p.programmed_at_fill_ml, p.delivered_at_fill_ml = programmed_ml, delivered_ml
        p.fill_ml = filled_ml
        if p.flow_s is None or t >= p.flow_s:  # a late refill: later readings know better
            p.reservoir_ml = filled_ml

    def _refill_check(
        self,
        p: _Pump,
        s: RuleSettings,
        withdrawn_ml: float,
        programmed_ml: float,
        delivered_ml: float,
        estimate_ml: float,
        t: float,
    ) -> None:
        programmed_since_ml = programmed_ml - (p.programmed_at_fill_ml or 0.0)
        delivered_since_ml = max(delivered_ml - (p.delivered_at_fill_ml or delivered_ml), 0.0)
        used_ml = delivered_since_ml if s.delivered_count else max(programmed_since_ml, 0.0)
        small = p.capacity_ml is None or p.capacity_ml <= s.small_reservoir_max_ml
        floor_ml = s.refill_discrepancy_small_ml if small else s.refill_discrepancy_large_ml
        tolerance_ml = max(floor_ml, s.refill_discrepancy_pct / 100.0 * used_ml)
        expected_ml = estimate_ml
        if p.fill_ml is not None and estimate_ml <= tolerance_ml:
            # Near 0 the pump's estimate is floored; the fill minus the programme is not.
            expected_ml = min(estimate_ml, p.fill_ml - programmed_since_ml)
        delta_ml = withdrawn_ml - expected_ml
        motor_excess_ml = delivered_since_ml - programmed_since_ml
        if s.delivered_count and expected_ml <= tolerance_ml and motor_excess_ml > tolerance_ml:
            delta_ml = min(delta_ml, -motor_excess_ml)  # both at 0: the motor count tells
        p.refill_withdrawn_ml, p.refill_expected_ml = withdrawn_ml, expected_ml
        outside = abs(delta_ml) > tolerance_ml
        p.leak_factor = 1.0
        if outside and delta_ml < 0.0 and programmed_since_ml > 0.0:
            p.leak_factor = (programmed_since_ml - delta_ml) / programmed_since_ml
        key = REFILL_DISCREPANCY.kind
        alert = p.alerts.get(key)
        if outside and key in p.on and alert is not None:
            details = _discrepancy_text(p, key, delta_ml, tolerance_ml)
            self._update(p, alert, delta_ml, tolerance_ml, details, " (another refill)")
        else:
            self._drive(p, REFILL_DISCREPANCY, key, outside, 0.0, t, delta_ml, tolerance_ml)

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
        name: str | None = None,
    ) -> None:
        """Debounce one condition and move its alert: the only place conditions change.

        `name` goes into a new alert's id in place of `key` (the reservoir alert's key stays
        `low_reservoir` while its id names the level it started at)."""
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
            self._raise(p, spec, key, value, threshold, name or key)
        elif key in p.on:
            p.on.discard(key)
            alert = p.alerts.get(key)
            if alert is not None:
                self._resolve(p, spec, key, alert, value, threshold)
        elif key in p.since:
            del p.since[key]

    def _raise(
        self,
        p: _Pump,
        spec: _Spec,
        key: str,
        value: float | None,
        threshold: float | None,
        name: str,
    ) -> None:
        details = spec.describe(p, key, value, threshold)
        alert = p.alerts.get(key)
        if alert is not None:  # latched and not yet acknowledged: present again
            alert.state = AlarmState.ACTIVE
            self._update(p, alert, value, threshold, details, " (present again)")
            return
        n = p.counters[spec.kind] = p.counters.get(spec.kind, 0) + 1  # per (pump, kind)
        alert = _Alert(
            alert_id=f"{p.pump_id}:{name}:{self._token(p.pump_id, name, n)}",
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
        alert.started_s = alert.announced_s = self._now.timestamp()
        p.alerts[key] = alert
        self._by_id[alert.alert_id] = (p, key)
        self._emit(p, alert, Phase.START, AlarmState.ACTIVE)

    def _token(self, pump_id: str, key: str, n: int) -> str:
        """The unguessable part of an alert id: keyed by the engine's salt, stable across
        restarts (the salt is in the saved state), never derivable from outside."""
        name = f"{pump_id}:{key}:{n}".encode()
        return hmac.new(self._salt, name, hashlib.sha256).hexdigest()[:ALERT_TOKEN_HEX]

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
        self._changed.add(p.pump_id)
        alert.transitions += 1
        alert.state = state
        if phase is Phase.ACKNOWLEDGED:
            words = f" acknowledged by {alert.acked_by} (recorded here only)"
        elif not words:
            words = _PHASE_WORDS.get((phase, state), "")
        message = self._message
        details = alert.details
        code = _EVIDENCE_BY_KIND.get(alert.kind)
        if code is not None and code in p.device_alarms:
            details += f" The pump's own alarm '{code}' is on; this gateway cannot clear it."
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
            text=f"{alert.title}{words}: {details}"[:MAX_TEXT_CHARS],
            at=self._now,
            device_time=message.device_time if message is not None else None,
            cause_record_id=message.record_id if message is not None else self._cause,
            acknowledged_by=alert.acked_by,
            acknowledged_at=alert.acked_at,
            escalation_level=alert.level,
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
        p.missing.clear()
        p.reading_seq = -1
    p.seq = seq
    return True


def _held(p: _Pump, key: str, raw: bool, for_s: float, t: float) -> bool:
    """Whether `raw` has held for `for_s` of device time (a level within an alert)."""
    if not raw:
        p.since.pop(key, None)
        return False
    since = p.since.get(key)
    if since is None or t < since:
        p.since[key] = since = t
    return t - since >= for_s


def _note_gap(p: _Pump, seq: int) -> None:
    """Remember the sequence numbers skipped before `seq`: a resend may still bring them."""
    missing = p.missing
    missing.update(range(max(p.seq + 1, seq - GAPS_REMEMBERED), seq))
    if len(missing) > GAPS_REMEMBERED:
        p.missing = set(sorted(missing)[-GAPS_REMEMBERED:])


def _set_pump_state(p: _Pump, state: PumpState, t: float) -> None:
    if state is PumpState.STOPPED and p.pump_state is not PumpState.STOPPED:
        p.stopped_since_s = t
    elif state is PumpState.RUNNING and p.pump_state is PumpState.STOPPED:
        p.restarted_s = t
    p.pump_state = state


def _add_bolus(p: _Pump, bolus_ml: float, t: float) -> None:
    """Count a delivered bolus into the programmed volume, unless a reading counted it."""
    p.bolus_seen_ml = bolus_ml
    if p.bolus_inferred > 0 and p.reading_s is not None and t < p.reading_s:
        p.bolus_inferred -= 1  # a resent record of a bolus already inferred as lost
        return
    p.expected_total_ml += bolus_ml
    insort(p.bolus_times, t)


def _count_lost_boluses(p: _Pump, count_24h: int, t: float) -> None:
    """Add the boluses a reading counts over 24 h but whose events never arrived."""
    times = p.bolus_times
    while times and times[0] <= t - SECONDS_PER_DAY - BOLUS_EDGE_S:
        times.popleft()
    if count_24h == 0:
        p.bolus_inferred = 0
    lost = count_24h - len(times)
    dose_ml = p.bolus_dose_ml or p.bolus_seen_ml
    if lost > 0 and dose_ml > 0.0:
        p.expected_total_ml += lost * dose_ml
        times.extend([t] * lost)
        p.bolus_inferred += lost


def _worse_ml(p: _Pump, estimate_ml: float) -> float:
    """The reservoir with the gateway's evidence of over-infusion or a leak applied.

    The pump's estimate is its last fill minus the programme; the worse figure scales that
    programme by the measured excess (the flow window) or the refill's shortfall. With no
    refill seen, the fill is taken as the full capacity: the larger use, the earlier alert.
    """
    programmed_since_ml = p.expected_total_ml - (p.programmed_at_fill_ml or 0.0)
    worse_ml = estimate_ml
    if p.leak_factor > 1.0 and p.fill_ml is not None:
        worse_ml = min(worse_ml, p.fill_ml - p.leak_factor * programmed_since_ml)
    if _OVER in p.on:
        fill_ml = p.fill_ml if p.fill_ml is not None else p.capacity_ml or estimate_ml
        used_ml = max(fill_ml - estimate_ml, 0.0)  # the programme since the fill
        worse_ml = min(worse_ml, fill_ml - p.flow_factor * used_ml)
        if p.delivered_ml is not None and p.delivered_at_fill_ml is not None:
            excess_ml = (p.delivered_ml - p.delivered_at_fill_ml) - programmed_since_ml
            worse_ml = min(worse_ml, estimate_ml - max(excess_ml, 0.0))
    return max(worse_ml, 0.0)


def _volumes_at(p: _Pump, t: float) -> tuple[float, float, float] | None:
    """(programmed total, delivered total, pump estimate) projected to time `t`; None unknown."""
    if p.reservoir_ml is None:
        return None
    rate_ml_per_s = p.flow_rate_ml_per_day / SECONDS_PER_DAY if p.flow_running else 0.0
    if p.flow_s is None or t >= p.flow_s:
        since_s = 0.0 if p.flow_s is None else t - p.flow_s
        programmed_ml = p.expected_total_ml + rate_ml_per_s * since_s
        estimate_ml = p.reservoir_ml - rate_ml_per_s * since_s
        return programmed_ml, p.delivered_ml or 0.0, estimate_ml
    before = [sample for sample in p.samples if sample[0] <= t]
    if not before:
        return None
    sample_s, delivered_ml, sample_programmed_ml, sample_estimate_ml = before[-1]
    extra_ml = rate_ml_per_s * (t - sample_s)
    return sample_programmed_ml + extra_ml, delivered_ml, sample_estimate_ml - extra_ml


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
    samples.append((t, r.delivered_total_ml, p.expected_total_ml, r.reservoir_ml))
    start_s = t - window_s
    while len(samples) > 1 and samples[1][0] <= start_s:
        samples.popleft()
    return True


def _flow_deviation_pct(
    p: _Pump, s: RuleSettings, delivered_ml: float, t: float, window_s: float
) -> float | None:
    """Delivered against programmed volume over the window, in %; None without a verdict."""
    first_s, first_delivered_ml, first_expected_ml, _ = p.samples[0]
    if first_s > t - min(window_s, s.flow_min_window_h * SECONDS_PER_HOUR):
        return None
    window_expected_ml = p.expected_total_ml - first_expected_ml
    if window_expected_ml < s.flow_min_expected_ml or window_expected_ml <= 0.0:
        return None
    delivered_in_window_ml = delivered_ml - first_delivered_ml
    return (delivered_in_window_ml - window_expected_ml) / window_expected_ml * 100.0
