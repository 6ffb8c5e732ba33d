"""gateway.points: line protocol for readings, events and alerts, and the point identity."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from gateway.points import (
    ALARM_STATE_CODES,
    BATTERY_STATE_CODES,
    PHASE_CODES,
    PRIORITY_CODES,
    PUMP_STATE_CODES,
    PointTags,
    alert_time_ns,
    epoch_ns,
    epoch_us,
    escape_measurement,
    escape_tag,
    line_for,
    point_time_ns,
    quote_string,
)
from schemas.models import (
    AlarmState,
    AlertTransition,
    BatteryState,
    DeviceAlarm,
    DeviceEvent,
    DeviceInfo,
    EventKind,
    GatewayStatus,
    Phase,
    Prescription,
    Priority,
    PumpState,
    PumpStatus,
    Quarantined,
    Reading,
)

TAGS = PointTags(site="north", station="bed-7")
T0 = datetime(2026, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)

# One line: measurement+tags, fields, timestamp; split on unescaped spaces outside quotes.
_TOKEN = re.compile(r'(?:[^ "\\]|\\.|"(?:[^"\\]|\\.)*")+')


def reading(**changes: Any) -> Reading:
    values: dict[str, Any] = {
        "pump_id": "P0001",
        "boot_id": "3fa2c1d0",
        "seq": 42,
        "device_time": T0,
        "received_at": T0 + timedelta(seconds=2, microseconds=7),
        "drug": "baclofen",
        "pump_state": "running",
        "reservoir_ml": 12.25,
        "reservoir_capacity_ml": 20.0,
        "low_reservoir_alarm_ml": 2.0,
        "basal_rate_ml_per_day": 0.5,
        "delivered_total_ml": 321.125,
        "bolus_count_24h": 3,
        "battery_state": "eri",
        "battery_remaining_pct": 61.5,
        "alarms": [{"code": "low_reservoir", "priority": "PM"}],
    }
    values.update(changes)
    return Reading.model_validate(values)


def event(**changes: Any) -> DeviceEvent:
    values: dict[str, Any] = {
        "pump_id": "P0001",
        "boot_id": "3fa2c1d0",
        "seq": 43,
        "device_time": T0,
        "received_at": T0,
        "event": "refill",
        "withdrawn_ml": 1.75,
        "filled_ml": 20.0,
    }
    values.update(changes)
    return DeviceEvent.model_validate(values)


def alert(**changes: Any) -> AlertTransition:
    values: dict[str, Any] = {
        "alert_id": "P0001:low_reservoir:1",
        "transition_id": "P0001:low_reservoir:1:start",
        "pump_id": "P0001",
        "alert_kind": "low_reservoir",
        "priority": "PM",
        "alert_type": "ST",
        "state": "active",
        "phase": "start",
        "latching": True,
        "value": 1.9,
        "threshold": 2.0,
        "unit": "mL",
        "text": "Low reservoir: 1.9 mL left",
        "at": T0,
    }
    values.update(changes)
    return AlertTransition.model_validate(values)


def parse(line: bytes) -> tuple[str, dict[str, str], dict[str, str], int]:
    """Split a line into measurement, tags, raw field values and timestamp (test-only parser)."""
    head, fields, timestamp = _TOKEN.findall(line.decode())
    name, *tag_pairs = re.split(r"(?<!\\),", head)
    tags = dict(re.split(r"(?<!\\)=", pair, maxsplit=1) for pair in tag_pairs)
    field_pairs = re.findall(r'((?:[^,=\\]|\\.)+)=("(?:[^"\\]|\\.)*"|[^,]+)', fields)
    return name, tags, dict(field_pairs), int(timestamp)


def numeric_fields(line: bytes) -> dict[str, float]:
    """Fields that are numbers (what VictoriaMetrics keeps), as floats."""
    _, _, fields, _ = parse(line)
    return {k: float(v.rstrip("i")) for k, v in fields.items() if not v.startswith('"')}


def key_of(line: bytes) -> tuple[str, tuple[tuple[str, str], ...], int]:
    """InfluxDB's point key: measurement, tag set, timestamp."""
    name, tags, _, timestamp = parse(line)
    return name, tuple(sorted(tags.items())), timestamp


