"""MQTT sink: drains the outbox to a broker with paho-mqtt 2.x and receives operator acks.

One thread. The sink thread (`run`) owns the connection and every piece of delivery
state: it drives paho itself (`MqttClient.start(in_caller=True)` and `poll`), so a
PUBLISH is written by the thread that read the record and its PUBACK is read and
applied there too; other threads (the service's commits, applied operator acks)
only raise the sink's wake event. docs/topics.md is the user's view of what is
published where.

Delivery: every record is published with QoS 1 and counts as delivered only when
its PUBACK arrives with a success reason code (matched by mid), never because
publish() returned success. Records wait in a bounded window in outbox order;
the outbox cursor advances over the contiguous acknowledged prefix only. A lost
connection makes every unacknowledged record in the window unsent again; they are
re-published, with the same record_id, once connected (at-least-once).

Backlog: when the oldest unread row is older than `historical_after_s`, the rows
stored so far become a replay lane published at `replay_rate_per_s`, while rows
stored from then on go out at once in a live lane. The cursor follows the replay
lane and jumps over the live lane's acknowledged prefix when the replay is done.
One replay at a time: rows that age in the live lane meanwhile go out at full
speed (still flagged historical).

A record the broker denies (PUBACK >= 0x80) stays in the window and is retried;
it holds the cursor back, so later records keep flowing only until the window
(inflight_max) is full of records waiting behind it. Records of its kind (an ACL
names a topic leaf such as pumps/+/telemetry) are held for DENIED_RETRY_S, across
the disconnect Mosquitto 2.0 answers a denial with, so other kinds flow meanwhile;
any other reconnect offers everything again at once.

The connection itself (settings, TLS, credentials, paho's codes and errors, typed events) is
gateway.adapters.mqtt_client's; this module is the delivery on top of it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.adapters.mqtt_bulk import ReadsBeforeCloseClient
from gateway.adapters.mqtt_client import (
    ClientEvent,
    Connected,
    Disconnected,
    MqttClient,
    MqttError,
    MqttRefusedError,
    MqttSettings,
    PackedProperties,
    Published,
    Refused,
    SelectableEvent,
    Unreachable,
    paho_errors,
    publish_problem,
    user_properties,
)
from gateway.delivery_window import Lane, RateBucket, Slot, held, next_retry_m
from gateway.health import latency_histogram
from gateway.outbox import Outbox
from gateway.quiet import QuietLog
from gateway.records import StoredRecord
from gateway.sink_health import SinkHealth
from gateway.topics import (
    TopicBase,
    ack_filter,
    ack_origin,
    ack_refusal_topic,
    is_retained,
    legacy_ack_topic,
    status_topic,
    topic_for,
)

log = logging.getLogger(__name__)

SINK_NAME: Final = "mqtt"
QOS: Final = 1
DENIED_RETRY_S: Final = 30.0
"""A record the broker refused (PUBACK >= 0x80) is offered again after this long."""
KICKED_WITHIN_S: Final = 2.0
"""A disconnect this soon after a denial or after connecting may be the broker's answer to a
denial: Mosquitto 2.0 closes the connection right after a PUBACK 0x87 (eclipse/mosquitto#2579),
and the reset can destroy that PUBACK before it is read. Denied kinds stay held across it."""
IDLE_WAIT_S: Final = 1.0
BUSY_WAIT_S: Final = 0.05
READ_AHEAD_ROWS: Final = 256
"""Outbox rows read at once per lane; one query per PUBACK round cost ~12 % of the sink's CPU."""
TOPIC_CACHE_MAX: Final = 10_000
"""While waiting for PUBACKs, new outbox rows are looked for at least this often."""
SHUTDOWN_DRAIN_S: Final = 2.0
MAX_ACK_BYTES: Final = 16_384
"""A larger message on the ack topic is dropped unread (an Acknowledgement is < 1 KiB)."""
DISCONNECT_WITH_WILL: Final = 0x04
"""MQTT 5 DISCONNECT reason: the broker publishes the will (`offline`) on a clean stop too."""
SESSION_TAKEN_OVER: Final = 0x8E
"""MQTT 5 DISCONNECT reason: another client connected with this client id."""


def publish_denial(code: int, name: str, topic: str) -> MqttRefusedError:
    """A PUBACK with a failure reason code as our error."""
    return MqttRefusedError(
        f"broker denied publishing to {topic}: {name} (0x{code:02X}); the records stay in the "
        f"outbox and are retried every {DENIED_RETRY_S:.0f} s (check the broker's ACL)",
        code,
        topic,
    )




# --- delivery window --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedAck:
    """A message received on an ack topic, handed to the service unvalidated."""

    topic: str
    payload: bytes
    user_properties: tuple[tuple[str, str], ...] = ()
    retained: bool = False
    """The broker sent it with the retain flag (a stored message, or a retained publish)."""
    mid: int = field(default=0, compare=False)
    qos: int = field(default=0, compare=False)
    connection: int = field(default=0, compare=False)
    """The connection it arrived on: its PUBACK is sent on that connection only."""


OnAck = Callable[[ReceivedAck], None]
StatusPair = Callable[[], tuple[bytes, bytes]]
"""Builds the GatewayStatus payloads of one connection: (birth `online`, will `offline`)."""


# --- the sink ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SendRefusal:
    """From the service: publish this AckRefusal on the sink's thread."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class _Confirm:
    """From the service: this operator ack is stored; PUBACK it on the sink's thread."""

    ack: ReceivedAck


_FromService = _SendRefusal | _Confirm


class MqttSink:
    """Publishes outbox records to the broker, birth/will on the status topic, acks in."""

    name = SINK_NAME

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        topics: TopicBase,
        *,
        status: StatusPair,
        on_ack: OnAck,
    ) -> None:
        self.settings = settings
        self._outbox = outbox
        self._topics = topics
        self._status = status
        self._birth = self._will = b""
        self._on_ack = on_ack
        self._v5 = settings.protocol == "5"
        self.client_id = settings.client_id or f"pumpgw-{topics.site}-{topics.station}"
        self._status_topic = status_topic(topics)
        self._ack_filters = (ack_filter(topics), legacy_ack_topic(topics))
        self._refusal_topic = ack_refusal_topic(topics)
        self._events: queue.SimpleQueue[ClientEvent | _FromService] = queue.SimpleQueue()
        self._wake: threading.Event | None = None
        self._sink_thread: int | None = None
        self._quiet = QuietLog(log)
        self._live = Lane(outbox.cursor(SINK_NAME))
        self._replay: Lane | None = None
        self._bucket = RateBucket(settings.replay_rate_per_s, time.monotonic())
        self._throttled = False
        self._mids: dict[int, Slot] = {}
        self._topic_cache: dict[tuple[str, str | None], str] = {}
        self._connected = False
        self._ever_connected = False
        self._window_wire = settings.inflight_max
        self._refused_key = "refused"
        self._refused_pending = False
        """A CONNACK refused the last attempt; the disconnect that follows says no more."""
        self.last_error: str | None = None
        self.published = self.denied = self.reconnects = self.historical = 0
        self.unroutable = self.refusals = self.acks_received = self.acks_dropped = 0
        self.unreachable = self.connections = self.replays_done = self.takeovers = 0
        self.sessions_lost = self.refusals_sent = 0
        self._denied_seqs: set[int] = set()
        """Outbox seqs of records the broker denied and has not yet accepted."""
        self._denied_kinds: dict[str, float] = {}
        """Kinds of record the broker denied, and when (monotonic) to offer them again."""
        self._denial: str | None = None
        self._denied_at_m = self._connected_at_m = float("-inf")
        self._connection = 0
        self._connection_lock = threading.Lock()
        self._client = MqttClient(
            settings,
            self.client_id,
            emit=self._from_client,
            manual_ack=True,
            on_message=self._on_message,
            on_connect=self._on_connect,
            before_connect=self._before_connect,
            paho_class=ReadsBeforeCloseClient,  # hears a denial sent just before a close
        )
        self._paho = self._client.paho
        # Our window is the only in-flight limit (paho's would count dropped messages);
        # the queue cap is a safety net: the window never holds more than inflight_max.
        self._paho.max_inflight_messages_set(0)
        self._paho.max_queued_messages_set(settings.inflight_max + 64)
        self.puback_latency = latency_histogram(
            "pumpgw_commit_to_puback_seconds", "From a record's commit to the broker's PUBACK."
        )

    @property
    def state_epoch(self) -> int:
        """Changes whenever retained topics may hold older state than the gateway's: after
        each connect and each finished backlog replay (the service then re-asserts it)."""
        return self.connections + self.replays_done

    def send_refusal(self, payload: bytes) -> None:
        """Publish an AckRefusal (QoS 1, not retained) if connected; any thread."""
        self._hand_over(_SendRefusal(payload))

    # -- paho callbacks: run inside the sink thread's poll(); they only hand data over ----

    def _before_connect(self, client: mqtt.Client) -> None:
        # Birth and will are built for each connection: the birth's seq is above the last
        # connection's will, so a consumer ordering by seq never keeps an old `offline`.
        try:
            self._birth, self._will = self._status()
        except Exception as exc:  # noqa: BLE001 - a service bug must not stop the sink thread
            self._quiet.error("status", "cannot build the birth and will: %r", exc)
        client.will_set(self._status_topic, self._will, qos=QOS, retain=True)

    def _on_connect(self, client: mqtt.Client, event: Connected) -> None:
        self._new_connection()
        # paho's own copies of unacknowledged messages are dropped here, before paho
        # re-sends them after this callback returns; the sink thread re-publishes them from
        # its window, so nothing is lost and each record goes out once per connection rather
        # than twice. (The session kept by the broker only queues acknowledgements for us.)
        client.drop_out_messages()
        # Subscribe before the birth: whoever sees `online` can rely on acks being heard.
        if self._v5:
            client.subscribe([(f, self._ack_options()) for f in self._ack_filters])
        else:
            client.subscribe([(f, QOS) for f in self._ack_filters])
        client.publish(self._status_topic, self._birth, qos=QOS, retain=True)

    @staticmethod
    def _ack_options() -> SubscribeOptions:
        """MQTT 5: no retained acks at subscribe (retain handling 2) and the retain flag kept
        on live ones (retain as published), so a retained ack can be recognised and refused.
        (MQTT 3.1.1 has neither: retained acks arrive flagged at subscribe and are refused.)"""
        return SubscribeOptions(qos=QOS, noLocal=True, retainAsPublished=True,
                                retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        if ack_origin(self._topics, message.topic) is None:
            # A session resumed after someone else used our client id may carry their
            # subscriptions: nothing but the ack topics is ever taken as an acknowledgement.
            self.acks_dropped += 1
            self._puback(message.mid, message.qos)
            self._quiet.warning("not-ack", "ignored a message on %r: not an ack topic of this "
                                "station (a subscription left in the session by another client "
                                "that used this client id?)", message.topic[:200])
            return
        if len(message.payload) > MAX_ACK_BYTES:
            self.acks_dropped += 1
            self._puback(message.mid, message.qos)
            self._quiet.warning("ack-size", "dropped a %d-byte message on %s (limit %d)",
                                len(message.payload), message.topic, MAX_ACK_BYTES)
            return
        self.acks_received += 1
        props = user_properties(message.properties)
        ack = ReceivedAck(message.topic, bytes(message.payload), props, bool(message.retain),
                          message.mid, message.qos, self._connection)
        try:
            self._on_ack(ack)  # may wait for room: the broker then holds the rest back
        except Exception as exc:  # noqa: BLE001 - a service bug must not stop the sink thread
            self._quiet.error("on-ack", "the acknowledgement handler failed: %r", exc)

    def confirm(self, ack: ReceivedAck) -> None:
        """The service applied and stored `ack`: the sink's thread sends its PUBACK; any thread.

        Acknowledgements are received with paho's manual_ack, so a broker (and, through it,
        the operator's console) never hears "received" for an ack the gateway could still
        lose. An ack from an earlier connection is not confirmed: the broker delivers it
        again, and the packet id may name another message by now.
        """
        self._hand_over(_Confirm(ack))

    def _event_confirm(self, ack: ReceivedAck) -> None:
        with self._connection_lock:
            if ack.connection == self._connection:
                self._puback(ack.mid, ack.qos)

    def _puback(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._paho.ack(mid, qos)

    def _new_connection(self) -> None:
        with self._connection_lock:
            self._connection += 1

    def _from_client(self, event: ClientEvent) -> None:
        if isinstance(event, Disconnected):
            self._new_connection()
        self._hand_over(event)

    def _hand_over(self, event: ClientEvent | _FromService) -> None:
        self._events.put(event)
        wake = self._wake
        if wake is not None and threading.get_ident() != self._sink_thread:
            wake.set()  # from another thread: wake the sink's select

    # -- the sink thread -------------------------------------------------------------

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Connect, drain the outbox until `stop` is set, then say `offline` and disconnect."""
        if self.settings.tls.insecure_skip_verify:
            log.warning("mqtt.tls.insecure_skip_verify is on: the broker's certificate is NOT "
                        "verified, so anyone on the network path can pose as %s",
                        self.settings.display_url())
        self._wake, self._sink_thread = wake, threading.get_ident()
        self._client.start(in_caller=True)
        try:
            while not stop.is_set():
                wake.clear()
                self._step()
                self._wait(wake)
        finally:
            self._shutdown()

    def _step(self) -> None:
        self._drain_events()
        if self._connected:
            now_m = time.monotonic()
            self._send_live(now_m)
            self._send_replay(now_m)
        self._advance()

    def _wait(self, wake: threading.Event) -> None:
        """Wait in one select for the broker (PUBACKs, acks, a lost connection), the wake
        event (rows committed, a request from the service) or the next timer; then let the
        client read, write and reconnect. Events it produced are handled by the next step."""
        if not self._events.empty():
            return
        timeout_s = self._timer_s(time.monotonic())
        if isinstance(wake, SelectableEvent):
            self._client.poll(timeout_s, wake)
        elif not wake.is_set():  # a plain Event cannot wake a select: look every BUSY_WAIT_S
            self._client.poll(min(timeout_s, BUSY_WAIT_S))

    def _timer_s(self, now_m: float) -> float:
        """Time until a denied record may be retried or the replay earns a token."""
        retry_m = next_retry_m(self._lanes(), now_m)
        timer_s = IDLE_WAIT_S if retry_m is None else retry_m - now_m
        if self._throttled:
            timer_s = min(timer_s, self._bucket.wait_s())
        return max(0.0, min(timer_s, IDLE_WAIT_S))

    def _lanes(self) -> list[Lane]:
        return [self._live] if self._replay is None else [self._replay, self._live]

    # -- events from paho --------------------------------------------------------------

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._dispatch(event)

    def _dispatch(self, event: ClientEvent | _FromService) -> None:
        match event:
            case Published(mid, code, name):
                self._event_puback(mid, code, name)
            case Connected(session_present, receive_max):
                self._event_connected(receive_max, session_present)
            case Disconnected(code, name):
                self._event_disconnected(code, name)
            case Refused():
                self._event_refused(event.code, event.error)
            case Unreachable(cause):
                self._event_unreachable(cause)
            case _SendRefusal(payload):
                self._event_refusal(payload)
            case _Confirm(ack):
                self._event_confirm(ack)
            case _:
                pass  # SUBACK of the ack filters: a refused one shows as acks never arriving

    def _event_connected(self, receive_max: int, session_present: bool = True) -> None:
        self._unsend_all()
        self._window_wire = max(1, min(self.settings.inflight_max, receive_max))
        if self._ever_connected:
            self.reconnects += 1
        self.connections += 1
        log.info("MQTT connected to %s as %s", self.settings.display_url(), self.client_id)
        if not session_present and self.settings.session_expiry_s > 0:
            self._session_lost()
        self._connected = self._ever_connected = True
        self._denied_at_m = float("-inf")  # a denial on this connection, not an earlier one
        self._connected_at_m = time.monotonic()
        self.last_error = self._denial  # records still wait for the ACL: not healthy yet
        self._refused_pending = False
        self._quiet.forget("unreachable")
        self._quiet.forget("closed-early")
        self._quiet.forget(self._refused_key)

    def _event_refused(self, code: int, error: MqttRefusedError) -> None:
        self.refusals += 1
        self.last_error = str(error)
        self._refused_key = f"refused:{code}"
        self._refused_pending = True
        self._quiet.error(self._refused_key, "%s", error)

    def _event_unreachable(self, cause: str | None = None) -> None:
        what = "TCP connect or TLS handshake" if self.settings.uses_tls else "TCP connect"
        hint = "; check mqtt.tls.ca_file" if cause and "CERTIFICATE_VERIFY_FAILED" in cause else ""
        self.unreachable += 1
        self.last_error = (f"cannot reach the broker at {self.settings.display_url()} "
                           f"({what} failed: {cause or 'no reason given'}){hint}; retrying")
        self._quiet.warning("unreachable", "%s", self.last_error)

    def _session_lost(self) -> None:
        """The broker kept no session for us: acks published while away were not queued.
        (At the process's first connect that is also what a first run looks like.)"""
        if self.connections > 1:
            self.sessions_lost += 1
            log.warning("MQTT: the broker did not keep this gateway's session (it expired, or "
                        "another client connected with client id %r and a clean start): "
                        "acknowledgements published while the gateway was away are lost; "
                        "operators see the alert still unacknowledged and must send again",
                        self.client_id)

    def _event_refusal(self, payload: bytes) -> None:
        if not self._connected:
            return  # the console is told nothing; it sees no receipt and may resend
        with contextlib.suppress(MqttError):
            with paho_errors("publish an acknowledgement refusal"):
                info = self._paho.publish(self._refusal_topic, payload, qos=QOS,
                                            properties=self._refusal_properties())
            if publish_problem(info.rc) is None:
                self.refusals_sent += 1

    def _refusal_properties(self) -> Properties | None:
        return PackedProperties([]) if self._v5 else None

    def _event_disconnected(self, code: int, name: str) -> None:
        if code == SESSION_TAKEN_OVER:
            self.takeovers += 1
            self._quiet.warning("taken-over", "MQTT: another client connected with this "
                                "gateway's client id %r and took its session over; check for a "
                                "second gateway with the same id, or a client misusing it (the "
                                "broker should bind client ids to users: docs/security.md)",
                                self.client_id)
        self._unsend_all()
        now_m = time.monotonic()
        kicked = now_m - self._denied_at_m < KICKED_WITHIN_S
        if not kicked and now_m - self._connected_at_m >= KICKED_WITHIN_S:
            self._denied_kinds.clear()  # a connection that was up may come back to a new ACL
        if kicked and self._denial is not None:
            self.last_error = f"{self._denial}; the broker then closed the connection"
            self._quiet.warning("kicked", "%s; reconnecting", self.last_error)
        elif self._connected:
            self.last_error = f"connection to {self.settings.display_url()} lost: {name}"
            log.warning("%s; reconnecting (unacknowledged records will be sent again)",
                        self.last_error)
        elif self._refused_pending:
            self._refused_pending = False  # the CONNACK said why: keep that reason
        else:
            self.last_error = self._closed_before_connack(name)
            self._quiet.warning("closed-early", "%s", self.last_error)
        self._connected = False

    def _closed_before_connack(self, name: str) -> str:
        """Why a connection the broker closed before answering CONNECT may have failed."""
        said = f"the broker at {self.settings.display_url()} closed the connection before " \
               f"accepting it ({name})"
        if not self.settings.uses_tls:
            return f"{said}; check the broker's log; retrying"
        if self.settings.tls.cert_file is None:
            return (f"{said}; it may require a client certificate: set mqtt.tls.cert_file "
                    "and mqtt.tls.key_file; retrying")
        return (f"{said}; it may not trust the client certificate in "
                f"{self.settings.tls.cert_file} (check the broker's CA and the certificate's "
                "dates); retrying")

    def _event_puback(self, mid: int, code: int, name: str) -> None:
        slot = self._mids.pop(mid, None)
        if slot is None:
            return  # birth, will, or a publish of a connection already given up
        slot.mid = None
        if code < 0x80:
            slot.acked = True
            self.published += 1
            self.puback_latency.observe(max(0.0, time.time() - slot.record.stored_at_s))
            if self._denied_seqs:
                self._accepted_after_denial(slot.record.seq)
            return
        topic = topic_for(slot.record.kind, slot.record.pump_id, self._topics)
        error = publish_denial(code, name, topic)
        self.denied += 1
        self._denied_seqs.add(slot.record.seq)
        self._denial = self.last_error = str(error)
        self._denied_at_m = time.monotonic()
        slot.retry_at_s = self._denied_kinds[slot.record.kind] = self._denied_at_m + DENIED_RETRY_S
        self._quiet.error(f"denied:{topic}:{code}", "%s", error)

    def _accepted_after_denial(self, seq: int) -> None:
        """The last denied record went through: the broker's ACL allows us again."""
        self._denied_seqs.discard(seq)
        if not self._denied_seqs:
            self._denial = None
            self._denied_kinds.clear()
            if self._connected:
                self.last_error = None
            log.info("MQTT: the broker accepts the records it denied before")

    def _unsend_all(self) -> None:
        self._mids.clear()
        for lane in self._lanes():
            lane.unsend()

    # -- publishing --------------------------------------------------------------------

    def _send_live(self, now_m: float) -> None:
        lane = self._live
        budget = self._window_wire - len(self._mids)
        sent, ok = self._publish_due(lane, now_m, budget)
        room = min(budget - sent, self.settings.inflight_max - self._held())
        while ok and room > 0:
            rows = self._read(lane, room)
            if not rows:
                return
            if self._replay is None and self._is_historical(rows[0], time.time()):
                self._start_replay(rows)
                return
            for slot in lane.take(rows, room):
                if not self._publish(slot):
                    return
                room -= slot.mid is not None  # held-back records take window space only
            room = min(room, self.settings.inflight_max - self._held())

    def _send_replay(self, now_m: float) -> None:
        lane = self._replay
        self._throttled = False
        if lane is None:
            return
        tokens = self._bucket.refill(now_m)
        cap = max(1, self.settings.inflight_max // 2)
        wire = min(self._window_wire - len(self._mids), cap - lane.on_the_wire)
        budget = min(tokens, wire)
        spent, ok = self._publish_due(lane, now_m, budget)
        room = min(budget - spent, cap - len(lane.slots), self.settings.inflight_max - self._held())
        if ok and room > 0 and not lane.read_all:
            for slot in lane.take(self._read(lane, room), room):
                if not self._publish(slot):
                    break
                spent += slot.mid is not None
        self._bucket.tokens -= spent
        # Out of tokens before out of room: wake when the next token is earned.
        self._throttled = spent >= tokens and tokens < wire

    def _read(self, lane: Lane, limit: int) -> list[StoredRecord]:
        """Up to `limit` rows after lane.read_to, through the lane's read-ahead buffer."""
        ahead = lane.ahead
        if len(ahead) < limit:
            after = ahead[-1].seq if ahead else lane.read_to
            wanted = max(limit, READ_AHEAD_ROWS) - len(ahead)
            ahead.extend(self._outbox.read(SINK_NAME, after, wanted))
        return [ahead.popleft() for _ in range(min(limit, len(ahead)))]

    def _start_replay(self, rows: list[StoredRecord]) -> None:
        """Bound the current lane at the last stored row; rows after it go out live."""
        count, _oldest = self._outbox.backlog(SINK_NAME)
        last_seq = max(self._outbox.cursor(SINK_NAME) + count, rows[-1].seq)
        self._replay, self._live = self._live, Lane(last_seq)
        self._replay.upto = last_seq
        self._replay.take(rows, len(rows))
        self._replay.read_all = rows[-1].seq >= last_seq
        log.info("MQTT backlog of %d records: replaying at %.0f/s, flagged historical",
                 count, self.settings.replay_rate_per_s)

    def _publish_due(self, lane: Lane, now_m: float, budget: int) -> tuple[int, bool]:
        """Publish slots that wait to be (re)sent; return how many, and False if paho refused."""
        sent = 0
        for slot in list(lane.due(now_m)):
            if sent >= budget:
                break
            if not self._publish(slot):
                return sent, False
            sent += slot.mid is not None  # a held-back or unroutable record costs nothing
        return sent, True

    def _held(self) -> int:
        return held(self._lanes())

    def _is_historical(self, record: StoredRecord, now_s: float) -> bool:
        return now_s - record.stored_at_s > self.settings.historical_after_s

    def _publish(self, slot: Slot) -> bool:
        """Hand one record to paho; False means stop sending for now."""
        record = slot.record
        try:
            topic = self._topic(record)
        except ValueError as exc:
            self._skip_unroutable(slot, str(exc))
            return True
        hold_until_m = self._denied_kinds.get(record.kind, 0.0)
        if hold_until_m > time.monotonic():
            slot.retry_at_s = hold_until_m  # the broker denied this kind: wait with the rest
            return True
        historical = self._is_historical(record, time.time())
        retain = record.retain or is_retained(record.kind)
        try:
            with paho_errors(f"publish to {topic}"):
                info = self._paho.publish(topic, record.payload, qos=QOS, retain=retain,
                                            properties=self._properties(record, historical))
        except MqttError as exc:
            self._skip_unroutable(slot, str(exc))
            return True
        problem = publish_problem(info.rc)
        if problem is not None:
            self._quiet.warning(f"publish:{problem}", "MQTT publish deferred: %s", problem)
            return False
        slot.mid = info.mid
        self._mids[info.mid] = slot
        self.historical += historical
        return True

    def _topic(self, record: StoredRecord) -> str:
        """topic_for, remembered per kind and pump (it checks the pump id every time)."""
        key = (record.kind, record.pump_id)
        topic = self._topic_cache.get(key)
        if topic is None:
            topic = topic_for(record.kind, record.pump_id, self._topics)
            if len(self._topic_cache) >= TOPIC_CACHE_MAX:
                self._topic_cache.clear()
            self._topic_cache[key] = topic
        return topic

    def _skip_unroutable(self, slot: Slot, why: str) -> None:
        # Retrying cannot help and would stop every later record; the row stays in the
        # outbox (and in InfluxDB), so it is counted and logged, not silently lost.
        slot.acked = True
        self.unroutable += 1
        self._quiet.error(f"unroutable:{slot.record.kind}", "record %s not published to MQTT: %s",
                          slot.record.record_id, why)

    def _properties(self, record: StoredRecord, historical: bool) -> Properties | None:
        if not self._v5:
            return None
        pairs = [("record_id", record.record_id)]
        if historical:
            pairs.append(("historical", "true"))
        return PackedProperties(pairs)

    def _advance(self) -> None:
        replay, live = self._replay, self._live
        if replay is None:
            if live.advance():
                self._outbox.ack(SINK_NAME, live.acked_to)
            return
        live.advance()
        if replay.advance():
            self._outbox.ack(SINK_NAME, replay.acked_to)
        if replay.done:
            self._replay = None
            self.replays_done += 1
            self._outbox.ack(SINK_NAME, max(live.acked_to, replay.acked_to))
            log.info("MQTT backlog replayed; publishing live")

    # -- shutdown ----------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Wait a little for PUBACKs of what is in flight, then leave saying `offline`."""
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        self._drain_events()
        while self._connected and self._mids and time.monotonic() < deadline:
            self._client.poll(BUSY_WAIT_S)
            self._drain_events()
            self._advance()
        if not self._v5 and self._paho.is_connected():
            self._say_offline(deadline)
        self.close()

    def _say_offline(self, deadline: float) -> None:
        """MQTT 3.1.1 has no 'disconnect with will': publish the `offline` status ourselves."""
        try:
            with paho_errors("publish offline status"):
                info = self._paho.publish(self._status_topic, self._will, qos=QOS, retain=True)
            deadline = max(deadline, time.monotonic() + 0.1)
            while not info.is_published() and time.monotonic() < deadline:
                self._client.poll(BUSY_WAIT_S)
        except MqttError as exc:
            log.warning("could not publish the offline status: %s", exc)

    def close(self) -> None:
        """Disconnect (MQTT 5: asking the broker to publish the will) and release the socket.

        Safe to call more than once.
        """
        self._client.stop(reason_code=DISCONNECT_WITH_WILL)
        self._connected = False

    # -- observation -------------------------------------------------------------------

    def health(self) -> SinkHealth:
        """For /healthz and /metrics: state, last error, the delivery window and counters."""
        return SinkHealth(
            connected=self._paho.is_connected(),
            last_error=self.last_error,
            delivered=self.published,
            counters={
                "denied": self.denied,
                "reconnects": self.reconnects,
                "refused": self.refusals,
                "unreachable": self.unreachable,
                "historical": self.historical,
                "unroutable": self.unroutable,
                "acks_received": self.acks_received,
                "acks_dropped": self.acks_dropped,
                "ack_refusals_sent": self.refusals_sent,
                "session_takeovers": self.takeovers,
                "sessions_lost": self.sessions_lost,
            },
            gauges={"inflight": len(self._mids)},
        )
