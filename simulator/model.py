"""Pure, seeded model of one implanted intrathecal pump.

No I/O, no clock reads, no threads: the caller passes `random.Random(seed)` and the
simulated time `now`. Numbers come from /work/shared/DOMAIN.md; [D] marks our own.

Three volumes are kept apart on purpose (DOMAIN.md 2.1, 3):
- `true_ml`: what is really in the reservoir (only a refill measures it);
- `estimate_ml`: the pump's own reservoir figure, from the last fill minus the
  programmed basal and the boluses it gave. It is what `Reading.reservoir_ml` shows;
- `delivered_total_ml`: what the drive mechanism delivered (motor-derived): it shows
  over-infusion and stalls, but not a catheter occlusion.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from random import Random
from typing import Any, Final

from schemas.models import (
    BatteryState,
    DeviceAlarm,
    DeviceEvent,
    DeviceInfo,
    DeviceMessageModel,
    Drug,
    EventKind,
    Prescription,
    Priority,
    PumpState,
    Reading,
)

SECONDS_PER_DAY: Final = 86_400.0
ERI_TO_EOS_S: Final = 90 * SECONDS_PER_DAY
"""SynchroMed II stops 90 days after the ERI alarm (DOMAIN.md 2.2)."""
BATTERY_LIFE_S: Final = 7 * 365 * SECONDS_PER_DAY
"""Maximum product life 7 years (DOMAIN.md 1.1); the remaining-% scale is [D]."""
BOLUS_WINDOW_S: Final = SECONDS_PER_DAY
"""Allotted boluses count over the last 24 h (DOMAIN.md 1.2)."""
REFILL_MEASUREMENT_SD_ML: Final = 0.05
"""[D] Reading error of the syringe that withdraws the residual at a refill."""
DEFAULT_LOW_RESERVOIR_ALARM_ML: Final = 2.0
"""Manufacturer-recommended alarm volume (DOMAIN.md 1.1, 2.1)."""
DEFAULT_INFO_EVERY: Final = 60
MIN_RATE_ML_PER_DAY: Final = 0.048
"""SynchroMed II minimum flow rate (DOMAIN.md 1.1 [S16]): what a rate fallback after a low
battery reset is modelled as ("reset to a very low level", DOMAIN.md 2.2 [S1],[S26])."""

ALARM_LOW_RESERVOIR: Final = DeviceAlarm(code="low_reservoir", priority=Priority.MEDIUM)
ALARM_MOTOR_STALL: Final = DeviceAlarm(code="motor_stall", priority=Priority.HIGH)
ALARM_ERI: Final = DeviceAlarm(code="eri", priority=Priority.MEDIUM)
ALARM_EOS: Final = DeviceAlarm(code="eos", priority=Priority.HIGH)


@dataclass(frozen=True, slots=True)
class PumpSpec:
    """Identity and programming of one pump: what its DeviceInfo reports."""

    pump_id: str
    serial: str
    model: str
    capacity_ml: float
    drug: Drug
    concentration_mg_per_ml: float
    basal_rate_ml_per_day: float
    low_reservoir_alarm_ml: float = DEFAULT_LOW_RESERVOIR_ALARM_ML
    bolus_ml: float = 0.0
    bolus_lockout_min: int = 0
    boluses_per_day_max: int = 0
    bolus_requests_per_day: float = 0.0
    firmware: str = "pumpsim-1"


@dataclass(frozen=True, slots=True)
class Window:
    """A span of simulated seconds after the start; `end_s` infinite means permanent."""

    start_s: float
    end_s: float = math.inf

    def covers(self, t_s: float) -> bool:
        """True while the window is open at `t_s`."""
        return self.start_s <= t_s < self.end_s


@dataclass(frozen=True, slots=True)
class FlowFault:
    """Actual flow = factor x programmed; `seen_by_motor` False for a catheter occlusion."""

    window: Window
    factor: float
    seen_by_motor: bool = True


@dataclass(frozen=True, slots=True)
class Refill:
    at_s: float
    fill_ml: float


@dataclass(frozen=True, slots=True)
class ClockJump:
    at_s: float
    jump_s: float


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Everything that will go wrong (or be done) to a pump, in seconds after the start."""

    stalls: tuple[Window, ...] = ()
    flow: tuple[FlowFault, ...] = ()
    stops: tuple[Window, ...] = ()
    dropouts: tuple[Window, ...] = ()
    battery_resets_s: tuple[float, ...] = ()
    refills: tuple[Refill, ...] = ()
    eri_at_s: float = math.inf
    clock_drift_ppm: float = 0.0
    clock_jumps: tuple[ClockJump, ...] = ()
    reboots_s: tuple[float, ...] = ()
    """The pump restarts: a new boot session, its sequence numbers from 1 again."""
    rate_fallback_ml_per_day: float | None = None
    """After a low battery reset the programmed basal rate falls back to this."""
    safe_state_at_s: float = math.inf
    """The pump enters safe state and stops delivering (DOMAIN.md 2.2 [S27])."""
    lost_bolus_share: float = 0.0
    """Share of bolus-delivered event frames the pump never gets through (sequence consumed)."""
    duplicate_refill_records: bool = False
    """Each refill is logged twice (the same record under two sequence numbers)."""


