"""Message models: every message that crosses a process boundary.

Pure: imports only the standard library and pydantic. All models are frozen and
forbid unknown fields. Numbers carry their unit in the field name. Bounds reject
the physically impossible and accept the whole clinical range (docs/schemas.md
lists each bound and its source in DOMAIN.md).

Identity: every device message carries (pump_id, boot_id, seq); `record_id` joins
them into one string that consumers and the time-series database deduplicate on.
Time: `device_time` is the pump's own clock (it drifts), `received_at` the
gateway's clock when the frame's last byte arrived.
"""

from __future__ import annotations

import re
import reprlib
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
"""Version of the message schemas; see docs/compatibility.md."""

IntendedUse = Literal[
    "Secondary, informational notification only. Not a primary alarm system. "
    "Does not replace the pump's audible alarms or clinical refill/interrogation "
    "procedures. Do not rely on it for immediate clinical action."
]
INTENDED_USE: IntendedUse = (
    "Secondary, informational notification only. Not a primary alarm system. "
    "Does not replace the pump's audible alarms or clinical refill/interrogation "
    "procedures. Do not rely on it for immediate clinical action."
)
"""DOMAIN.md section 6: carried by every alert payload."""

EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(2100, 1, 1, tzinfo=UTC)
"""Every timestamp on the wire lies in [EARLIEST_TIMESTAMP, LATEST_TIMESTAMP): anything outside
is a broken clock or a forged message, and the bound keeps date arithmetic from overflowing."""
MAX_DEVICE_CLOCK_AHEAD = timedelta(days=1)
"""A device timestamp later than receive time plus this is a broken clock, not data."""

MAX_RESERVOIR_CAPACITY_ML = 100.0
"""[D] Generous ceiling: the largest listed reservoirs are 40 mL (DOMAIN.md 1.1-1.3)."""
MAX_BASAL_RATE_ML_PER_DAY = 100.0
"""[D] Sanity ceiling; SynchroMed II maximum rate is unconfirmed (DOMAIN.md 1.1)."""
MAX_CONCENTRATION_MG_PER_ML = 100.0
"""[D] Ceiling above every listed concentration (morphine 25 mg/mL, DOMAIN.md 1.4)."""
MAX_DELIVERED_TOTAL_ML = 1_000_000.0
MAX_SEQ = 2**32 - 1
MAX_ALARMS_PER_READING = 64
"""More alarms than one wire frame can carry (MAX_FRAME_BYTES 2048 / 31 bytes of the shortest
alarm), so no reading a station decodes is refused; it bounds what an MQTT publisher can send."""
MAX_ACTIVE_ALERTS = 128
"""Above one alert per rule kind plus one per device alarm code a reading can carry."""
MAX_SOURCES = 1024
"""Serial sources in one gateway status."""
MAX_ESCALATION_LEVEL = 10_000
"""[D] Re-announcements of one alert: over 100 days at the 15 min default interval."""

PUMP_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
BOOT_ID_PATTERN = r"^[0-9A-Za-z]{1,16}$"
OPERATOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"
"""An acknowledging MQTT user name: letters, digits and `._@-`; no spaces or control codes."""
MAX_STATE_SEQ = 2**53 - 1
"""Sequence numbers of retained state stay exact in JavaScript (Number.MAX_SAFE_INTEGER)."""
PumpId = Annotated[str, Field(pattern=PUMP_ID_PATTERN)]
Operator = Annotated[str, Field(pattern=OPERATOR_PATTERN)]
SessionId = Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")]
StateSeq = Annotated[int, Field(ge=0, le=MAX_STATE_SEQ, strict=True)]
RESERVED_PUMP_IDS = frozenset({".", ".."})
"""Ids no device may use, besides any starting with `_` (the gateway's own, `_gateway`)."""


def reserved_pump_id_problem(pump_id: str) -> str | None:
    """Why a device may not use this pump id, or None (the text never repeats the id)."""
    if pump_id.startswith("_"):
        return "pump_id starting with an underscore is reserved for the gateway's own alerts"
    if pump_id in RESERVED_PUMP_IDS:
        return "pump_id . and .. are reserved (path segments)"
    return None


BootId = Annotated[str, Field(pattern=BOOT_ID_PATTERN)]
Seq = Annotated[int, Field(ge=0, le=MAX_SEQ, strict=True)]


