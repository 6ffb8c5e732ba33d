"""HL7 v2 (PCD-01, PCD-04) and FHIR R4 builders: validated by hl7apy and fhir.resources, and
compared with the golden messages in tests/data/ (a drift shows as a diff).

After an intended change to a message, rewrite the goldens and review the diff:
    .venv/bin/python -m tests.unit.test_interop_messages --write
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from gateway.adapters.delivery import Verdict
from gateway.adapters.fhir_rest import answer_for_status
from gateway.adapters.mllp import answer_for
from gateway.fhir_bundles import outcome_reason, transaction_bundle
from gateway.hl7_messages import (
    LOCAL_SYSTEM,
    DeviceLink,
    Envelope,
    control_id_for,
    escape,
    parse_ack,
    pcd01_message,
    pcd04_message,
)
from schemas.mdc import MDC_TABLE
from schemas.models import AlertTransition, Reading

DATA = Path(__file__).resolve().parents[1] / "data"
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
ENVELOPE = Envelope("PUMPGW", "north.bed-12", "ENGINE", "HOSPITAL", "P")
LINK = DeviceLink("MRN-0042", "HOSP", "0123456789ABCDEF")
ACM_CODES = {"196616", "68480", "68481", "68482", "68483", "68484", "68485", "69986"}
"""DOMAIN.md 4.2 and 4.4 [C]: the codes used beside schemas/mdc.py's table."""


def reading(seq: int, **changes: Any) -> Reading:
    fields: dict[str, Any] = {
        "pump_id": "P0001",
        "boot_id": "b1a2",
        "seq": seq,
        "device_time": T0.replace(minute=seq),
        "received_at": T0.replace(minute=seq, second=1),
        "drug": "baclofen",
        "pump_state": "running",
        "reservoir_ml": 12.5 - seq * 0.01,
        "reservoir_capacity_ml": 20.0,
        "low_reservoir_alarm_ml": 4.0,
        "basal_rate_ml_per_day": 0.5,
        "delivered_total_ml": 100.0 + seq * 0.01,
        "battery_remaining_pct": 80.0,
    }
    return Reading(**{**fields, **changes})


def alert(phase: str, **changes: Any) -> AlertTransition:
    fields: dict[str, Any] = {
        "alert_id": "P0001:low_reservoir:1",
        "transition_id": f"P0001:low_reservoir:1:{phase}:1",
        "pump_id": "P0001",
        "alert_kind": "low_reservoir",
        "priority": "PM",
        "alert_type": "ST",
        "state": "active",
        "phase": phase,
        "latching": True,
        "value": 3.9,
        "threshold": 4.0,
        "unit": "mL",
        "text": "Reservoir 3.9 mL | below 4.0 mL: refill soon",
        "at": T0,
    }
    return AlertTransition(**{**fields, **changes})


ACKED = alert(
    "acknowledged",
    inactivation="alert-acknowledged",
    acknowledged_by="nurse.jones",
    acknowledged_at=T0.replace(minute=30),
    at=T0.replace(minute=31),
)


def hl7_goldens() -> dict[str, str]:
    return {
        "pcd01_single.hl7": pcd01_message([reading(1)], ENVELOPE).text,
        "pcd01_batch_linked.hl7": pcd01_message([reading(1), reading(2)], ENVELOPE, LINK).text,
        "pcd04_start.hl7": pcd04_message(alert("start"), ENVELOPE).text,
        "pcd04_acknowledged.hl7": pcd04_message(ACKED, ENVELOPE, LINK).text,
        "pcd04_end.hl7": pcd04_message(
            alert("end", state="inactive", value=None, threshold=None, unit=None), ENVELOPE
        ).text,
    }


def fhir_golden() -> str:
    bundle = transaction_bundle([reading(1), alert("start"), ACKED], {"P0001": LINK})
    return json.dumps(json.loads(bundle.body), indent=1, sort_keys=True) + "\n"


def hl7_validate(text: str) -> None:
    """Strict hl7apy v2.6 validation (PCD-04's ORU_R40 has the ORU_R01 grammar)."""
    text = text.replace("|ORU^R40^ORU_R40|", "|ORU^R40^ORU_R01|", 1)
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.version == "2.6"
    assert message.validate()


