"""MDC/UCUM table: covers every numeric and coded field, codes are consistent, docs agree."""

from __future__ import annotations

import types
import typing
from enum import Enum
from pathlib import Path

import pytest

from schemas.mdc import (
    DEVICE_MDC,
    MDC_TABLE,
    MdcEntry,
    alert_code_for,
    code_from_partition,
    mdc_for,
)
from schemas.models import DeviceEvent, DeviceInfo, Frozen, Prescription, Reading

DOCS_SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas.md"
MDC_HEADER = (
    "| Subject | Name | REFID | Code | Partition::term | MDC unit | UCUM | Conf. | Source | Note |"
)
ALERT_KINDS = (
    "low_reservoir", "refill_due", "empty_reservoir", "motor_stall", "over_infusion",
    "under_infusion", "pump_stopped", "refill_discrepancy", "battery_eri", "battery_eos",
    "telemetry_lost", "device_alarm", "outbox_near_full", "outbox_full",
)  # fmt: skip
# Every partition::term form that DOMAIN.md 4.4 gives, transcribed by hand.
DOMAIN_PARTITION_FORMS = {
    157784: (2, 26712),  # MDC_FLOW_FLUID_PUMP
    263762: (4, 1618),  # MDC_DIM_MILLI_L
    196634: (3, 26),  # MDC_EVT_EMPTY
    196646: (3, 38),  # MDC_EVT_FAIL
    196660: (3, 52),  # MDC_EVT_INOP
    196688: (3, 80),  # MDC_EVT_OCCL
    196670: (3, 62),  # MDC_EVT_LO
    196860: (3, 252),  # MDC_EVT_FLUID_LINE_PROB
    196940: (3, 332),  # MDC_EVT_FLUID_LINE_OCCL
    196800: (3, 192),  # MDC_EVT_BATT_FAIL
    196802: (3, 194),  # MDC_EVT_BATT_LO
    196804: (3, 196),  # MDC_EVT_BATT_MALF
    203286: (3, 6678),  # MDC_EVT_ADVIS_BATT_REPLACE
    203266: (3, 6658),  # MDC_EVT_ADVIS_CHK
    202822: (3, 6214),  # MDC_EVT_STAT_AL_SILENCE
}
# Every REFID and code DOMAIN.md 4.2-4.4 names, so the table can hold nothing invented.
DOMAIN_CODES = {
    "MDC_DEV_PUMP_INFUS_MDS": 69985, "MDC_FLOW_FLUID_PUMP": 157784, "MDC_CONC_DRUG": 157760,
    "MDC_VOL_FLUID_TBI_REMAIN": 157872, "MDC_VOL_FLUID_DELIV_TOTAL": 157993,
    "MDC_DRUG_NAME_LABEL": 184514, "MDC_PUMP_INFUSING_STATUS": 184519,
    "MDC_TIME_PCA_LOCKOUT": 157989, "MDC_VOL_FLUID_CONTAINER_START": 157994,
    "MDC_EVT_EMPTY": 196634, "MDC_EVT_FAIL": 196646, "MDC_EVT_LO": 196670,
    "MDC_EVT_FLUID_LINE_OCCL": 196940, "MDC_EVT_BATT_FAIL": 196800,
    "MDC_EVT_ADVIS_BATT_REPLACE": 203286, "MDC_EVT_ALARM": 196616,
    "MDC_DIM_MILLI_L": 263762, "MDC_DIM_MILLI_G_PER_ML": 264306, "MDC_DIM_MIN": 264352,
}  # fmt: skip
DOMAIN_UNNAMED_CODES = {157988}  # PCA max doses per hour: DOMAIN.md gives no REFID
UCUM_UNITS = {"mL", "mL/d", "mL/h", "mg/d", "ug/d", "mg/mL", "ug/mL", "/d", "min", "%"}


def is_numeric_or_coded(annotation: object) -> bool:
    """True for int, float and enum fields, also inside Optional and Annotated."""
    if isinstance(annotation, type):
        return annotation is not bool and issubclass(annotation, int | float | Enum)
    if typing.get_origin(annotation) is typing.Annotated:
        return is_numeric_or_coded(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, int) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(is_numeric_or_coded(a) for a in typing.get_args(annotation))
    return False


def numeric_and_coded_fields(model: type[Frozen]) -> set[str]:
    return {
        name for name, info in model.model_fields.items() if is_numeric_or_coded(info.annotation)
    }


@pytest.mark.parametrize("model", [Reading, DeviceInfo, DeviceEvent, Prescription])
def test_every_numeric_and_coded_field_is_in_the_table(model: type[Frozen]) -> None:
    fields = numeric_and_coded_fields(model)
    assert fields, "the field scan found nothing: it is broken"
    missing = sorted(f for f in fields if mdc_for(f) is None)
    assert missing == []


def test_field_scan_sees_optional_and_annotated_numbers() -> None:
    assert {"battery_remaining_pct", "bolus_count_24h", "seq", "schema_version", "drug"} <= (
        numeric_and_coded_fields(Reading)
    )
    assert {"bolus_ml", "withdrawn_ml", "filled_ml", "event"} <= numeric_and_coded_fields(
        DeviceEvent
    )


