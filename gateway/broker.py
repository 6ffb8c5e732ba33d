"""An embedded MQTT broker for `pumpgw demo` when Mosquitto is not installed. Demo only.

Standard library only: asyncio on one background thread, listening on loopback. It speaks
MQTT 3.1.1 and 5 well enough for the gateway and paho-mqtt clients: CONNECT/CONNACK,
PUBLISH at QoS 0 and 1 (an inbound QoS 2 is acknowledged and delivered at QoS 1),
SUBSCRIBE/UNSUBSCRIBE with `+` and `#`, `$share/group/filter` (round-robin), retained
messages, last will, keep-alive, PINGREQ and DISCONNECT. MQTT 5 user properties and the
other message properties are forwarded; subscription options No Local, Retain As
Published and Retain Handling are honoured.

Not a production broker: no persistence (every session is clean), no authentication (the
username and password are ignored), no TLS, no flow control. A client that sends a
malformed packet, or whose unsent data passes MAX_CLIENT_BUFFER_BYTES, is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import PumpgwError

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)
MQTT_311: Final = 4
MQTT_5: Final = 5
MAX_PACKET_BYTES: Final = 1024 * 1024
MAX_CLIENT_BUFFER_BYTES: Final = 16 * 1024 * 1024
"""Unsent bytes queued for one subscriber before it is dropped as too slow."""
CONNECT_TIMEOUT_S: Final = 10.0
START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 10.0
KEEPALIVE_GRACE: Final = 1.5
PACKET_IDS: Final = range(1, 65536)
DISCONNECT_WITH_WILL: Final = 0x04
TOPIC_ALIAS: Final = 0x23
ASSIGNED_CLIENT_ID: Final = 0x12
NOT_FORWARDED: Final = frozenset({TOPIC_ALIAS, 0x0B, 0x18})
"""Topic alias, subscription identifier and will delay belong to one hop, not the message.

Topic aliases are not supported: a PUBLISH with an alias and an empty topic is dropped."""
# MQTT 5 property id -> value type: 1, 2 and 4 are fixed byte counts.
PROPERTY_TYPES: Final[dict[int, int | str]] = {
    0x01: 1, 0x02: 4, 0x03: "str", 0x08: "str", 0x09: "bin", 0x0B: "varint", 0x11: 4,
    0x12: "str", 0x13: 2, 0x15: "str", 0x16: "bin", 0x17: 1, 0x18: 4, 0x19: 1, 0x1A: "str",
    0x1C: "str", 0x1F: "str", 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: "pair",
    0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1,
}  # fmt: skip


class ProtocolError(PumpgwError):
    """A malformed or unexpected packet: the client that sent it is dropped."""


class _Parser:
    """Reads MQTT fields from one packet body; raises ProtocolError when it runs short."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise ProtocolError("packet shorter than its fields")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise ProtocolError("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("string is not UTF-8") from exc

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def properties(self) -> list[tuple[int, bytes]]:
        """MQTT 5 properties as (id, encoded property) pairs, so they can be forwarded as-is."""
        block = _Parser(self.take(self.varint()))
        found = []
        while not block.at_end():
            start = block.pos
            prop_id = block.u8()
            kind = PROPERTY_TYPES.get(prop_id)
            if kind is None:
                raise ProtocolError(f"unknown property 0x{prop_id:02x}")
            _skip_value(block, kind)
            found.append((prop_id, block.data[start : block.pos]))
        return found


def _skip_value(block: _Parser, kind: int | str) -> None:
    if isinstance(kind, int):
        block.take(kind)
    elif kind == "varint":
        block.varint()
    else:
        for _ in range(2 if kind == "pair" else 1):
            block.binary()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def _packet(ptype: int, body: bytes, flags: int = 0) -> bytes:
    return bytes([ptype << 4 | flags]) + _varint(len(body)) + body


def _forwardable(props: list[tuple[int, bytes]]) -> bytes:
    return b"".join(raw for prop_id, raw in props if prop_id not in NOT_FORWARDED)


