"""The server fixtures start real private servers that behave as the gateway's tests need."""

from __future__ import annotations

import queue
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests import servers
from tests.servers import (
    Influx1,
    Mosquitto,
    MosquittoFactory,
    MosquittoTls,
    Pki,
    VictoriaMetrics,
    http_request,
)

WAIT_S = 5.0


# Raw paho on purpose: it tests the broker fixture itself, with reconnect_on_failure=False
# (the seam always reconnects) and a CONNACK of None when the broker hangs up first.
class MqttProbe:
    """A paho client whose CONNACKs, SUBACKs and messages land in queues a test waits on."""

    def __init__(self, client_id: str = "", *, clean_session: bool = True) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            reconnect_on_failure=False,  # a test makes a new probe to reconnect
        )
        self.connacks: queue.Queue[ReasonCode | None] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def connect(self, port: int) -> ReasonCode | None:
        """Connect and return the CONNACK reason code, None if the broker hung up first."""
        self.client.connect(servers.LOOPBACK, port)
        self.client.loop_start()
        try:
            return self.connacks.get(timeout=WAIT_S)
        except queue.Empty:
            return None

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK's reason code."""
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=WAIT_S)[0]

    def next_message(self) -> mqtt.MQTTMessage:
        """Wait for the next message delivered to this client."""
        return self.messages.get(timeout=WAIT_S)

    def __enter__(self) -> MqttProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connacks.put(reason_code)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connacks.put(None)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self.subacks.put(reason_codes)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)


def unique(prefix: str) -> str:
    """Return a name no other test uses (topics, measurements, databases)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def connack(broker: Mosquitto, port: int | None = None, **credentials: str) -> ReasonCode | None:
    """Connect a fresh client to the broker's plain port with optional username/password."""
    with MqttProbe() as probe:
        if credentials:
            probe.client.username_pw_set(credentials["username"], credentials["password"])
        return probe.connect(port or broker.port)


def succeeded(reason_code: ReasonCode | None) -> bool:
    """Whether a CONNACK came and said success."""
    return reason_code is not None and not reason_code.is_failure


def tls_handshake_error(probe: MqttProbe, port: int) -> OSError | None:
    """Connect expecting TLS to fail; return the error, or None if a CONNACK said success."""
    try:
        reason_code = probe.connect(port)
    except OSError as exc:  # ssl.SSLError, or a reset when the server refuses our certificate
        close_sockets_left_in(exc)
        return exc
    if reason_code is None:
        return ConnectionResetError("the broker closed the connection before CONNACK")
    return None if succeeded(reason_code) else ConnectionRefusedError(f"CONNACK {reason_code}")


def close_sockets_left_in(exc: BaseException) -> None:
    """Close the sockets a failed connect left open (paho 2.2 leaks one on a TLS failure)."""
    traceback = exc.__traceback__
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if isinstance(value, socket.socket):
                value.close()
        traceback = traceback.tb_next


# --- Mosquitto --------------------------------------------------------------------------


@pytest.mark.integration
def test_mosquitto_delivers_a_published_message_to_a_subscriber(mosquitto: Mosquitto) -> None:
    topic = unique("test/pubsub")
    with MqttProbe() as subscriber, MqttProbe() as publisher:
        assert subscriber.connect(mosquitto.port) == 0
        assert not subscriber.subscribe(topic).is_failure
        assert publisher.connect(mosquitto.port) == 0
        publisher.client.publish(topic, b"reservoir 12.5", qos=1).wait_for_publish(WAIT_S)
        message = subscriber.next_message()
    assert (message.topic, message.payload) == (topic, b"reservoir 12.5")