_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _not_a_number(value: object) -> object:
    if isinstance(value, int | float) or (
        isinstance(value, str) and ":" not in value and _NUMBER.fullmatch(value)
    ):
        raise ValueError("must be an ISO 8601 date-time with a UTC offset, not a number")
    return value


def _within_bounds(value: datetime) -> datetime:
    if value < EARLIEST_TIMESTAMP:
        raise ValueError(
            f"{value.isoformat()} is before {EARLIEST_TIMESTAMP.date()}: the clock is not set"
        )
    if value >= LATEST_TIMESTAMP:
        raise ValueError(
            f"{value.isoformat()} is not before {LATEST_TIMESTAMP.date()}:"
            " a broken clock or a forged message"
        )
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_not_a_number), AfterValidator(_within_bounds)]
"""An aware date-time between 2000 and 2100; numbers (which pydantic would read as Unix time)
are rejected."""


# Numbers are strict (no "12.5" strings, no booleans); Frozen's allow_inf_nan=False rejects
# NaN and infinity in every float field. Keep constraints in Field() and ahead of any
# AfterValidator: after one, pydantic exports them as keywords no JSON Schema validator knows.
Volume_ml = Annotated[float, Field(ge=0.0, le=MAX_DELIVERED_TOTAL_ML, strict=True)]
ReservoirVolume_ml = Annotated[float, Field(ge=0.0, le=MAX_RESERVOIR_CAPACITY_ML, strict=True)]
Capacity_ml = Annotated[float, Field(gt=0.0, le=MAX_RESERVOIR_CAPACITY_ML, strict=True)]
Rate_ml_per_day = Annotated[float, Field(ge=0.0, le=MAX_BASAL_RATE_ML_PER_DAY, strict=True)]
Percent = Annotated[float, Field(ge=0.0, le=100.0, strict=True)]


class Drug(StrEnum):
    """Drugs named in DOMAIN.md 1.4; `other` for anything a clinic adds."""

    MORPHINE = "morphine"
    HYDROMORPHONE = "hydromorphone"
    ZICONOTIDE = "ziconotide"
    BACLOFEN = "baclofen"
    BUPIVACAINE = "bupivacaine"
    CLONIDINE = "clonidine"
    SUFENTANIL = "sufentanil"
    OTHER = "other"