def line(message: Any, tags: PointTags = TAGS) -> bytes:
    result = line_for(message, tags)
    assert result is not None
    return result


# --- readings ---------------------------------------------------------------------------


def test_reading_line_carries_every_value_with_its_type() -> None:
    name, tags, fields, _ = parse(line(reading()))
    assert name == "pump_reading"
    assert tags == {
        "boot": "3fa2c1d0",
        "drug": "baclofen",
        "pump": "P0001",
        "site": "north",
        "station": "bed-7",
    }
    assert fields == {
        "reservoir_ml": "12.25",
        "reservoir_capacity_ml": "20.0",
        "low_reservoir_alarm_ml": "2.0",
        "basal_rate_ml_per_day": "0.5",
        "delivered_total_ml": "321.125",
        "bolus_count_24h": "3i",
        "battery_remaining_pct": "61.5",
        "pump_state_code": "0i",
        "battery_state_code": "1i",
        "alarm_count": "1i",
        "alarm_max_priority_code": "2i",
        "seq": "42i",
        "received_at_ns": f"{epoch_ns(T0) + 2_000_007_000}i",
    }


def test_reading_tags_are_sorted_by_key_as_influxdb_recommends() -> None:
    _, tags, _, _ = parse(line(reading()))
    assert list(tags) == sorted(tags)


def test_reading_without_battery_percentage_omits_the_field() -> None:
    _, _, fields, _ = parse(line(reading(battery_remaining_pct=None)))
    assert "battery_remaining_pct" not in fields


def test_float_fields_stay_floats_even_when_whole_numbers() -> None:
    # An InfluxDB field keeps its first type: 12 (float) then 12i would be a type conflict.
    _, _, fields, _ = parse(line(reading(reservoir_ml=12, delivered_total_ml=0)))
    assert fields["reservoir_ml"] == "12.0"
    assert fields["delivered_total_ml"] == "0.0"


def test_float_values_round_trip_exactly() -> None:
    value = 0.1 + 0.2  # 0.30000000000000004: shortest repr, no rounding
    fields = numeric_fields(line(reading(reservoir_ml=value)))
    assert fields["reservoir_ml"] == value


# --- timestamps -------------------------------------------------------------------------


def test_timestamp_is_device_time_in_microseconds_with_seq_below() -> None:
    _, _, _, timestamp = parse(line(reading(seq=123_456_789)))
    assert timestamp == 1_772_353_815_123_456_789
    assert timestamp // 1000 == epoch_ns(T0) // 1000


def test_nanosecond_timestamps_use_integer_arithmetic_far_from_the_epoch() -> None:
    # A float timestamp() loses the last microsecond digits at this magnitude.
    moment = datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert epoch_ns(moment) == 4_102_444_799_999_999_000
    assert int(moment.timestamp() * 1e9) != epoch_ns(moment)


def test_timestamps_do_not_depend_on_the_timezone_the_device_used() -> None:
    local = T0.astimezone(timezone(timedelta(hours=-5, minutes=-30)))
    assert point_time_ns(local, 7) == point_time_ns(T0, 7)


def test_received_at_is_kept_at_full_microsecond_precision() -> None:
    received = T0 + timedelta(microseconds=1)
    fields = numeric_fields(line(reading(received_at=received)))
    _, _, raw, _ = parse(line(reading(received_at=received)))
    assert int(raw["received_at_ns"].rstrip("i")) == epoch_ns(T0) + 1000
    assert "received_at_ns" in fields


# --- identity ---------------------------------------------------------------------------


