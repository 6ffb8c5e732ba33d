"""The ingest worker's pure core: topics, validation into records, dedup, configuration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError
from gateway.ingest import (
    MAX_PAYLOAD_BYTES,
    RecentIds,
    Rejected,
    client_id_for,
    load_ingest_settings,
    quarantine_record,
    record_for,
    subscriptions,
)
from gateway.records import OutRecord
from gateway.topics import TopicParts, parse_topic
from schemas.models import (
    AlarmState,
    AlertTransition,
    AlertType,
    DeviceEvent,
    EventKind,
    Phase,
    Priority,
    Quarantined,
    Reading,
)

T0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)
TELEMETRY = "pumpgw/north/bed-12/pumps/P0001/telemetry"


def reading(**changes: Any) -> Reading:
    values: dict[str, Any] = {
        "pump_id": "P0001",
        "boot_id": "b1",
        "seq": 7,
        "device_time": T0,
        "received_at": T0 + timedelta(seconds=1),
        "drug": "morphine",
        "pump_state": "running",
        "reservoir_ml": 12.5,
        "reservoir_capacity_ml": 20.0,
        "low_reservoir_alarm_ml": 2.0,
        "basal_rate_ml_per_day": 0.5,
        "delivered_total_ml": 100.0,
    }
    values.update(changes)
    return Reading.model_validate(values)


def alert(pump_id: str = "P0001") -> AlertTransition:
    return AlertTransition(
        alert_id=f"{pump_id}:low_reservoir:1",
        transition_id=f"{pump_id}:low_reservoir:1:start",
        pump_id=pump_id,
        alert_kind="low_reservoir",
        priority=Priority.MEDIUM,
        alert_type=AlertType.PHYSIOLOGICAL,
        state=AlarmState.ACTIVE,
        phase=Phase.START,
        latching=False,
        text="reservoir low",
        at=T0,
    )


def accepted(result: OutRecord | Rejected) -> OutRecord:
    assert isinstance(result, OutRecord), result
    return result


def rejected(result: OutRecord | Rejected) -> Rejected:
    assert isinstance(result, Rejected), result
    return result


# --- topics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "parts"),
    [
        (TELEMETRY, TopicParts("north", "bed-12", "P0001", "reading")),
        ("pumpgw/s/st/pumps/P2/events", TopicParts("s", "st", "P2", "event")),
        ("pumpgw/s/st/pumps/P2/alerts", TopicParts("s", "st", "P2", "alert")),
        ("pumpgw/s/st/gateway/alerts", TopicParts("s", "st", "_gateway", "alert")),
    ],
)
def test_parse_topic_reads_station_pump_and_kind(topic: str, parts: TopicParts) -> None:
    assert parse_topic(topic, "pumpgw") == parts


@pytest.mark.parametrize(
    "topic",
    [
        "other/north/bed-12/pumps/P0001/telemetry",
        "pumpgw/north/bed-12/pumps/P0001/alerts/active",
        "pumpgw/north/bed-12/pumps/P0001/status",
        "pumpgw/north/bed-12/pumps/P0001/info",
        "pumpgw/north/bed-12/gateway/status",
        "pumpgw/north/bed-12/deadletter",
        "pumpgw/north/pumps/P0001/telemetry",
    ],
)
def test_parse_topic_refuses_topics_that_are_not_points(topic: str) -> None:
    assert parse_topic(topic, "pumpgw") is None


def test_subscriptions_share_every_point_topic_in_the_group() -> None:
    assert subscriptions("g1", "pgw") == [
        "$share/g1/pgw/+/+/pumps/+/telemetry",
        "$share/g1/pgw/+/+/pumps/+/events",
        "$share/g1/pgw/+/+/pumps/+/alerts",
        "$share/g1/pgw/+/+/gateway/alerts",
    ]


# --- records --------------------------------------------------------------------------------


def test_reading_becomes_a_point_tagged_with_the_topics_station() -> None:
    payload = reading().model_dump_json().encode()
    record = accepted(record_for(TELEMETRY, payload, "pumpgw", "t_"))
    assert (record.kind, record.pump_id) == ("reading", "P0001")
    assert record.record_id == "north/bed-12/P0001:b1:7"  # scoped by the topic's station
    assert record.payload == payload
    assert record.line is not None
    assert record.line.startswith(b"t_pump_reading,boot=b1,drug=morphine,pump=P0001,")
    assert b"site=north,station=bed-12 " in record.line


def test_event_and_alert_become_points() -> None:
    event = DeviceEvent(
        pump_id="P0001", boot_id="b1", seq=8, device_time=T0, received_at=T0,
        event=EventKind.BOLUS_DELIVERED, bolus_ml=0.1,
    )  # fmt: skip
    events = accepted(
        record_for(
            TELEMETRY.replace("telemetry", "events"), event.model_dump_json().encode(), "pumpgw"
        )
    )
    alerts = accepted(
        record_for(
            TELEMETRY.replace("telemetry", "alerts"), alert().model_dump_json().encode(), "pumpgw"
        )
    )
    assert events.line is not None
    assert events.line.startswith(b"pump_event,")
    assert alerts.line is not None
    assert alerts.line.startswith(b"pump_alert,")
    assert alerts.record_id == "north/bed-12/P0001:low_reservoir:1:start"


def test_gateway_alert_is_stored_under_the_gateway_pump_id() -> None:
    payload = alert("_gateway").model_dump_json().encode()
    record = accepted(record_for("pumpgw/north/bed-12/gateway/alerts", payload, "pumpgw"))
    assert record.pump_id == "_gateway"


@pytest.mark.parametrize(
    ("payload", "reason_kind"),
    [
        (b"not json", "invalid"),
        (b"[]", "invalid"),
        (b'{"kind": "reading"}', "invalid"),
        (reading().model_dump_json().replace('"seq":7', '"seq":-1').encode(), "invalid"),
        (alert().model_dump_json().encode(), "invalid"),  # an alert on a telemetry topic
        (reading(pump_id="P0002").model_dump_json().encode(), "pump_mismatch"),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "oversized"),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(payload: bytes, reason_kind: str) -> None:
    result = rejected(record_for(TELEMETRY, payload, "pumpgw"))
    assert result.reason_kind == reason_kind
    assert result.reason


def test_message_on_an_unknown_topic_is_rejected() -> None:
    payload = reading().model_dump_json().encode()
    assert rejected(record_for("pumpgw/x/y/gateway/status", payload, "pumpgw")).reason_kind == (
        "topic"
    )


def test_quarantine_record_keeps_reason_and_bytes_with_a_stable_id() -> None:
    why = Rejected("invalid", "seq: must be >= 0", "P0001")
    first = quarantine_record(TELEMETRY, b"\x00bad", why, T0)
    again = quarantine_record(TELEMETRY, b"\x00bad", why, T0 + timedelta(hours=1))
    other = quarantine_record(TELEMETRY, b"\x00bae", why, T0)
    assert first.kind == "quarantine"
    assert first.line is None
    assert first.record_id == again.record_id != other.record_id
    entry = Quarantined.model_validate_json(first.payload)
    assert (entry.reason_kind, entry.raw_hex, entry.pump_id) == ("invalid", "00626164", "P0001")
    assert entry.source == f"mqtt:{TELEMETRY}"


def test_recent_ids_recognise_a_redelivery_and_forget_the_oldest() -> None:
    recent = RecentIds(limit=2)
    assert recent.add("a")
    assert recent.add("b")
    assert not recent.add("a")
    assert recent.add("c")  # "b" was the least recent: forgotten
    assert recent.add("b")
    assert not recent.add("c")


# --- configuration --------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(text)
    return path


INGEST_TOML = """
[mqtt]
url = "mqtt://broker:1883"
topic_prefix = "pumpgw"
[influx]
url = "http://influx:8086"
org = "clinic"
bucket = "pumps"
[store]
path = "/tmp/ingest.db"
[ingest]
group = "central"
client_id = "worker-1"
"""


def test_ingest_config_reads_the_ingest_section(tmp_path: Path) -> None:
    settings = load_ingest_settings(write(tmp_path, INGEST_TOML))
    assert settings.ingest.group == "central"
    assert client_id_for(settings) == "worker-1"
    assert settings.ingest.session_expiry_s == 86_400


def test_environment_overrides_the_ingest_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUMPGW_INGEST__CLIENT_ID", "worker-2")
    settings = load_ingest_settings(write(tmp_path, INGEST_TOML))
    assert client_id_for(settings) == "worker-2"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (('url = "mqtt://broker:1883"', 'url = "mqtt://broker:1883"\nprotocol = "3.1.1"'),
         "mqtt.protocol"),
        (('group = "central"', 'group = "a/b"'), "ingest.group"),
        (('group = "central"', 'group = "central"\nbogus = 1'), "ingest.bogus"),
    ],
)  # fmt: skip
def test_ingest_config_problems_name_the_key(
    tmp_path: Path, change: tuple[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_ingest_settings(write(tmp_path, INGEST_TOML.replace(*change)))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[[sources]]\nurl = "/dev/ttyUSB0"\n', "sources"),
        ("[alerts]\n", "alerts"),
        ('[hl7]\nurl = "mllp://127.0.0.1:2575"\n', "hl7"),
        ('[fhir]\nurl = "http://127.0.0.1:8080/fhir"\n', "fhir"),
    ],
)
def test_ingest_config_refuses_the_station_sections_it_does_not_run(
    tmp_path: Path, section: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_ingest_settings(write(tmp_path, INGEST_TOML + "\n" + section))
    problems = info.value.problems
    assert any(p.startswith(f"{key}: unknown key") for p in problems), problems


def test_ingest_config_needs_influx(tmp_path: Path) -> None:
    text = INGEST_TOML.split("[influx]")[0] + "[store]" + INGEST_TOML.split("[store]")[1]
    with pytest.raises(ConfigError) as info:
        load_ingest_settings(write(tmp_path, text))
    assert any(p.startswith("influx:") for p in info.value.problems)
