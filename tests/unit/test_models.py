"""Message models: bounds, clinical ranges from DOMAIN.md 1.4, and readable error messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from schemas.export import schema_for
from schemas.models import (
    INTENDED_USE,
    MAX_SEQ,
    MODELS_BY_KIND,
    Acknowledgement,
    AlertTransition,
    DeviceEvent,
    DeviceInfo,
    Prescription,
    Reading,
    describe_errors,
)

RECEIVED_AT = datetime(2025, 3, 1, 8, 0, 5, tzinfo=UTC)
ENVELOPE: dict[str, Any] = {
    "pump_id": "P0001",
    "boot_id": "3fa2c1d0",
    "seq": 1,
    "device_time": "2025-03-01T08:00:00Z",
    "received_at": RECEIVED_AT,
}
READING: dict[str, Any] = {
    **ENVELOPE,
    "drug": "morphine",
    "pump_state": "running",
    "reservoir_ml": 12.0,
    "reservoir_capacity_ml": 20.0,
    "low_reservoir_alarm_ml": 2.0,
    "basal_rate_ml_per_day": 0.5,
    "delivered_total_ml": 100.0,
}
PRESCRIPTION: dict[str, Any] = {"basal_rate_ml_per_day": 0.5}
INFO: dict[str, Any] = {
    **ENVELOPE,
    "model": "SynchroMed II 8637-20",
    "serial": "NGP123456H",
    "firmware": "1.1",
    "reservoir_capacity_ml": 20.0,
    "drug": "morphine",
    "concentration_mg_per_ml": 25.0,
    "prescription": PRESCRIPTION,
}
EVENT: dict[str, Any] = {**ENVELOPE, "event": "eri"}


def error_text(model: type[BaseModel], fields: dict[str, Any]) -> str:
    """Validate and return describe_errors of the failure; fail if it validates."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(fields)
    return describe_errors(info.value.errors())


def reading(**changes: Any) -> dict[str, Any]:
    return {**READING, **changes}


# Reservoir volume


@pytest.mark.parametrize("reservoir_ml", [0.0, 0, 2.0, 19.999, 20.0])
def test_reservoir_from_empty_to_capacity_is_accepted(reservoir_ml: float) -> None:
    assert Reading.model_validate(reading(reservoir_ml=reservoir_ml)).reservoir_ml == reservoir_ml


@pytest.mark.parametrize(
    ("reservoir_ml", "expected"),
    [
        (-0.001, "reservoir_ml=-0.001: Input should be greater than or equal to 0"),
        (100.5, "reservoir_ml=100.5: Input should be less than or equal to 100"),
        (20.5, "reservoir_ml 20.5 exceeds reservoir_capacity_ml 20.0"),
        (float("nan"), "reservoir_ml=nan: Input should be a finite number"),
        (float("inf"), "reservoir_ml=inf: Input should be a finite number"),
        (float("-inf"), "reservoir_ml=-inf: Input should be a finite number"),
        ("12.5", "reservoir_ml='12.5': Input should be a valid number"),
        (True, "reservoir_ml=True: Input should be a valid number"),
        (None, "reservoir_ml=None: Input should be a valid number"),
    ],
)
def test_impossible_reservoir_is_rejected_naming_field_value_and_rule(
    reservoir_ml: object, expected: str
) -> None:
    assert error_text(Reading, reading(reservoir_ml=reservoir_ml)) == expected


def test_reservoir_json_nan_and_infinity_literals_are_rejected() -> None:
    payload = Reading.model_validate(READING).model_dump_json()
    assert '"reservoir_ml":12.0' in payload
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        bad = payload.replace('"reservoir_ml":12.0', f'"reservoir_ml":{literal}')
        with pytest.raises(ValidationError, match="reservoir_ml"):
            Reading.model_validate_json(bad)


@pytest.mark.parametrize(
    ("alarm_ml", "accepted"), [(0.0, True), (2.0, True), (4.0, True), (19.9, True), (20.0, False)]
)
def test_low_reservoir_alarm_must_be_below_capacity(alarm_ml: float, accepted: bool) -> None:
    fields = reading(low_reservoir_alarm_ml=alarm_ml)
    if accepted:
        assert Reading.model_validate(fields).low_reservoir_alarm_ml == alarm_ml
    else:
        assert error_text(Reading, fields) == (
            "low_reservoir_alarm_ml 20.0 must be below reservoir_capacity_ml 20.0"
        )


