"""`pumpgw ingest`: central workers that move gateways' telemetry from MQTT into InfluxDB.

Workers in one group hold the same MQTT 5 shared subscriptions (`$share/<group>/...`), so the
broker splits the messages between them. Each worker keeps a persistent session
(clean_start=False with a session expiry), validates every message with the schemas models,
commits it to its own outbox and only then acknowledges it (paho `manual_ack`): a worker
killed at any moment leaves its unacknowledged share in its session on the broker, which
delivers it again when the worker comes back. An InfluxSink drains the outbox, as on a
station. docs/scaling.md shows where this sits in a larger deployment.

The functions above `MqttSubscription` are pure (topic parsing, validation, line protocol);
the rest is the shell: paho's thread (a BulkClient: chunked reads, batched PUBACKs) hands
deliveries to the worker thread through a queue; the worker validates a batch while a
committer thread stores, then acknowledges, the one before.

Configuration is the gateway's file ([mqtt], [influx], [store], [health]) plus an optional
[ingest] section (IngestSection); `load_ingest_settings` reads both.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import Field, ValidationError, field_validator, model_validator

from gateway import store_shell
from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.adapters.mqtt_bulk import BulkClient
from gateway.adapters.mqtt_client import (
    ClientEvent,
    Connected,
    Disconnected,
    MqttClient,
    MqttSettings,
    Refused,
    Subscribed,
    Unreachable,
    Unsubscribed,
    session_properties,
)
from gateway.admission import OriginGuard, OriginLimits, Refusal, TimeWindow
from gateway.config import (
    ConfigError,
    GatewaySection,
    HealthSection,
    ProcessSettings,
    Section,
    StoreSection,
    load_settings_as,
)
from gateway.health import Observation, SourceObservation
from gateway.outbox import OutboxError
from gateway.points import PointTags, line_for
from gateway.quiet import QuietLog
from gateway.records import OutRecord, StoredRecord
from gateway.topics import LEAF_KINDS, TopicParts, parse_topic, segment_problem
from schemas.models import (
    AlertTransition,
    DeviceEvent,
    Frozen,
    Quarantined,
    Reading,
    describe_errors,
)

log = logging.getLogger(__name__)

MODELS: Final[dict[str, type[Frozen]]] = {
    "reading": Reading,
    "event": DeviceEvent,
    "alert": AlertTransition,
}
QOS: Final = 1
MAX_PAYLOAD_BYTES: Final = 65_536
"""A larger message is quarantined unread (a reading is under 1 KiB, an alert under 2 KiB):
only its first QUARANTINE_RAW_BYTES leave paho's thread."""
QUARANTINE_RAW_BYTES: Final = 4096
RECENT_IDS: Final = 50_000
"""Record ids remembered to drop a redelivered message without storing it twice."""
IDLE_WAIT_S: Final = 0.5
RETRY_COMMIT_S: Final = 1.0
COMPACT_EVERY_S: Final = 60.0
SOURCE_NAME: Final = "mqtt"
RETIRE_IDLE_S: Final = 3.0
"""A retiring worker's session counts as drained after this long without a message."""
QUEUE_FULL_WAIT_S: Final = 1.0
"""paho's thread re-checks this often for room in a full queue (the worker frees it)."""


# --- configuration --------------------------------------------------------------------------