def test_same_record_twice_gives_identical_lines() -> None:
    assert line(reading()) == line(Reading.model_validate_json(reading().model_dump_json()))
    assert line(event()) == line(DeviceEvent.model_validate_json(event().model_dump_json()))
    assert line(alert()) == line(AlertTransition.model_validate_json(alert().model_dump_json()))


def test_two_readings_of_one_pump_at_the_same_device_time_get_distinct_keys() -> None:
    # A pump clock stepping back makes a later reading repeat an earlier device time.
    first = reading(seq=100)
    later = reading(seq=101, reservoir_ml=11.0)
    assert first.device_time == later.device_time
    assert key_of(line(first)) != key_of(line(later))


def test_readings_from_two_boot_sessions_never_share_a_key() -> None:
    # After a reboot seq restarts: same seq and device time, different boot tag.
    before = reading(boot_id="aaaa0001", seq=5)
    after = reading(boot_id="bbbb0002", seq=5)
    assert key_of(line(before)) != key_of(line(after))


def test_readings_of_different_pumps_at_the_same_time_get_distinct_keys() -> None:
    assert key_of(line(reading(pump_id="P0001"))) != key_of(line(reading(pump_id="P0002")))


def test_consecutive_seqs_in_one_microsecond_all_get_distinct_keys() -> None:
    keys = {key_of(line(reading(seq=seq))) for seq in range(1000)}
    assert len(keys) == 1000


def test_identity_tags_are_only_low_cardinality_ones() -> None:
    for message in (reading(), event(), alert()):
        _, tags, _, _ = parse(line(message))
        assert set(tags) <= {
            "site",
            "station",
            "pump",
            "boot",
            "drug",
            "event",
            "alert_kind",
            "priority",
        }


# --- events and alerts ------------------------------------------------------------------


def test_refill_event_line_carries_volumes() -> None:
    name, tags, fields, timestamp = parse(line(event()))
    assert name == "pump_event"
    assert tags["event"] == "refill"
    assert tags["boot"] == "3fa2c1d0"
    assert fields["withdrawn_ml"] == "1.75"
    assert fields["filled_ml"] == "20.0"
    assert fields["seq"] == "43i"
    assert "bolus_ml" not in fields
    assert timestamp == point_time_ns(T0, 43)


def test_event_without_volumes_still_has_numeric_fields() -> None:
    fields = numeric_fields(
        line(event(event="motor_stall_start", withdrawn_ml=None, filled_ml=None))
    )
    assert set(fields) == {"seq", "received_at_ns"}


def test_alert_line_carries_codes_and_text() -> None:
    name, tags, fields, timestamp = parse(line(alert()))
    assert name == "pump_alert"
    assert tags == {
        "alert_kind": "low_reservoir",
        "priority": "PM",
        "pump": "P0001",
        "site": "north",
        "station": "bed-7",
    }
    assert fields["state_code"] == "1i"
    assert fields["phase_code"] == "0i"
    assert fields["priority_code"] == "2i"
    assert fields["acknowledged"] == "0i"
    assert fields["latching"] == "1i"
    assert fields["value"] == "1.9"
    assert fields["threshold"] == "2.0"
    assert fields["alert_id"] == '"P0001:low_reservoir:1"'
    assert timestamp == alert_time_ns(alert())
    assert timestamp // 1000 == epoch_ns(T0) // 1000


def test_acknowledged_alert_sets_acknowledged_field() -> None:
    fields = numeric_fields(
        line(
            alert(
                phase="acknowledged",
                inactivation="alert-acknowledged",
                transition_id="P0001:low_reservoir:1:ack",
            )
        )
    )
    assert fields["acknowledged"] == 1
    assert fields["phase_code"] == PHASE_CODES[Phase.ACKNOWLEDGED]


def test_two_transitions_of_one_alert_at_the_same_instant_get_distinct_keys() -> None:
    ended = alert(phase="end", state="inactive", transition_id="P0001:low_reservoir:1:end")
    restarted = alert(transition_id="P0001:low_reservoir:2:start", alert_id="P0001:low_reservoir:2")
    assert key_of(line(ended)) != key_of(line(restarted))