def golden_path(name: str) -> Path:
    return DATA / "interop" / name


@pytest.mark.parametrize("name", sorted(hl7_goldens()))
def test_hl7_message_validates_with_hl7apy_and_matches_its_golden(name: str) -> None:
    text = hl7_goldens()[name]
    hl7_validate(text)
    golden = golden_path(name).read_bytes().decode()
    assert text == golden.replace("\n", "\r"), f"{name} drifted from tests/data/interop/{name}"


def test_fhir_bundle_validates_with_fhir_resources_r4b_and_matches_its_golden() -> None:
    body = transaction_bundle([reading(1), alert("start"), ACKED], {"P0001": LINK}).body
    bundle = Bundle.model_validate_json(body)
    assert bundle.type == "transaction"
    kinds = []
    for entry in json.loads(body)["entry"]:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        kinds.append(resource["resourceType"])
    assert kinds.count("Device") == 1
    assert kinds.count("Observation") == 1
    assert kinds.count("DetectedIssue") == 2
    assert kinds.count("DeviceMetric") == 10
    assert fhir_golden() == golden_path("fhir_bundle.json").read_text()


def test_pcd01_carries_each_reading_once_with_its_record_id_and_device_time() -> None:
    message = pcd01_message([reading(1), reading(2)], ENVELOPE)
    segments = message.text.split("\r")
    obrs = [s for s in segments if s.startswith("OBR|")]
    assert [o.split("|")[3] for o in obrs] == ["P0001:b1a2:1^PUMPGW", "P0001:b1a2:2^PUMPGW"]
    assert obrs[1].split("|")[7] == "20260105080200.0000+0000"
    assert message.record_ids == ("P0001:b1a2:1", "P0001:b1a2:2")
    assert not any(s.startswith("PID") for s in segments), "no patient link, no PID"


def test_control_id_is_stable_per_record_set_and_differs_for_another() -> None:
    first = pcd01_message([reading(1), reading(2)], ENVELOPE).control_id
    assert pcd01_message([reading(1), reading(2)], ENVELOPE).control_id == first
    assert pcd01_message([reading(1)], ENVELOPE).control_id != first
    assert control_id_for(["a", "b"]) != control_id_for(["b", "a"])
    assert len(first) == 20


def test_every_mdc_code_sent_is_in_the_mdc_table_or_domain_acm_rows() -> None:
    known = {str(e.code) for e in MDC_TABLE if e.code is not None}
    known |= {str(e.mdc_unit_code) for e in MDC_TABLE if e.mdc_unit_code is not None}
    for text in hl7_goldens().values():
        for segment in text.split("\r"):
            for field in segment.split("|"):
                for rep in field.split("~"):
                    parts = rep.split("^")
                    for i in range(2, len(parts), 3):
                        if parts[i] == "MDC":
                            assert parts[i - 2] in known | ACM_CODES, rep


def test_fields_without_a_confirmed_code_use_the_local_system_never_a_guess() -> None:
    text = pcd01_message([reading(1)], ENVELOPE).text
    unconfirmed = [e.name for e in MDC_TABLE if e.subject == "field" and e.confidence == "U"]
    for name in ("reservoir_capacity_ml", "low_reservoir_alarm_ml", "battery_state"):
        assert name in unconfirmed
        assert f"|{name}^{name}^{LOCAL_SYSTEM}|" in text
    refill_due = pcd04_message(alert("start", alert_kind="refill_due"), ENVELOPE).text
    assert f"|refill_due^refill_due^{LOCAL_SYSTEM}|" in refill_due


def test_pcd04_acknowledged_carries_who_and_when_and_the_acm_facets() -> None:
    segments = pcd04_message(ACKED, ENVELOPE).text.split("\r")
    obx = {s.split("|")[3].split("^")[1]: s.split("|") for s in segments if s.startswith("OBX")}
    inactivation = obx["MDC_ATTR_ALARM_INACTIVATION_STATE"]
    assert inactivation[5] == "alert-acknowledged"
    assert inactivation[14] == "20260105083000.0000+0000"
    assert inactivation[16] == "nurse.jones"
    assert obx["MDC_ATTR_EVENT_PHASE"][5] == "acknowledged"
    assert obx["MDC_ATTR_ALARM_PRIORITY"][5] == "PM"
    assert obx["MDC_EVT_ALARM"][5] == "196670^MDC_EVT_LO^MDC"


