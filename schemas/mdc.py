"""IEEE 11073-10101 (MDC) codes and UCUM units for the fields and alerts of our messages.

Pure data, taken only from DOMAIN.md sections 4.4 (MDC) and 4.5 (UCUM); nothing here is
invented. Each row carries a confidence as DOMAIN.md marks it:

- C: the code is confirmed in the cited source and means what the field means;
- D: derived by us: a code computed from its partition and term, the nearest analogue of
  a quantity that has no code of its own, or our allocation of an alert to an event code;
- U: no code is known (the field is listed with code None so the gap is explicit);
- -: no code is wanted (identity and version fields, not observations).

The table is rendered in docs/schemas.md; a unit test keeps the two in agreement.
Context-free code = partition * 65536 + term; `partition_term` is set only where
DOMAIN.md gives that form. The per-day MDC units (mL/day and the like) are unconfirmed,
so rows in those units carry a UCUM unit and no MDC unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Confidence = Literal["C", "D", "U", "-"]
Subject = Literal["field", "alert", "device"]

MDC_CODE_SYSTEM: Final = "urn:iso:std:iso:11073:10101"
"""FHIR code system URI of MDC (DOMAIN.md 5)."""
UCUM_SYSTEM: Final = "http://unitsofmeasure.org"
"""UCUM code system URI (DOMAIN.md 4.5); UCUM codes are case-sensitive."""
PARTITION_SIZE: Final = 65536


@dataclass(frozen=True, slots=True)
class MdcEntry:
    """One field, alert kind or device and its MDC code, MDC unit and UCUM unit."""

    subject: Subject
    name: str
    refid: str | None
    code: int | None
    partition_term: tuple[int, int] | None
    mdc_unit: str | None
    mdc_unit_code: int | None
    ucum: str | None
    confidence: Confidence
    source: str
    note: str


_ML: Final = ("MDC_DIM_MILLI_L", 263762)
_MIN: Final = ("MDC_DIM_MIN", 264352)
_NONE: Final = (None, None)


def _field(
    name: str,
    code: tuple[str | None, int | None],
    unit: tuple[str | None, int | None],
    ucum: str | None,
    confidence: Confidence,
    source: str,
    note: str,
    partition_term: tuple[int, int] | None = None,
) -> MdcEntry:
    refid, number = code
    unit_refid, unit_code = unit
    return MdcEntry(
        "field", name, refid, number, partition_term, unit_refid, unit_code, ucum, confidence,
        source, note,
    )  # fmt: skip


def _alert(
    name: str,
    code: tuple[str | None, int | None],
    confidence: Confidence,
    source: str,
    note: str,
    partition_term: tuple[int, int] | None = None,
) -> MdcEntry:
    refid, number = code
    return MdcEntry(
        "alert", name, refid, number, partition_term, None, None, None, confidence, source, note
    )


# fmt: off
MDC_TABLE: Final[tuple[MdcEntry, ...]] = (
    MdcEntry(
        "device", "pump", "MDC_DEV_PUMP_INFUS_MDS", 69985, None, None, None, None, "C",
        "[S71],[S73]", "alert source and device type of every pump",
    ),
    # Fields: envelope and identity.
    _field("schema_version", _NONE, _NONE, None, "-", "-", "message format version"),
    _field("seq", _NONE, _NONE, None, "-", "-", "frame sequence number: identity only"),
    # Fields: therapy and state.
    _field("drug", ("MDC_DRUG_NAME_LABEL", 184514), _NONE, None, "C", "[S73]", "drug name"),
    _field("concentration_mg_per_ml", ("MDC_CONC_DRUG", 157760),
           ("MDC_DIM_MILLI_G_PER_ML", 264306), "mg/mL", "C", "[S73],[S75]", "drug concentration"),
    _field("pump_state", ("MDC_PUMP_INFUSING_STATUS", 184519), _NONE, None, "C", "[S73]",
           "running / stopped / stalled"),
    _field("basal_rate_ml_per_day", ("MDC_FLOW_FLUID_PUMP", 157784), _NONE, "mL/d", "C",
           "[S71],[S73],[S75]",
           "MDC per-day unit is [U]: no MDC unit; IHE examples use mL/h (265266)",
           partition_term=(2, 26712)),
    _field("reservoir_ml", ("MDC_VOL_FLUID_TBI_REMAIN", 157872), _ML, "mL", "C", "[S73]",
           "remaining volume; the pump's estimate from programmed rate, not a measurement",
           ),
    _field("reservoir_capacity_ml", _NONE, _ML, "mL", "U", "[S71],[S75]",
           "no MDC code for reservoir capacity in DOMAIN.md"),
    _field("low_reservoir_alarm_ml", _NONE, _ML, "mL", "U", "[S71],[S75]",
           "reservoir-low metric code is [U] (DOMAIN.md 4.4)"),
    _field("delivered_total_ml", ("MDC_VOL_FLUID_DELIV_TOTAL", 157993), _ML, "mL", "C",
           "[S73]", "delivered total since implant"),
    _field("bolus_count_24h", _NONE, _NONE, "/d", "U", "[S75]",
           "no MDC code for boluses given; PCA codes are limits"),
    _field("battery_state", _NONE, _NONE, None, "U", "-",
           "battery state code is [U]; ERI and EOS have event codes (alert rows)"),
    _field("battery_remaining_pct", _NONE, _NONE, "%", "U", "[S75]",
           "battery-remaining metric code is [U] (DOMAIN.md 4.4)"),
    # Fields: prescription (bolus rules use the PCA codes, the closest analogue).
    _field("bolus_dose_ml", _NONE, _ML, "mL", "U", "[S71],[S75]",
           "no bolus-volume code; MDC_DOSE_PCA_LIMIT 157985 is a limit, not the dose"),
    _field("bolus_lockout_min", ("MDC_TIME_PCA_LOCKOUT", 157989), _MIN, "min", "D",
           "[S71],[S73]", "PCA lockout: closest analogue of the PTM lockout"),
    _field("boluses_per_day_max", (None, 157988), _NONE, "/d", "D", "[S71],[S75]",
           "nearest analogue: PCA max doses per hour (REFID not in DOMAIN.md); "
           "ours is per day"),
    # Fields: events.
    _field("event", _NONE, _NONE, None, "U", "-",
           "event kinds map to event codes through the alert rows"),
    _field("bolus_ml", _NONE, _ML, "mL", "U", "[S71],[S75]", "no bolus-volume code"),
    _field("withdrawn_ml", _NONE, _ML, "mL", "U", "[S71],[S75]",
           "no code for volume drained at refill"),
    _field("filled_ml", ("MDC_VOL_FLUID_CONTAINER_START", 157994), _ML, "mL", "D",
           "[S71]", "container start volume, approximately the reservoir fill volume"),
    # Alert kinds (our allocation: the manufacturer allocation is unknown).
    _alert("low_reservoir", ("MDC_EVT_LO", 196670), "D", "[S71],[S74]",
           "our allocation of the generic low event", partition_term=(3, 62)),
    _alert("refill_due", _NONE, "U", "-", "advisory; no code"),
    _alert("empty_reservoir", ("MDC_EVT_EMPTY", 196634), "D", "[S74]",
           "code computed from its term", partition_term=(3, 26)),
    _alert("motor_stall", ("MDC_EVT_FAIL", 196646), "D", "[S74]",
           "code computed from its term; our allocation", partition_term=(3, 38)),
    _alert("over_infusion", _NONE, "U", "-", "no code"),
    _alert("under_infusion", ("MDC_EVT_FLUID_LINE_OCCL", 196940), "D", "[S71],[S74]",
           "occlusion is one cause of under-infusion; our allocation",
           partition_term=(3, 332)),
    _alert("pump_stopped", _NONE, "U", "-",
           "not allocated: MDC_EVT_INOP means inoperable, a stop may be intended"),
    _alert("refill_discrepancy", _NONE, "U", "-",
           "not allocated: MDC_EVT_FLUID_LINE_PROB is a candidate"),
    _alert("battery_eri", ("MDC_EVT_ADVIS_BATT_REPLACE", 203286), "D", "[S74]",
           "code computed from its term", partition_term=(3, 6678)),
    _alert("battery_eos", ("MDC_EVT_BATT_FAIL", 196800), "D", "[S74]",
           "code computed from its term; our allocation", partition_term=(3, 192)),
    _alert("telemetry_lost", _NONE, "U", "-", "gateway watchdog; no code"),
    _alert("device_alarm", ("MDC_EVT_ALARM", 196616), "D", "[S71]",
           "PCD-04 event id for technical alarms; the specific alarm is the device's code"),
    _alert("outbox_near_full", _NONE, "U", "-", "gateway technical alert; no code"),
    _alert("outbox_full", _NONE, "U", "-", "gateway technical alert; no code"),
)
# fmt: on
"""The one table: every coded or numeric field, every alert kind and the device."""

_FIELDS: Final = {e.name: e for e in MDC_TABLE if e.subject == "field"}
_ALERTS: Final = {e.name: e for e in MDC_TABLE if e.subject == "alert"}
DEVICE_MDC: Final = next(e for e in MDC_TABLE if e.subject == "device")


def mdc_for(field: str) -> MdcEntry | None:
    """The row of a model field by name; None when the field is not in the table."""
    return _FIELDS.get(field)


def alert_code_for(alert_kind: str) -> MdcEntry | None:
    """The row of an alert kind; None when the kind is not in the table."""
    return _ALERTS.get(alert_kind)


def code_from_partition(partition: int, term: int) -> int:
    """Context-free code of a partition and term code."""
    return partition * PARTITION_SIZE + term