def test_every_phase_of_one_alert_at_the_same_instant_gets_its_own_key() -> None:
    phases = [alert(phase=phase, transition_id=f"t:{phase}") for phase in Phase]
    assert len({key_of(line(a)) for a in phases}) == len(Phase)


def test_alert_caused_by_a_message_sits_at_its_device_time() -> None:
    device_time = T0 - timedelta(days=2)
    _, _, _, timestamp = parse(line(alert(device_time=device_time)))
    assert timestamp // 1000 == epoch_ns(device_time) // 1000


def test_updates_of_one_alert_read_in_one_batch_get_distinct_keys() -> None:
    # Latched, then present again: both evaluated when one read arrived, so `at` is shared.
    latched = alert(phase="update", state="latched", transition_id="t:2", device_time=T0)
    again = alert(
        phase="update", transition_id="t:3", device_time=T0 + timedelta(hours=3, microseconds=1)
    )
    assert key_of(line(latched)) != key_of(line(again))


def test_replayed_transition_evaluated_later_keeps_its_key() -> None:
    first = alert(device_time=T0 - timedelta(hours=1))
    replayed = alert(device_time=T0 - timedelta(hours=1), at=T0 + timedelta(days=3))
    assert key_of(line(first)) == key_of(line(replayed))


def test_simultaneous_device_alarms_of_one_pump_get_distinct_keys() -> None:
    # Every device alarm has alert_kind device_alarm; the alert id tells them apart.
    codes = ["low_battery", "motor_fault", "memory_error", "catheter", "reservoir"]
    alarms = [
        alert(alert_kind="device_alarm", alert_id=f"P0001:device_alarm:{code}:1") for code in codes
    ]
    assert len({key_of(line(a)) for a in alarms}) == len(codes)


def test_alert_without_value_or_unit_omits_them() -> None:
    _, _, fields, _ = parse(line(alert(value=None, threshold=None, unit=None)))
    assert not {"value", "threshold", "unit"} & set(fields)


def test_readings_and_events_carry_no_string_fields() -> None:
    # VictoriaMetrics turns a string field into a series of zeros: keep the volume numeric.
    for message in (reading(), event()):
        _, _, fields, _ = parse(line(message))
        assert set(fields) == set(numeric_fields(line(message)))


def test_every_dashboard_value_is_numeric() -> None:
    reading_fields = numeric_fields(line(reading()))
    assert {
        "reservoir_ml",
        "reservoir_capacity_ml",
        "low_reservoir_alarm_ml",
        "basal_rate_ml_per_day",
        "delivered_total_ml",
        "bolus_count_24h",
        "battery_remaining_pct",
        "pump_state_code",
        "battery_state_code",
        "alarm_count",
        "seq",
        "received_at_ns",
    } <= set(reading_fields)
    alert_fields = numeric_fields(line(alert()))
    assert {"state_code", "phase_code", "priority_code", "acknowledged", "value"} <= set(
        alert_fields
    )


@pytest.mark.parametrize(
    ("codes", "enum"),
    [
        (PUMP_STATE_CODES, PumpState),
        (BATTERY_STATE_CODES, BatteryState),
        (PRIORITY_CODES, Priority),
        (ALARM_STATE_CODES, AlarmState),
        (PHASE_CODES, Phase),
    ],
)
def test_every_enum_member_has_a_distinct_numeric_code(codes: dict[str, int], enum: Any) -> None:
    assert set(codes) == {member.value for member in enum}
    assert len(set(codes.values())) == len(codes)


@pytest.mark.parametrize("state", list(PumpState))
def test_every_pump_state_produces_a_line(state: PumpState) -> None:
    fields = numeric_fields(line(reading(pump_state=state)))
    assert fields["pump_state_code"] == PUMP_STATE_CODES[state]