class IngestSection(Section):
    """`[ingest]`: the shared subscription group and this worker's session."""

    group: str = Field(
        "pumpgw-ingest", description="shared subscription group; workers in a group split the load"
    )
    client_id: str | None = Field(
        None,
        description="MQTT client id, unique per worker and the same after a restart (its session "
        "holds the unacknowledged messages); default mqtt.client_id, else pumpgw-ingest-{hostname}",
    )
    session_expiry_s: int = Field(
        86_400,
        ge=0,
        le=4_294_967_294,
        description="how long the broker keeps a stopped worker's session and its queued share; "
        "0 ends it with the connection (for brokers that hand a departed member's share to the "
        "others, docs/scaling.md)",
    )
    receive_max: int = Field(
        2000,
        ge=1,
        le=65_535,
        description="messages the broker may send before they are acked; a batch is at most "
        "half of them, so the next batch arrives while one is committed",
    )
    measurement_prefix: str = Field("", description="prefix of measurement names, as on stations")
    sites: list[str] = Field(
        ["*"],
        min_length=1,
        description="site names (glob patterns) whose messages are stored; others are quarantined",
    )
    stations: list[str] = Field(
        ["*"], min_length=1, description="station names (glob patterns) whose messages are stored"
    )
    max_name_chars: int = Field(64, ge=1, le=128, description="longest site or station name")
    max_stations: int = Field(
        10_000, ge=1, description="distinct site/station pairs one worker stores (series bound)"
    )
    max_pumps_per_station: int = Field(
        256, ge=1, description="distinct pumps one station may report (series bound)"
    )
    max_record_age_days: float = Field(
        366.0,
        gt=0,
        description="oldest receive or device time stored, before this worker's clock; longer "
        "than the longest outage a station's outbox bridges",
    )
    max_clock_ahead_s: float = Field(
        300.0,
        ge=0,
        description="receive and alert times may be this far after this worker's clock "
        "(device times one day more: a pump's clock drifts)",
    )
    max_queue_messages: int = Field(
        5000, ge=1, description="deliveries waiting between paho's thread and the worker"
    )
    max_queue_bytes: int = Field(
        16 * 1024 * 1024,
        ge=MAX_PAYLOAD_BYTES,
        description="payload bytes waiting between paho's thread and the worker",
    )

    @model_validator(mode="after")
    def _queue_holds_the_window(self) -> IngestSection:
        if self.max_queue_messages < self.receive_max:
            raise ValueError(
                f"max_queue_messages {self.max_queue_messages} must be at least receive_max "
                f"{self.receive_max}, the messages the broker may send before an ack"
            )
        return self

    def origin_limits(self) -> OriginLimits:
        return OriginLimits(
            sites=tuple(self.sites),
            stations=tuple(self.stations),
            max_name_chars=self.max_name_chars,
            max_stations=self.max_stations,
            max_pumps_per_station=self.max_pumps_per_station,
        )

    def window(self, now: datetime) -> TimeWindow:
        return TimeWindow.around(
            now, timedelta(days=self.max_record_age_days), timedelta(seconds=self.max_clock_ahead_s)
        )

    @field_validator("group")
    @classmethod
    def _segment(cls, value: str) -> str:
        problem = segment_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class IngestSettings(ProcessSettings):
    """[mqtt], [influx], [store], [health] and [ingest]: what a worker runs, nothing more."""

    gateway: GatewaySection = GatewaySection()
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings | None = None
    store: StoreSection = StoreSection()
    health: HealthSection = HealthSection()

    ingest: IngestSection = IngestSection()


def load_ingest_settings(path: Path | None, **overrides: Any) -> IngestSettings:
    """Read the TOML file, apply PUMPGW_* variables (PUMPGW_INGEST__GROUP...); raise ConfigError."""
    settings = load_settings_as(IngestSettings, path, **overrides)
    problems = []
    if settings.mqtt.protocol != "5":
        problems.append('mqtt.protocol: ingest needs "5" (shared subscriptions, session expiry)')
    if settings.influx is None:
        problems.append("influx: ingest writes to InfluxDB; add an [influx] section")
    if problems:
        raise ConfigError(problems)
    return settings


def client_id_for(settings: IngestSettings) -> str:
    """The worker's MQTT client id: [ingest], else [mqtt], else one per host."""
    return (
        settings.ingest.client_id
        or settings.mqtt.client_id
        or f"pumpgw-ingest-{socket.gethostname()}"
    )


# --- the pure core: topics, validation, records ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a message cannot be stored as a point."""

    reason_kind: str
    reason: str
    pump_id: str | None = None


def subscriptions(group: str, prefix: str) -> list[str]:
    """The shared subscription filters of a worker group under a topic prefix."""
    base = f"$share/{group}/{prefix}/+/+"
    return [*(f"{base}/pumps/+/{leaf}" for leaf in LEAF_KINDS), f"{base}/gateway/alerts"]


@lru_cache(maxsize=1024)
def _tags(site: str, station: str, measurement_prefix: str) -> PointTags:
    return PointTags(site, station, measurement_prefix)