@dataclass(slots=True)
class PumpStatus:
    """Everything about one pump that changes as time passes."""

    true_ml: float
    estimate_ml: float
    last_fill_ml: float
    delivered_total_ml: float = 0.0
    programmed_since_fill_ml: float = 0.0
    t_s: float = 0.0
    bolus_times_s: deque[float] = field(default_factory=deque)
    boluses_denied: int = 0
    stalled: bool = False
    stopped: bool = False
    eri: bool = False
    eos: bool = False
    battery_reset: bool = False
    refills_done: int = 0
    resets_done: int = 0
    reboots_done: int = 0
    safe_state: bool = False
    basal_override_ml_per_day: float | None = None
    steps: int = 0
    readings: int = 0


@dataclass(frozen=True, slots=True)
class _Event:
    kind: EventKind
    device_time: datetime
    bolus_ml: float | None = None
    withdrawn_ml: float | None = None
    filled_ml: float | None = None


def status_after_fill(
    spec: PumpSpec, fill_ml: float, days_since_fill: float = 0.0, flow_factor: float = 1.0
) -> PumpStatus:
    """A pump filled `days_since_fill` ago, having delivered `flow_factor` x programmed since."""
    programmed_ml = spec.basal_rate_ml_per_day * days_since_fill
    return PumpStatus(
        true_ml=max(0.0, fill_ml - programmed_ml * flow_factor),
        estimate_ml=max(0.0, fill_ml - programmed_ml),
        last_fill_ml=fill_ml,
        programmed_since_fill_ml=programmed_ml,
    )