class PumpState(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    STALLED = "stalled"


class BatteryState(StrEnum):
    """DOMAIN.md 2.2: ok, replacement indicator (ERI), end of service, low battery reset, safe."""

    OK = "ok"
    ERI = "eri"
    EOS = "eos"
    LBR = "lbr"
    SAFE_STATE = "safe_state"


class Priority(StrEnum):
    """IHE PCD ACM alarm priority (DOMAIN.md 4.2)."""

    HIGH = "PH"
    MEDIUM = "PM"
    LOW = "PL"
    NONE = "PN"


class AlertType(StrEnum):
    """IHE PCD ACM alert type: technical, advisory, physiological."""

    TECHNICAL = "ST"
    ADVISORY = "SA"
    PHYSIOLOGICAL = "SP"


class AlarmState(StrEnum):
    INACTIVE = "inactive"
    ACTIVE = "active"
    LATCHED = "latched"


class Phase(StrEnum):
    """IHE PCD ACM event phase (the subset this gateway emits)."""

    START = "start"
    UPDATE = "update"
    ACKNOWLEDGED = "acknowledged"
    END = "end"


class Inactivation(StrEnum):
    ENABLED = "enabled"
    ACKNOWLEDGED = "alert-acknowledged"


class Frozen(BaseModel):
    """Base for every message: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DeviceMessage(Frozen):
    """Fields every device message carries: version, identity and both clocks."""

    schema_version: Literal[1] = 1
    pump_id: PumpId
    boot_id: BootId
    seq: Seq
    device_time: Timestamp
    received_at: Timestamp

    @field_validator("pump_id")
    @classmethod
    def _not_reserved(cls, pump_id: str) -> str:
        problem = reserved_pump_id_problem(pump_id)
        if problem is not None:
            raise ValueError(problem)
        return pump_id

    @model_validator(mode="after")
    def _device_clock_plausible(self) -> Self:
        if self.device_time > self.received_at + MAX_DEVICE_CLOCK_AHEAD:
            raise ValueError(
                f"device_time {self.device_time.isoformat()} is more than "
                f"{MAX_DEVICE_CLOCK_AHEAD} ahead of received_at {self.received_at.isoformat()}"
            )
        return self

    @property
    def record_id(self) -> str:
        """Stable identity: pump, boot session and sequence number."""
        return f"{self.pump_id}:{self.boot_id}:{self.seq}"


class DeviceAlarm(Frozen):
    """An alarm the pump itself reports; passed through with its priority."""

    code: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]
    priority: Priority


class Reading(DeviceMessage):
    """One periodic pump reading.

    `reservoir_ml` is the pump's own estimate, computed from the programmed rate
    and the last refill: it is not a measurement (DOMAIN.md 2.1), and an
    over-infusing pump can be emptier than it says. `delivered_total_ml` counts
    what the drive mechanism delivered since implant.
    """

    kind: Literal["reading"] = "reading"
    drug: Drug
    pump_state: PumpState
    reservoir_ml: ReservoirVolume_ml
    reservoir_basis: Literal["computed_from_programmed_rate"] = "computed_from_programmed_rate"
    reservoir_capacity_ml: Capacity_ml
    low_reservoir_alarm_ml: ReservoirVolume_ml
    basal_rate_ml_per_day: Rate_ml_per_day
    delivered_total_ml: Volume_ml
    bolus_count_24h: Annotated[int, Field(ge=0, le=1000, strict=True)] = 0
    battery_state: BatteryState = BatteryState.OK
    battery_remaining_pct: Percent | None = None
    alarms: Annotated[tuple[DeviceAlarm, ...], Field(max_length=MAX_ALARMS_PER_READING)] = ()

    @model_validator(mode="after")
    def _volumes_fit_reservoir(self) -> Self:
        if self.reservoir_ml > self.reservoir_capacity_ml:
            raise ValueError(
                f"reservoir_ml {self.reservoir_ml} exceeds reservoir_capacity_ml "
                f"{self.reservoir_capacity_ml}"
            )
        if self.low_reservoir_alarm_ml >= self.reservoir_capacity_ml:
            raise ValueError(
                f"low_reservoir_alarm_ml {self.low_reservoir_alarm_ml} must be below "
                f"reservoir_capacity_ml {self.reservoir_capacity_ml}"
            )
        return self


class Prescription(Frozen):
    """The programmed therapy (DOMAIN.md 1.1, 1.2)."""

    basal_rate_ml_per_day: Rate_ml_per_day
    bolus_dose_ml: Annotated[float, Field(ge=0.0, le=10.0, strict=True)] = 0.0
    bolus_lockout_min: Annotated[int, Field(ge=0, le=7 * 24 * 60, strict=True)] = 0
    boluses_per_day_max: Annotated[int, Field(ge=0, le=100, strict=True)] = 0
    low_reservoir_alarm_ml: ReservoirVolume_ml = 2.0


class DeviceInfo(DeviceMessage):
    """Identity and programming of a pump, sent at connect and on change."""

    kind: Literal["info"] = "info"
    model: Annotated[str, Field(min_length=1, max_length=64)]
    serial: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    firmware: Annotated[str, Field(min_length=1, max_length=32)]
    reservoir_capacity_ml: Capacity_ml
    drug: Drug
    concentration_mg_per_ml: Annotated[
        float, Field(gt=0.0, le=MAX_CONCENTRATION_MG_PER_ML, strict=True)
    ]
    prescription: Prescription

    @model_validator(mode="after")
    def _alarm_below_capacity(self) -> Self:
        if self.prescription.low_reservoir_alarm_ml >= self.reservoir_capacity_ml:
            raise ValueError(
                f"prescription.low_reservoir_alarm_ml {self.prescription.low_reservoir_alarm_ml} "
                f"must be below reservoir_capacity_ml {self.reservoir_capacity_ml}"
            )
        return self


class EventKind(StrEnum):
    """Events a pump logs and reports (DOMAIN.md 2.2-2.5)."""

    MOTOR_STALL_START = "motor_stall_start"
    MOTOR_STALL_END = "motor_stall_end"
    LOW_BATTERY_RESET = "low_battery_reset"
    ERI = "eri"
    EOS = "eos"
    PUMP_STOPPED = "pump_stopped"
    PUMP_STARTED = "pump_started"
    BOLUS_DELIVERED = "bolus_delivered"
    REFILL = "refill"


class DeviceEvent(DeviceMessage):
    """A device-reported event; refills carry withdrawn and filled volumes, boluses their dose."""

    kind: Literal["event"] = "event"
    event: EventKind
    bolus_ml: Annotated[float, Field(gt=0.0, le=10.0, strict=True)] | None = None
    withdrawn_ml: ReservoirVolume_ml | None = None
    filled_ml: ReservoirVolume_ml | None = None

    @model_validator(mode="after")
    def _fields_match_event(self) -> Self:
        if self.event is EventKind.REFILL and (self.withdrawn_ml is None or self.filled_ml is None):
            raise ValueError("a refill event needs withdrawn_ml and filled_ml")
        if self.event is EventKind.BOLUS_DELIVERED and self.bolus_ml is None:
            raise ValueError("a bolus_delivered event needs bolus_ml")
        return self


class AlertTransition(Frozen):
    """One transition of one alert, in IHE PCD ACM vocabulary (DOMAIN.md 4.2).

    `alert_id` is stable for the whole life of the alert (start to end);
    `transition_id` is unique per transition and is what consumers deduplicate on.
    """

    schema_version: Literal[1] = 1
    kind: Literal["alert"] = "alert"
    alert_id: Annotated[str, Field(min_length=1, max_length=160)]
    transition_id: Annotated[str, Field(min_length=1, max_length=200)]
    pump_id: PumpId
    alert_kind: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]
    priority: Priority
    alert_type: AlertType
    state: AlarmState
    phase: Phase
    inactivation: Inactivation = Inactivation.ENABLED
    latching: bool
    value: StrictFloat | None = None
    threshold: StrictFloat | None = None
    unit: Annotated[str, Field(max_length=16)] | None = None
    text: Annotated[str, Field(max_length=500)]
    at: Timestamp
    device_time: Timestamp | None = None
    cause_record_id: str | None = None
    acknowledged_by: Annotated[str, Field(max_length=128)] | None = None
    acknowledged_at: Timestamp | None = None
    escalation_level: Annotated[int, Field(ge=0, le=MAX_ESCALATION_LEVEL, strict=True)] = 0
    """How many times the alert has been announced again unacknowledged (PH and PM, every
    `reannounce_after_s`); 0 until then. A second audience subscribes to levels >= 1."""
    intended_use: IntendedUse = INTENDED_USE

    @property
    def record_id(self) -> str:
        return self.transition_id


class Acknowledgement(Frozen):
    """An operator's acknowledgement of one alert, published to the ack topic.

    Acknowledging records that a person has seen the alert; it never clears the
    pump's own alarm (IHE CP-PCD-146: a local alarm is not cleared remotely).
    """

    schema_version: Literal[1] = 1
    alert_id: Annotated[str, Field(min_length=1, max_length=160)]
    by: Operator | None = None
    """Optional: the gateway takes the identity from the ack topic (`.../ack/{username}`) and
    refuses a message whose `by` names anyone else."""
    at: Timestamp | None = None
    """The console's own time of the acknowledgement: recorded as `acknowledged_at`, bounded to
    the alert's life; the transition's `at` is the gateway's receive time."""
    note: Annotated[str, Field(max_length=500)] | None = None


class AckRefusal(Frozen):
    """Why the gateway refused a message on an ack topic (published, not retained)."""

    schema_version: Literal[1] = 1
    kind: Literal["ack_refusal"] = "ack_refusal"
    username: Operator | None
    """The ack topic's last level (the MQTT user), None when it was not a usable name."""
    alert_id: Annotated[str, Field(max_length=160)] | None = None
    reason_kind: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]
    reason: Annotated[str, Field(max_length=500)]
    at: Timestamp


