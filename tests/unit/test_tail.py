"""render_message and its helpers: one line per message, built from real model payloads."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.tail import (
    filter_base,
    is_historical,
    parse_broker_url,
    render_message,
    render_segments,
    run_tail,
    short_topic,
)
from schemas.models import (
    Acknowledgement,
    AckRefusal,
    ActiveAlerts,
    AlarmState,
    AlertTransition,
    AlertType,
    BatteryState,
    DeviceAlarm,
    DeviceEvent,
    DeviceInfo,
    Drug,
    EventKind,
    GatewayStatus,
    Phase,
    Prescription,
    Priority,
    PumpState,
    PumpStatus,
    Quarantined,
    Reading,
    SourceStatus,
)

BASE = "pumpgw/site1/st1"
PUMP = f"{BASE}/pumps/P0001"
AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def render(topic: str, payload: bytes | str, *, historical: bool = False) -> str:
    raw = payload.encode() if isinstance(payload, str) else payload
    return render_message(topic, raw, historical=historical, base=BASE)


def reading(**changes: object) -> Reading:
    fields: dict[str, object] = {
        "pump_id": "P0001",
        "boot_id": "b1",
        "seq": 42,
        "device_time": AT,
        "received_at": AT,
        "drug": Drug.MORPHINE,
        "pump_state": PumpState.RUNNING,
        "reservoir_ml": 12.5,
        "reservoir_capacity_ml": 20.0,  # SynchroMed II 20 mL reservoir (DOMAIN.md 1.1)
        "low_reservoir_alarm_ml": 2.0,  # manufacturer-recommended alarm volume (DOMAIN.md 1.1)
        "basal_rate_ml_per_day": 0.5,  # about monthly refill of 20 mL (DOMAIN.md 1.5)
        "delivered_total_ml": 100.25,
    }
    return Reading.model_validate({**fields, **changes})


def alert(**changes: object) -> AlertTransition:
    fields: dict[str, object] = {
        "alert_id": "P0001:low_reservoir:1",
        "transition_id": "P0001:low_reservoir:1:start",
        "pump_id": "P0001",
        "alert_kind": "low_reservoir",
        "priority": Priority.HIGH,
        "alert_type": AlertType.TECHNICAL,
        "state": AlarmState.ACTIVE,
        "phase": Phase.START,
        "latching": True,
        "text": "reservoir 1.90 mL (pump estimate) at or below 2.0 mL",
        "at": AT,
    }
    return AlertTransition.model_validate({**fields, **changes})


def test_reading_renders_volumes_rate_state_and_battery() -> None:
    line = render(f"{PUMP}/telemetry", reading().model_dump_json())

    assert line == (
        "pumps/P0001/telemetry  P0001 reading #42 reservoir 12.50 mL (est.) rate 0.500 mL/d "
        "delivered 100.25 mL running battery ok"
    )


def test_reading_lists_device_alarms_and_battery_percentage() -> None:
    payload = reading(
        battery_state=BatteryState.ERI,
        battery_remaining_pct=8.0,
        alarms=[DeviceAlarm(code="motor_stall", priority=Priority.HIGH)],
    ).model_dump_json()

    line = render(f"{PUMP}/telemetry", payload)

    assert line.endswith("running battery eri 8% alarms: motor_stall(PH)")


def test_alert_shows_priority_phase_kind_and_text() -> None:
    line = render(f"{PUMP}/alerts", alert().model_dump_json())

    assert line == (
        "pumps/P0001/alerts  P0001 ALERT PH start low_reservoir: "
        "reservoir 1.90 mL (pump estimate) at or below 2.0 mL"
    )


def test_alert_is_marked_historical_when_replayed() -> None:
    line = render(f"{PUMP}/alerts", alert().model_dump_json(), historical=True)

    assert line.startswith("pumps/P0001/alerts  [historical] P0001 ALERT PH start")


def test_live_alert_is_not_marked_historical() -> None:
    assert "[historical]" not in render(f"{PUMP}/alerts", alert().model_dump_json())


def test_acknowledged_alert_names_who_acknowledged_it() -> None:
    payload = alert(
        phase=Phase.ACKNOWLEDGED, acknowledged_by="nurse.kim", acknowledged_at=AT
    ).model_dump_json()

    line = render(f"{PUMP}/alerts", payload)

    assert "P0001 ALERT PH acknowledged low_reservoir:" in line
    assert line.endswith("(acknowledged by nurse.kim)")


def test_alert_priority_is_highlighted_on_a_terminal() -> None:
    segments = render_segments(
        f"{PUMP}/alerts", alert().model_dump_json().encode(), historical=False, base=BASE
    )

    assert ("PH", "bold white on red") in segments


def test_pump_status_shows_telemetry_and_latest_values() -> None:
    status = PumpStatus(
        pump_id="P0001",
        telemetry="lost",
        at=AT,
        reservoir_ml=3.25,
        pump_state=PumpState.STOPPED,
        battery_state=BatteryState.OK,
    )

    line = render(f"{PUMP}/status", status.model_dump_json())

    assert line == (
        "pumps/P0001/status  P0001 status telemetry lost reservoir 3.25 mL (est.) stopped "
        "battery ok"
    )


def test_active_alerts_show_count_and_kinds() -> None:
    second = alert(
        alert_id="P0001:battery_eri:1",
        transition_id="P0001:battery_eri:1:start",
        alert_kind="battery_eri",
        priority=Priority.MEDIUM,
        text="replacement indicator",
    )
    active = ActiveAlerts(pump_id="P0001", at=AT, alerts=(alert(), second))

    line = render(f"{PUMP}/alerts/active", active.model_dump_json())

    assert line == (
        "pumps/P0001/alerts/active  P0001 active alerts 2: low_reservoir(PH), battery_eri(PM)"
    )


def test_no_active_alerts_shows_zero() -> None:
    line = render(
        f"{PUMP}/alerts/active", ActiveAlerts(pump_id="P0001", at=AT, alerts=()).model_dump_json()
    )

    assert line.endswith("P0001 active alerts 0")


@pytest.mark.parametrize("state", ["online", "offline"])
def test_gateway_status_shows_state_session_and_seq(state: str) -> None:
    status = GatewayStatus.model_validate(
        {
            "site": "site1",
            "station": "st1",
            "session_id": "s7",
            "seq": 3,
            "state": state,
            "at": AT,
            "version": "0.1.0",
            "sources": [SourceStatus(url="/dev/ttyUSB0", connected=True)],
        }
    )

    line = render(f"{BASE}/gateway/status", status.model_dump_json())

    assert line == (
        f"gateway/status  gateway site1/st1 {state} session s7 seq 3 version 0.1.0 "
        "sources 1/1 connected"
    )


def test_quarantine_shows_reason_kind_and_reason() -> None:
    record = Quarantined(
        quarantine_id="q1",
        source="/dev/ttyUSB0",
        reason_kind="bad_checksum",
        reason="CRC 1A2B3C4D does not match 00000000",
        raw_hex="24",
        received_at=AT,
        pump_id="P0001",
    )

    line = render(f"{BASE}/deadletter", record.model_dump_json())

    assert line == (
        "deadletter  QUARANTINE bad_checksum: CRC 1A2B3C4D does not match 00000000 "
        "pump P0001 from /dev/ttyUSB0"
    )


def test_info_shows_model_drug_and_programming() -> None:
    info = DeviceInfo(
        pump_id="P0001",
        boot_id="b1",
        seq=1,
        device_time=AT,
        received_at=AT,
        model="8637-20",
        serial="NGP123",
        firmware="1.2",
        reservoir_capacity_ml=20.0,
        drug=Drug.MORPHINE,
        concentration_mg_per_ml=25.0,
        prescription=Prescription(basal_rate_ml_per_day=0.5),
    )

    line = render(f"{PUMP}/info", info.model_dump_json())

    assert line == (
        "pumps/P0001/info  P0001 info 8637-20 serial NGP123 firmware 1.2 morphine 25 mg/mL "
        "capacity 20.0 mL rate 0.500 mL/d"
    )


def test_refill_event_shows_withdrawn_and_filled_volumes() -> None:
    event = DeviceEvent(
        pump_id="P0001",
        boot_id="b1",
        seq=9,
        device_time=AT,
        received_at=AT,
        event=EventKind.REFILL,
        withdrawn_ml=2.5,
        filled_ml=20.0,
    )

    line = render(f"{PUMP}/events", event.model_dump_json())

    assert line.endswith("P0001 event #9 refill withdrawn 2.50 mL filled 20.00 mL")


def test_acknowledgement_without_kind_is_recognised_on_the_ack_topic() -> None:
    ack = Acknowledgement(alert_id="P0001:low_reservoir:1", by="nurse.kim", note="refill booked")

    line = render(f"{BASE}/ack", ack.model_dump_json())

    assert line == "ack  ACK P0001:low_reservoir:1 by nurse.kim: refill booked"
    line = render(f"{BASE}/ack/nurse.kim", '{"alert_id": "P0001:low_reservoir:1"}')
    assert line == "ack/nurse.kim  ACK P0001:low_reservoir:1"


def test_a_refused_acknowledgement_shows_who_and_why_escaped() -> None:
    refusal = AckRefusal(
        username="nurse.kim", alert_id="P0001:x:1", reason_kind="unknown_alert",
        reason="no active alert 'P0001:x:1'\x1b[2J", at=datetime(2026, 12, 1, tzinfo=UTC),
    )  # fmt: skip
    line = render(f"{BASE}/gateway/acks/refused", refusal.model_dump_json())
    assert "ACK REFUSED P0001:x:1 from nurse.kim: unknown_alert" in line
    assert "\x1b" not in line
    assert "\\x1b[2J" in line


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"kind": "mystery"}', "unknown kind 'mystery'"),
        (b'{"no_kind": 1}', "unknown kind 'None'"),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_unrenderable_payload_is_shown_raw(payload: bytes, why: str) -> None:
    line = render(f"{PUMP}/telemetry", payload)

    assert line.startswith(f"pumps/P0001/telemetry  {why} ({len(payload)} B): ")


def test_invalid_model_payload_names_the_problem_and_shows_raw() -> None:
    data = json.loads(reading().model_dump_json())
    data["reservoir_ml"] = -1

    line = render(f"{PUMP}/telemetry", json.dumps(data))

    assert line.startswith("pumps/P0001/telemetry  invalid reading: reservoir_ml=-1")
    assert " raw (" in line


def test_long_raw_payload_is_truncated() -> None:
    line = render(f"{PUMP}/telemetry", b"x" * 10_000)

    assert len(line) < 250
    assert line.endswith("...")


def test_control_characters_are_escaped_to_keep_one_line() -> None:
    payload = alert(text="line one\nline two \x1b[2J").model_dump_json()

    line = render(f"{PUMP}/alerts", payload)

    assert "\n" not in line
    assert "\x1b" not in line
    assert "line one\\nline two \\x1b[2J" in line


def test_retained_message_is_marked() -> None:
    line = render_message(
        f"{PUMP}/status",
        PumpStatus(pump_id="P0001", telemetry="ok", at=AT).model_dump_json().encode(),
        historical=False,
        base=BASE,
        retained=True,
    )

    assert line == "pumps/P0001/status  [retained] P0001 status telemetry ok"


@pytest.mark.parametrize(
    ("topic", "base", "shown"),
    [
        (f"{PUMP}/telemetry", BASE, "pumps/P0001/telemetry"),
        (f"{PUMP}/telemetry", "pumpgw", "site1/st1/pumps/P0001/telemetry"),
        ("other/tree/x", BASE, "other/tree/x"),
        (f"{BASE}x/y", BASE, f"{BASE}x/y"),
        (f"{PUMP}/telemetry", "", f"{PUMP}/telemetry"),
    ],
)
def test_short_topic_drops_only_a_whole_base(topic: str, base: str, shown: str) -> None:
    assert short_topic(topic, base) == shown


@pytest.mark.parametrize(
    ("topic_filter", "base"),
    [
        ("pumpgw/site1/st1/#", "pumpgw/site1/st1"),
        ("pumpgw/#", "pumpgw"),
        ("pumpgw/+/+/pumps/+/alerts", "pumpgw"),
        ("pumpgw/site1/st1/pumps/P0001/#", "pumpgw/site1/st1"),
        ("pumpgw/site1/st1/gateway/status", "pumpgw/site1/st1"),
        ("pumpgw/site1/st1", "pumpgw/site1"),
        ("#", ""),
    ],
)
def test_filter_base_is_the_literal_station_root_at_most(topic_filter: str, base: str) -> None:
    assert filter_base(topic_filter) == base


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://127.0.0.1:1884", "127.0.0.1", 1884, False),
        ("mqtt://broker.local", "broker.local", 1883, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("ssl://broker.local:8884", "broker.local", 8884, True),
    ],
)
def test_parse_broker_url(url: str, host: str, port: int, tls: bool) -> None:
    address = parse_broker_url(url)

    assert (address.host, address.port, address.tls) == (host, port, tls)


@pytest.mark.parametrize("url", ["http://x:1", "mqtt://", "mqtt://x:99999", "x"])
def test_parse_broker_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="mqtt"):
        parse_broker_url(url)


def test_historical_user_property_is_detected() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("source", "replay"), ("historical", "true")]
    plain = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]

    assert is_historical(props)
    assert not is_historical(plain)
    assert not is_historical(None)


def test_run_tail_rejects_a_bad_url_with_exit_code_2() -> None:
    err = io.StringIO()

    code = run_tail("http://nowhere", "pumpgw/#", stop=threading.Event(), err=err)

    assert code == 2
    assert "mqtt://host:port" in err.getvalue()


def test_run_tail_rejects_an_unknown_protocol_with_exit_code_2() -> None:
    err = io.StringIO()

    code = run_tail("mqtt://127.0.0.1:1", "#", stop=threading.Event(), err=err, protocol="4")

    assert code == 2
    assert "protocol '4'" in err.getvalue()