class Pump:
    """One simulated pump: call `step(now)` once per reading interval, get its messages."""

    def __init__(
        self,
        spec: PumpSpec,
        plan: FaultPlan,
        status: PumpStatus,
        *,
        rng: Random,
        boot_id: str,
        start: datetime,
        info_every: int = DEFAULT_INFO_EVERY,
        first_seq: int = 1,
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.status = status
        self.boot_id = boot_id
        self.start = start
        self._rng = rng
        self._info_every = max(1, info_every)
        self._next_seq = first_seq
        self._held: list[_Event] = []

    def step(self, now: datetime) -> list[DeviceMessageModel]:
        """Advance the physics to `now`; return the frames due (none during a dropout).

        A reading made during a dropout is lost on the way: it uses up its sequence number.
        """
        s = self.status
        t_s = (now - self.start).total_seconds()
        dt_s = t_s - s.t_s
        self._deliver_basal(dt_s)
        s.t_s = t_s
        s.steps += 1
        device_time = self.device_time(now)
        rebooted = self._reboot(t_s)
        self._held.extend(self._transitions(t_s, device_time))
        self._maybe_bolus(t_s, dt_s, device_time)
        if any(w.covers(t_s) for w in self.plan.dropouts):
            self._next_seq += 1
            return []
        out: list[DeviceMessageModel] = []
        if rebooted or s.readings % self._info_every == 0:
            out.append(self.info(device_time))
        for event in self._held:
            out.extend(self._event_messages(event))
        self._held.clear()
        out.append(self.reading(device_time))
        s.readings += 1
        return out

    @property
    def basal_rate_ml_per_day(self) -> float:
        """The programmed basal rate now: the prescription's, or a fallback after a reset."""
        override = self.status.basal_override_ml_per_day
        return self.spec.basal_rate_ml_per_day if override is None else override

    def _reboot(self, t_s: float) -> bool:
        """Start a new boot session when one is due: new boot id, sequence from 1."""
        s = self.status
        due = sum(1 for at_s in self.plan.reboots_s if at_s <= t_s) - s.reboots_done
        if due <= 0:
            return False
        s.reboots_done += due
        self.boot_id = f"{self.boot_id[:10]}r{s.reboots_done}"
        self._next_seq = 1
        return True

    def device_time(self, now: datetime) -> datetime:
        """The pump's clock: true time plus drift (ppm) plus any jumps so far."""
        t_s = (now - self.start).total_seconds()
        offset_s = t_s * self.plan.clock_drift_ppm / 1e6
        offset_s += sum(j.jump_s for j in self.plan.clock_jumps if j.at_s <= t_s)
        return now + timedelta(seconds=offset_s)

    def request_bolus(self, t_s: float) -> bool:
        """A patient asks for a bolus: given unless stopped, locked out or over the daily limit."""
        s, spec = self.status, self.spec
        while s.bolus_times_s and s.bolus_times_s[0] <= t_s - BOLUS_WINDOW_S:
            s.bolus_times_s.popleft()
        locked = bool(s.bolus_times_s) and t_s - s.bolus_times_s[-1] < spec.bolus_lockout_min * 60
        full = len(s.bolus_times_s) >= spec.boluses_per_day_max
        if spec.bolus_ml <= 0 or self._halted or s.stalled or locked or full:
            s.boluses_denied += 1
            return False
        s.bolus_times_s.append(t_s)
        self._account_programmed(spec.bolus_ml)
        self._pump_volume(spec.bolus_ml, t_s)
        return True

    def info(self, device_time: datetime) -> DeviceInfo:
        spec = self.spec
        return DeviceInfo(
            **self._envelope(device_time),
            model=spec.model,
            serial=spec.serial,
            firmware=spec.firmware,
            reservoir_capacity_ml=spec.capacity_ml,
            drug=spec.drug,
            concentration_mg_per_ml=spec.concentration_mg_per_ml,
            prescription=Prescription(
                basal_rate_ml_per_day=self.basal_rate_ml_per_day,
                bolus_dose_ml=spec.bolus_ml,
                bolus_lockout_min=spec.bolus_lockout_min,
                boluses_per_day_max=spec.boluses_per_day_max,
                low_reservoir_alarm_ml=spec.low_reservoir_alarm_ml,
            ),
        )

    def reading(self, device_time: datetime) -> Reading:
        s, spec = self.status, self.spec
        return Reading(
            **self._envelope(device_time),
            drug=spec.drug,
            pump_state=self.pump_state,
            reservoir_ml=self.reservoir_ml,
            reservoir_capacity_ml=spec.capacity_ml,
            low_reservoir_alarm_ml=spec.low_reservoir_alarm_ml,
            basal_rate_ml_per_day=self.basal_rate_ml_per_day,
            delivered_total_ml=round(s.delivered_total_ml, 4),
            bolus_count_24h=sum(1 for b in s.bolus_times_s if b > s.t_s - BOLUS_WINDOW_S),
            battery_state=self.battery_state,
            battery_remaining_pct=round(self.battery_remaining_pct, 1),
            alarms=self.alarms,
        )

    @property
    def reservoir_ml(self) -> float:
        """The pump's estimate as it reports it (to the microlitre)."""
        return round(self.status.estimate_ml, 3)

    @property
    def pump_state(self) -> PumpState:
        if self._halted:
            return PumpState.STOPPED
        return PumpState.STALLED if self.status.stalled else PumpState.RUNNING

    @property
    def battery_state(self) -> BatteryState:
        s = self.status
        if s.eos:
            return BatteryState.EOS
        if s.safe_state:
            return BatteryState.SAFE_STATE
        if s.battery_reset:
            return BatteryState.LBR
        return BatteryState.ERI if s.eri else BatteryState.OK

    @property
    def battery_remaining_pct(self) -> float:
        """[D] Linear from 100 % to 0 % at EOS over the maximum product life."""
        left_s = self.plan.eri_at_s + ERI_TO_EOS_S - self.status.t_s
        return min(100.0, max(0.0, 100.0 * left_s / BATTERY_LIFE_S))

    @property
    def alarms(self) -> tuple[DeviceAlarm, ...]:
        """The pump's own alarms; low reservoir is judged on its estimate, not the truth."""
        s = self.status
        found = []
        if self.reservoir_ml <= self.spec.low_reservoir_alarm_ml:
            found.append(ALARM_LOW_RESERVOIR)
        if s.stalled and not self._halted:
            found.append(ALARM_MOTOR_STALL)
        if s.eos:
            found.append(ALARM_EOS)
        elif s.eri:
            found.append(ALARM_ERI)
        return tuple(found)

    @property
    def _halted(self) -> bool:
        return self.status.stopped or self.status.eos or self.status.safe_state

    def _envelope(self, device_time: datetime) -> dict[str, Any]:
        """Identity, the next seq of this boot, and the device clock (as received_at too)."""
        seq = self._next_seq
        self._next_seq += 1
        return {"pump_id": self.spec.pump_id, "boot_id": self.boot_id, "seq": seq,
                "device_time": device_time, "received_at": device_time}

    def _deliver_basal(self, dt_s: float) -> None:
        if dt_s <= 0 or self._halted:
            return
        volume_ml = self.basal_rate_ml_per_day * dt_s / SECONDS_PER_DAY
        self._account_programmed(volume_ml)
        if not self.status.stalled:
            self._pump_volume(volume_ml, self.status.t_s)

    def _account_programmed(self, volume_ml: float) -> None:
        """[D] The estimate follows the programme, stall or not: a stall shows at refill."""
        s = self.status
        s.estimate_ml = max(0.0, s.estimate_ml - volume_ml)
        s.programmed_since_fill_ml += volume_ml

    def _pump_volume(self, volume_ml: float, t_s: float) -> None:
        factor, seen_by_motor = self._flow_at(t_s)
        s = self.status
        s.delivered_total_ml += volume_ml * (factor if seen_by_motor else 1.0)
        s.true_ml = max(0.0, s.true_ml - volume_ml * factor)

    def _flow_at(self, t_s: float) -> tuple[float, bool]:
        for fault in self.plan.flow:
            if fault.window.covers(t_s):
                return fault.factor, fault.seen_by_motor
        return 1.0, True

    def _transitions(self, t_s: float, device_time: datetime) -> list[_Event]:
        events = self._toggles(t_s, device_time)
        events.extend(self._battery(t_s, device_time))
        events.extend(self._refills(t_s, device_time))
        return events

    def _toggles(self, t_s: float, device_time: datetime) -> list[_Event]:
        s, plan = self.status, self.plan
        events = []
        stalled = any(w.covers(t_s) for w in plan.stalls)
        if stalled != s.stalled:
            kind = EventKind.MOTOR_STALL_START if stalled else EventKind.MOTOR_STALL_END
            events.append(_Event(kind, device_time))
            s.stalled = stalled
        stopped = any(w.covers(t_s) for w in plan.stops)
        if stopped != s.stopped:
            kind = EventKind.PUMP_STOPPED if stopped else EventKind.PUMP_STARTED
            events.append(_Event(kind, device_time))
            s.stopped = stopped
        return events

    def _battery(self, t_s: float, device_time: datetime) -> list[_Event]:
        s, plan = self.status, self.plan
        events: list[_Event] = []
        due = sum(1 for at_s in plan.battery_resets_s if at_s <= t_s) - s.resets_done
        s.battery_reset = due > 0
        s.resets_done += due
        events.extend(_Event(EventKind.LOW_BATTERY_RESET, device_time) for _ in range(due))
        if due and plan.rate_fallback_ml_per_day is not None:
            s.basal_override_ml_per_day = plan.rate_fallback_ml_per_day
        if not s.safe_state and t_s >= plan.safe_state_at_s:
            s.safe_state = True
            events.append(_Event(EventKind.PUMP_STOPPED, device_time))
        if not s.eri and t_s >= plan.eri_at_s:
            s.eri = True
            events.append(_Event(EventKind.ERI, device_time))
        if not s.eos and t_s >= plan.eri_at_s + ERI_TO_EOS_S:
            s.eos = True
            events.append(_Event(EventKind.EOS, device_time))
        return events

    def _refills(self, t_s: float, device_time: datetime) -> list[_Event]:
        s, plan = self.status, self.plan
        events = []
        while s.refills_done < len(plan.refills) and plan.refills[s.refills_done].at_s <= t_s:
            fill_ml = min(plan.refills[s.refills_done].fill_ml, self.spec.capacity_ml)
            noise_ml = self._rng.gauss(0.0, REFILL_MEASUREMENT_SD_ML)
            withdrawn_ml = round(min(self.spec.capacity_ml, max(0.0, s.true_ml + noise_ml)), 2)
            s.refills_done += 1
            s.true_ml = s.estimate_ml = s.last_fill_ml = fill_ml
            s.programmed_since_fill_ml = 0.0
            events.append(
                _Event(EventKind.REFILL, device_time, withdrawn_ml=withdrawn_ml, filled_ml=fill_ml)
            )
        return events

    def _maybe_bolus(self, t_s: float, dt_s: float, device_time: datetime) -> None:
        """Patient demand: at most one request per step; one draw per step keeps runs repeatable."""
        p = min(1.0, self.spec.bolus_requests_per_day * max(0.0, dt_s) / SECONDS_PER_DAY)
        if self._rng.random() < p and self.request_bolus(t_s):
            self._held.append(_Event(EventKind.BOLUS_DELIVERED, device_time, self.spec.bolus_ml))

    def _event_messages(self, event: _Event) -> list[DeviceEvent]:
        """The event's frame(s): a lost bolus record uses up its number, a duplicated refill
        record is sent twice."""
        lost_share = self.plan.lost_bolus_share
        bolus = event.kind is EventKind.BOLUS_DELIVERED
        if bolus and lost_share and self._rng.random() < lost_share:
            self._next_seq += 1
            return []
        copies = 2 if event.kind is EventKind.REFILL and self.plan.duplicate_refill_records else 1
        return [self._event_message(event) for _ in range(copies)]

    def _event_message(self, event: _Event) -> DeviceEvent:
        return DeviceEvent(
            **self._envelope(event.device_time),
            event=event.kind,
            bolus_ml=event.bolus_ml,
            withdrawn_ml=event.withdrawn_ml,
            filled_ml=event.filled_ml,
        )
