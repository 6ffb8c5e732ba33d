"""FHIR R4 transaction Bundles built from our records: Device, DeviceMetric, Observation and
DetectedIssue resources as plain JSON.

Pure: no I/O, no clock, no logging, and no FHIR library at run time (the tests validate every
resource with fhir.resources' R4B models). docs/interoperability.md maps every element.

Replays create nothing twice: the Device and its DeviceMetrics are conditional updates on
their identifiers, each Observation (one per reading, a component per field) and each
DetectedIssue (one per alert transition) a conditional create (`ifNoneExist`) on the record
id. Codes: MDC where schemas/mdc.py has one (C or D rows), else the local code systems below.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from pydantic_core import to_json

from gateway.hl7_messages import NO_LINK, READING_METRICS, READING_STATES, DeviceLink
from gateway.records import GATEWAY_PUMP_ID
from schemas.mdc import DEVICE_MDC, MDC_CODE_SYSTEM, UCUM_SYSTEM, alert_code_for, mdc_for
from schemas.models import AlertTransition, Priority, Reading

PUMP_ID_SYSTEM: Final = "urn:pumpgw:pump-id"
METRIC_ID_SYSTEM: Final = "urn:pumpgw:metric-id"
RECORD_ID_SYSTEM: Final = "urn:pumpgw:record-id"
ALERT_ID_SYSTEM: Final = "urn:pumpgw:alert-id"
FIELD_SYSTEM: Final = "urn:pumpgw:field"
"""Local codes for fields without a confirmed MDC code, and for their coded values."""
ALERT_KIND_SYSTEM: Final = "urn:pumpgw:alert-kind"
ACM_SYSTEMS: Final = {
    facet: f"urn:pumpgw:acm-{facet}"
    for facet in ("phase", "state", "inactivation", "priority", "type")
}
"""IHE PCD ACM facet values (DOMAIN.md 4.2); FHIR R4 has no code system of its own for them."""
PATIENT_ID_SYSTEM_DEFAULT: Final = "urn:pumpgw:patient-id"
_NAMESPACE: Final = uuid.UUID("5f0d3c56-8a0e-4a59-9d59-7b2d0c4a9e11")
"""Namespace of the bundle-internal urn:uuid ids (uuid5: the same record, the same id)."""
SEVERITY: Final = {Priority.HIGH: "high", Priority.MEDIUM: "moderate", Priority.LOW: "low"}
METRIC_CATEGORY: Final = {
    "low_reservoir_alarm_ml": "setting",
    "reservoir_capacity_ml": "setting",
    "reservoir_ml": "calculation",
}
"""DeviceMetric.category; the rest are measurements. The reservoir is computed (DOMAIN.md 2.1)."""


@dataclass(frozen=True, slots=True)
class FhirBundle:
    """One transaction Bundle as JSON bytes and the records it carries."""

    body: bytes
    record_ids: tuple[str, ...]


def fhir_time(moment: datetime) -> str:
    """instant/dateTime in UTC with milliseconds."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _urn(kind: str, value: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, f'{kind}:{value}')}"


def _search(system: str, value: str) -> str:
    return f"identifier={quote(system, safe=':')}|{quote(value, safe=':')}"


def field_concept(name: str) -> dict[str, Any]:
    """The CodeableConcept of a reading field: MDC when known, else FIELD_SYSTEM."""
    concept = _CONCEPTS.get(name)
    return concept if concept is not None else _field_concept(name)


def _field_concept(name: str) -> dict[str, Any]:
    entry = mdc_for(name)
    if entry is not None and entry.code is not None and entry.confidence in ("C", "D"):
        refid = entry.refid or name
        coding = {"system": MDC_CODE_SYSTEM, "code": str(entry.code), "display": refid}
    else:
        coding = {"system": FIELD_SYSTEM, "code": name, "display": name}
    return {"coding": [coding], "text": name}


_CONCEPTS: Final = {
    name: _field_concept(name)
    for name in ("reservoir_ml", "basal_rate_ml_per_day", "delivered_total_ml",
                 "reservoir_capacity_ml", "low_reservoir_alarm_ml", "bolus_count_24h",
                 "battery_remaining_pct", "pump_state", "battery_state", "drug")
}  # fmt: skip
"""Computed once: a Bundle repeats them for every reading (the JSON encoder copies them)."""


