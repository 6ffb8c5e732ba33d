"""The embedded demo broker against real paho-mqtt 2.x clients, MQTT 5 and 3.1.1."""

from __future__ import annotations

import queue
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.broker import EmbeddedBroker

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0
V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
PROTOCOLS = pytest.mark.parametrize("protocol", [V5, V311], ids=["mqtt5", "mqtt311"])


class Inbox:
    """Messages a client received, handed from paho's thread through a queue."""

    def __init__(self) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()

    def on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def take(self, count: int) -> list[mqtt.MQTTMessage]:
        return [self.messages.get(timeout=TIMEOUT_S) for _ in range(count)]

    def take_until(self, topic: str) -> list[mqtt.MQTTMessage]:
        """Everything received before the marker message on `topic` (which is not included)."""
        taken = []
        while (message := self.messages.get(timeout=TIMEOUT_S)).topic != topic:
            taken.append(message)
        return taken


ClientFactory = Callable[..., tuple[mqtt.Client, Inbox]]


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as started:
        yield started


@pytest.fixture
def connect(broker: EmbeddedBroker) -> Iterator[ClientFactory]:
    """Connected paho clients with a running network loop; all disconnected after the test."""
    clients: list[mqtt.Client] = []

    def factory(
        protocol: MQTTProtocolVersion = V5,
        will: tuple[str, bytes] | None = None,
        start_loop: bool = True,
    ) -> tuple[mqtt.Client, Inbox]:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        inbox = Inbox()
        client.on_message = inbox.on_message
        if will is not None:
            client.will_set(will[0], will[1], qos=1)
        clients.append(client)
        connected = threading.Event()
        client.on_connect = lambda *_args: connected.set()
        client.connect("127.0.0.1", broker.port, keepalive=30)
        if start_loop:
            client.loop_start()
            assert connected.wait(TIMEOUT_S), "no CONNACK from the embedded broker"
        else:
            while not connected.is_set():
                client.loop(timeout=0.1)
        return client, inbox

    yield factory
    for client in clients:
        client.disconnect()
        client.loop_stop()


def subscribe(client: mqtt.Client, topic_filter: str, qos: int = 1) -> list[Any]:
    """Subscribe and wait for the SUBACK; return the granted reason codes."""
    done: queue.Queue[list[Any]] = queue.Queue()
    client.on_subscribe = lambda _c, _u, _mid, codes, _p: done.put(list(codes))
    result, _ = client.subscribe(topic_filter, qos=qos)
    assert result == mqtt.MQTT_ERR_SUCCESS
    return done.get(timeout=TIMEOUT_S)


def unique(name: str) -> str:
    return f"test/{uuid.uuid4().hex[:8]}/{name}"


@PROTOCOLS
def test_qos1_publish_is_acknowledged_and_delivered(
    connect: ClientFactory, protocol: MQTTProtocolVersion
) -> None:
    subscriber, inbox = connect(protocol)
    publisher, _ = connect(protocol)
    topic = unique("telemetry")
    granted = subscribe(subscriber, topic, qos=1)
    acked: queue.Queue[tuple[int, Any]] = queue.Queue()
    publisher.on_publish = lambda _c, _u, mid, code, _p: acked.put((mid, code))

    info = publisher.publish(topic, b"reading 1", qos=1)

    mid, code = acked.get(timeout=TIMEOUT_S)
    assert mid == info.mid
    assert not code.is_failure
    assert [code.value for code in granted] == [1]
    (message,) = inbox.take(1)
    assert (message.topic, message.payload, message.qos, message.retain) == (
        topic,
        b"reading 1",
        1,
        False,
    )


@PROTOCOLS
def test_subscription_is_granted_at_most_qos1(
    connect: ClientFactory, protocol: MQTTProtocolVersion
) -> None:
    client, _ = connect(protocol)

    granted = subscribe(client, unique("x"), qos=2)

    assert [code.value for code in granted] == [1]


@PROTOCOLS
def test_retained_message_reaches_late_subscriber(
    connect: ClientFactory, protocol: MQTTProtocolVersion
) -> None:
    publisher, _ = connect(protocol)
    topic = unique("status")
    publisher.publish(topic, b"old", qos=1, retain=True)
    publisher.publish(topic, b"current", qos=1, retain=True).wait_for_publish(TIMEOUT_S)
    late, inbox = connect(protocol)

    subscribe(late, topic)

    (message,) = inbox.take(1)
    assert (message.payload, message.retain) == (b"current", True)


def test_empty_retained_payload_deletes_the_retained_message(connect: ClientFactory) -> None:
    publisher, _ = connect()
    topic, marker = unique("status"), unique("marker")
    publisher.publish(topic, b"online", qos=1, retain=True)
    publisher.publish(topic, b"", qos=1, retain=True)
    publisher.publish(marker, b"end", qos=1, retain=True).wait_for_publish(TIMEOUT_S)
    late, inbox = connect()

    subscribe(late, topic)
    subscribe(late, marker)

    assert inbox.take_until(marker) == []


@PROTOCOLS
def test_wildcard_filters_match_per_mqtt_rules(
    connect: ClientFactory, protocol: MQTTProtocolVersion
) -> None:
    subscriber, inbox = connect(protocol)
    publisher, _ = connect(protocol)
    root = unique("site")
    subscribe(subscriber, f"{root}/+/pumps/+/telemetry")
    subscribe(subscriber, f"{root}/st1/gateway/#")
    topics = [
        f"{root}/st1/pumps/P1/telemetry",  # yes
        f"{root}/st1/pumps/P1/alerts",  # no
        f"{root}/st2/pumps/P2/telemetry",  # yes
        f"{root}/st1/pumps/P1/telemetry/extra",  # no
        f"{root}/st1/gateway",  # yes: '#' also matches the parent level
        f"{root}/st1/gateway/alerts/active",  # yes
        f"{root}/st2/gateway/status",  # no
    ]
    for topic in [*topics, f"{root}/st1/gateway/end"]:
        publisher.publish(topic, b"x", qos=1)

    received = [m.topic for m in inbox.take_until(f"{root}/st1/gateway/end")]

    assert received == [topics[0], topics[2], topics[4], topics[5]]