@pytest.mark.parametrize("capacity_ml", [20.0, 30.0, 40.0, 100.0])
def test_listed_reservoir_sizes_are_accepted(capacity_ml: float) -> None:
    # DOMAIN.md 1.1-1.3: 20 and 40 mL IDDS reservoirs; Codman about 30 mL [D].
    assert Reading.model_validate(reading(reservoir_capacity_ml=capacity_ml))


@pytest.mark.parametrize(
    ("capacity_ml", "expected"),
    [
        (0.0, "reservoir_capacity_ml=0.0: Input should be greater than 0"),
        (100.1, "reservoir_capacity_ml=100.1: Input should be less than or equal to 100"),
    ],
)
def test_capacity_out_of_bounds_is_rejected(capacity_ml: float, expected: str) -> None:
    fields = reading(
        reservoir_capacity_ml=capacity_ml, reservoir_ml=0.0, low_reservoir_alarm_ml=0.0
    )
    assert error_text(Reading, fields) == expected


# Rates, totals, counts


@pytest.mark.parametrize(
    "rate_ml_per_day",
    [
        0.0,  # stopped pump
        0.048,  # SynchroMed II minimum flow rate [S16]
        0.5,  # a 20 mL pump refilled about monthly [S19] [D]
        0.768,  # ziconotide max 19.2 ug/day at 25 ug/mL [S16],[S20] [D]
        1.406,  # baclofen 703 ug/day at 0.5 mg/mL [S21] [D]
        100.0,  # sanity ceiling
    ],
)
def test_clinical_basal_rates_are_accepted(rate_ml_per_day: float) -> None:
    reading_ok = Reading.model_validate(reading(basal_rate_ml_per_day=rate_ml_per_day))
    prescription = Prescription.model_validate({"basal_rate_ml_per_day": rate_ml_per_day})
    assert reading_ok.basal_rate_ml_per_day == prescription.basal_rate_ml_per_day


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (-0.048, "basal_rate_ml_per_day=-0.048: Input should be greater than or equal to 0"),
        (100.01, "basal_rate_ml_per_day=100.01: Input should be less than or equal to 100"),
    ],
)
def test_impossible_basal_rate_is_rejected(rate: float, expected: str) -> None:
    assert error_text(Reading, reading(basal_rate_ml_per_day=rate)) == expected


def test_delivered_total_bounds() -> None:
    assert Reading.model_validate(reading(delivered_total_ml=1_000_000.0))
    assert error_text(Reading, reading(delivered_total_ml=-1.0)) == (
        "delivered_total_ml=-1.0: Input should be greater than or equal to 0"
    )
    assert error_text(Reading, reading(delivered_total_ml=1_000_000.5)) == (
        "delivered_total_ml=1000000.5: Input should be less than or equal to 1000000"
    )


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, None),
        (1000, None),
        (-1, "bolus_count_24h=-1: Input should be greater than or equal to 0"),
        (1001, "bolus_count_24h=1001: Input should be less than or equal to 1000"),
        (1.5, "bolus_count_24h=1.5: Input should be a valid integer"),
        (2.0, "bolus_count_24h=2.0: Input should be a valid integer"),
    ],
)
def test_bolus_count_bounds(count: object, expected: str | None) -> None:
    if expected is None:
        assert Reading.model_validate(reading(bolus_count_24h=count)).bolus_count_24h == count
    else:
        assert error_text(Reading, reading(bolus_count_24h=count)) == expected


@pytest.mark.parametrize(
    ("pct", "expected"),
    [
        (0.0, None),
        (100.0, None),
        (None, None),
        (-0.1, "battery_remaining_pct=-0.1: Input should be greater than or equal to 0"),
        (100.1, "battery_remaining_pct=100.1: Input should be less than or equal to 100"),
    ],
)
def test_battery_percent_bounds(pct: float | None, expected: str | None) -> None:
    if expected is None:
        message = Reading.model_validate(reading(battery_remaining_pct=pct))
        assert message.battery_remaining_pct == pct
    else:
        assert error_text(Reading, reading(battery_remaining_pct=pct)) == expected


# Identity and clocks


@pytest.mark.parametrize("seq", [0, MAX_SEQ])
def test_sequence_number_bounds_are_accepted(seq: int) -> None:
    assert Reading.model_validate(reading(seq=seq)).record_id == f"P0001:3fa2c1d0:{seq}"