def test_free_text_cannot_break_the_message_structure() -> None:
    assert escape("a|b^c~d\\e&f\rg") == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f g"
    nasty = alert("start", text="x|y\rMSH|^~\\&|EVIL")
    hl7_validate(pcd04_message(nasty, ENVELOPE).text)


@pytest.mark.parametrize(
    ("code", "verdict"),
    [("AA", Verdict.ACCEPTED), ("CA", Verdict.ACCEPTED), ("AE", Verdict.RETRY),
     ("CE", Verdict.RETRY), ("AR", Verdict.REJECTED), ("CR", Verdict.REJECTED)],
)  # fmt: skip
def test_original_mode_acknowledgement_codes_map_to_verdicts(code: str, verdict: Verdict) -> None:
    ack = f"MSH|^~\\&|R||PUMPGW||20260105||ACK^R01^ACK|9|P|2.6\rMSA|{code}|CID42|why\r"
    answer = answer_for(ack, "CID42")
    assert answer.verdict is verdict
    if verdict is not Verdict.ACCEPTED:
        assert answer.reason == f"{code}: why"


def test_an_ack_for_another_message_or_without_msa_is_retried() -> None:
    assert answer_for("MSH|^~\\&\rMSA|AA|OTHER\r", "CID42").verdict is Verdict.RETRY
    assert answer_for("MSH|^~\\&\r", "CID42").verdict is Verdict.RETRY
    ack = parse_ack("MSH|^~\\&\rMSA|AR|CID42\rERR||||E||||bad PID\r")
    assert (ack.code, ack.control_id, ack.reason) == ("AR", "CID42", "bad PID")


def test_fhir_answers_map_to_verdicts() -> None:
    outcome = json.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                          "diagnostics": "bad code"}]}
    ).encode()  # fmt: skip
    assert answer_for_status(201, b"", None, 0.0).verdict is Verdict.ACCEPTED
    rejected = answer_for_status(422, outcome, None, 0.0)
    assert rejected.verdict is Verdict.REJECTED
    assert rejected.reason == "HTTP 422: bad code"
    assert answer_for_status(503, b"", "7", 0.0).wait_s == 7.0
    assert answer_for_status(429, outcome, None, 0.0).verdict is Verdict.RETRY
    assert answer_for_status(401, outcome, None, 0.0).verdict is Verdict.RETRY
    assert answer_for_status(404, b"<html>", None, 0.0).verdict is Verdict.RETRY
    assert outcome_reason(b"not json") is None


def test_replayed_records_get_the_same_bundle_and_conditional_requests() -> None:
    first = transaction_bundle([reading(1), alert("start")])
    assert transaction_bundle([reading(1), alert("start")]).body == first.body
    entries = json.loads(first.body)["entry"]
    requests = {e["resource"]["resourceType"]: e["request"] for e in entries}
    assert requests["Device"]["method"] == "PUT"
    assert requests["Device"]["url"] == "Device?identifier=urn:pumpgw:pump-id|P0001"
    assert requests["Observation"]["ifNoneExist"] == (
        "identifier=urn:pumpgw:record-id|P0001:b1a2:1"
    )
    assert requests["DetectedIssue"]["ifNoneExist"].endswith("P0001:low_reservoir:1:start:1")


def test_pure_builders_load_no_network_or_validation_library() -> None:
    code = (
        "import sys, gateway.hl7_messages, gateway.fhir_bundles\n"
        "bad = [m for m in ('paho', 'urllib3', 'hl7apy', 'hl7', 'fhir', 'sqlite3') "
        "if m in sys.modules]\nprint(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def write_goldens() -> None:
    folder = DATA / "interop"
    folder.mkdir(exist_ok=True)
    for name, text in hl7_goldens().items():
        (folder / name).write_text(text.replace("\r", "\n"))
    (folder / "fhir_bundle.json").write_text(fhir_golden())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_goldens()
