"""MQTT adapter without a broker: settings validation, secrets, the paho seam, the window."""

from __future__ import annotations

from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTErrorCode
from pydantic import ValidationError

from gateway.adapters.mqtt import (
    MqttConfigError,
    MqttSettings,
    MqttTls,
    _Bucket,
    _Lane,
    connect_refusal,
    publish_denial,
    publish_problem,
)
from gateway.outbox import StoredRecord


def problems(**values: object) -> str:
    with pytest.raises(ValidationError) as caught:
        MqttSettings(**values)
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in caught.value.errors())


def test_defaults_are_valid_and_shown_without_secrets() -> None:
    settings = MqttSettings()
    assert settings.display_url() == "mqtt://localhost:1883"
    assert settings.protocol == "5"
    assert (settings.inflight_max, settings.topic_prefix) == (1000, "pumpgw")


def test_mqtts_url_defaults_to_port_8883() -> None:
    settings = MqttSettings(url="mqtts://broker.example")
    assert (settings.host, settings.port, settings.uses_tls) == ("broker.example", 8883, True)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://broker:1883", "mqtt://host:port or mqtts://host:port"),
        ("mqtt://gw:hunter2@broker:1883", "not in the url"),
        ("mqtt://broker:1883/topic", "nothing else"),
        ("mqtt://broker:99999", "bad port"),
        ("mqtt://:1883", "nothing else"),
    ],
)
def test_bad_url_is_refused_with_the_reason(url: str, says: str) -> None:
    found = problems(url=url)
    assert found.startswith("url:")
    assert says in found
    assert "hunter2" not in found


def test_protocol_written_as_a_number_is_accepted() -> None:
    assert MqttSettings(protocol=5).protocol == "5"
    assert "protocol" in problems(protocol="4")


def test_topic_prefix_with_a_wildcard_is_refused() -> None:
    assert "topic_prefix" in problems(topic_prefix="a/b")


def test_password_is_never_shown() -> None:
    settings = MqttSettings(username="gw", password="hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in settings.model_dump_json()
    assert settings.password_value() == "hunter2"


def test_password_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    found = problems(password_file=secret)
    assert found.startswith("password_file:")
    assert f"chmod 600 {secret}" in found


def test_private_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    assert MqttSettings(password_file=secret).password_value() == "hunter2"


def test_password_file_made_public_after_loading_is_refused_at_use(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    settings = MqttSettings(password_file=secret)
    secret.chmod(0o640)
    with pytest.raises(MqttConfigError, match="chmod 600"):
        settings.password_value()


def test_missing_password_file_is_refused(tmp_path: Path) -> None:
    assert "cannot read" in problems(password_file=tmp_path / "absent")


def test_password_and_password_file_together_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o600)
    assert "not both" in problems(password="x", password_file=secret)


def test_tls_settings_need_an_mqtts_url() -> None:
    assert "use mqtts://" in problems(tls=MqttTls(ca_file=Path("/ca.pem")))


def test_tls_key_without_certificate_is_refused() -> None:
    with pytest.raises(ValidationError, match="key_file needs cert_file"):
        MqttTls(key_file=Path("/k.pem"))


def test_unknown_key_is_refused() -> None:
    assert problems(prefix="x") == "prefix: Extra inputs are not permitted"


# --- the paho seam ----------------------------------------------------------------------------


def test_refused_connect_says_what_to_do() -> None:
    error = connect_refusal(0x86, "Bad user name or password", "mqtt://b:1883")
    assert error.reason_code == 0x86
    assert error.topic is None
    assert "(0x86)" in str(error)
    assert "PUMPGW_MQTT__PASSWORD" in str(error)


def test_denied_publish_names_topic_and_reason() -> None:
    error = publish_denial(0x87, "Not authorized", "p/s/t/pumps/P1/telemetry")
    assert (error.reason_code, error.topic) == (0x87, "p/s/t/pumps/P1/telemetry")
    assert "Not authorized (0x87)" in str(error)
    assert "stay in the outbox" in str(error)


def test_publish_return_codes() -> None:
    assert publish_problem(MQTTErrorCode.MQTT_ERR_SUCCESS) is None
    assert publish_problem(MQTTErrorCode.MQTT_ERR_NO_CONN) == "not connected"
    assert publish_problem(MQTTErrorCode.MQTT_ERR_QUEUE_SIZE) == "paho's queue is full"


# --- the delivery window ----------------------------------------------------------------------


def rows(*seqs: int) -> list[StoredRecord]:
    return [StoredRecord(s, "reading", f"P1:b:{s}", "P1", b"{}", None, False, 0.0) for s in seqs]


def test_lane_acknowledges_only_the_contiguous_prefix() -> None:
    lane = _Lane(after_seq=10)
    slots = lane.take(rows(11, 12, 13), asked=3)
    slots[1].acked = True
    assert not lane.advance()
    assert lane.acked_to == 10
    slots[0].acked = True
    assert lane.advance()
    assert lane.acked_to == 12
    assert list(lane.slots) == [13]


def test_lost_connection_makes_unacknowledged_slots_due_again() -> None:
    lane = _Lane(after_seq=0)
    first, second = lane.take(rows(1, 2), asked=2)
    first.mid, second.mid, second.acked = 7, 8, True
    first.retry_at_s = 99.0
    lane.unsend()
    assert [s.record.seq for s in lane.due(now_m=0.0)] == [1]


def test_bounded_lane_stops_at_its_upper_seq_and_jumps_gaps_when_done() -> None:
    lane = _Lane(after_seq=0, upto_seq=5)
    taken = lane.take(rows(1, 3, 6, 7), asked=4)
    assert [s.record.seq for s in taken] == [1, 3]
    assert lane.read_all
    for slot in taken:
        slot.acked = True
    assert lane.advance()
    assert lane.done
    assert lane.acked_to == 5


def test_replay_bucket_limits_the_rate() -> None:
    bucket = _Bucket(rate_per_s=160.0)
    now = 1024.0
    bucket.refill(now)
    bucket.tokens = 0.0
    assert bucket.refill(now + 1 / 32) == 5
    assert bucket.refill(now + 60.0) == 16, "a long pause earns at most 0.1 s worth"
    bucket.tokens = 0.5
    assert bucket.wait_s() == pytest.approx(0.5 / 160)
