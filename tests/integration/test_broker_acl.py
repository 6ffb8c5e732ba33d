"""Each broker role's allowed and refused operations, and the attacks on them, against a real
Mosquitto running deploy/mosquitto's config, ACL and make-passwd.sh (users and roles) as shipped.

Users (deploy/mosquitto/users.env.example): the station `demo/ward-sim`, the ingest workers
`ingest-1` and `ingest-2`, the dashboards `dashboard` and `technician`. docs/security.md has the
threat table these tests prove.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.integration.test_deploy import COMPOSE_CONFIG, USERS, ComposeMosquitto

pytestmark = pytest.mark.integration

WAIT_S = 20.0
NOT_AUTHORIZED = 0x87
STATION = USERS["MQTT_GATEWAY_USER"]  # demo/ward-sim
ROOT = f"pumpgw/{STATION}"
OTHER_ROOT = "pumpgw/demo/bed-12"
PASSWORDS = {
    STATION: USERS["MQTT_GATEWAY_PASSWORD"],
    "ingest-1": USERS["MQTT_INGEST_PASSWORD"],
    "ingest-2": USERS["MQTT_INGEST_PASSWORD"],
    "dashboard": USERS["MQTT_DASHBOARD_PASSWORD"],
    "technician": USERS["MQTT_TECHNICIAN_PASSWORD"],
}
ACCEPTED = (0x00, 0x10)
"""PUBACK: success, or success with no matching subscribers."""
SHARED_TELEMETRY = "$share/pumpgw-ingest/pumpgw/+/+/pumps/+/telemetry"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ComposeMosquitto]:
    with ComposeMosquitto(tmp_path / "mosquitto") as server:
        yield server


# Raw paho on purpose: the ACL checks need the WebSocket transport, each SUBACK's reason
# code per call and a count of disconnects, which the gateway's MqttClient seam does not expose.
class Client:
    """A blocking MQTT 5 client: each call waits for the broker's answer."""

    def __init__(self, broker: ComposeMosquitto, user: str, *, client_id: str | None = None,
                 websockets: bool = False) -> None:  # fmt: skip
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            transport="websockets" if websockets else "tcp",
            client_id=client_id or f"c-{uuid.uuid4().hex[:8]}",
        )
        self.client.username_pw_set(user, PASSWORDS[user])
        self.answers: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.messages: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self.disconnects = 0
        self.client.on_connect = lambda c, u, f, rc, p: self.answers.put(("connack", rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.answers.put(("suback", rcs))
        self.client.on_publish = lambda c, u, mid, rc, p: self.answers.put(("puback", rc))
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_disconnect = self._on_disconnect
        self.port = broker.ws_port if websockets else broker.port

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnects += 1

    def connect(self, *, session_expiry_s: int = 0) -> ReasonCode:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        self.client.connect("127.0.0.1", self.port, clean_start=session_expiry_s == 0,
                            properties=props)  # fmt: skip
        self.client.loop_start()
        code: ReasonCode = self._answer("connack")
        return code

    def subscribe(self, topic_filter: str) -> int:
        self.client.subscribe(topic_filter, qos=1)
        codes = self._answer("suback")
        return int(codes[0].value)

    def publish(self, topic: str, payload: bytes = b"{}", *, retain: bool = False) -> int:
        self.client.publish(topic, payload, qos=1, retain=retain)
        return int(self._answer("puback").value)

    def topics_until(self, last: str) -> list[str]:
        """Topics received up to and including `last` (a marker published after the rest)."""
        seen: list[str] = []
        while not seen or seen[-1] != last:
            seen.append(self.messages.get(timeout=WAIT_S).topic)
        return seen

    def _answer(self, kind: str) -> Any:
        got, value = self.answers.get(timeout=WAIT_S)
        assert got == kind, (got, value)
        return value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(broker: ComposeMosquitto) -> Iterator[Any]:
    clients: list[Client] = []

    def make(user: str, **options: Any) -> Client:
        session_expiry_s = options.pop("session_expiry_s", 0)
        client = Client(broker, user, **options)
        clients.append(client)
        code = client.connect(session_expiry_s=session_expiry_s)
        assert not code.is_failure, f"{user}: {code}"
        return client

    yield make
    for client in clients:
        client.close()


# --- stations -----------------------------------------------------------------------------


def test_a_station_publishes_its_own_tree_and_nothing_of_another_station(connect: Any) -> None:
    station = connect(STATION)
    leaves = ("pumps/P0001/telemetry", "pumps/P0001/events", "pumps/P0001/alerts",
              "pumps/P0001/alerts/active", "pumps/P0001/status", "pumps/P0001/info",
              "gateway/status", "gateway/alerts", "gateway/alerts/active",
              "deadletter")  # fmt: skip
    for leaf in leaves:
        assert station.publish(f"{ROOT}/{leaf}") in ACCEPTED, leaf
    for topic in (
        f"{OTHER_ROOT}/pumps/P0001/telemetry",  # another station's readings
        f"{OTHER_ROOT}/gateway/status",  # its retained birth: a forged "online"/"offline"
        f"{OTHER_ROOT}/pumps/P0001/alerts/active",  # a forged "all clear"
        "pumpgw/other-site/ward-sim/pumps/P0001/telemetry",  # the same station name elsewhere
        f"{ROOT}/ack/dashboard",  # an operator's acknowledgement
        f"{ROOT}/ack",
    ):
        assert station.publish(topic, retain=True) == NOT_AUTHORIZED, topic


def test_a_station_reads_only_acknowledgements_sent_to_it(connect: Any) -> None:
    station, dashboard = connect(STATION), connect("dashboard")
    assert station.subscribe("pumpgw/#") == 1  # granted; each message is checked on delivery
    assert dashboard.publish(f"{OTHER_ROOT}/ack/dashboard") in ACCEPTED  # another station's
    assert dashboard.publish(f"{ROOT}/ack/dashboard") in ACCEPTED
    assert station.topics_until(f"{ROOT}/ack/dashboard") == [f"{ROOT}/ack/dashboard"]


def test_a_station_cannot_join_the_workers_shared_group(connect: Any) -> None:
    station = connect(STATION)
    assert station.subscribe(SHARED_TELEMETRY) == NOT_AUTHORIZED
    assert station.subscribe("$share/any/pumpgw/#") == NOT_AUTHORIZED


# --- dashboards and the technical role ------------------------------------------------------


@pytest.mark.parametrize("user", ["dashboard", "technician"])
def test_a_dashboard_reads_everything_and_acknowledges_only_as_itself(
    connect: Any, user: str
) -> None:
    station = connect(STATION)
    dashboard = connect(user, websockets=True)
    assert dashboard.subscribe("pumpgw/#") == 1
    assert station.publish(f"{ROOT}/pumps/P0001/telemetry") in ACCEPTED
    assert dashboard.publish(f"{ROOT}/ack/{user}") in ACCEPTED
    assert dashboard.topics_until(f"{ROOT}/ack/{user}") == [
        f"{ROOT}/pumps/P0001/telemetry",
        f"{ROOT}/ack/{user}",
    ]
    other = "technician" if user == "dashboard" else "dashboard"
    for topic in (
        f"{ROOT}/ack/{other}",  # acknowledging under someone else's name
        f"{ROOT}/ack",  # without a name
        f"{ROOT}/pumps/P0001/telemetry",
        f"{ROOT}/gateway/status",
        f"{ROOT}/pumps/P0001/alerts/active",
        f"pumpgw/{user}/pumps/P0001/telemetry",  # what the station patterns give a plain name
        f"pumpgw/{user}/gateway/status",
        f"pumpgw/{user}/deadletter",
    ):
        assert dashboard.publish(topic) == NOT_AUTHORIZED, topic


@pytest.mark.parametrize("shared", [SHARED_TELEMETRY, "$share/other/pumpgw/#"])
def test_a_dashboard_is_refused_from_shared_groups(connect: Any, shared: str) -> None:
    dashboard = connect("dashboard")
    assert dashboard.subscribe(shared) == NOT_AUTHORIZED


def test_a_dashboard_cannot_steal_the_workers_share(connect: Any) -> None:
    """The attack: join $share/pumpgw-ingest/... and take (then drop) a part of every reading."""
    worker = connect("ingest-1", session_expiry_s=3600)
    assert worker.subscribe(SHARED_TELEMETRY) == 1
    thief = connect("dashboard")
    assert thief.subscribe(SHARED_TELEMETRY) == NOT_AUTHORIZED
    station = connect(STATION)
    topics = [f"{ROOT}/pumps/P{n:04d}/telemetry" for n in range(20)]
    for topic in topics:
        assert station.publish(topic) in ACCEPTED
    assert worker.topics_until(topics[-1]) == topics
    assert thief.messages.empty()


@pytest.mark.parametrize("victim", ["ingest-1", STATION])
def test_nobody_takes_over_a_session_by_reusing_its_client_id(
    broker: ComposeMosquitto, connect: Any, victim: str
) -> None:
    """A dashboard connecting with a worker's or a station's client id gets its own session."""
    target = connect(victim, client_id=victim, session_expiry_s=3600)
    target_filter = SHARED_TELEMETRY if victim == "ingest-1" else f"{ROOT}/ack/+"
    assert target.subscribe(target_filter) == 1
    for _ in range(3):
        intruder = connect("dashboard", client_id=victim)  # clean start: would wipe a session
        intruder.close()
    if victim == "ingest-1":
        sender, marker = connect(STATION), f"{ROOT}/pumps/P0001/telemetry"
    else:
        sender, marker = connect("technician"), f"{ROOT}/ack/technician"
    assert sender.publish(marker) in ACCEPTED
    assert target.topics_until(marker) == [marker]
    assert target.disconnects == 0
    assert "already connected, closing old connection" not in broker.broker_log.read_text()


# --- ingest workers -------------------------------------------------------------------------


def test_a_worker_reads_points_through_its_group_and_publishes_nothing(connect: Any) -> None:
    worker = connect("ingest-2")
    assert worker.subscribe(SHARED_TELEMETRY) == 1
    assert worker.subscribe("$share/pumpgw-ingest/pumpgw/+/+/gateway/alerts") == 1
    assert worker.subscribe("$share/another-group/pumpgw/#") == NOT_AUTHORIZED
    assert worker.subscribe("pumpgw/#") == 1  # granted; delivery is limited to points
    station = connect(STATION)
    for leaf in ("gateway/status", "pumps/P0001/status", "pumps/P0001/telemetry"):
        assert station.publish(f"{ROOT}/{leaf}") in ACCEPTED
    telemetry = f"{ROOT}/pumps/P0001/telemetry"
    assert worker.topics_until(telemetry) == [telemetry]  # not the statuses before it
    for topic in (f"{ROOT}/gateway/status", f"{ROOT}/ack/ingest-2", telemetry,
                  "pumpgw/ingest-2/gateway/status"):  # fmt: skip
        assert worker.publish(topic) == NOT_AUTHORIZED, topic


# --- pumpgw tail --config -------------------------------------------------------------------


def test_tail_with_a_config_connects_with_its_user_and_password(
    broker: ComposeMosquitto, connect: Any
) -> None:
    """Without the config's credentials the shipped broker refuses tail (exit 1)."""
    env = {
        **os.environ,
        "PUMPGW_MQTT__URL": f"mqtt://127.0.0.1:{broker.port}",
        "PUMPGW_MQTT__USERNAME": "technician",
        "PUMPGW_MQTT__PASSWORD": PASSWORDS["technician"],
    }
    argv = [sys.executable, "-m", "gateway.cli", "tail", "--config", str(COMPOSE_CONFIG)]
    tail = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)  # fmt: skip
    try:
        assert tail.stdout is not None
        while "subscribed to" not in (line := tail.stdout.readline()):
            assert line, "tail ended before subscribing"
        station = connect(STATION)
        assert station.publish(f"{ROOT}/gateway/status", b"not json") in ACCEPTED
        while "gateway/status" not in (line := tail.stdout.readline()):
            assert line, "tail ended before the message"
    finally:
        tail.terminate()
        tail.communicate(timeout=WAIT_S)
    refused = subprocess.run([sys.executable, "-m", "gateway.cli", "tail", "--url",
                              f"mqtt://127.0.0.1:{broker.port}"], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
