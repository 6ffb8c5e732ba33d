"""Nothing a publisher sends may stop a consumer: the ingest worker's record path and the
`tail` renderer turn every payload, however hostile, into a record or a readable line."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ingest import Rejected, record_for
from gateway.tail import render_message
from schemas.models import Reading

TOPICS = {
    "reading": "pumpgw/north/bed-12/pumps/P0001/telemetry",
    "event": "pumpgw/north/bed-12/pumps/P0001/events",
    "alert": "pumpgw/north/bed-12/pumps/P0001/alerts",
}
T0 = datetime(2026, 1, 5, tzinfo=UTC)


def reading_fields() -> dict[str, Any]:
    return Reading(
        pump_id="P0001", boot_id="b1", seq=7, device_time=T0,
        received_at=T0 + timedelta(seconds=1), drug="baclofen", pump_state="running",
        reservoir_ml=15.0, reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=4.0,
        basal_rate_ml_per_day=0.5, delivered_total_ml=10.0,
    ).model_dump(mode="json")  # fmt: skip


EXTREME_VALUES = [
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:01Z",
    "2100-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59",
    1e308, -1e308, 2**64, -(2**64), "", "x" * 10_000, None, [], {}, True, "NaN", "\u0000",
]  # fmt: skip


@pytest.mark.parametrize("value", EXTREME_VALUES)
@pytest.mark.parametrize("field", sorted(reading_fields()))
def test_an_extreme_value_in_any_reading_field_is_a_record_or_a_reason(
    field: str, value: object
) -> None:
    data = reading_fields()
    data[field] = value
    payload = json.dumps(data).encode()
    result = record_for(TOPICS["reading"], payload, "pumpgw")
    assert isinstance(result, Rejected) or result.record_id
    render_message(TOPICS["reading"], payload, historical=False, base="pumpgw")


def test_a_receive_time_in_the_year_9999_is_rejected_with_its_reason() -> None:
    data = reading_fields()
    data["received_at"] = "9999-12-31T23:59:59Z"
    result = record_for(TOPICS["reading"], json.dumps(data).encode(), "pumpgw")
    assert isinstance(result, Rejected)
    assert result.reason_kind == "invalid"
    assert "is not before 2100-01-01" in result.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(TOPICS)), value=json_values)
def test_arbitrary_json_never_raises_in_the_worker_or_tail(kind: str, value: object) -> None:
    payload = json.dumps(value).encode()
    result = record_for(TOPICS[kind], payload, "pumpgw")
    assert isinstance(result, Rejected)
    render_message(TOPICS[kind], payload, historical=False, base="pumpgw")


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(sorted(reading_fields())),
    value=json_values,
)
def test_arbitrary_value_of_any_field_never_raises(field: str, value: object) -> None:
    data = reading_fields()
    data[field] = value
    payload = json.dumps(data).encode()
    result = record_for(TOPICS["reading"], payload, "pumpgw")
    assert isinstance(result, Rejected) or result.record_id
    render_message(TOPICS["reading"], payload, historical=False, base="pumpgw")
