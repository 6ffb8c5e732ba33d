"""HL7 v2.6 messages of the IHE Patient Care Device profiles, built from our records.

Pure: no I/O, no clock, no logging. PCD-01 (Communicate PCD Data, ORU^R01) reports readings,
PCD-04 (Report Alert, ORU^R40) reports alert transitions; `parse_ack` reads a receiver's
original-mode acknowledgement. docs/interoperability.md maps every field.

Codes come from schemas/mdc.py; the PCD-04 attribute codes (MDC_ATTR_*) and the VMD code are
the confirmed rows of DOMAIN.md 4.2 and 4.4. Where schemas/mdc.py knows no code (rows marked
U) the observation carries a code of the local coding system LOCAL_SYSTEM instead of a guess
(HL7 v2 reserves names beginning "99" for local coding systems).

Identity: MSH-10 is a hash of the record ids the message carries, so a resend after a crash
carries the same control id; each reading's OBR-3 and each alert's OBR-2 carry the record id
itself, so a receiver can also deduplicate per record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from schemas.mdc import DEVICE_MDC, MdcEntry, alert_code_for, mdc_for
from schemas.models import AlertTransition, Reading

SEGMENT_END: Final = "\r"
LOCAL_SYSTEM: Final = "99PGW"
"""Local coding system for observations without a confirmed MDC code (docs/interoperability.md)."""
HL7_VERSION: Final = "2.6"
PCD01_TYPE: Final = "ORU^R01^ORU_R01"
PCD04_TYPE: Final = "ORU^R40^ORU_R40"
PCD01_PROFILE: Final = "IHE_PCD_001^IHE PCD"
PCD04_PROFILE: Final = "IHE_PCD_ACM_001^IHE PCD"
"""MSH-21 without the profile OIDs: sources disagree on them, so none is sent."""
CONTROL_ID_CHARS: Final = 20
"""MSH-10 length: 20 hex digits (80 bits of a SHA-256) fit every HL7 v2 version's limit."""

MDC_VMD: Final = ("69986", "MDC_DEV_PUMP_INFUS_VMD")
"""DOMAIN.md 4.4 [C] [S71],[S73]."""
MDC_EVT_ALARM: Final = ("196616", "MDC_EVT_ALARM")
ACM_FACETS: Final = {
    "source": ("68480", "MDC_ATTR_ALERT_SOURCE"),
    "phase": ("68481", "MDC_ATTR_EVENT_PHASE"),
    "state": ("68482", "MDC_ATTR_ALARM_STATE"),
    "inactivation": ("68483", "MDC_ATTR_ALARM_INACTIVATION_STATE"),
    "priority": ("68484", "MDC_ATTR_ALARM_PRIORITY"),
    "type": ("68485", "MDC_ATTR_ALERT_TYPE"),
}
"""PCD-04 OBX-3 facet codes, DOMAIN.md 4.2 [C] [S71]."""

READING_METRICS: Final = (
    "reservoir_ml",
    "basal_rate_ml_per_day",
    "delivered_total_ml",
    "reservoir_capacity_ml",
    "low_reservoir_alarm_ml",
    "bolus_count_24h",
    "battery_remaining_pct",
)
"""Numeric fields of a Reading, reported as NM observations in this order."""
READING_STATES: Final = ("pump_state", "battery_state")
"""Coded fields of a Reading, reported as CWE observations (values in LOCAL_SYSTEM)."""