def _quantity(name: str, value: float) -> dict[str, Any]:
    entry = mdc_for(name)
    ucum = entry.ucum if entry is not None else None
    if ucum is None:
        return {"value": value}
    return {"value": value, "unit": ucum, "system": UCUM_SYSTEM, "code": ucum}


def _device_concept() -> dict[str, Any]:
    coding = {"system": MDC_CODE_SYSTEM, "code": str(DEVICE_MDC.code), "display": DEVICE_MDC.refid}
    return {"coding": [coding]}


def _patient(link: DeviceLink) -> dict[str, Any] | None:
    if link.patient_id is None:
        return None
    system = link.assigning_authority or PATIENT_ID_SYSTEM_DEFAULT
    return {"identifier": {"system": system, "value": link.patient_id}}


def device_entry(pump_id: str, link: DeviceLink) -> dict[str, Any]:
    """The pump as a Device, a conditional update on its (pseudonymous) identifier."""
    identifiers = [{"system": PUMP_ID_SYSTEM, "value": pump_id}]
    if link.eui64 is not None:
        identifiers.append({"system": "urn:ietf:rfc:7043", "value": link.eui64})
    resource: dict[str, Any] = {
        "resourceType": "Device",
        "identifier": identifiers,
        "status": "active",
    }
    if pump_id == GATEWAY_PUMP_ID:  # the gateway's own technical alerts
        resource["deviceName"] = [{"name": "pumpgw gateway", "type": "user-friendly-name"}]
    else:
        resource["type"] = _device_concept()
        patient = _patient(link)
        if patient is not None:
            resource["patient"] = patient
    return {
        "fullUrl": _urn("device", pump_id),
        "resource": resource,
        "request": {"method": "PUT", "url": f"Device?{_search(PUMP_ID_SYSTEM, pump_id)}"},
    }


def metric_entries(pump_id: str) -> list[dict[str, Any]]:
    """One DeviceMetric per quantity a reading carries, conditional updates like the Device."""
    entries = []
    for name in (*READING_METRICS, *READING_STATES, "drug"):
        metric_id = f"{pump_id}:{name}"
        resource: dict[str, Any] = {
            "resourceType": "DeviceMetric",
            "identifier": [{"system": METRIC_ID_SYSTEM, "value": metric_id}],
            "type": field_concept(name),
            "source": {"reference": _urn("device", pump_id)},
            "operationalStatus": "on",
            "category": METRIC_CATEGORY.get(name, "measurement"),
        }
        entry = mdc_for(name)
        if entry is not None and entry.mdc_unit_code is not None:
            resource["unit"] = {
                "coding": [
                    {"system": MDC_CODE_SYSTEM, "code": str(entry.mdc_unit_code),
                     "display": entry.mdc_unit}
                ]
            }  # fmt: skip
        entries.append(
            {
                "fullUrl": _urn("metric", metric_id),
                "resource": resource,
                "request": {
                    "method": "PUT",
                    "url": f"DeviceMetric?{_search(METRIC_ID_SYSTEM, metric_id)}",
                },
            }
        )
    return entries


def _components(reading: Reading) -> list[dict[str, Any]]:
    components: list[dict[str, Any]] = []
    for name in READING_METRICS:
        value = getattr(reading, name)
        if value is not None:
            quantity = _quantity(name, float(value))
            components.append({"code": field_concept(name), "valueQuantity": quantity})
    for name in READING_STATES:
        state = str(getattr(reading, name))
        concept: dict[str, Any] = {
            "coding": [{"system": FIELD_SYSTEM, "code": state}],
            "text": state,
        }
        components.append({"code": field_concept(name), "valueCodeableConcept": concept})
    components.append({"code": field_concept("drug"), "valueString": reading.drug.value})
    return components


