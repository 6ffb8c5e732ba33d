"""MQTT clients for tests, built on the gateway's own seam (gateway.adapters.mqtt_client).

`Probe` is one connection to a test broker: it subscribes to its filters on every connect
(before the test publishes anything), keeps every message it receives, and publishes at
QoS 1 waiting for the broker's PUBACK and its reason code. Tests that need paho itself (a
forged packet, an option the seam does not expose) keep a raw paho client and say why.

    with subscribed(port, f"{prefix}/#") as sub:
        ...
        assert sub.wait_for(3, WAIT_S)
        [first, *_] = sub.messages()
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from gateway.adapters.mqtt_client import (
    ClientEvent,
    Connected,
    MqttClient,
    MqttSettings,
    MqttTls,
    Published,
    Refused,
    Subscribed,
    publish_problem,
)
from gateway.adapters.mqtt_client import user_properties as user_properties_of

WAIT_S = 10.0
LOOPBACK = "127.0.0.1"
RECONNECT_MAX_S = 1
"""Back within a second of a broker restart (the broker keeps a persistent session's queue)."""
PERSISTENT_SESSION_S = 3600


@dataclass(frozen=True, slots=True)
class Received:
    """One message as the broker delivered it."""

    topic: str
    payload: bytes
    properties: Properties | None
    retain: bool
    qos: int
    arrived_s: float
    """Wall-clock time it arrived here (epoch seconds), to compare with a payload's stamps."""

    @property
    def user_properties(self) -> dict[str, str]:
        return dict(user_properties_of(self.properties))

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True, slots=True)
class PubAck:
    """The broker's PUBACK of one publish: `code` >= 0x80 is a refusal."""

    code: int
    name: str

    @property
    def accepted(self) -> bool:
        return self.code < 0x80


def settings_for(
    port: int,
    *,
    protocol: Literal["5", "3.1.1"] = "5",
    user: tuple[str, str] | None = None,
    persistent: bool = False,
    tls: MqttTls | None = None,
) -> MqttSettings:
    """`[mqtt]` for a test client of the broker on `port` (mqtts:// when `tls` is given)."""
    return MqttSettings(
        url=f"{'mqtts' if tls else 'mqtt'}://{LOOPBACK}:{port}",
        protocol=protocol,
        username=None if user is None else user[0],
        password=None if user is None else SecretStr(user[1]),
        tls=tls or MqttTls(),
        reconnect_max_s=RECONNECT_MAX_S,
        session_expiry_s=PERSISTENT_SESSION_S if persistent else 0,
    )