@pytest.mark.parametrize(
    ("seq", "expected"),
    [
        (-1, "seq=-1: Input should be greater than or equal to 0"),
        (MAX_SEQ + 1, "seq=4294967296: Input should be less than or equal to 4294967295"),
    ],
)
def test_sequence_number_out_of_range_is_rejected(seq: int, expected: str) -> None:
    assert error_text(Reading, reading(seq=seq)) == expected


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("pump_id", "", "pump_id='': String should match pattern"),
        ("pump_id", "P 1", "pump_id='P 1': String should match pattern"),
        ("pump_id", "P" * 65, "pump_id='PPPPPP"),
        ("boot_id", "3fa2-c1d0", "boot_id='3fa2-c1d0': String should match pattern"),
        ("boot_id", "a" * 17, "boot_id='aaaa"),
    ],
)
def test_identity_fields_outside_their_pattern_are_rejected(
    field: str, value: str, expected: str
) -> None:
    assert error_text(Reading, reading(**{field: value})).startswith(expected)


def test_device_time_up_to_a_day_ahead_is_accepted() -> None:
    ahead = RECEIVED_AT + timedelta(days=1)
    assert Reading.model_validate(reading(device_time=ahead)).device_time == ahead


def test_device_time_far_in_the_future_is_rejected() -> None:
    text = error_text(Reading, reading(device_time="2025-03-02T08:00:06Z"))
    assert text == (
        "device_time 2025-03-02T08:00:06+00:00 is more than 1 day, 0:00:00 ahead of "
        "received_at 2025-03-01T08:00:05+00:00"
    )


def test_device_time_before_2000_is_rejected() -> None:
    text = error_text(Reading, reading(device_time="1999-12-31T23:59:59Z"))
    assert text == (
        "device_time='1999-12-31T23:59:59Z': 1999-12-31T23:59:59+00:00 is before 2000-01-01:"
        " the clock is not set"
    )
    assert Reading.model_validate(reading(device_time="2000-01-01T00:00:00Z"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-03-01T08:00:00", "device_time='2025-03-01T08:00:00': Input should have timezone"),
        (1740816000, "device_time=1740816000: must be an ISO 8601 date-time with a UTC offset"),
        ("1740816000", "device_time='1740816000': must be an ISO 8601 date-time with a UTC offset"),
        ("yesterday", "device_time='yesterday': Input should be a valid datetime"),
    ],
)
def test_device_time_must_be_an_aware_timestamp(value: object, expected: str) -> None:
    assert error_text(Reading, reading(device_time=value)).startswith(expected)


def test_device_time_with_an_offset_is_accepted() -> None:
    message = Reading.model_validate(reading(device_time="2025-03-01T09:00:00+01:00"))
    assert message.device_time == datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


# Unknown fields, versions, enums


def test_unknown_field_is_rejected_with_its_name() -> None:
    text = error_text(Reading, reading(colour="red"))
    assert text == "colour='red': Extra inputs are not permitted"


def test_unknown_field_in_nested_prescription_is_rejected_with_its_path() -> None:
    fields = INFO | {"prescription": PRESCRIPTION | {"max_dose_mg": 5}}
    assert error_text(DeviceInfo, fields) == (
        "prescription.max_dose_mg=5: Extra inputs are not permitted"
    )


def test_future_schema_version_is_rejected() -> None:
    assert error_text(Reading, reading(schema_version=2)) == "schema_version=2: Input should be 1"


def test_unknown_drug_is_rejected_listing_the_allowed_values() -> None:
    text = error_text(Reading, reading(drug="heroin"))
    assert text.startswith("drug='heroin': Input should be 'morphine', 'hydromorphone'")


def test_missing_field_is_named_without_dumping_the_whole_message() -> None:
    fields = reading()
    del fields["pump_state"]
    assert error_text(Reading, fields) == "pump_state: Field required"


def test_several_errors_are_all_reported() -> None:
    text = error_text(Reading, reading(reservoir_ml=-1.0, seq=-1))
    assert "seq=-1" in text
    assert "reservoir_ml=-1.0" in text


def test_describe_errors_bounds_a_hostile_value() -> None:
    nested: object = 1
    for _ in range(50):
        nested = [nested]
    text = error_text(Reading, reading(pump_state=nested, drug="x" * 10_000))
    assert len(text) < 400
    assert "pump_state=[[[[...]]]]" in text


def test_models_are_frozen() -> None:
    message = Reading.model_validate(reading())
    with pytest.raises(ValidationError, match="frozen"):
        message.reservoir_ml = 1.0  # type: ignore[misc]


# DeviceInfo: concentrations from DOMAIN.md 1.4


