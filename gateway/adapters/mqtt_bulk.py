"""paho's client reading and acknowledging in bulk, for a subscriber taking thousands of
messages a second (`pumpgw ingest`: BulkClient), and the station sink's client
(ReadsBeforeCloseClient: the broker's last packets handled before a lost connection).

Stock paho reads each packet with three or more recv() calls (its type byte, each length
byte, its body) and one select() per packet, and sends each PUBACK with a send() of its own
after waking its thread through a socket pair. Each of those calls gives up the GIL and
takes it back, and the worker thread that validates and commits the messages needs it:
under a backlog paho's thread used about as much CPU as the worker's. BulkClient changes
how bytes move, never what they say:

- `_sock_recv` reads up to READ_CHUNK_BYTES at once and serves paho's small reads from that
  chunk; `loop_read` goes on while the chunk holds bytes, so a buffered packet never waits
  in select() (paho does the same for TLS's own buffer through `pending()`); `_sock_close`
  drops the chunk together with the connection it came from.
- `ack_many` queues the PUBACKs of many QoS 1 messages as one write and wakes paho's thread
  once.
- A QoS 1 PUBLISH for manual acknowledgement is decoded without its MQTT 5 properties
  (`message.properties` is None): paho builds a Properties object for every message, about
  8 µs, and the ingest reads none of them. Anything else (QoS 0 or 2, automatic acks, a
  packet that does not parse, paho's debug log on) goes through paho's own decoding.

It overrides private paho methods (paho-mqtt 2.x: pyproject.toml pins <3); the unit tests
and tests/integration/test_ingest*.py run it against a real Mosquitto.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK_BYTES: Final = 65_536
READ_PACKETS_MAX: Final = 2_000
"""Packets one `loop_read` hands on before paho's loop writes (acks, pings) again."""
_PUBACK: Final = struct.Struct("!BBH")
"""A PUBACK without reason code or properties (success): the same in MQTT 3.1.1 and 5."""


class ReadsBeforeCloseClient(mqtt.Client):
    """A paho client that, when a write finds the connection closed, first handles the
    packets the broker sent before closing. The station's MQTT sink writes PUBLISH bursts
    from the thread that also reads, so without this a denial could go unheard: Mosquitto
    2.0 answers a denied PUBLISH with PUBACK 0x87 and then closes, and the next write fails
    before the thread reads again. paho then handles the lost connection as always."""

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except BlockingIOError:
            raise
        except OSError:
            self._read_last_packets()
            raise

    def _read_last_packets(self) -> None:
        """Handle every whole packet still readable (a closed socket keeps what it received)."""
        for _ in range(READ_PACKETS_MAX):
            if self._sock is None or self._packet_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return


class ChunkedReadClient(ReadsBeforeCloseClient):
    """Socket reads in chunks: one recv() for every packet that has arrived, not three or
    more per packet."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._chunk_pos = 0

    def buffered_bytes(self) -> int:
        """Bytes read from the socket that paho has not parsed yet."""
        return len(self._chunk) - self._chunk_pos

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._chunk_pos >= len(self._chunk):
            chunk = super()._sock_recv(max(bufsize, READ_CHUNK_BYTES))
            if not chunk:
                return chunk  # the connection closed: paho handles it as before
            self._chunk, self._chunk_pos = chunk, 0
        start = self._chunk_pos
        end = self._chunk_pos = min(start + bufsize, len(self._chunk))
        return self._chunk[start:end]

    def _sock_close(self) -> None:
        self._chunk, self._chunk_pos = b"", 0
        super()._sock_close()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        for _ in range(READ_PACKETS_MAX):
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is None:
                break
            if not self.buffered_bytes():
                break
            rc = super().loop_read(max_packets)
        return rc


class BulkClient(ChunkedReadClient):
    """Chunked reads, plus PUBACKs sent in batches and QoS 1 PUBLISH decoded without its
    properties (`pumpgw ingest`)."""

    def _handle_publish(self) -> MQTTErrorCode:
        command, packet = self._in_packet["command"], self._in_packet["packet"]
        if (command & 0x06) >> 1 != 1 or not self._manual_ack or self._logger is not None:
            return super()._handle_publish()
        parsed = _qos1_publish(packet, with_properties=self._protocol == mqtt.MQTTv5)
        if parsed is None:
            return super()._handle_publish()  # paho reports what is wrong with it
        topic, mid, payload_at = parsed
        message = mqtt.MQTTMessage(mid=mid, topic=topic)
        message.dup = bool(command & 0x08)
        message.qos = 1
        message.retain = bool(command & 0x01)
        message.payload = bytes(packet[payload_at:])
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Iterable[int]) -> None:
        """PUBACK these QoS 1 messages (manual_ack) in one queued write; a no-op for none."""
        packet = b"".join(_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids)
        if packet:
            self._packet_queue(mqtt.PUBACK, packet, 0, 1)


def _qos1_publish(
    packet: bytes | bytearray, *, with_properties: bool
) -> tuple[bytes, int, int] | None:
    """(topic, packet id, where the payload starts) of a QoS 1 PUBLISH body; None if malformed.

    The body: topic length (2 bytes), topic, packet id (2 bytes), then in MQTT 5 the
    properties' length (a variable byte integer) and the properties, then the payload.
    """
    topic_end = 2 + int.from_bytes(packet[0:2], "big")
    at = topic_end + 2
    if len(packet) < at or (topic_end == 2 and not with_properties):
        return None  # too short, or MQTT 3.1.1's forbidden empty topic
    mid = int.from_bytes(packet[topic_end:at], "big")
    if with_properties:
        length = _variable_int(packet, at)
        if length is None:
            return None
        value, used = length
        at += used + value
        if at > len(packet):
            return None
    return bytes(packet[2:topic_end]), mid, at


def _variable_int(packet: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, bytes used) of the variable byte integer at `at`; None if cut off or too long."""
    value = 0
    for used in range(4):
        if at + used >= len(packet):
            return None
        byte = packet[at + used]
        value |= (byte & 0x7F) << (7 * used)
        if not byte & 0x80:
            return value, used + 1
    return None
