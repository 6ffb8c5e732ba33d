"""MQTT adapter without a broker: settings validation, secrets, the paho seam, the window."""

from __future__ import annotations

from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTErrorCode
from pydantic import ValidationError

from gateway.adapters.mqtt import publish_denial
from gateway.adapters.mqtt_client import (
    MqttConfigError,
    MqttSettings,
    MqttTls,
    connect_refusal,
    publish_problem,
)


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