@pytest.mark.parametrize(
    ("drug", "mg_per_ml"),
    [
        ("morphine", 10.0),
        ("morphine", 25.0),
        ("ziconotide", 0.025),  # 25 ug/mL
        ("ziconotide", 0.1),  # 100 ug/mL
        ("baclofen", 0.05),
        ("baclofen", 0.5),
        ("baclofen", 1.0),
        ("baclofen", 2.0),
    ],
)
def test_listed_drug_concentrations_are_accepted(drug: str, mg_per_ml: float) -> None:
    info = DeviceInfo.model_validate(INFO | {"drug": drug, "concentration_mg_per_ml": mg_per_ml})
    assert info.concentration_mg_per_ml == mg_per_ml


@pytest.mark.parametrize(
    ("mg_per_ml", "expected"),
    [
        (0.0, "concentration_mg_per_ml=0.0: Input should be greater than 0"),
        (100.5, "concentration_mg_per_ml=100.5: Input should be less than or equal to 100"),
        (float("nan"), "concentration_mg_per_ml=nan: Input should be a finite number"),
    ],
)
def test_impossible_concentration_is_rejected(mg_per_ml: float, expected: str) -> None:
    assert error_text(DeviceInfo, INFO | {"concentration_mg_per_ml": mg_per_ml}) == expected


def test_info_alarm_volume_must_be_below_capacity() -> None:
    fields = INFO | {"prescription": PRESCRIPTION | {"low_reservoir_alarm_ml": 20.0}}
    assert error_text(DeviceInfo, fields) == (
        "prescription.low_reservoir_alarm_ml 20.0 must be below reservoir_capacity_ml 20.0"
    )


@pytest.mark.parametrize(
    ("field", "low", "high", "too_high"),
    [
        ("bolus_dose_ml", 0.0, 10.0, 10.5),
        ("bolus_lockout_min", 0, 10_080, 10_081),
        ("boluses_per_day_max", 0, 100, 101),
        ("low_reservoir_alarm_ml", 0.0, 100.0, 100.5),
    ],
)
def test_prescription_bounds(field: str, low: float, high: float, too_high: float) -> None:
    for value in (low, high):
        assert getattr(Prescription.model_validate(PRESCRIPTION | {field: value}), field) == value
    assert error_text(Prescription, PRESCRIPTION | {field: too_high}).startswith(
        f"{field}={too_high}: Input should be less than or equal to"
    )
    assert error_text(Prescription, PRESCRIPTION | {field: -1}) == (
        f"{field}=-1: Input should be greater than or equal to 0"
    )


def test_prescription_defaults_to_the_recommended_alarm_volume() -> None:
    # 2 mL: manufacturer-recommended low-reservoir alarm volume [S13].
    assert Prescription.model_validate(PRESCRIPTION).low_reservoir_alarm_ml == 2.0


# DeviceEvent


def test_refill_event_needs_both_volumes() -> None:
    assert error_text(DeviceEvent, EVENT | {"event": "refill", "filled_ml": 20.0}) == (
        "a refill event needs withdrawn_ml and filled_ml"
    )
    refill = DeviceEvent.model_validate(
        EVENT | {"event": "refill", "withdrawn_ml": 2.7, "filled_ml": 20.0}
    )
    assert (refill.withdrawn_ml, refill.filled_ml) == (2.7, 20.0)


def test_bolus_event_needs_a_positive_dose() -> None:
    assert error_text(DeviceEvent, EVENT | {"event": "bolus_delivered"}) == (
        "a bolus_delivered event needs bolus_ml"
    )
    assert error_text(DeviceEvent, EVENT | {"event": "bolus_delivered", "bolus_ml": 0.0}) == (
        "bolus_ml=0.0: Input should be greater than 0"
    )
    assert error_text(DeviceEvent, EVENT | {"event": "bolus_delivered", "bolus_ml": 10.5}) == (
        "bolus_ml=10.5: Input should be less than or equal to 10"
    )


def test_unknown_event_kind_is_rejected() -> None:
    assert error_text(DeviceEvent, EVENT | {"event": "explode"}).startswith(
        "event='explode': Input should be 'motor_stall_start'"
    )


# Alerts and acknowledgements


def alert(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "alert_id": "P0001:low_reservoir:1",
        "transition_id": "P0001:low_reservoir:1:start",
        "pump_id": "P0001",
        "alert_kind": "low_reservoir",
        "priority": "PM",
        "alert_type": "ST",
        "state": "active",
        "phase": "start",
        "latching": True,
        "value": 1.8,
        "threshold": 2.0,
        "unit": "mL",
        "text": "Reservoir estimate 1.8 mL is at or below the 2.0 mL alarm volume",
        "at": RECEIVED_AT,
    }
    return base | changes


