"""Exported JSON Schemas: no drift from the models, and they validate what the models emit."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from schemas import export
from schemas.models import (
    MODELS_BY_KIND,
    Acknowledgement,
    AckRefusal,
    ActiveAlerts,
    AlertTransition,
    DeviceAlarm,
    DeviceEvent,
    DeviceInfo,
    EventKind,
    GatewayStatus,
    Prescription,
    PumpStatus,
    Quarantined,
    Reading,
    SourceStatus,
)

AT = datetime(2025, 3, 1, 8, 0, 5, tzinfo=UTC)
DEVICE = {"pump_id": "P0001", "boot_id": "3fa2c1d0", "device_time": AT, "received_at": AT}
ALERT = AlertTransition(
    alert_id="P0001:low_reservoir:1", transition_id="P0001:low_reservoir:1:start",
    pump_id="P0001", alert_kind="low_reservoir", priority="PM", alert_type="ST",
    state="active", phase="start", latching=True, value=1.8, threshold=2.0, unit="mL",
    text="Reservoir estimate 1.8 mL is at or below the 2.0 mL alarm volume", at=AT,
    device_time=AT, cause_record_id="P0001:3fa2c1d0:7",
)  # fmt: skip
SAMPLES: dict[str, list[BaseModel]] = {
    "reading": [
        Reading(**DEVICE, seq=7, drug="morphine", pump_state="running", reservoir_ml=1.8,
                reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=2.0,
                basal_rate_ml_per_day=0.5, delivered_total_ml=18.2, battery_remaining_pct=50.0,
                alarms=(DeviceAlarm(code="low_reservoir", priority="PM"),)),
        Reading(**DEVICE, seq=0, drug="ziconotide", pump_state="stalled", reservoir_ml=0.0,
                reservoir_capacity_ml=40.0, low_reservoir_alarm_ml=4.0,
                basal_rate_ml_per_day=0.048, delivered_total_ml=0.0),
    ],
    "info": [
        DeviceInfo(**DEVICE, seq=1, model="Prometra II", serial="13827-001", firmware="2.01.1",
                   reservoir_capacity_ml=20.0, drug="baclofen", concentration_mg_per_ml=2.0,
                   prescription=Prescription(basal_rate_ml_per_day=0.3, bolus_lockout_min=60,
                                             boluses_per_day_max=4, low_reservoir_alarm_ml=3.0)),
    ],
    "event": [
        DeviceEvent(**DEVICE, seq=2, event=EventKind.REFILL, withdrawn_ml=2.7, filled_ml=20.0),
        DeviceEvent(**DEVICE, seq=3, event=EventKind.BOLUS_DELIVERED, bolus_ml=0.05),
        DeviceEvent(**DEVICE, seq=4, event=EventKind.MOTOR_STALL_START),
    ],
    "alert": [ALERT],
    "gateway_status": [
        GatewayStatus(site="s1", station="st1", session_id="abc", seq=0, state="online", at=AT,
                      version="0.1.0", sources=(SourceStatus(url="socket://127.0.0.1:7000",
                                                             connected=True),)),
    ],
    "pump_status": [
        PumpStatus(pump_id="P0001", telemetry="ok", at=AT, last_record_id="P0001:3fa2c1d0:7",
                   last_device_time=AT, reservoir_ml=1.8, pump_state="running",
                   battery_state="ok"),
        PumpStatus(pump_id="P0001", telemetry="lost", at=AT, session_id="3fa2c1d09b1e", seq=1),
    ],
    "active_alerts": [
        ActiveAlerts(pump_id="P0001", at=AT, alerts=(ALERT,)),
        ActiveAlerts(pump_id="P0001", at=AT, alerts=(), session_id="3fa2c1d09b1e", seq=7),
    ],
    "quarantine": [
        Quarantined(quarantine_id="q1", source="socket://127.0.0.1:7000", reason_kind="checksum",
                    reason="CRC-32 mismatch", raw_hex="2450", received_at=AT, pump_id=None),
    ],
    "acknowledgement": [
        Acknowledgement(alert_id="P0001:low_reservoir:1", by="nurse.7", at=AT),
        Acknowledgement(alert_id="P0001:low_reservoir:1"),
    ],
    "ack_refusal": [
        AckRefusal(username="nurse.7", alert_id="P0001:x:1", reason_kind="unknown_alert",
                   reason="no active alert 'P0001:x:1' (unknown or ended)", at=AT),
        AckRefusal(username=None, reason_kind="legacy_topic", reason="publish on ...", at=AT),
    ],
}  # fmt: skip


def checked_in_schema(kind: str) -> dict[str, Any]:
    path = export.SCHEMA_DIR / f"{kind}{export.SCHEMA_SUFFIX}"
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def validator_for(kind: str) -> jsonschema.Draft202012Validator:
    schema = checked_in_schema(kind)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def payload_of(message: BaseModel) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(message.model_dump_json())
    return payload


def test_checked_in_schemas_match_the_models() -> None:
    stale = export.drift()
    assert stale == [], f"schemas drifted: {stale}; run `python -m schemas.export`"


def test_every_message_kind_has_a_schema_and_samples() -> None:
    files = {p.name for p in export.SCHEMA_DIR.glob(f"*{export.SCHEMA_SUFFIX}")}
    assert files == {f"{kind}{export.SCHEMA_SUFFIX}" for kind in MODELS_BY_KIND}
    assert set(SAMPLES) == set(MODELS_BY_KIND)


@pytest.mark.parametrize("kind", sorted(MODELS_BY_KIND))
def test_schema_has_id_title_and_dialect(kind: str) -> None:
    schema = checked_in_schema(kind)
    assert schema["$id"] == f"urn:pumpgw:schema:{kind}:v1"
    assert kind in schema["title"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("kind", sorted(MODELS_BY_KIND))
def test_model_payloads_validate_against_the_checked_in_schema(kind: str) -> None:
    validator = validator_for(kind)
    for message in SAMPLES[kind]:
        assert isinstance(message, MODELS_BY_KIND[kind])
        errors = [e.message for e in validator.iter_errors(payload_of(message))]
        assert errors == []


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("reading", "reservoir_ml", -0.5),
        ("reading", "reservoir_ml", 100.5),
        ("reading", "basal_rate_ml_per_day", "0.5"),
        ("reading", "bolus_count_24h", 1.5),
        ("reading", "seq", 2**32),
        ("reading", "pump_id", "P 1"),
        ("reading", "drug", "heroin"),
        ("reading", "schema_version", 2),
        ("reading", "colour", "red"),
        ("info", "concentration_mg_per_ml", 0),
        ("event", "event", "explode"),
        ("alert", "intended_use", "Primary alarm"),
        ("alert", "priority", "PX"),
        ("pump_status", "telemetry", "maybe"),
    ],
)
def test_schema_rejects_what_the_model_rejects(kind: str, field: str, value: object) -> None:
    payload = payload_of(SAMPLES[kind][0]) | {field: value}
    assert not validator_for(kind).is_valid(payload)
    with pytest.raises(ValueError, match=field):
        MODELS_BY_KIND[kind].model_validate_json(json.dumps(payload))


def test_schema_requires_fields_without_defaults() -> None:
    payload = payload_of(SAMPLES["reading"][0])
    del payload["reservoir_ml"]
    assert not validator_for("reading").is_valid(payload)


def test_export_is_deterministic(tmp_path: Path) -> None:
    export.write(tmp_path)
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    export.write(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert all(text.endswith(b"}\n") for text in first.values())
    for name, text in first.items():
        assert text == (export.SCHEMA_DIR / name).read_bytes()


def test_check_lists_changed_missing_and_stale_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export.write(tmp_path)
    assert export.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "reading.schema.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "info.schema.json").unlink()
    (tmp_path / "old.schema.json").write_text("{}\n", encoding="utf-8")
    capsys.readouterr()
    assert export.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    for name in ("reading.schema.json", "info.schema.json", "old.schema.json"):
        assert name in err
    assert "acknowledgement.schema.json" not in err


def test_write_repairs_drift_and_removes_stale_files(tmp_path: Path) -> None:
    export.write(tmp_path)
    (tmp_path / "reading.schema.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "old.schema.json").write_text("{}\n", encoding="utf-8")
    assert export.write(tmp_path) == ["old.schema.json", "reading.schema.json"]
    assert export.drift(tmp_path) == []
    assert not (tmp_path / "old.schema.json").exists()