@pytest.mark.parametrize("kind", list(EventKind))
def test_every_event_kind_produces_a_line(kind: EventKind) -> None:
    message = event(event=kind, bolus_ml=0.1 if kind is EventKind.BOLUS_DELIVERED else None)
    _, tags, _, _ = parse(line(message))
    assert tags["event"] == kind.value


def test_state_and_record_kinds_are_not_time_series() -> None:
    info = DeviceInfo(
        pump_id="P0001",
        boot_id="3fa2c1d0",
        seq=1,
        device_time=T0,
        received_at=T0,
        model="8637-20",
        serial="SN1",
        firmware="1.0",
        reservoir_capacity_ml=20.0,
        drug="morphine",
        concentration_mg_per_ml=10.0,
        prescription=Prescription(basal_rate_ml_per_day=0.5),
    )
    status = PumpStatus(pump_id="P0001", telemetry="ok", at=T0)
    gateway = GatewayStatus(
        site="s", station="t", session_id="x", seq=1, state="online", at=T0, version="0"
    )
    quarantined = Quarantined(
        quarantine_id="q1",
        source="s",
        reason_kind="checksum",
        reason="r",
        raw_hex="",
        received_at=T0,
    )
    for message in (info, status, gateway, quarantined):
        assert line_for(message, TAGS) is None


# --- escaping ---------------------------------------------------------------------------


def test_tag_values_escape_commas_equals_and_spaces() -> None:
    assert escape_tag("a,b=c d") == r"a\,b\=c\ d"


def test_measurement_names_escape_commas_and_spaces_but_not_equals() -> None:
    assert escape_measurement("m,x y=z") == r"m\,x\ y=z"


def test_string_fields_escape_quotes_and_backslashes_and_drop_newlines() -> None:
    assert quote_string('say "hi"\\now\nthen') == r'"say \"hi\"\\now then"'


def test_station_tags_with_special_characters_parse_back() -> None:
    tags = PointTags(site="St Mary's, east", station="bed=7")
    _, parsed, _, _ = parse(line(reading(), tags))
    assert parsed["site"] == r"St\ Mary's\,\ east"
    assert parsed["station"] == r"bed\=7"


def test_alert_text_with_quotes_stays_one_field() -> None:
    text = 'Reservoir "low", refill\nsoon = now'
    _, _, fields, _ = parse(line(alert(text=text)))
    assert fields["text"] == r'"Reservoir \"low\", refill soon = now"'
    assert fields["latching"] == "1i"


def test_a_line_never_contains_a_newline() -> None:
    tags = PointTags(site="a b", station="c")
    message = alert(text="one\ntwo\r\nthree", unit="m\nL")
    assert b"\n" not in line(message, tags)


def test_measurement_prefix_names_every_measurement() -> None:
    tags = PointTags(site="s", station="t", measurement_prefix="test_1_")
    assert parse(line(reading(), tags))[0] == "test_1_pump_reading"
    assert parse(line(event(), tags))[0] == "test_1_pump_event"
    assert parse(line(alert(), tags))[0] == "test_1_pump_alert"


@pytest.mark.parametrize("bad", ["", "back\\slash", "new\nline"])
def test_point_tags_refuse_values_line_protocol_cannot_carry(bad: str) -> None:
    with pytest.raises(ValueError, match="tag value"):
        PointTags(site=bad, station="t")


def test_reading_with_every_device_alarm_priority_reports_the_highest() -> None:
    alarms = [
        DeviceAlarm(code="a", priority=Priority.LOW),
        DeviceAlarm(code="b", priority=Priority.HIGH),
    ]
    fields = numeric_fields(line(reading(alarms=alarms)))
    assert fields["alarm_count"] == 2
    assert fields["alarm_max_priority_code"] == PRIORITY_CODES[Priority.HIGH]


def test_epoch_microseconds_are_exact_before_the_epoch_too() -> None:
    assert epoch_us(datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == -1
    assert epoch_us(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1_000_000