class Probe:
    """A test's MQTT connection: subscribes to `filters` at each connect, keeps what arrives."""

    def __init__(self, settings: MqttSettings, filters: Sequence[str] = (), *,
                 client_id: str | None = None,
                 on_message: Callable[[Received], None] | None = None) -> None:  # fmt: skip
        """on_message: hand each message to it (on paho's thread) instead of keeping it."""
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:8]}"
        self._filters = tuple(filters)
        self._hand_over = on_message
        self._received: list[Received] = []
        self._taken = 0
        self._acks: dict[int, PubAck] = {}
        self._events: list[ClientEvent] = []
        self._changed = threading.Condition()
        self._client = MqttClient(
            settings,
            self.client_id,
            emit=self._on_event,
            on_message=self._on_message,
            on_connect=self._subscribe,
            subscribed_filters=self._filters,
        )
        # As the sink's window: publish_all may have settings.inflight_max unacknowledged.
        self._client.paho.max_inflight_messages_set(settings.inflight_max)

    # -- life cycle -----------------------------------------------------------------------

    def start(
        self,
        timeout_s: float = WAIT_S,
        *,
        clean_start: bool | None = None,
        properties: Properties | None = None,
        refused_ok: bool = False,
    ) -> Probe:
        """Connect; wait for the CONNACK and, with filters, the SUBACK (AssertionError if not,
        or if the broker refused a filter, unless `refused_ok`). MQTT 5 `clean_start` and
        CONNECT `properties` as MqttClient.start takes them."""
        self._client.start(clean_start=clean_start, properties=properties)
        try:
            self._check_started(timeout_s, refused_ok=refused_ok)
        except AssertionError:
            self.close()  # no paho thread outlives a failed start
            raise
        return self

    def _check_started(self, timeout_s: float, *, refused_ok: bool) -> None:
        wanted: type[ClientEvent] = Subscribed if self._filters else Connected
        if not self.wait_for_event(lambda e: isinstance(e, (wanted, Refused)), timeout_s):
            raise AssertionError(f"{self.client_id}: no {wanted.__name__} within {timeout_s} s")
        for event in self.events():
            if isinstance(event, Refused):
                raise AssertionError(f"{self.client_id}: {event.error}")
            if isinstance(event, Subscribed) and event.refused and not refused_ok:
                raise AssertionError(f"{self.client_id}: subscription refused: {event.refused}")

    @property
    def session_present(self) -> bool:
        """Whether the broker kept a session for this client id (the first CONNACK's flag)."""
        return next(e.session_present for e in self.events() if isinstance(e, Connected))

    def close(self) -> None:
        self._client.stop()

    @property
    def paho(self) -> mqtt.Client:
        """The paho client under the seam, for what it does not wrap (unsubscribe, ...)."""
        return self._client.paho

    # -- paho's thread: hand over only ----------------------------------------------------

    def _subscribe(self, client: mqtt.Client, _connected: Connected) -> None:
        if self._filters:  # one SUBSCRIBE, so the SUBACK's codes pair with the filters
            client.subscribe([(topic_filter, 1) for topic_filter in self._filters])

    def _on_event(self, event: ClientEvent) -> None:
        with self._changed:
            self._events.append(event)
            if isinstance(event, Published):
                self._acks[event.mid] = PubAck(event.code, event.name)
            self._changed.notify_all()

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        received = Received(
            message.topic,
            bytes(message.payload),
            getattr(message, "properties", None),
            bool(message.retain),
            message.qos,
            time.time(),
        )
        if self._hand_over is not None:
            self._hand_over(received)
            return
        with self._changed:
            self._received.append(received)
            self._changed.notify_all()

    # -- what arrived ---------------------------------------------------------------------

    def messages(self) -> list[Received]:
        with self._changed:
            return list(self._received)

    def events(self) -> list[ClientEvent]:
        with self._changed:
            return list(self._events)

    def wait_for(
        self, want: int | Callable[[list[Received]], bool], timeout_s: float = WAIT_S
    ) -> bool:
        """Wait until `want` messages arrived in all, or want(messages) holds."""
        holds = want if callable(want) else (lambda got: len(got) >= want)
        return self._wait(lambda: holds(self._received), timeout_s)

    def wait_for_event(self, holds: Callable[[ClientEvent], bool], timeout_s: float) -> bool:
        return self._wait(lambda: any(holds(e) for e in self._events), timeout_s)

    def next(self, timeout_s: float = WAIT_S) -> Received:
        """The oldest message not yet taken (AssertionError after the timeout)."""
        message = self.poll(timeout_s)
        if message is None:
            raise AssertionError(f"{self.client_id}: no message within {timeout_s} s")
        return message

    def poll(self, timeout_s: float = WAIT_S) -> Received | None:
        """The oldest message not yet taken by next() or poll(), or None after the timeout."""
        if not self._wait(lambda: len(self._received) > self._taken, timeout_s):
            return None
        with self._changed:
            self._taken += 1
            return self._received[self._taken - 1]

    def _wait(self, holds: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not holds():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    # -- publishing -----------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
        timeout_s: float = WAIT_S,
    ) -> PubAck:
        """Publish at QoS 1 and return the broker's PUBACK (AssertionError without one)."""
        [puback] = self.publish_all(
            [(topic, payload)], retain=retain, user_properties=user_properties, timeout_s=timeout_s
        )
        return puback

    def publish_all(
        self,
        messages: Sequence[tuple[str, bytes | str]],
        *,
        retain: bool = False,
        user_properties: Sequence[tuple[str, str]] = (),
        timeout_s: float = WAIT_S,
    ) -> list[PubAck]:
        """Publish (topic, payload) pairs at QoS 1 without waiting in between, then wait for
        every PUBACK; return them in order (AssertionError when one does not come)."""
        properties = None
        if user_properties:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = list(user_properties)
        mids = [self._publish_one(topic, body, retain, properties) for topic, body in messages]
        if not self._wait(lambda: all(mid in self._acks for mid in mids), timeout_s):
            raise AssertionError(f"{self.client_id}: PUBACKs missing after {timeout_s} s")
        with self._changed:
            return [self._acks.pop(mid) for mid in mids]

    def _publish_one(
        self, topic: str, payload: bytes | str, retain: bool, properties: Properties | None
    ) -> int:
        info = self.paho.publish(topic, payload, qos=1, retain=retain, properties=properties)
        problem = publish_problem(info.rc)
        if problem is not None:
            raise AssertionError(f"{self.client_id}: publish to {topic}: {problem}")
        return info.mid


@contextmanager
def probing(settings: MqttSettings, filters: Sequence[str] = (), *,
            client_id: str | None = None) -> Iterator[Probe]:  # fmt: skip
    """A started Probe, closed when the block ends."""
    probe = Probe(settings, filters, client_id=client_id)
    try:
        yield probe.start()
    finally:
        probe.close()


@contextmanager
def subscribed(port: int, *filters: str, **options: Any) -> Iterator[Probe]:
    """A plain-TCP subscriber to `filters` on the broker at `port`, subscribed before the
    block runs; `options` go to settings_for (protocol, user, persistent, tls)."""
    with probing(settings_for(port, **options), filters) as probe:
        yield probe


@contextmanager
def publisher(port: int, **options: Any) -> Iterator[Probe]:
    """A connected publisher to the broker at `port` (options as for `subscribed`)."""
    with probing(settings_for(port, **options)) as probe:
        yield probe