def record_id_for(parts: TopicParts, message_record_id: str) -> str:
    """A record's identity at a consumer: site and station from the topic, then the message's.

    The broker lets a station publish only under its own site and station, so no station can
    take another's ids (a message's own id is unique only within its station). '/' cannot
    occur in a topic level, so the joined id is unambiguous.
    """
    return f"{parts.site}/{parts.station}/{message_record_id}"


def record_for(
    topic: str,
    payload: bytes,
    prefix: str,
    measurement_prefix: str = "",
    *,
    payload_bytes: int | None = None,
    window: TimeWindow | None = None,
    origin: OriginGuard | None = None,
) -> OutRecord | Rejected:
    """The outbox record (with its point) of one message, or why it cannot be one.

    payload_bytes: the message's real size when `payload` is only its start (a message too
    large to copy); window and origin: the worker's admission checks (none when omitted).
    """
    parts = parse_topic(topic, prefix)
    if parts is None:
        return Rejected("topic", f"{topic[:200]}: not a telemetry, event or alert topic")
    size = len(payload) if payload_bytes is None else payload_bytes
    if size > MAX_PAYLOAD_BYTES:
        return Rejected("oversized", f"{size} bytes (limit {MAX_PAYLOAD_BYTES})")
    if origin is not None and (refusal := origin.admit_station(parts.site, parts.station)):
        return Rejected(refusal.reason_kind, refusal.reason)
    try:
        return _validated_record(parts, payload, measurement_prefix, window, origin)
    except ValidationError as exc:
        return Rejected("invalid", describe_errors(exc.errors()), parts.pump_id)
    except Exception as exc:  # noqa: BLE001 - nothing a publisher sends may stop the worker
        return Rejected("invalid", f"{type(exc).__name__}: {str(exc)[:200]}", parts.pump_id)


def _validated_record(
    parts: TopicParts,
    payload: bytes,
    measurement_prefix: str,
    window: TimeWindow | None,
    origin: OriginGuard | None,
) -> OutRecord | Rejected:
    message = MODELS[parts.kind].model_validate_json(payload)
    assert isinstance(message, Reading | DeviceEvent | AlertTransition)  # MODELS says so
    if message.pump_id != parts.pump_id:
        problem = f"payload pump_id {message.pump_id!r} is not the topic's {parts.pump_id!r}"
        return Rejected("pump_mismatch", problem, parts.pump_id)
    refusal: Refusal | None = None
    if window is not None:
        refusal = window.problem(message)
    if refusal is None and origin is not None:
        refusal = origin.admit_pump(parts.site, parts.station, parts.pump_id)
    if refusal is not None:
        return Rejected(refusal.reason_kind, refusal.reason, parts.pump_id)
    try:
        tags = _tags(parts.site, parts.station, measurement_prefix)
    except ValueError as exc:
        return Rejected("topic", str(exc), parts.pump_id)
    line = line_for(message, tags)
    record_id = record_id_for(parts, message.record_id)
    return OutRecord(parts.kind, record_id, message.pump_id, payload, line)


def quarantine_record(
    topic: str, payload: bytes, rejected: Rejected, received_at: datetime
) -> OutRecord:
    """A rejected message kept in the outbox with its reason (no point: InfluxDB skips it)."""
    digest = hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:24]
    pump_id = rejected.pump_id
    entry = Quarantined(
        quarantine_id=f"ingest:{digest}",
        source=f"mqtt:{topic[:200]}",
        reason_kind=rejected.reason_kind,
        reason=rejected.reason[:1000],
        raw_hex=payload[:QUARANTINE_RAW_BYTES].hex(),
        received_at=received_at,
        pump_id=pump_id if pump_id and len(pump_id) <= 64 else None,
    )
    return OutRecord("quarantine", entry.quarantine_id, None, entry.model_dump_json().encode())


class RecentIds:
    """The most recent record ids, bounded: a redelivered message is recognised, not stored."""

    def __init__(self, limit: int = RECENT_IDS) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, record_id: str) -> bool:
        """Remember an id; return False if it was already known."""
        if record_id in self._ids:
            self._ids.move_to_end(record_id)
            return False
        self._ids[record_id] = None
        if len(self._ids) > self._limit:
            self._ids.popitem(last=False)
        return True

    def extend(self, record_ids: Iterable[str]) -> None:
        for record_id in record_ids:
            self.add(record_id)


# --- the MQTT side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received message; `generation` is the connection it arrived on."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int
    size_bytes: int
    """The payload's real size; `payload` holds only its start when it is over the limit."""