def test_alert_carries_the_intended_use_statement() -> None:
    assert AlertTransition.model_validate(alert()).intended_use == INTENDED_USE
    assert "Not a primary alarm system" in INTENDED_USE


def test_alert_with_another_intended_use_is_rejected() -> None:
    text = error_text(AlertTransition, alert(intended_use="Primary alarm"))
    assert text.startswith("intended_use='Primary alarm': Input should be")


def test_alert_value_must_be_a_finite_number() -> None:
    assert error_text(AlertTransition, alert(value=float("nan"))) == (
        "value=nan: Input should be a finite number"
    )
    assert error_text(AlertTransition, alert(value="1.8")) == (
        "value='1.8': Input should be a valid number"
    )


def test_acknowledgement_by_is_optional_and_a_plain_user_name() -> None:
    assert Acknowledgement.model_validate({"alert_id": "a1", "by": "nurse.7"}).by == "nurse.7"
    assert Acknowledgement.model_validate({"alert_id": "a1"}).by is None
    for name in ("", "nurse 7", "nurse\n[INFO] forged", "\x1b]0;x\x07", "a" * 129):
        assert error_text(Acknowledgement, {"alert_id": "a1", "by": name}).startswith("by=")


# docs/schemas.md lists every field of every model with its bounds and their source.

DOCS_SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas.md"
BOUNDS_HEADER = "| Model | Field | Type | Required | Bounds | Source |"


def all_model_schemas() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Object schemas by model name (message models and the models nested in them), and defs."""
    models: dict[str, dict[str, Any]] = {}
    defs: dict[str, Any] = {}
    for kind, model in MODELS_BY_KIND.items():
        schema = schema_for(kind, model)
        models[model.__name__] = schema
        defs.update(schema.get("$defs", {}))
    models.update({name: d for name, d in defs.items() if "properties" in d})
    return models, defs


def type_text(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(type_text(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if prop.get("type") == "array":
        return type_text(prop["items"]) + "[]"
    if prop.get("format") == "date-time":
        return "date-time"
    return str(prop.get("type", "any"))


def bounds_text(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """Every JSON Schema constraint of one property, in words a reader can check."""
    if "anyOf" in prop:
        return "; ".join(t for t in (bounds_text(p, defs) for p in prop["anyOf"]) if t)
    if "$ref" in prop:
        target = defs[str(prop["$ref"]).rsplit("/", 1)[-1]]
        if "enum" in target:
            return "one of " + ", ".join(f"`{v}`" for v in target["enum"])
        return ""
    if prop.get("type") == "array":
        items = bounds_text(prop["items"], defs)
        count = f"items ≤ {prop['maxItems']}" if "maxItems" in prop else ""
        return ", ".join(t for t in (items, count) if t)
    words = []
    if "const" in prop:
        shown = "INTENDED_USE" if prop["const"] == INTENDED_USE else f"`{prop['const']}`"
        words.append(f"= {shown}")
    for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                      ("exclusiveMaximum", "<"), ("minLength", "length ≥"),
                      ("maxLength", "length ≤")):  # fmt: skip
        if key in prop:
            number = prop[key]
            words.append(f"{sign} {int(number) if float(number).is_integer() else number}")
    if "pattern" in prop:
        words.append(f"pattern `{prop['pattern']}`")
    return ", ".join(words)


def expected_bound_rows() -> dict[tuple[str, str], tuple[str, str, str]]:
    models, defs = all_model_schemas()
    rows = {}
    for model_name, schema in models.items():
        required = set(schema.get("required", []))
        for field, prop in schema["properties"].items():
            rows[(model_name, field)] = (
                type_text(prop),
                "yes" if field in required else "no",
                bounds_text(prop, defs) or "—",
            )
    return rows


def documented_bound_rows() -> dict[tuple[str, str], list[str]]:
    lines = DOCS_SCHEMAS.read_text(encoding="utf-8").splitlines()
    start = lines.index(BOUNDS_HEADER) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        model, field = cells[0], cells[1].strip("`")
        rows[(model, field)] = cells[2:]
    return rows


def test_docs_list_every_field_of_every_model() -> None:
    assert set(documented_bound_rows()) == set(expected_bound_rows())


def test_docs_bounds_agree_with_the_models() -> None:
    documented = documented_bound_rows()
    for key, (type_name, required, bounds) in expected_bound_rows().items():
        row = documented[key]
        assert row[:3] == [f"`{type_name}`", required, bounds], key
        assert row[3] not in ("", "?"), f"{key}: no source for the bound"