_ESCAPES: Final = str.maketrans(
    {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "~": "\\R\\", "&": "\\T\\", "\r": " ", "\n": " ",
     "\x0b": " ", "\x1c": " "}  # the last two would end an MLLP block early
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """MSH-3 to MSH-6 and MSH-11 of every message, from the [hl7] section."""

    sending_application: str = "PUMPGW"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"


@dataclass(frozen=True, slots=True)
class DeviceLink:
    """What the optional device map says about one pump: its patient and its EUI-64."""

    patient_id: str | None = None
    assigning_authority: str = ""
    eui64: str | None = None


NO_LINK: Final = DeviceLink()


@dataclass(frozen=True, slots=True)
class Hl7Message:
    """One ER7-encoded message and the records it carries."""

    control_id: str
    text: str
    record_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Hl7Ack:
    """A receiver's answer: MSA-1 code, MSA-2 control id, and its reason text if any."""

    code: str
    control_id: str
    reason: str


def escape(text: str) -> str:
    """Text safe inside an HL7 field (delimiters escaped, line breaks flattened)."""
    return text.translate(_ESCAPES)


def hl7_time(moment: datetime) -> str:
    """DTM in UTC with four fractional digits: YYYYMMDDHHMMSS.SSSS+0000."""
    utc = moment.astimezone(UTC)
    return f"{utc:%Y%m%d%H%M%S}.{utc.microsecond // 100:04d}+0000"


def control_id_for(record_ids: Sequence[str]) -> str:
    """MSH-10: the same for the same records in the same order, whenever it is built."""
    digest = hashlib.sha256("\n".join(record_ids).encode()).hexdigest()
    return digest[:CONTROL_ID_CHARS].upper()


def _msh(envelope: Envelope, at: datetime, message_type: str, control_id: str, profile: str) -> str:
    e = envelope
    fields = [
        "MSH", "^~\\&", escape(e.sending_application), escape(e.sending_facility),
        escape(e.receiving_application), escape(e.receiving_facility), hl7_time(at), "",
        message_type, control_id, e.processing_id, HL7_VERSION, "", "", "AL", "NE", "",
        "UNICODE UTF-8", "", "", profile,
    ]  # fmt: skip
    return "|".join(fields)


def _pid(link: DeviceLink) -> list[str]:
    if link.patient_id is None:
        return []
    authority = escape(link.assigning_authority)
    # PID-5 is required in v2.6: the gateway knows no name, so the name type says unspecified
    return [f"PID|||{escape(link.patient_id)}^^^{authority}^MR||^^^^^^U"]


def _equipment(pump_id: str, link: DeviceLink, envelope: Envelope) -> str:
    """OBX-18: the EUI-64 when the device map gives one, else the (pseudonymous) pump id."""
    if link.eui64 is not None:
        return f"{link.eui64}^^{link.eui64}^EUI-64"
    return f"{escape(pump_id)}^{escape(envelope.sending_application)}"


def _cwe(code: str, text: str, system: str) -> str:
    return f"{code}^{text}^{system}"


def coded_field(name: str) -> str:
    """OBX-3 of a reading field: its MDC code, or the field name in LOCAL_SYSTEM."""
    entry = mdc_for(name)
    if entry is not None and entry.code is not None and entry.confidence in ("C", "D"):
        return _cwe(str(entry.code), entry.refid or name, "MDC")
    return _cwe(name, name, LOCAL_SYSTEM)


def unit_field(name: str) -> str:
    """OBX-6: the MDC unit with UCUM as alternate, or UCUM alone (per-day units have no MDC)."""
    entry = mdc_for(name)
    if entry is None or entry.ucum is None:
        return ""
    ucum = escape(entry.ucum)
    if entry.mdc_unit_code is not None and entry.mdc_unit is not None:
        return f"{entry.mdc_unit_code}^{entry.mdc_unit}^MDC^{ucum}^{ucum}^UCUM"
    return f"{ucum}^{ucum}^UCUM"


def _number(value: float) -> str:
    return format(value, ".6g")


def _reading_group(index: int, reading: Reading, link: DeviceLink, envelope: Envelope) -> list[str]:
    """OBR and the OBX containment tree MDS 1 / VMD 1.1 / CHAN 1.1.1 / METRIC 1.1.1.n."""
    when = hl7_time(reading.device_time)
    equipment = _equipment(reading.pump_id, link, envelope)
    mds = _cwe(str(DEVICE_MDC.code), DEVICE_MDC.refid or "", "MDC")
    segments = [
        f"OBR|{index}||{escape(reading.record_id)}^{escape(envelope.sending_application)}|"
        f"{mds}|||{when}|{when}",
        f"OBX|1||{mds}|1|||||||X|||{when}||||{equipment}",
        f"OBX|2||{_cwe(*MDC_VMD, 'MDC')}|1.1|||||||X|||{when}",
        f"OBX|3||{_cwe('channel', 'Infusion channel', LOCAL_SYSTEM)}|1.1.1|||||||X|||{when}",
    ]
    n = 3
    for name in READING_METRICS:
        value = getattr(reading, name)
        if value is None:
            continue
        n += 1
        segments.append(
            f"OBX|{n}|NM|{coded_field(name)}|1.1.1.{n - 3}|{_number(float(value))}|"
            f"{unit_field(name)}|||||R|||{when}||||{equipment}"
        )
    for name in READING_STATES:
        n += 1
        state = str(getattr(reading, name))
        segments.append(
            f"OBX|{n}|CWE|{coded_field(name)}|1.1.1.{n - 3}|{_cwe(state, state, LOCAL_SYSTEM)}|"
            f"|||||R|||{when}||||{equipment}"
        )
    n += 1
    segments.append(
        f"OBX|{n}|ST|{coded_field('drug')}|1.1.1.{n - 3}|{escape(reading.drug.value)}|"
        f"|||||R|||{when}||||{equipment}"
    )
    return segments


def pcd01_message(
    readings: Sequence[Reading], envelope: Envelope, link: DeviceLink = NO_LINK
) -> Hl7Message:
    """One ORU^R01 carrying readings of one pump, one OBR group per reading, oldest first."""
    if not readings:
        raise ValueError("a PCD-01 message needs at least one reading")
    record_ids = tuple(r.record_id for r in readings)
    control_id = control_id_for(record_ids)
    at = max(r.received_at for r in readings)
    segments = [_msh(envelope, at, PCD01_TYPE, control_id, PCD01_PROFILE), *_pid(link)]
    for index, reading in enumerate(readings, start=1):
        segments.extend(_reading_group(index, reading, link, envelope))
    return Hl7Message(control_id, SEGMENT_END.join(segments) + SEGMENT_END, record_ids)


def alert_event_code(alert_kind: str) -> str:
    """OBX-5 of the event OBX: the alert kind's MDC event code, or the kind in LOCAL_SYSTEM."""
    entry: MdcEntry | None = alert_code_for(alert_kind)
    if entry is not None and entry.code is not None and entry.refid is not None:
        return _cwe(str(entry.code), entry.refid, "MDC")
    return _cwe(alert_kind, alert_kind, LOCAL_SYSTEM)


def _facet(n: int, facet: str, value: str, tail: str = "") -> str:
    code, refid = ACM_FACETS[facet]
    return f"OBX|{n}|ST|{code}^{refid}^MDC|1.0.0.0.{n}|{escape(value)}||||||F{tail}"


def pcd04_message(
    alert: AlertTransition, envelope: Envelope, link: DeviceLink = NO_LINK
) -> Hl7Message:
    """One ORU^R40 for one alert transition: identity, phase, state, priority, inactivation."""
    record_ids = (alert.transition_id,)
    control_id = control_id_for(record_ids)
    app = escape(envelope.sending_application)
    when = hl7_time(alert.at)
    equipment = _equipment(alert.pump_id, link, envelope)
    mds = _cwe(str(DEVICE_MDC.code), DEVICE_MDC.refid or "", "MDC")
    acked = ""
    if alert.acknowledged_by is not None:
        acked_at = hl7_time(alert.acknowledged_at) if alert.acknowledged_at else ""
        acked = f"|||{acked_at}||{escape(alert.acknowledged_by)}"
    segments = [
        _msh(envelope, alert.at, PCD04_TYPE, control_id, PCD04_PROFILE),
        *_pid(link),
        f"OBR|1|{escape(alert.transition_id)}^{app}|{escape(alert.alert_id)}^{app}|"
        f"{_cwe(*MDC_EVT_ALARM, 'MDC')}|||{when}",
        f"NTE|1||{escape(alert.text)}",
        f"OBX|1|CWE|{_cwe(*MDC_EVT_ALARM, 'MDC')}|1.0.0.0.1|{alert_event_code(alert.alert_kind)}"
        f"||||||F|||{when}||||{equipment}",
        f"OBX|2|CWE|{ACM_FACETS['source'][0]}^{ACM_FACETS['source'][1]}^MDC|1.0.0.0.2|{mds}||||||F",
        _facet(3, "phase", alert.phase.value),
        _facet(4, "state", alert.state.value),
        _facet(5, "inactivation", alert.inactivation.value, acked),
        _facet(6, "priority", alert.priority.value),
        _facet(7, "type", alert.alert_type.value),
    ]
    n = 7
    for name, value in (("alert_value", alert.value), ("alert_threshold", alert.threshold)):
        if value is None:
            continue
        n += 1
        unit = escape(alert.unit or "")
        units = f"{unit}^{unit}^{LOCAL_SYSTEM}" if unit else ""
        segments.append(
            f"OBX|{n}|NM|{_cwe(name, name, LOCAL_SYSTEM)}|1.0.0.0.{n}|{_number(value)}|{units}"
            "|||||F"
        )
    return Hl7Message(control_id, SEGMENT_END.join(segments) + SEGMENT_END, record_ids)


def parse_ack(text: str) -> Hl7Ack:
    """MSA-1, MSA-2 and the reason (MSA-3, else ERR-8) of an ACK; ValueError if there is no MSA."""
    reason = ""
    ack: tuple[str, str] | None = None
    for segment in text.replace("\n", "\r").split("\r"):
        fields = segment.split("|")
        if fields[0] == "MSA" and len(fields) > 2:
            ack = (fields[1], fields[2])
            reason = fields[3] if len(fields) > 3 else ""
        elif fields[0] == "ERR" and len(fields) > 8 and not reason:
            reason = fields[8]
    if ack is None:
        raise ValueError("the answer has no MSA segment")
    return Hl7Ack(ack[0], ack[1], reason)