class MqttSubscription:
    """A persistent MQTT 5 session with the group's shared subscriptions; acks after commit.

    paho's callbacks only hand events to `events` and bump `generation`. Every connect and
    disconnect starts a new generation: an acknowledgement for a message of an earlier
    connection is not sent, because the broker delivers that message again (with the same
    packet id, which it may by then have given to another message).

    Back-pressure: the filters are subscribed at QoS 1 and the CONNECT's Receive Maximum
    bounds the QoS 1 messages in flight, but a QoS 0 publish bypasses both; so a QoS 0
    delivery is dropped and counted here, never queued (a station publishes at QoS 1). The
    queue to the worker is bounded in messages and bytes: when it is full, paho's thread
    waits for room, so the broker holds the rest.
    """

    def __init__(
        self,
        settings: IngestSettings,
        events: queue.SimpleQueue[ClientEvent | Delivery],
        *,
        retire: bool = False,
    ) -> None:
        """retire: unsubscribe at connect instead of subscribing (see IngestWorker.run)."""
        self.retire = retire
        self.mqtt: MqttSettings = settings.mqtt
        self.ingest = settings.ingest
        self.client_id = client_id_for(settings)
        self.filters = subscriptions(settings.ingest.group, settings.mqtt.topic_prefix)
        self._events = events
        self._lock = threading.Lock()
        self.generation = 0
        self.subscribed = False
        self.reconnects = 0
        self.bytes_in = 0
        self.qos0_dropped = 0
        self.queue_full_waits = 0
        self.last_error: str | None = None
        self._room = threading.Condition()
        self._queued_messages = 0
        self._queued_bytes = 0
        self._closing = False
        self._client = self._make_client()

    def _make_client(self) -> MqttClient:
        client = MqttClient(
            self.mqtt,
            self.client_id,
            emit=self._emit,
            on_message=self._on_message,
            on_connect=self._on_connect,
            manual_ack=True,
            subscribed_filters=tuple(self.filters),
            paho_class=BulkClient,
        )
        assert isinstance(client.paho, BulkClient)  # paho_class says so
        self._paho = client.paho
        return client

    def start(self) -> None:
        """Connect in the background (paho's thread), keeping the session of this client id."""
        props = session_properties(self.ingest.session_expiry_s, self.ingest.receive_max)
        self._client.start(clean_start=False, properties=props)

    def close(self, *, end_session: bool = False) -> None:
        """Disconnect; the session and its unacknowledged messages stay unless `end_session`."""
        with self._room:
            self._closing = True
            self._room.notify_all()
        with self._lock:
            self.generation += 1
        self._client.stop(properties=session_properties(0) if end_session else None)

    def ack(self, deliveries: Sequence[Delivery]) -> tuple[int, int]:
        """Acknowledge committed messages (one write); return (acked, left to redelivery)."""
        with self._lock:
            current = [d for d in deliveries if d.qos and d.generation == self.generation]
            self._paho.ack_many(d.mid for d in current if d.qos == 1)
            for d in current:
                if d.qos != 1:
                    self._paho.ack(d.mid, d.qos)
        stale = sum(1 for d in deliveries if d.qos) - len(current)
        return len(current), stale

    # -- paho callbacks: paho's thread; they only hand data over -----------------------------

    def _bump(self) -> int:
        with self._lock:
            self.generation += 1
            return self.generation

    def _on_connect(self, client: mqtt.Client, event: Connected) -> None:
        self._bump()
        if self.retire:
            client.unsubscribe(self.filters)
        else:
            client.subscribe([(f, SubscribeOptions(qos=QOS)) for f in self.filters])

    def _emit(self, event: ClientEvent) -> None:
        if isinstance(event, Refused):
            self._bump()
        elif isinstance(event, Disconnected):
            self._bump()
            self.subscribed = False
        elif isinstance(event, Subscribed):
            self.subscribed = not event.refused
        self._events.put(event)

    def taken(self, deliveries: Sequence[Delivery]) -> None:
        """The worker took these deliveries off the queue: their room is free again."""
        if not deliveries:
            return
        with self._room:
            self._queued_messages -= len(deliveries)
            self._queued_bytes -= sum(len(d.payload) for d in deliveries)
            self._room.notify()

    def queued(self) -> tuple[int, int]:
        """(messages, payload bytes) waiting for the worker."""
        with self._room:
            return self._queued_messages, self._queued_bytes

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        size = len(message.payload)
        self.bytes_in += size
        if message.qos == 0:
            self.qos0_dropped += 1
            return
        # An oversized payload is quarantined unread: only its start is copied and handed over.
        kept = (
            message.payload if size <= MAX_PAYLOAD_BYTES else message.payload[:QUARANTINE_RAW_BYTES]
        )
        payload = bytes(kept)
        if not self._wait_for_room(len(payload)):
            return  # closing: not acknowledged, so the broker delivers it again
        delivery = Delivery(message.topic, payload, message.mid, message.qos, self.generation, size)
        self._events.put(delivery)

    def _wait_for_room(self, payload_bytes: int) -> bool:
        """Reserve queue room for one delivery, waiting while the queue is full."""
        limits = self.ingest
        with self._room:
            while not self._closing and (
                self._queued_messages >= limits.max_queue_messages
                or self._queued_bytes + payload_bytes > limits.max_queue_bytes
            ):
                self.queue_full_waits += 1
                self._room.wait(QUEUE_FULL_WAIT_S)
            if self._closing:
                return False
            self._queued_messages += 1
            self._queued_bytes += payload_bytes
            return True