@PROTOCOLS
def test_last_will_is_published_when_a_client_drops_without_disconnect(
    connect: ClientFactory, protocol: MQTTProtocolVersion
) -> None:
    watcher, inbox = connect(protocol)
    will_topic = unique("gateway/status")
    subscribe(watcher, will_topic)
    doomed, _ = connect(protocol, will=(will_topic, b"offline"), start_loop=False)

    sock = doomed.socket()
    assert isinstance(sock, socket.socket)
    sock.close()  # no DISCONNECT: the broker sees the connection vanish

    (message,) = inbox.take(1)
    assert (message.topic, message.payload) == (will_topic, b"offline")


def test_last_will_is_discarded_after_a_clean_disconnect(connect: ClientFactory) -> None:
    watcher, inbox = connect()
    will_topic, marker = unique("gateway/status"), unique("marker")
    subscribe(watcher, will_topic)
    subscribe(watcher, marker)
    polite, _ = connect(will=(will_topic, b"offline"))
    gone = threading.Event()
    polite.on_disconnect = lambda *_args: gone.set()

    polite.disconnect()
    assert gone.wait(TIMEOUT_S)
    watcher.publish(marker, b"end", qos=1)

    assert inbox.take_until(marker) == []


@PROTOCOLS
def test_thousand_qos1_messages_arrive_in_order(
    connect: ClientFactory, protocol: MQTTProtocolVersion
) -> None:
    subscriber, inbox = connect(protocol)
    publisher, _ = connect(protocol)
    topic = unique("telemetry")
    subscribe(subscriber, topic)
    count = 1000

    infos = [publisher.publish(topic, str(i).encode(), qos=1) for i in range(count)]

    received = [int(m.payload) for m in inbox.take(count)]
    assert received == list(range(count))
    for info in infos:
        info.wait_for_publish(TIMEOUT_S)
    assert all(info.is_published() for info in infos)


def test_mqtt5_user_properties_are_forwarded(connect: ClientFactory) -> None:
    subscriber, inbox = connect()
    publisher, _ = connect()
    topic = unique("alerts")
    subscribe(subscriber, topic)
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = ("historical", "true")

    publisher.publish(topic, b"{}", qos=1, properties=props)

    (message,) = inbox.take(1)
    assert getattr(message.properties, "UserProperty", None) == [("historical", "true")]


def test_shared_subscription_splits_messages_round_robin(connect: ClientFactory) -> None:
    worker_a, inbox_a = connect()
    worker_b, inbox_b = connect()
    publisher, _ = connect()
    topic = unique("ingest")
    subscribe(worker_a, f"$share/writers/{topic}")
    subscribe(worker_b, f"$share/writers/{topic}")

    for i in range(10):
        publisher.publish(topic, str(i).encode(), qos=1)

    got_a, got_b = inbox_a.take(5), inbox_b.take(5)
    payloads = sorted(int(m.payload) for m in got_a + got_b)
    assert payloads == list(range(10))
    assert inbox_a.messages.empty()
    assert inbox_b.messages.empty()


def test_unsubscribed_filter_receives_nothing(connect: ClientFactory) -> None:
    client, inbox = connect()
    topic, marker = unique("a"), unique("marker")
    subscribe(client, topic)
    subscribe(client, marker)
    done = threading.Event()
    client.on_unsubscribe = lambda *_args: done.set()
    client.unsubscribe(topic)
    assert done.wait(TIMEOUT_S)

    client.publish(topic, b"x", qos=1)
    client.publish(marker, b"end", qos=1)

    assert inbox.take_until(marker) == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length longer than 4 bytes
        b"\x10\x04\x00\x04MQ",  # CONNECT cut short
        b"\x30\x02\x00\x00",  # PUBLISH before CONNECT
        b"\x10\x0c\x00\x04MQTT\x05\x00\x00\x3c\x05\xff",  # MQTT 5 CONNECT, bad property
    ],
    ids=["length", "truncated", "no-connect", "bad-property"],
)
def test_malformed_packet_drops_only_that_client(
    broker: EmbeddedBroker, connect: ClientFactory, garbage: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT_S) as raw:
        raw.sendall(garbage)
        raw.shutdown(socket.SHUT_WR)
        assert raw.recv(64) == b""  # the broker closed it without answering

    subscriber, inbox = connect()
    topic = unique("after")
    subscribe(subscriber, topic)
    subscriber.publish(topic, b"still serving", qos=1)
    assert inbox.take(1)[0].payload == b"still serving"


def test_ping_keeps_an_idle_connection_open(broker: EmbeddedBroker) -> None:
    connack_then_pingresp = b"\x20\x02\x00\x00\xd0\x00"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT_S) as raw:
        raw.sendall(b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02id" + b"\xc0\x00")
        received = b""
        while len(received) < len(connack_then_pingresp):
            chunk = raw.recv(64)
            assert chunk, "broker closed the connection"
            received += chunk
    assert received == connack_then_pingresp


def test_stop_closes_connected_clients(connect: ClientFactory, broker: EmbeddedBroker) -> None:
    client, _ = connect()
    lost = threading.Event()
    client.on_disconnect = lambda *_args: lost.set()

    broker.stop()

    assert lost.wait(TIMEOUT_S)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT_S).close()
