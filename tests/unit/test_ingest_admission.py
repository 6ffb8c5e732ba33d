"""What the ingest worker admits: origin-scoped identity, the clock window, names and counts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission import OriginGuard, OriginLimits, TimeWindow
from gateway.ingest import MAX_PAYLOAD_BYTES, IngestSection, Rejected, record_for
from gateway.records import OutRecord
from schemas.models import (
    MAX_ALARMS_PER_READING,
    AlarmState,
    AlertTransition,
    AlertType,
    Phase,
    Priority,
    Reading,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
WINDOW = TimeWindow.around(NOW, timedelta(days=30), timedelta(seconds=300))


def topic(site: str = "north", station: str = "bed-12", pump: str = "P0001") -> str:
    return f"pumpgw/{site}/{station}/pumps/{pump}/telemetry"


def reading(at: datetime = NOW, pump: str = "P0001", **changes: Any) -> bytes:
    data = Reading(
        pump_id=pump, boot_id="b1", seq=7, device_time=at, received_at=at,
        drug="baclofen", pump_state="running", reservoir_ml=15.0, reservoir_capacity_ml=20.0,
        low_reservoir_alarm_ml=4.0, basal_rate_ml_per_day=0.5, delivered_total_ml=10.0,
    ).model_dump(mode="json")  # fmt: skip
    data.update(changes)
    return json.dumps(data).encode()


def alert_payload(at: datetime) -> bytes:
    return AlertTransition(
        alert_id="P0001:low_reservoir:1", transition_id="P0001:low_reservoir:1:start",
        pump_id="P0001", alert_kind="low_reservoir", priority=Priority.MEDIUM,
        alert_type=AlertType.TECHNICAL, state=AlarmState.ACTIVE, phase=Phase.START,
        latching=False, text="low", at=at,
    ).model_dump_json().encode()  # fmt: skip


def rejected(result: OutRecord | Rejected) -> Rejected:
    assert isinstance(result, Rejected), result
    return result


def accepted(result: OutRecord | Rejected) -> OutRecord:
    assert isinstance(result, OutRecord), result
    return result


# --- identity scoped by origin ------------------------------------------------------------


def test_two_stations_with_the_same_pump_boot_and_seq_get_different_identities() -> None:
    guard = OriginGuard(OriginLimits())
    a = accepted(record_for(topic(station="bed-7"), reading(), "pumpgw", origin=guard))
    b = accepted(record_for(topic(station="bed-12"), reading(), "pumpgw", origin=guard))
    assert a.record_id == "north/bed-7/P0001:b1:7"
    assert b.record_id == "north/bed-12/P0001:b1:7"
    assert b"station=bed-7" in (a.line or b"")
    assert b"station=bed-12" in (b.line or b"")


# --- every time within a window around the worker's clock ---------------------------------


@pytest.mark.parametrize(
    "at",
    [NOW - timedelta(days=31), NOW + timedelta(seconds=301), datetime(2000, 1, 1, tzinfo=UTC)],
)
def test_a_reading_outside_the_window_is_refused_with_the_limit(at: datetime) -> None:
    why = rejected(record_for(topic(), reading(at), "pumpgw", window=WINDOW))
    assert why.reason_kind == "time_window"
    assert "ingest.max_" in why.reason


def test_a_reading_inside_the_window_and_a_pump_clock_a_little_ahead_are_stored() -> None:
    accepted(record_for(topic(), reading(NOW - timedelta(days=29)), "pumpgw", window=WINDOW))
    ahead = reading(NOW, device_time=(NOW + timedelta(hours=2)).isoformat())
    accepted(record_for(topic(), ahead, "pumpgw", window=WINDOW))


def test_alert_times_are_bounded_too() -> None:
    alerts = topic().replace("telemetry", "alerts")
    why = rejected(record_for(alerts, alert_payload(datetime(2001, 1, 1, tzinfo=UTC)), "pumpgw",
                              window=WINDOW))  # fmt: skip
    assert why.reason_kind == "time_window"
    assert why.reason.startswith("at 2001-01-01")
    accepted(record_for(alerts, alert_payload(NOW), "pumpgw", window=WINDOW))


def test_the_window_follows_the_configuration() -> None:
    section = IngestSection(max_record_age_days=1, max_clock_ahead_s=0)
    window = section.window(NOW)
    assert (window.earliest, window.latest) == (NOW - timedelta(days=1), NOW)


# --- sizes and lists ----------------------------------------------------------------------


def test_a_message_too_large_to_copy_is_refused_by_its_real_size() -> None:
    start = reading()[:100]
    why = rejected(record_for(topic(), start, "pumpgw", payload_bytes=500_000))
    assert why.reason_kind == "oversized"
    assert "500000 bytes" in why.reason
    assert MAX_PAYLOAD_BYTES < 500_000


def test_a_reading_with_more_alarms_than_a_frame_can_carry_is_refused() -> None:
    alarm = {"code": "a", "priority": "PL"}
    most = reading(alarms=[alarm] * MAX_ALARMS_PER_READING)
    accepted(record_for(topic(), most, "pumpgw"))
    why = rejected(record_for(topic(), reading(alarms=[alarm] * 1500), "pumpgw"))
    assert why.reason_kind == "invalid"
    assert "alarms" in why.reason


# --- cardinality ----------------------------------------------------------------------------


def test_only_allowed_sites_and_stations_are_stored() -> None:
    guard = OriginGuard(OriginLimits(sites=("north",), stations=("bed-*",)))
    accepted(record_for(topic(), reading(), "pumpgw", origin=guard))
    south = record_for(topic(site="south"), reading(), "pumpgw", origin=guard)
    assert rejected(south).reason_kind == "not_allowed"
    why = rejected(record_for(topic(station="icu-1"), reading(), "pumpgw", origin=guard))
    assert why.reason_kind == "not_allowed"
    assert "ingest.stations" in why.reason
    assert guard.refused == 2
    assert guard.stations == 1


def test_a_long_site_name_is_refused_before_the_payload_is_read() -> None:
    guard = OriginGuard(OriginLimits(max_name_chars=64))
    why = rejected(record_for(topic(site="s" * 20_000), b"not json", "pumpgw", origin=guard))
    assert why.reason_kind == "name_too_long"
    assert len(why.reason) < 200


def test_stations_and_pumps_per_station_are_bounded() -> None:
    guard = OriginGuard(OriginLimits(max_stations=2, max_pumps_per_station=2))
    for station in ("a", "b"):
        for pump in ("P1", "P2"):
            accepted(record_for(topic(station=station, pump=pump), reading(pump=pump), "pumpgw",
                                origin=guard))  # fmt: skip
    third_pump = record_for(
        topic(station="a", pump="P3"), reading(pump="P3"), "pumpgw", origin=guard
    )
    assert rejected(third_pump).reason_kind == "too_many_pumps"
    third_station = record_for(topic(station="c"), reading(), "pumpgw", origin=guard)
    assert rejected(third_station).reason_kind == "too_many_stations"
    # Known pumps of known stations go on.
    accepted(record_for(topic(station="b", pump="P2"), reading(pump="P2"), "pumpgw", origin=guard))


def test_an_invalid_message_does_not_use_up_a_pump_slot() -> None:
    guard = OriginGuard(OriginLimits(max_pumps_per_station=1))
    rejected(record_for(topic(pump="P9"), b"{}", "pumpgw", origin=guard))
    accepted(record_for(topic(), reading(), "pumpgw", origin=guard))


def test_the_queue_must_hold_what_the_broker_may_send_unacknowledged() -> None:
    with pytest.raises(ValueError, match="max_queue_messages 10 must be at least receive_max"):
        IngestSection(receive_max=100, max_queue_messages=10)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
any_time = st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat())


@settings(max_examples=150, deadline=None)
@given(
    field=st.sampled_from(sorted(json.loads(reading()))),
    value=json_values | any_time,
    site=st.text(max_size=80),
)
def test_any_field_value_and_site_name_is_a_record_or_a_reason_with_every_check_on(
    field: str, value: object, site: str
) -> None:
    data = json.loads(reading())
    data[field] = value
    guard = OriginGuard(OriginLimits(sites=("north", "s*"), max_pumps_per_station=2))
    result = record_for(topic(site=site.replace("/", "_") or "x"), json.dumps(data).encode(),
                        "pumpgw", window=WINDOW, origin=guard)  # fmt: skip
    assert isinstance(result, Rejected) or result.record_id.endswith("P0001:b1:7")