# --- the worker ---------------------------------------------------------------------------


@dataclass
class IngestCounts:
    """What the worker did, for /metrics."""

    received: int = 0
    duplicates: int = 0
    acked: int = 0
    stale_acks: int = 0
    accepted_by_kind: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)


class IngestWorker:
    """One ingest worker: shared subscription in, its own outbox, InfluxDB out."""

    def __init__(self, settings: IngestSettings, *, retire: bool = False) -> None:
        assert settings.influx is not None  # load_ingest_settings checks it
        self.settings = settings
        self.started_s = time.time()
        self.stop_event = threading.Event()
        self.wake_influx = threading.Event()
        self.counts = IngestCounts()
        self._batch_max = max(1, settings.ingest.receive_max // 2)
        """Half the broker's window: one batch commits while the next one arrives."""
        self._events: queue.SimpleQueue[ClientEvent | Delivery] = queue.SimpleQueue()
        self._quiet = QuietLog(log)
        self.outbox = store_shell.open_outbox(settings.store, ["influx"])
        self._recent = RecentIds()
        self._recent.extend(self.outbox.recent_record_ids(RECENT_IDS))
        self.origin = OriginGuard(settings.ingest.origin_limits())
        self.subscription = MqttSubscription(settings, self._events, retire=retire)
        self._unsubscribed = False
        self.sink = InfluxSink(settings.influx, self.outbox, on_poison=self._on_poison)
        self._sink_thread: threading.Thread | None = None

    def run(self, stop: threading.Event) -> bool:
        """Ingest until `stop` is set; then disconnect (unacked messages stay queued) and close.

        A retiring worker (IngestWorker(..., retire=True)) instead leaves its group: it
        unsubscribes, so the broker sends it nothing new, ingests what its session still
        holds, waits until InfluxDB has all of it, then ends its session. Returns whether
        it retired (False: stopped first).
        """
        log.info(
            "ingest worker %s %s group %r: %s -> %s",
            self.subscription.client_id,
            "leaving" if self.subscription.retire else "in",
            self.settings.ingest.group,
            self.settings.mqtt.display_url(),
            self.sink.settings.display_url(),
        )
        self._sink_thread = threading.Thread(
            target=self.sink.run,
            args=(self.stop_event, self.wake_influx),
            name="influx sink",
            daemon=True,
        )
        self._sink_thread.start()
        self.subscription.start()
        retired = False
        try:
            retired = self._loop(stop)
        finally:
            self._shutdown(retired)
        return retired

    def _loop(self, stop: threading.Event) -> bool:
        """Ingest until stopped (False) or, when retiring, until everything is out (True).

        Two stages: this thread takes and validates a batch while the committer thread
        stores (and then acknowledges) the one before, so validation runs during the
        commit's fsync. One batch commits at a time, in order; the committer is done
        before this returns (and before the outbox closes).
        """
        now_m = time.monotonic()
        next_compact, last_delivery_m = now_m + COMPACT_EVERY_S, now_m
        with ThreadPoolExecutor(1, thread_name_prefix="ingest commit") as committer:
            in_flight: Future[None] | None = None
            while not stop.is_set():
                deliveries = self._take(IDLE_WAIT_S)
                now_m = time.monotonic()
                if deliveries:
                    last_delivery_m = now_m
                    records = self._records(deliveries)
                    _settle(in_flight)
                    in_flight = committer.submit(self._store, records, deliveries, stop)
                else:
                    _settle(in_flight)
                    in_flight = None
                    if self._retired(now_m - last_delivery_m):
                        return True
                if now_m >= next_compact:
                    next_compact = now_m + COMPACT_EVERY_S
                    self.outbox.compact(time.time())
            _settle(in_flight)
        return False

    def _retired(self, idle_s: float) -> bool:
        """A retiring worker is done when its session is drained and InfluxDB has it all."""
        if not (self.subscription.retire and self._unsubscribed and idle_s >= RETIRE_IDLE_S):
            return False
        backlog, _oldest = self.outbox.backlog("influx")
        if backlog:
            return False
        log.info(
            "left group %r: session drained, every point written; ending the session",
            self.settings.ingest.group,
        )
        return True

    def _shutdown(self, end_session: bool) -> None:
        self.subscription.close(end_session=end_session)
        self.stop_event.set()
        self.wake_influx.set()
        if self._sink_thread is not None:
            self._sink_thread.join(10.0)
        self.outbox.close()
        log.info("ingest worker stopped")

    def _take(self, timeout_s: float) -> list[Delivery]:
        """Up to half of receive_max deliveries, handling connection events on the way.

        Waits only for the first: the batch is whatever arrived meanwhile, so it grows with
        the load and one commit (one fsync) serves all of it.
        """
        deliveries: list[Delivery] = []
        wait_s: float | None = timeout_s
        while len(deliveries) < self._batch_max:
            try:
                event = self._events.get(timeout=wait_s) if wait_s else self._events.get_nowait()
            except queue.Empty:
                break
            wait_s = None
            if isinstance(event, Delivery):
                deliveries.append(event)
            else:
                self._connection_event(event)
        self.subscription.taken(deliveries)
        return deliveries

    def _connection_event(self, event: ClientEvent) -> None:
        sub = self.subscription
        url = self.settings.mqtt.display_url()
        match event:
            case Connected(session_present):
                session = "resumed" if session_present else "new"
                log.info("MQTT connected to %s as %s (%s session)", url, sub.client_id, session)
                sub.last_error = None
                self._quiet.forget("unreachable")
            case Subscribed(refused):
                for topic_filter, name in refused:
                    sub.last_error = f"broker refused the subscription to {topic_filter}: {name}"
                    self._quiet.error(
                        f"sub:{topic_filter}",
                        "%s; check the broker's ACL for %s",
                        sub.last_error,
                        self.settings.mqtt.username or "this client",
                    )
            case Unsubscribed():
                self._unsubscribed = True
                log.info(
                    "unsubscribed from group %r; taking what the session still holds",
                    self.settings.ingest.group,
                )
            case Refused(code):
                sub.last_error = str(event.error)
                self._quiet.error(f"refused:{code}", "%s", sub.last_error)
            case Unreachable():
                sub.last_error = f"cannot reach the broker at {url}; retrying"
                self._quiet.warning("unreachable", "%s", sub.last_error)
            case Disconnected(_code, name):
                sub.reconnects += 1
                sub.last_error = f"connection to {url} lost: {name}"
                log.warning("%s; unacknowledged messages will be delivered again", sub.last_error)
            case _:
                pass  # PUBACKs: the worker publishes nothing

    def _records(self, deliveries: list[Delivery]) -> list[OutRecord]:
        """The records to store for a batch: validated, admitted or quarantined, deduplicated."""
        window = self.settings.ingest.window(datetime.now(UTC))
        return [r for d in deliveries if (r := self._record(d, window)) is not None]

    def _store(
        self, records: list[OutRecord], deliveries: list[Delivery], stop: threading.Event
    ) -> None:
        """Commit, then acknowledge: nothing is acked that is not stored (committer thread)."""
        if not self._commit(records, stop):
            return  # stopping: not acknowledged, so the broker delivers them again
        self.wake_influx.set()
        acked, stale = self.subscription.ack(deliveries)
        self.counts.acked += acked
        self.counts.stale_acks += stale

    def _record(self, delivery: Delivery, window: TimeWindow) -> OutRecord | None:
        """The record to store for one delivery; None for a message already stored."""
        self.counts.received += 1
        result = record_for(
            delivery.topic,
            delivery.payload,
            self.settings.mqtt.topic_prefix,
            self.settings.ingest.measurement_prefix,
            payload_bytes=delivery.size_bytes,
            window=window,
            origin=self.origin,
        )
        if isinstance(result, Rejected):
            self.counts.quarantined[result.reason_kind] += 1
            self._quiet.warning(
                f"quarantine:{result.reason_kind}",
                "quarantined a message on %s: %s",
                delivery.topic[:200],
                result.reason,
            )
            return quarantine_record(delivery.topic, delivery.payload, result, datetime.now(UTC))
        if not self._recent.add(result.record_id):
            self.counts.duplicates += 1
            return None
        self.counts.accepted_by_kind[result.kind] += 1
        return result

    def _commit(self, records: list[OutRecord], stop: threading.Event) -> bool:
        """Store the records, retrying while the outbox is full or failing; False if stopped."""
        stored = store_shell.commit(
            self.outbox,
            list(records),
            None,
            on_full=lambda exc: self._quiet.error(
                "outbox",
                "outbox full, not acknowledging until InfluxDB "
                "catches up (the broker keeps the messages): %s",
                exc,
            ),
            on_error=lambda exc: self._quiet.error(
                "outbox", "outbox write failed, retrying: %s", exc
            ),
            wait_to_retry=lambda: stop.wait(RETRY_COMMIT_S),
        )
        if stored:
            self._quiet.forget("outbox")
        return stored

    def _on_poison(self, record: StoredRecord, why: str) -> None:
        """Called on the sink's thread: keep a point InfluxDB refused for good, with the reason."""
        rejected = Rejected("rejected_by_database", why, record.pump_id)
        try:
            self.outbox.append(
                [
                    quarantine_record(
                        f"influx:{record.record_id}",
                        record.line or b"",
                        rejected,
                        datetime.now(UTC),
                    )
                ]
            )
        except OutboxError as exc:
            log.error("cannot keep the rejected point %s: %s", record.record_id, exc)

    # -- observation -----------------------------------------------------------------------

    def observe(self) -> Observation:
        """Counters and backlog in the gateway's shape, so /metrics has the same names."""
        now_s = time.time()
        health = self.sink.health()
        sub = self.subscription
        counts = self.counts
        intake = store_shell.Intake(
            frames_in=counts.received,
            accepted_by_kind=dict(counts.accepted_by_kind),
            quarantined_by_reason=dict(counts.quarantined),
            duplicates=counts.duplicates,
            alert_transitions=counts.accepted_by_kind.get("alert", 0),
        )
        source = SourceObservation(
            f"{SOURCE_NAME} {self.settings.ingest.group}",
            sub.subscribed,
            sub.reconnects,
            sub.bytes_in,
            sub.last_error,
        )
        sink = store_shell.sink_observation(
            "influx",
            health,
            self.outbox.backlog("influx"),
            now_s,
            {
                "mqtt_acked": counts.acked,
                "mqtt_stale_acks": counts.stale_acks,
                "mqtt_qos0_dropped": sub.qos0_dropped,
                "mqtt_queue_full_waits": sub.queue_full_waits,
            },
        )
        return store_shell.observation(
            self.outbox,
            intake,
            outbox_full=False,
            uptime_s=now_s - self.started_s,
            sources=(source,),
            sinks=(sink,),
            max_backlog_age_s=self.settings.health.max_backlog_age_s,
        )


def _settle(in_flight: Future[None] | None) -> None:
    """Wait for a batch's commit and acknowledgement (raising what it raised)."""
    if in_flight is not None:
        in_flight.result()


def run_ingest(settings: IngestSettings, stop: threading.Event, *, retire: bool = False) -> bool:
    """Run one worker until `stop` is set (or it has left its group): `pumpgw ingest`."""
    worker = IngestWorker(settings, retire=retire)
    with store_shell.serving_health(settings.health, worker.observe):
        return worker.run(stop)