def observation_entry(reading: Reading, link: DeviceLink) -> dict[str, Any]:
    """One reading as one Observation with a component per field, created once."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": RECORD_ID_SYSTEM, "value": reading.record_id}],
        "status": "final",
        "code": _device_concept(),
        "effectiveDateTime": fhir_time(reading.device_time),
        "issued": fhir_time(reading.received_at),
        "device": {"reference": _urn("device", reading.pump_id)},
        "component": _components(reading),
    }
    patient = _patient(link)
    if patient is not None:
        resource["subject"] = patient
    return {
        "fullUrl": _urn("record", reading.record_id),
        "resource": resource,
        "request": {
            "method": "POST",
            "url": "Observation",
            "ifNoneExist": _search(RECORD_ID_SYSTEM, reading.record_id),
        },
    }


def _acm(facet: str, value: str) -> dict[str, Any]:
    return {"coding": [{"system": ACM_SYSTEMS[facet], "code": value}], "text": f"{facet}: {value}"}


def alert_concept(alert_kind: str) -> dict[str, Any]:
    """The alert kind's MDC event code, or the kind in ALERT_KIND_SYSTEM."""
    entry = alert_code_for(alert_kind)
    if entry is not None and entry.code is not None and entry.refid is not None:
        coding = {"system": MDC_CODE_SYSTEM, "code": str(entry.code), "display": entry.refid}
    else:
        coding = {"system": ALERT_KIND_SYSTEM, "code": alert_kind, "display": alert_kind}
    return {"coding": [coding], "text": alert_kind}


def alert_entry(alert: AlertTransition, link: DeviceLink) -> dict[str, Any]:
    """One alert transition as one DetectedIssue, created once (docs/interoperability.md)."""
    device = {"reference": _urn("device", alert.pump_id)}
    resource: dict[str, Any] = {
        "resourceType": "DetectedIssue",
        "identifier": [
            {"system": RECORD_ID_SYSTEM, "value": alert.transition_id},
            {"system": ALERT_ID_SYSTEM, "value": alert.alert_id},
        ],
        "status": "final" if alert.phase.value == "end" else "preliminary",
        "code": alert_concept(alert.alert_kind),
        "identifiedDateTime": fhir_time(alert.at),
        "author": device,
        "implicated": [device],
        "evidence": [
            {
                "code": [
                    _acm("phase", alert.phase.value),
                    _acm("state", alert.state.value),
                    _acm("inactivation", alert.inactivation.value),
                    _acm("priority", alert.priority.value),
                    _acm("type", alert.alert_type.value),
                ]
            }
        ],
        "detail": alert.text,
    }
    if alert.priority in SEVERITY:
        resource["severity"] = SEVERITY[alert.priority]
    patient = _patient(link)
    if patient is not None:
        resource["patient"] = patient
    if alert.acknowledged_by is not None:
        mitigation: dict[str, Any] = {
            "action": _acm("inactivation", "alert-acknowledged"),
            "author": {"display": alert.acknowledged_by},
        }
        if alert.acknowledged_at is not None:
            mitigation["date"] = fhir_time(alert.acknowledged_at)
        resource["mitigation"] = [mitigation]
    return {
        "fullUrl": _urn("record", alert.transition_id),
        "resource": resource,
        "request": {
            "method": "POST",
            "url": "DetectedIssue",
            "ifNoneExist": _search(RECORD_ID_SYSTEM, alert.transition_id),
        },
    }


def transaction_bundle(
    records: Sequence[Reading | AlertTransition],
    links: Mapping[str, DeviceLink] | None = None,
    *,
    metrics_for: Collection[str] | None = None,
) -> FhirBundle:
    """A transaction Bundle: each pump's Device once (with its DeviceMetrics if the pump is in
    `metrics_for`; None: every pump), then one entry per record."""
    links = links or {}
    pumps = dict.fromkeys(r.pump_id for r in records)
    entries: list[dict[str, Any]] = []
    for pump_id in pumps:
        entries.append(device_entry(pump_id, links.get(pump_id, NO_LINK)))
        wanted = metrics_for is None or pump_id in metrics_for
        if wanted and pump_id != GATEWAY_PUMP_ID:
            entries.extend(metric_entries(pump_id))
    record_ids = []
    for record in records:
        link = links.get(record.pump_id, NO_LINK)
        if isinstance(record, Reading):
            entries.append(observation_entry(record, link))
        else:
            entries.append(alert_entry(record, link))
        record_ids.append(record.record_id)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return FhirBundle(to_json(bundle), tuple(record_ids))


def outcome_reason(body: bytes | str | None, limit_chars: int = 500) -> str | None:
    """The diagnostics of an OperationOutcome body, or None when the body is not one."""
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("resourceType") != "OperationOutcome":
        return None
    issues = data.get("issue")
    if not isinstance(issues, list):
        issues = []
    texts = [
        str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code") or "")
        for i in issues
        if isinstance(i, dict)
    ]
    return ("; ".join(t for t in texts if t) or "OperationOutcome without diagnostics")[
        :limit_chars
    ]
