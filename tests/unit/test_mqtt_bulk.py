"""BulkClient: paho's packets read from one chunk and PUBACKs written in one go, byte for byte.

A socket pair stands in for the connection (the ingest integration tests run the client
against a real Mosquitto); paho parses what the far end writes exactly as from a broker.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import CallbackAPIVersion

from gateway.adapters import mqtt_bulk
from gateway.adapters.mqtt_bulk import BulkClient
from gateway.adapters.mqtt_client import PackedProperties


def publish_body(topic: str, payload: bytes, mid: int, properties: bytes = b"\0") -> bytes:
    """An MQTT 5 PUBLISH body at QoS 1; `properties` with their length (none by default)."""
    return (
        len(topic).to_bytes(2, "big")
        + topic.encode()
        + mid.to_bytes(2, "big")
        + properties
        + payload
    )


def publish_packet(topic: str, payload: bytes, mid: int, properties: bytes = b"\0") -> bytes:
    """The whole PUBLISH: fixed header, remaining length, body."""
    body = publish_body(topic, payload, mid, properties)
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (128 if size else 0)])
        if not size:
            break
    return b"\x32" + length + body


@pytest.fixture
def wired() -> Iterator[tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]]]:
    """A client whose socket is one end of a pair; the test writes the broker's bytes."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = BulkClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    received: list[mqtt.MQTTMessage] = []
    client.on_message = lambda _client, _userdata, message: received.append(message)
    client._sock = ours
    yield client, broker, received
    client._sock_close()
    broker.close()


def test_one_loop_read_takes_every_packet_already_buffered(
    wired: tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]],
) -> None:
    client, broker, received = wired
    broker.sendall(b"".join(publish_packet("t/a", b"x%d" % n, n + 1) for n in range(50)))
    client.loop_read()  # stock paho reads one packet per call (per select())
    assert [m.payload for m in received] == [b"x%d" % n for n in range(50)]
    assert [m.mid for m in received] == list(range(1, 51))
    assert client.buffered_bytes() == 0


def test_packets_split_across_chunks_arrive_whole(
    wired: tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, broker, received = wired
    monkeypatch.setattr(mqtt_bulk, "READ_CHUNK_BYTES", 7)
    payloads = [bytes([n]) * (n * 37) for n in range(1, 12)]  # lengths past 127: 2-byte varint
    broker.sendall(b"".join(publish_packet("t/b", p, n + 1) for n, p in enumerate(payloads)))
    for _ in range(200):
        client.loop_read()
        if len(received) == len(payloads):
            break
    assert [m.payload for m in received] == payloads


def test_closing_drops_bytes_of_the_old_connection(
    wired: tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, broker, received = wired
    monkeypatch.setattr(mqtt_bulk, "READ_CHUNK_BYTES", 4096)
    monkeypatch.setattr(mqtt_bulk, "READ_PACKETS_MAX", 0)
    broker.sendall(b"".join(publish_packet("t/c", b"y", n + 1) for n in range(3)))
    client.loop_read()
    assert len(received) == 1
    assert client.buffered_bytes() > 0
    client._sock_close()
    assert client.buffered_bytes() == 0


def test_ack_many_writes_every_puback_in_one_queued_packet(
    wired: tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, broker, _ = wired
    sent: list[bytes] = []
    send = client._sock_send

    def counted(data: bytes | bytearray) -> int:
        sent.append(bytes(data))
        return send(data)

    monkeypatch.setattr(client, "_sock_send", counted)
    client.ack_many([1, 2, 300])
    client.ack_many([])
    client.loop_write()
    assert len(sent) == 1  # one write, not one per message
    broker.settimeout(5)
    assert broker.recv(64) == b"\x40\x02\x00\x01" + b"\x40\x02\x00\x02" + b"\x40\x02\x01\x2c"


@pytest.mark.parametrize(
    "properties",
    [
        b"\x00",
        PackedProperties([("record_id", "P0001:b:7")]).pack(),
        PackedProperties([("record_id", "x" * 200)]).pack(),  # length past 127: two bytes
    ],
)
def test_publish_with_properties_gives_the_topic_id_and_payload_paho_would(
    wired: tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]], properties: bytes
) -> None:
    client, broker, received = wired
    expected = decode_publish(0x32, publish_body("t/x", b'{"a": 1}', 7, properties), mqtt.MQTTv5)
    broker.sendall(publish_packet("t/x", b'{"a": 1}', 7, properties))
    client.loop_read()
    assert len(received) == 1
    message = received[0]
    assert (message.topic.encode(), message.mid, message.payload, message.qos) == (
        expected.topic, expected.mid, expected.payload, 1,
    )  # fmt: skip
    assert message.properties is None  # skipped, not parsed


def test_a_publish_that_does_not_parse_is_left_to_paho(
    wired: tuple[BulkClient, socket.socket, list[mqtt.MQTTMessage]],
) -> None:
    client, broker, received = wired
    broker.sendall(b"\x32\x03\x00\x09t")  # a 9-byte topic in a 3-byte body
    assert client.loop_read() == mqtt.MQTT_ERR_PROTOCOL
    assert received == []


def test_a_write_to_a_closed_connection_first_handles_what_the_broker_said_before_closing() -> None:
    """Mosquitto answers a denied PUBLISH with PUBACK 0x87 and closes: the writer, busy
    sending the next records, must still hear the denial before paho drops the connection."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = mqtt_bulk.ReadsBeforeCloseClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    acked: list[tuple[int, int]] = []
    client.on_publish = lambda _c, _u, mid, reason, _p: acked.append((mid, reason.value))
    client._sock = ours
    try:
        for _ in range(2):
            client.publish("t/denied", b"x", qos=1)  # written before the broker answers
        broker.sendall(bytes([0x40, 3, 0, 1, 0x87]))  # PUBACK mid 1: Not authorized
        broker.close()
        client.loop_write()  # the writes fail: the connection is gone
        client.publish("t/denied", b"y", qos=1)
    finally:
        client._sock_close()
    assert (1, 0x87) in acked