@pytest.mark.integration
def test_password_broker_rejects_a_wrong_password_and_accepts_the_right_one(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory(users={"gateway": "s3cret"})
    rejected = connack(broker, username="gateway", password="wrong")
    anonymous = connack(broker)
    accepted = connack(broker, username="gateway", password="s3cret")
    assert not succeeded(rejected)
    assert not succeeded(anonymous)
    assert succeeded(accepted)


@pytest.mark.integration
def test_user_added_while_running_can_connect(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(users={"gateway": "s3cret"})
    broker.add_user("dashboard", "0ther")
    assert succeeded(connack(broker, username="dashboard", password="0ther"))


@pytest.mark.integration
def test_acl_broker_delivers_only_the_topics_a_user_may_read(
    mosquitto_factory: MosquittoFactory,
) -> None:
    acl = "user gateway\ntopic write #\n\nuser dashboard\ntopic read pumps/#\n"
    broker = mosquitto_factory(users={"gateway": "s3cret", "dashboard": "0ther"}, acl=acl)
    with MqttProbe() as dashboard, MqttProbe() as gateway:
        dashboard.client.username_pw_set("dashboard", "0ther")
        gateway.client.username_pw_set("gateway", "s3cret")
        assert dashboard.connect(broker.port) == 0
        assert gateway.connect(broker.port) == 0
        # Mosquitto grants every SUBSCRIBE and applies the ACL when it delivers.
        dashboard.subscribe("#")
        for topic in ("gateway/secrets", "pumps/p1/telemetry"):
            gateway.client.publish(topic, b"x", qos=1).wait_for_publish(WAIT_S)
        first = dashboard.next_message()  # in order: had the secret passed, it came first
    assert first.topic == "pumps/p1/telemetry"


@pytest.mark.integration
def test_broker_restart_keeps_persistent_sessions_and_queued_messages(
    mosquitto: Mosquitto,
) -> None:
    topic, client_id = unique("test/outage"), unique("subscriber")
    with MqttProbe(client_id, clean_session=False) as subscriber:
        assert subscriber.connect(mosquitto.port) == 0
        assert not subscriber.subscribe(topic).is_failure
    mosquitto.stop()
    assert not servers.accepts_tcp(mosquitto.port)
    mosquitto.start()
    with MqttProbe() as publisher:
        assert publisher.connect(mosquitto.port) == 0
        publisher.client.publish(topic, b"queued", qos=1).wait_for_publish(WAIT_S)
    with MqttProbe(client_id, clean_session=False) as subscriber:
        assert subscriber.connect(mosquitto.port) == 0
        assert subscriber.next_message().payload == b"queued"


@pytest.mark.integration
def test_tls_broker_accepts_a_client_trusting_the_test_ca(
    mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    assert broker.tls_port is not None
    with MqttProbe() as probe:
        probe.client.tls_set(ca_certs=str(pki.ca_cert))
        assert probe.connect(broker.tls_port) == 0


@pytest.mark.integration
def test_tls_client_trusting_a_rogue_ca_fails_verification(
    mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    assert broker.tls_port is not None
    with MqttProbe() as probe:
        probe.client.tls_set(ca_certs=str(pki.rogue_ca_cert))
        assert isinstance(tls_handshake_error(probe, broker.tls_port), ssl.SSLCertVerificationError)


@pytest.mark.integration
def test_tls_broker_requiring_certificates_tells_signed_from_rogue_clients(
    mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki, require_certificate=True))
    assert broker.tls_port is not None
    with MqttProbe() as signed:
        signed.client.tls_set(str(pki.ca_cert), str(pki.client_cert), str(pki.client_key))
        assert signed.connect(broker.tls_port) == 0
    with MqttProbe() as rogue:
        rogue.client.tls_set(
            str(pki.ca_cert), str(pki.rogue_client_cert), str(pki.rogue_client_key)
        )
        assert tls_handshake_error(rogue, broker.tls_port) is not None


# --- VictoriaMetrics --------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/write", "/api/v2/write?org=clinic&bucket=pumps"])
def test_victoria_metrics_exports_influx_lines_written_to_it(
    victoria_metrics: VictoriaMetrics, path: str
) -> None:
    measurement = unique("test_vm")
    line = f"{measurement},pump=p1 reservoir_ml=12.5"
    response = http_request("POST", f"{victoria_metrics.url}{path}", body=line.encode())
    assert response.status == 204
    series = victoria_metrics.export(f'{{__name__="{measurement}_reservoir_ml"}}')
    assert len(series) == 1
    assert series[0]["metric"]["pump"] == "p1"
    assert series[0]["values"] == [12.5]


@pytest.mark.integration
def test_victoria_metrics_keeps_data_across_an_outage(victoria_metrics: VictoriaMetrics) -> None:
    measurement = unique("test_vm_outage")
    write_url = f"{victoria_metrics.url}/write"
    http_request("POST", write_url, body=f"{measurement} flow_ml=1".encode())
    victoria_metrics.stop()
    assert servers.http_status(f"{victoria_metrics.url}/health") is None
    victoria_metrics.start()
    http_request("POST", write_url, body=f"{measurement} flow_ml=2".encode())
    series = victoria_metrics.export(f'{{__name__="{measurement}_flow_ml"}}', min_points=2)
    assert sorted(series[0]["values"]) == [1, 2]


# --- InfluxDB 1.x -----------------------------------------------------------------------


def select_all(influx1: Influx1, measurement: str, db: str) -> dict[str, Any]:
    """Return the one series of SELECT * FROM measurement: its columns and values."""
    statement = f'SELECT * FROM "{measurement}"'  # noqa: S608 -- a name the test made
    series: dict[str, Any] = influx1.query(statement, db=db)["results"][0]["series"][0]
    return series


@pytest.mark.integration
def test_influx1_returns_a_written_value_from_select(influx1: Influx1) -> None:
    db, measurement = unique("db"), unique("pump")
    influx1.create_database(db)
    influx1.write(db, f"{measurement},pump=p1 reservoir_ml=12.5")
    series = select_all(influx1, measurement, db)
    assert series["columns"] == ["time", "pump", "reservoir_ml"]
    assert series["values"][0][1:] == ["p1", 12.5]


@pytest.mark.integration
def test_influx1_keeps_data_across_a_restart(influx1: Influx1) -> None:
    db, measurement = unique("db"), unique("pump")
    influx1.create_database(db)
    influx1.write(db, f"{measurement} battery_pct=80")
    influx1.restart()
    assert [row[1:] for row in select_all(influx1, measurement, db)["values"]] == [[80]]


# --- start-up failures ------------------------------------------------------------------


def test_missing_binary_error_names_the_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(servers, "SBIN_DIRS", ())
    with pytest.raises(RuntimeError, match="install the Debian package 'mosquitto'"):
        Mosquitto(tmp_path)
    with pytest.raises(RuntimeError, match="install the Debian package 'influxdb'"):
        Influx1(tmp_path)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other socket is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((servers.LOOPBACK, 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.integration
def test_start_picks_another_port_when_the_first_is_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, taken_port: int
) -> None:
    kernel_port = servers.free_port
    ports = iter([taken_port])
    monkeypatch.setattr(servers, "free_port", lambda: next(ports, None) or kernel_port())
    with Mosquitto(tmp_path) as broker:
        assert broker.port != taken_port
        assert connack(broker) == 0