class SourceStatus(Frozen):
    url: str
    connected: bool
    reconnects: Annotated[int, Field(ge=0, strict=True)] = 0
    last_error: str | None = None


class GatewayStatus(Frozen):
    """Retained birth/death message of one gateway session (Sparkplug-like)."""

    schema_version: Literal[1] = 1
    kind: Literal["gateway_status"] = "gateway_status"
    site: str
    station: str
    session_id: SessionId
    seq: StateSeq
    """Orders this session's status messages: each connection's birth is above the previous
    connection's will, and its will above every status of the connection."""
    state: Literal["online", "offline"]
    at: Timestamp
    version: str
    sources: Annotated[tuple[SourceStatus, ...], Field(max_length=MAX_SOURCES)] = ()
    intended_use: IntendedUse = INTENDED_USE

    @property
    def record_id(self) -> str:
        return f"gateway:{self.session_id}:{self.seq}"


class PumpStatus(Frozen):
    """Retained per-pump status: connectivity and the latest reading's key values."""

    schema_version: Literal[1] = 1
    kind: Literal["pump_status"] = "pump_status"
    pump_id: PumpId
    telemetry: Literal["ok", "lost"]
    at: Timestamp
    last_record_id: str | None = None
    last_device_time: Timestamp | None = None
    reservoir_ml: StrictFloat | None = None
    pump_state: PumpState | None = None
    battery_state: BatteryState | None = None
    session_id: SessionId | None = None
    """The gateway session that published it (GatewayStatus.session_id); see seq."""
    seq: StateSeq | None = None
    """Increases with every retained state message of the session: a consumer keeps the
    highest per topic and ignores a lower one or one of a session that is not the gateway's."""