def valid_filter(topic_filter: str) -> bool:
    """Whether a subscription filter is well formed (`#` last and alone, `+` alone)."""
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return bool(topic_filter) and "\x00" not in topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching; wildcards at the first level never match `$` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(frozen=True, slots=True)
class Message:
    """An application message; `props` holds the encoded MQTT 5 properties to forward."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes = b""


@dataclass(frozen=True, slots=True)
class Subscription:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(eq=False)
class _Client:
    client_id: str
    version: int
    writer: asyncio.StreamWriter
    keepalive_s: int
    will: Message | None = None
    subs: dict[str, Subscription] = field(default_factory=dict)
    packet_ids: itertools.cycle[int] = field(default_factory=lambda: itertools.cycle(PACKET_IDS))

    def send(self, data: bytes) -> None:
        """Queue bytes for the client; drop a client that has stopped reading."""
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_CLIENT_BUFFER_BYTES:
            log.warning("embedded broker: dropping %s, it is not reading", self.client_id)
            self.writer.close()
            return
        self.writer.write(data)


@dataclass(eq=False)
class _SharedGroup:
    members: list[tuple[_Client, Subscription]] = field(default_factory=list)
    turn: int = 0

    def next_member(self) -> tuple[_Client, Subscription]:
        self.turn = (self.turn + 1) % len(self.members)
        return self.members[self.turn]


class EmbeddedBroker:
    """A demo MQTT broker on a background thread: `start()`, then `port`, then `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._requested_port = host, port
        self._port: int | None = None
        self._clients: dict[str, _Client] = {}
        self._shared: dict[tuple[str, str], _SharedGroup] = {}
        self._retained: dict[str, Message] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._auto_ids = itertools.count(1)
        self._dispatch: dict[int, Callable[[_Client, int, _Parser], None]] = {
            PUBLISH: self._on_publish,
            PUBACK: _ignore,
            PUBREC: _ignore,
            PUBCOMP: _ignore,
            PUBREL: lambda c, _f, p: c.send(_packet(PUBCOMP, p.take(2))),
            SUBSCRIBE: self._on_subscribe,
            UNSUBSCRIBE: self._on_unsubscribe,
            PINGREQ: lambda c, _f, _p: c.send(_packet(PINGRESP, b"")),
        }

    @property
    def port(self) -> int:
        """The TCP port it listens on (the bound one when started with port 0)."""
        if self._port is None:
            raise RuntimeError("the embedded broker is not started")
        return self._port

    def start(self) -> None:
        """Start listening; return when connections are accepted, raise OSError if it cannot."""
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the embedded broker did not start in time")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        """Close every client and the listening socket, and join the broker thread."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop finished between the check and the call
                loop.call_soon_threadsafe(stopping.set)
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - handed to start() on the caller's thread
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._serve, self._host, self._requested_port)
        self._port = server.sockets[0].getsockname()[1]
        log.info("embedded broker listening on %s:%d (demo only)", self._host, self._port)
        self._ready.set()
        await self._stopping.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client: _Client | None = None
        try:
            ptype, _, body = await asyncio.wait_for(_read_packet(reader), CONNECT_TIMEOUT_S)
            if ptype != CONNECT:
                raise ProtocolError("first packet is not CONNECT")
            client = self._accept(_Parser(body), writer)
            await self._session(client, reader)
        except (ProtocolError, asyncio.IncompleteReadError, TimeoutError, OSError) as exc:
            log.debug("embedded broker: dropping a client: %r", exc)
        finally:
            self._tasks.discard(task)
            if client is not None:
                self._drop(client)
            writer.close()
            with suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _session(self, client: _Client, reader: asyncio.StreamReader) -> None:
        timeout_s = client.keepalive_s * KEEPALIVE_GRACE if client.keepalive_s else None
        while True:
            ptype, flags, body = await asyncio.wait_for(_read_packet(reader), timeout_s)
            if ptype == DISCONNECT:
                self._disconnect(client, body)
                return
            handler = self._dispatch.get(ptype)
            if handler is None:
                raise ProtocolError(f"unexpected packet type {ptype}")
            handler(client, flags, _Parser(body))

    # --- connection -------------------------------------------------------------------

    def _accept(self, body: _Parser, writer: asyncio.StreamWriter) -> _Client:
        name, version = body.text(), body.u8()
        if name != "MQTT" or version not in (MQTT_311, MQTT_5):
            rc = 0x84 if version == MQTT_5 else 0x01
            writer.write(_packet(CONNACK, bytes([0, rc]) + (b"\0" if version == MQTT_5 else b"")))
            raise ProtocolError(f"unsupported protocol {name!r} level {version}")
        flags, keepalive_s = body.u8(), body.u16()
        if flags & 0x01:
            raise ProtocolError("reserved CONNECT flag set")
        if version == MQTT_5:
            body.properties()
        client_id = body.text()
        assigned = not client_id
        client_id = client_id or f"embedded-{next(self._auto_ids)}"
        client = _Client(client_id, version, writer, keepalive_s)
        client.will = _read_will(body, flags, version)
        _ = body.text() if flags & 0x80 else None  # username: no authentication (demo only)
        _ = body.binary() if flags & 0x40 else None  # password
        self._take_over(client)
        props = _string(client_id) if assigned and version == MQTT_5 else b""
        props = bytes([ASSIGNED_CLIENT_ID]) + props if props else b""
        tail = _varint(len(props)) + props if version == MQTT_5 else b""
        client.send(_packet(CONNACK, b"\0\0" + tail))
        log.debug("embedded broker: %s connected (MQTT level %d)", client_id, version)
        return client

    def _take_over(self, client: _Client) -> None:
        old = self._clients.get(client.client_id)
        if old is not None:
            old.writer.close()  # its own task publishes its will and cleans up
            self._forget_shared(old)
        self._clients[client.client_id] = client

    def _disconnect(self, client: _Client, body: bytes) -> None:
        if not (client.version == MQTT_5 and body[:1] == bytes([DISCONNECT_WITH_WILL])):
            client.will = None

    def _drop(self, client: _Client) -> None:
        if self._clients.get(client.client_id) is client:
            del self._clients[client.client_id]
        self._forget_shared(client)
        stopping = self._stopping is not None and self._stopping.is_set()
        if client.will is not None and not stopping:
            self._route(client.will, sender=client)
        client.will = None

    def _forget_shared(self, client: _Client) -> None:
        for group in self._shared.values():
            group.members = [(c, s) for c, s in group.members if c is not client]

    # --- publish ----------------------------------------------------------------------

    def _on_publish(self, client: _Client, flags: int, body: _Parser) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        topic = body.text()
        packet_id = body.take(2) if qos else b""
        props = body.properties() if client.version == MQTT_5 else []
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolError(f"bad topic name {topic!r}")
        message = Message(topic, body.rest(), min(qos, 1), retain, _forwardable(props))
        self._route(message, sender=client)
        reason = b"\0\0" if client.version == MQTT_5 else b""
        if qos:
            client.send(_packet(PUBACK if qos == 1 else PUBREC, packet_id + reason))

    def _route(self, message: Message, sender: _Client) -> None:
        if message.retain:
            self._store_retained(message)
        for client in list(self._clients.values()):
            sub = _best_match(client, message, sender)
            if sub is not None:
                self._deliver(
                    client, message, sub, retain=message.retain and sub.retain_as_published
                )
        for (_, topic_filter), group in self._shared.items():
            if group.members and topic_matches(topic_filter, message.topic):
                target, sub = group.next_member()
                self._deliver(target, message, sub, retain=False)

    def _store_retained(self, message: Message) -> None:
        if message.payload:
            self._retained[message.topic] = message
        else:
            self._retained.pop(message.topic, None)

    def _deliver(
        self, client: _Client, message: Message, sub: Subscription, *, retain: bool
    ) -> None:
        qos = min(message.qos, sub.qos)
        body = _string(message.topic)
        if qos:
            body += next(client.packet_ids).to_bytes(2, "big")
        if client.version == MQTT_5:
            body += _varint(len(message.props)) + message.props
        client.send(_packet(PUBLISH, body + message.payload, flags=qos << 1 | int(retain)))

    # --- subscriptions ----------------------------------------------------------------

    def _on_subscribe(self, client: _Client, flags: int, body: _Parser) -> None:
        if flags != 0x02:
            raise ProtocolError("SUBSCRIBE with bad flags")
        packet_id = body.take(2)
        if client.version == MQTT_5:
            body.properties()
        codes = bytearray()
        while not body.at_end():
            topic_filter, options = body.text(), body.u8()
            codes.append(self._subscribe(client, topic_filter, options))
        if not codes:
            raise ProtocolError("SUBSCRIBE without a topic filter")
        props = b"\0" if client.version == MQTT_5 else b""
        client.send(_packet(SUBACK, packet_id + props + bytes(codes)))

    def _subscribe(self, client: _Client, topic_filter: str, options: int) -> int:
        sub = Subscription(
            qos=min(options & 0x03, 1),
            no_local=client.version == MQTT_5 and bool(options & 0x04),
            retain_as_published=client.version == MQTT_5 and bool(options & 0x08),
            retain_handling=(options >> 4) & 0x03 if client.version == MQTT_5 else 0,
        )
        share = _split_shared(topic_filter)
        real_filter = share[1] if share else topic_filter
        if not valid_filter(real_filter) or (share is not None and not share[0]):
            return 0x8F if client.version == MQTT_5 else 0x80
        if share is not None:
            self._join_group(client, share, sub)
            return sub.qos
        is_new = topic_filter not in client.subs
        client.subs[topic_filter] = sub
        if sub.retain_handling == 0 or (sub.retain_handling == 1 and is_new):
            for message in list(self._retained.values()):
                if topic_matches(topic_filter, message.topic):
                    self._deliver(client, message, sub, retain=True)
        return sub.qos

    def _join_group(self, client: _Client, share: tuple[str, str], sub: Subscription) -> None:
        group = self._shared.setdefault(share, _SharedGroup())
        group.members = [(c, s) for c, s in group.members if c is not client] + [(client, sub)]

    def _on_unsubscribe(self, client: _Client, flags: int, body: _Parser) -> None:
        if flags != 0x02:
            raise ProtocolError("UNSUBSCRIBE with bad flags")
        packet_id = body.take(2)
        if client.version == MQTT_5:
            body.properties()
        codes = bytearray()
        while not body.at_end():
            codes.append(self._unsubscribe(client, body.text()))
        if client.version == MQTT_5:
            client.send(_packet(UNSUBACK, packet_id + b"\0" + bytes(codes)))
        else:
            client.send(_packet(UNSUBACK, packet_id))

    def _unsubscribe(self, client: _Client, topic_filter: str) -> int:
        share = _split_shared(topic_filter)
        if share is None:
            return 0x00 if client.subs.pop(topic_filter, None) is not None else 0x11
        group = self._shared.get(share)
        if group is None or all(c is not client for c, _ in group.members):
            return 0x11
        group.members = [(c, s) for c, s in group.members if c is not client]
        return 0x00


def _ignore(client: _Client, flags: int, body: _Parser) -> None:
    """Acknowledgements from subscribers: delivery towards them is best effort."""


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = (await reader.readexactly(1))[0]
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ProtocolError("remaining length longer than 4 bytes")
    if length > MAX_PACKET_BYTES:
        raise ProtocolError(f"packet of {length} bytes exceeds {MAX_PACKET_BYTES}")
    return first >> 4, first & 0x0F, await reader.readexactly(length)


def _read_will(body: _Parser, flags: int, version: int) -> Message | None:
    if not flags & 0x04:
        return None
    props = body.properties() if version == MQTT_5 else []
    topic, payload = body.text(), body.binary()
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolError(f"bad will topic {topic!r}")
    qos = min((flags >> 3) & 0x03, 1)
    return Message(topic, payload, qos, bool(flags & 0x20), _forwardable(props))


def _best_match(client: _Client, message: Message, sender: _Client) -> Subscription | None:
    best: Subscription | None = None
    for topic_filter, sub in client.subs.items():
        if sub.no_local and client is sender:
            continue
        if topic_matches(topic_filter, message.topic) and (best is None or sub.qos > best.qos):
            best = sub
    return best


def _split_shared(topic_filter: str) -> tuple[str, str] | None:
    """`$share/group/filter` -> (group, filter); None for an ordinary filter."""
    if not topic_filter.startswith("$share/"):
        return None
    _, group, *rest = topic_filter.split("/", 2)
    return (group, rest[0]) if rest and "+" not in group and "#" not in group else ("", "")