def test_every_table_field_exists_in_a_model() -> None:
    names = set().union(*(m.model_fields for m in (Reading, DeviceInfo, DeviceEvent, Prescription)))
    assert {e.name for e in MDC_TABLE if e.subject == "field"} <= names


@pytest.mark.parametrize("kind", ALERT_KINDS)
def test_every_alert_kind_has_a_row(kind: str) -> None:
    entry = alert_code_for(kind)
    assert entry is not None
    assert entry.subject == "alert"


def test_table_has_no_duplicate_rows() -> None:
    keys = [(e.subject, e.name) for e in MDC_TABLE]
    assert len(keys) == len(set(keys))
    assert {e.name for e in MDC_TABLE if e.subject == "alert"} == set(ALERT_KINDS)


@pytest.mark.parametrize("entry", MDC_TABLE, ids=lambda e: f"{e.subject}:{e.name}")
def test_codes_agree_with_their_partition_and_term(entry: MdcEntry) -> None:
    if entry.partition_term is not None:
        assert entry.code == code_from_partition(*entry.partition_term)
    if entry.code in DOMAIN_PARTITION_FORMS:
        assert entry.partition_term == DOMAIN_PARTITION_FORMS[entry.code]
    if entry.mdc_unit_code in DOMAIN_PARTITION_FORMS:
        assert entry.mdc_unit_code == code_from_partition(
            *DOMAIN_PARTITION_FORMS[entry.mdc_unit_code]
        )


def test_domain_partition_forms_are_self_consistent() -> None:
    for code, (partition, term) in DOMAIN_PARTITION_FORMS.items():
        assert code == partition * 65536 + term


@pytest.mark.parametrize("entry", MDC_TABLE, ids=lambda e: f"{e.subject}:{e.name}")
def test_codes_and_units_come_from_domain_md(entry: MdcEntry) -> None:
    if entry.refid is not None:
        assert DOMAIN_CODES[entry.refid] == entry.code
    elif entry.code is not None:
        assert entry.code in DOMAIN_UNNAMED_CODES
    if entry.mdc_unit is not None:
        assert DOMAIN_CODES[entry.mdc_unit] == entry.mdc_unit_code
    assert entry.ucum is None or entry.ucum in UCUM_UNITS
    assert entry.note


@pytest.mark.parametrize("entry", MDC_TABLE, ids=lambda e: f"{e.subject}:{e.name}")
def test_confidence_matches_what_is_known(entry: MdcEntry) -> None:
    if entry.code is None:
        assert entry.confidence in ("U", "-")
    else:
        assert entry.confidence in ("C", "D")
    if entry.partition_term is not None and entry.code in {196634, 196646, 196800, 203286}:
        assert entry.confidence == "D", "codes computed from their term are derived"


def test_examples_from_the_brief() -> None:
    reservoir = mdc_for("reservoir_ml")
    assert reservoir is not None
    assert (reservoir.refid, reservoir.code, reservoir.ucum) == (
        "MDC_VOL_FLUID_TBI_REMAIN",
        157872,
        "mL",
    )
    assert (reservoir.mdc_unit, reservoir.mdc_unit_code) == ("MDC_DIM_MILLI_L", 263762)
    basal = mdc_for("basal_rate_ml_per_day")
    assert basal is not None
    assert (basal.code, basal.ucum, basal.mdc_unit) == (157784, "mL/d", None)
    concentration = mdc_for("concentration_mg_per_ml")
    assert concentration is not None
    assert (concentration.code, concentration.mdc_unit_code, concentration.ucum) == (
        157760,
        264306,
        "mg/mL",
    )
    low = alert_code_for("low_reservoir")
    assert low is not None
    assert (low.refid, low.code, low.confidence) == ("MDC_EVT_LO", 196670, "D")
    assert DEVICE_MDC.code == 69985
    assert mdc_for("no_such_field") is None
    assert alert_code_for("no_such_alert") is None


# docs/schemas.md renders the same table.


def cell(value: object) -> str:
    return "—" if value is None else str(value)


def render_row(entry: MdcEntry) -> list[str]:
    partition = None if entry.partition_term is None else "{}::{}".format(*entry.partition_term)
    unit = None if entry.mdc_unit is None else f"{entry.mdc_unit} {entry.mdc_unit_code}"
    return [
        entry.subject, f"`{entry.name}`", cell(entry.refid), cell(entry.code), cell(partition),
        cell(unit), cell(entry.ucum and f"`{entry.ucum}`"), entry.confidence, entry.source,
        entry.note,
    ]  # fmt: skip


def documented_mdc_rows() -> list[list[str]]:
    lines = DOCS_SCHEMAS.read_text(encoding="utf-8").splitlines()
    start = lines.index(MDC_HEADER) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def test_docs_render_the_same_mdc_table() -> None:
    assert documented_mdc_rows() == [render_row(e) for e in MDC_TABLE]