class ActiveAlerts(Frozen):
    """Retained per-pump set of alerts that are not yet ended."""

    schema_version: Literal[1] = 1
    kind: Literal["active_alerts"] = "active_alerts"
    pump_id: PumpId
    at: Timestamp
    alerts: Annotated[tuple[AlertTransition, ...], Field(max_length=MAX_ACTIVE_ALERTS)]
    intended_use: IntendedUse = INTENDED_USE
    session_id: SessionId | None = None
    """The gateway session that published it (GatewayStatus.session_id); see seq."""
    seq: StateSeq | None = None
    """Increases with every retained state message of the session (as PumpStatus.seq)."""


class Quarantined(Frozen):
    """A frame that failed decoding or validation, kept with its reason."""

    schema_version: Literal[1] = 1
    kind: Literal["quarantine"] = "quarantine"
    quarantine_id: str
    source: str
    reason_kind: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]
    reason: str
    raw_hex: str
    received_at: Timestamp
    pump_id: str | None = None

    @property
    def record_id(self) -> str:
        return self.quarantine_id


DeviceMessageModel = Reading | DeviceInfo | DeviceEvent
MODELS_BY_KIND: dict[str, type[Frozen]] = {
    "reading": Reading,
    "info": DeviceInfo,
    "event": DeviceEvent,
    "alert": AlertTransition,
    "gateway_status": GatewayStatus,
    "pump_status": PumpStatus,
    "active_alerts": ActiveAlerts,
    "quarantine": Quarantined,
    "acknowledgement": Acknowledgement,
    "ack_refusal": AckRefusal,
}


def _bounded_repr() -> reprlib.Repr:
    """A repr for error messages that a hostile payload cannot make long or deep."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxdict, shown.maxlist = 3, 4, 4
    shown.maxstring, shown.maxother, shown.maxlong = 50, 50, 40
    return shown


_SHOWN = _bounded_repr()


def describe_errors(errors: list[Any]) -> str:
    """One readable line per pydantic error: field, value and rule."""
    parts = []
    for err in errors:
        loc = ".".join(_show_key(p) for p in err.get("loc", ()))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:
            parts.append(message)
        elif err.get("type") == "missing":
            parts.append(f"{loc}: {message}")  # the input is the whole object: not useful
        else:
            parts.append(f"{loc}={_show(err.get('input'))}: {message}")
    return "; ".join(parts)


def _show_key(part: object) -> str:
    """A location part as is when it is a plain name or index, else bounded and escaped."""
    text = str(part)
    return text if text.isprintable() and len(text) <= 60 else _show(text)


def _show(value: object) -> str:
    try:
        shown = _SHOWN.repr(value)
    except (RecursionError, ValueError):
        shown = f"<{type(value).__name__}>"
    return shown if len(shown) <= 60 else shown[:57] + "..."
