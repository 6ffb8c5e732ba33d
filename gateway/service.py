"""The service loop: sources -> pipeline -> outbox -> sinks, and the threads that run them.

Data flows one way. Source threads decode bytes and hand items to one ingest
thread through a bounded queue (a full queue stops the readers: back-pressure).
The ingest thread validates, evaluates alerts, commits everything to the outbox
in one transaction per batch, then acknowledges the frames to the device and
wakes the sinks. Sinks run in their own threads and advance their own cursors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Histogram

from gateway import __version__
from gateway.adapters.delivery import MessageSink, Sink
from gateway.adapters.fhir_rest import make_fhir_sink
from gateway.adapters.influx import InfluxSink
from gateway.adapters.mllp import make_hl7_sink
from gateway.adapters.mqtt import MqttSink, ReceivedAck
from gateway.adapters.mqtt_client import SelectableEvent
from gateway.adapters.serial_port import SerialSource
from gateway.config import Settings, pseudonymize_key
from gateway.health import Observation, SourceObservation, latency_histogram
from gateway.outbox import OutboxError, OutboxFullError
from gateway.pipeline import AckKey, Batch, Pipeline, ack_runs, pseudonym
from gateway.points import PointTags
from gateway.quiet import CountedLog, QuietLog
from gateway.records import OutRecord, StoredRecord
from gateway.rules import STATE_KEY, AlertEngine
from gateway.store_shell import (
    Intake,
    commit,
    observation,
    open_outbox,
    serving_health,
    sink_observation,
)
from gateway.topics import TopicBase, ack_filter, ack_origin
from schemas.codec import Frame, FrameDecoder, FrameError, encode_ack
from schemas.models import AckRefusal, GatewayStatus

log = logging.getLogger(__name__)

INGEST_QUEUE_ITEMS = 1000
"""Reads waiting for the ingest thread; when full, sources stop reading (back-pressure)."""
BATCH_MAX_ITEMS = 200
"""Most reads validated and committed in one transaction (natural group commit)."""
TICK_S = 1.0
COMPACT_EVERY_S = 60.0
ENGINE_SNAPSHOT_EVERY_S = 5.0
"""Save the rows of pumps whose state changed at least this often; alert changes save at once."""
RETRY_COMMIT_S = 1.0
RECENT_IDS_ON_START = 50_000
ACK_QUEUE_ITEMS = 1000
ACK_QUEUE_WAIT_S = 0.5
"""The MQTT sink's thread re-checks this often for room in a full ack queue (and for a stop)."""
"""Operator acknowledgements waiting for the ingest thread; they have their own queue so that
a full ingest queue or a full outbox never holds them back."""
STATUS_SEQ_BLOCK = 2**20
"""GatewayStatus seqs of one connection: birth at the block's start, will at its end."""


class StatusSequence:
    """GatewayStatus seqs of one session, ordered across connections; thread-safe.

    Connection k owns [k * BLOCK, (k + 1) * BLOCK): its birth takes the first, its will the
    last, and the statuses published while it lasts the ones between. So every birth is above
    the previous connection's will, and every will above its connection's other statuses."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self._will = STATUS_SEQ_BLOCK - 1

    def connection(self) -> tuple[int, int]:
        """(birth seq, will seq) of a new connection."""
        with self._lock:
            birth = self._will + 1
            self._will = birth + STATUS_SEQ_BLOCK - 1
            self._next = birth + 1
            return birth, self._will

    def next(self) -> int:
        """The seq of a status published during the current connection."""
        with self._lock:
            seq = self._next
            self._next = min(seq + 1, self._will - 1)  # a million statuses a connection
            return seq


@dataclass
class SinkSet:
    """The sinks the service drains the outbox to."""

    mqtt: MqttSink | None = None
    influx: InfluxSink | None = None
    messages: list[MessageSink] = field(default_factory=list)
    """HL7 v2 and FHIR: each a MessageSink (adapters/delivery.py) with its own cursor."""
    threads: list[threading.Thread] = field(default_factory=list)

    def names(self) -> list[str]:
        fixed = [n for n, s in (("mqtt", self.mqtt), ("influx", self.influx)) if s is not None]
        return fixed + [s.name for s in self.messages]

    def all(self) -> list[Sink]:
        """Every sink, behind the one Sink protocol (adapters/delivery.py), in outbox order."""
        fixed: list[Sink] = [s for s in (self.mqtt, self.influx) if s is not None]
        return fixed + list(self.messages)


class Gateway:
    """One gateway: owns the outbox, the pipeline, the sources and the sinks."""

    def __init__(self, settings: Settings, *, alert_salt: bytes | None = None) -> None:
        self.settings = settings
        self._alert_salt = alert_salt  # None: random, kept in the engine's saved state
        self.session_id = uuid.uuid4().hex[:12]
        self.started_s = time.time()
        self.stop_event = threading.Event()
        self.wake_mqtt = SelectableEvent()
        """Wakes the MQTT sink's select (it drives its own connection: no paho thread)."""
        self.wake_influx = threading.Event()
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(INGEST_QUEUE_ITEMS)
        self._acks: queue.Queue[ReceivedAck] = queue.Queue(ACK_QUEUE_ITEMS)
        self._status_seq = StatusSequence()
        self._state_epoch = -1
        self._refresh_due_m = float("-inf")
        self.ack_queue_full_waits = 0
        self._acks_unsaved = False
        """Acknowledgements changed the engine since its state was last given to a commit."""
        self._quiet = QuietLog(log)
        self._refusal_log = CountedLog(log)
        self._full = False
        self._near_full = False
        self._freed_reported = 0
        self._committed_m = float("-inf")
        self.frame_to_commit = latency_histogram(
            "pumpgw_frame_to_commit_seconds", "From a read off a line to its commit in the outbox."
        )
        self._sources_seen: tuple[bool, ...] = ()
        self._batches_done = 0
        sink_names = ["mqtt"] + (["influx"] if settings.influx is not None else [])
        sink_names += [n for n in ("hl7", "fhir") if getattr(settings, n) is not None]
        self.wake_messages = {name: threading.Event() for name in ("hl7", "fhir")}
        self.outbox = open_outbox(settings.store, sink_names)
        self.topics = TopicBase(
            prefix=settings.mqtt.topic_prefix,
            site=settings.gateway.site,
            station=settings.gateway.station,
        )
        self.pipeline = self._build_pipeline()
        self.sources = [SerialSource(s, self._deliver) for s in settings.sources]
        self.sinks = self._build_sinks()
        self._threads: list[threading.Thread] = []

    def _build_pipeline(self) -> Pipeline:
        gw, alerts = self.settings.gateway, self.settings.alerts
        key = pseudonymize_key(gw)
        if key is not None:  # per-pump overrides name real ids; the engine sees pseudonyms
            alerts = alerts.with_pump_ids(functools.partial(pseudonym, key))
        state = self.outbox.load_states(STATE_KEY)  # rows, or an earlier build's single row
        try:
            engine = AlertEngine(alerts, state, salt=self._alert_salt)
        except ValueError as exc:
            log.error("saved alert state unusable (%s): starting with no active alerts", exc)
            engine = AlertEngine(alerts, salt=self._alert_salt, discard=state)
        pipeline = Pipeline(
            engine,
            PointTags(site=gw.site, station=gw.station),
            pseudonymize_key=key,
            status_interval_s=gw.status_interval_s,
            ack_allowed=frozenset(gw.ack_allowed) if gw.ack_allowed is not None else None,
            ack_technical=frozenset(gw.ack_technical),
            session_id=self.session_id,
            ack_topic_hint=ack_filter(self.topics).removesuffix("+") + "{your MQTT user name}",
        )
        pipeline.remember(self.outbox.recent_record_ids(RECENT_IDS_ON_START))
        return pipeline

    def _build_sinks(self) -> SinkSet:
        sinks = SinkSet()
        sinks.mqtt = MqttSink(
            self.settings.mqtt,
            self.outbox,
            self.topics,
            status=self._connection_status,
            on_ack=self._on_operator_ack,
        )
        if self.settings.influx is not None:
            sinks.influx = InfluxSink(self.settings.influx, self.outbox, on_poison=self._on_poison)
        if self.settings.hl7 is not None:
            sinks.messages.append(
                make_hl7_sink(self.settings.hl7, self.outbox, on_poison=self._on_sink_poison)
            )
        if self.settings.fhir is not None:
            sinks.messages.append(
                make_fhir_sink(self.settings.fhir, self.outbox, on_poison=self._on_sink_poison)
            )
        return sinks

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start every thread; returns at once."""
        self._spawn("ingest", self._ingest_loop)
        for source in self.sources:
            self._spawn(f"source {source.label}", source.run, self.stop_event)
        if self.sinks.mqtt is not None:
            self._spawn("mqtt sink", self.sinks.mqtt.run, self.stop_event, self.wake_mqtt)
        if self.sinks.influx is not None:
            self._spawn("influx sink", self.sinks.influx.run, self.stop_event, self.wake_influx)
        for sink in self.sinks.messages:
            wake = self.wake_messages[sink.name]
            self._spawn(f"{sink.name} sink", sink.run, self.stop_event, wake)
        log.info(
            "gateway %s/%s started (session %s); sources: %s",
            self.settings.gateway.site,
            self.settings.gateway.station,
            self.session_id,
            ", ".join(s.label for s in self.sources) or "none",
        )

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop reading, commit what was read, let sinks finish in-flight work, close."""
        self.stop_event.set()
        self._wake_sinks()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("threads still running at shutdown: %s", ", ".join(alive))
        if self.sinks.mqtt is not None:
            self.sinks.mqtt.close()
        self.outbox.close()
        log.info("gateway stopped")

    # -- ingest ------------------------------------------------------------------

    def _deliver(
        self, source: SerialSource, received_s: float, items: list[Frame | FrameError]
    ) -> bool:
        """Called on a source thread: queue the items, waiting while the ingest is behind."""
        while not self.stop_event.is_set():
            try:
                self._queue.put(("frames", source, received_s, items), timeout=0.5)
                return True
            except queue.Full:
                self._quiet.warning("ingest", "ingest queue full: reading paused (back-pressure)")
        return False

    def _on_operator_ack(self, received: ReceivedAck) -> None:
        """Called on the MQTT sink's thread: hand the message over and wake the ingest thread.

        While ACK_QUEUE_ITEMS acks wait, this waits too: paho reads nothing more and the
        broker holds the rest (back-pressure), since nothing is PUBACKed before it is stored.
        """
        while True:
            try:
                self._acks.put(received, timeout=ACK_QUEUE_WAIT_S)
                break
            except queue.Full:
                self.ack_queue_full_waits += 1
                self._refusal_log.warning(
                    "ack-queue-full",
                    "%d acknowledgements wait to be applied: holding the next ones back at "
                    "the broker (nothing is lost; look for a client flooding the ack topics)",
                    ACK_QUEUE_ITEMS,
                )
            if self.stop_event.is_set():
                return  # not PUBACKed: the broker delivers it again to the next connection
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(("acks",))

    def _on_poison(self, record: StoredRecord, reason: str) -> None:
        """Called on the influx sink's thread when the database rejects a point for good."""
        self._queue.put(("poison", record.record_id, record.line or b"", reason, "influx"))

    def _on_sink_poison(self, sink: str, record: StoredRecord, reason: str, raw: bytes) -> None:
        """Called on an HL7 or FHIR sink's thread when the receiver refuses a record for good.
        The quarantine keeps the record's JSON, not the refused message: a message may carry
        a patient id from the device map, and quarantine entries go to the dead-letter topic."""
        self._queue.put(("poison", record.record_id, record.payload, reason, sink))

    def _ingest_loop(self) -> None:
        next_tick = time.monotonic()
        next_snapshot = next_compact = time.monotonic()
        while True:
            items = self._take_batch(timeout_s=max(0.0, next_tick - time.monotonic()))
            if not items and self.stop_event.is_set() and self._queue.empty():
                return
            self._apply_acks()
            batch = Batch()
            for item in items:
                self._apply(item, batch)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self.pipeline.tick(time.time(), batch)
                self._check_fill(batch)
                self._refresh_state(batch)
            self._check_sources(batch)
            snapshot = batch.alerts_changed or self._acks_unsaved or now >= next_snapshot
            if snapshot:
                next_snapshot = now + ENGINE_SNAPSHOT_EVERY_S
                self._acks_unsaved = False  # the state taken by this commit includes them
            self._commit(batch, snapshot)
            self._committed_m = time.monotonic()
            self._observe_latency(items, time.time())
            self._batches_done += 1
            if now >= next_compact:
                next_compact = now + COMPACT_EVERY_S
                self._compact()

    def _observe_latency(self, items: list[tuple[Any, ...]], committed_s: float) -> None:
        """frame->commit, once per read from a live line (a capture's times are the past's)."""
        for item in items:
            if item[0] == "frames":
                self.frame_to_commit.observe(max(0.0, committed_s - item[2]))

    def _compact(self) -> None:
        try:
            self.outbox.compact(time.time())
        except OutboxError as exc:
            self._quiet.error("compact", "%s; retrying later", exc)

    def _take_batch(self, timeout_s: float) -> list[tuple[Any, ...]]:
        """The next reads to validate and commit together: natural group commit. Wait for
        one, then take every read that arrived meanwhile (while the previous commit ran), up
        to BATCH_MAX_ITEMS: one reading alone on a quiet line, hundreds under load. With
        `store.gather_ms` set, a read that comes less than that after the last commit waits
        up to that long for others (fewer commits, more latency)."""
        try:
            items = [self._queue.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        now_m = time.monotonic()
        gather_s = self.settings.store.gather_ms / 1000.0
        deadline_m = now_m + gather_s if now_m - self._committed_m < gather_s else now_m
        while len(items) < BATCH_MAX_ITEMS:
            wait_s = deadline_m - time.monotonic()
            try:
                items.append(
                    self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return items

    def _apply(self, item: tuple[Any, ...], batch: Batch) -> None:
        kind = item[0]
        if kind == "frames":
            _, source, received_s, frames = item
            self.pipeline.frames(source.label, received_s, frames, batch)
        elif kind == "capture":
            _, label, received_s, frames = item
            self.pipeline.frames(label, received_s, frames, batch)
        elif kind == "poison":
            _, record_id, line, reason, sink = item
            self.pipeline.poisoned_point(record_id, line, reason, time.time(), batch, sink)
        for entry in batch.quarantined:
            self._quiet.warning(
                f"quarantine:{entry.reason_kind}",
                "quarantined: %s (source %s)",
                entry.reason,
                entry.source,
            )
        batch.quarantined.clear()

    def _commit(self, batch: Batch, snapshot: bool) -> None:
        if not batch.records and not snapshot:
            return
        state = self.pipeline.engine.changed_state() if snapshot else None
        stored = commit(
            self.outbox,
            batch.records,
            state,
            on_full=self._still_full,
            on_error=lambda exc: self._quiet.error(
                "outbox", "outbox write failed, retrying: %s", exc
            ),
            wait_to_retry=self._wait_to_retry,
        )
        if not stored:
            log.error(
                "stopping with %d records not stored; the device will resend them",
                len(batch.records),
            )
            return
        self._set_full(False)
        self._report_freed()
        self._wake_sinks()
        self._send_acks(batch.acks)

    def _still_full(self, exc: OutboxFullError) -> None:
        self._on_full(str(exc))
        log.debug("outbox still full: %s", exc)
        self._report_freed()

    def _wait_to_retry(self) -> bool:
        """Between commit attempts: apply operator acks (they never wait behind a full
        outbox), then wait; give up only when stopping with nothing more queued."""
        self._apply_acks()
        return self.stop_event.wait(RETRY_COMMIT_S) and self._queue.empty()

    def _wake_sinks(self) -> None:
        self.wake_mqtt.set()
        self.wake_influx.set()
        for wake in self.wake_messages.values():
            wake.set()

    def _send_acks(self, acks: dict[AckKey, list[int]]) -> None:
        """Tell each device which frames are stored: one range per gap-free run."""
        by_label = {s.label: s for s in self.sources}
        for key, seqs in acks.items():
            source = by_label.get(key.source)
            if source is None:
                continue
            frames = [
                encode_ack(key.pump_id, key.boot_id, last, first) for first, last in ack_runs(seqs)
            ]
            source.send(b"".join(frames))

    # -- operator acknowledgements ---------------------------------------------------

    def _apply_acks(self) -> None:
        """Apply the acknowledgements received so far and store their transitions at once,
        through the outbox's reserve for alerts: they do not wait for the batch being read
        nor for room in a full outbox. The engine state follows with the next commit."""
        batch = Batch()
        taken: list[ReceivedAck] = []
        while True:
            try:
                received = self._acks.get_nowait()
            except queue.Empty:
                break
            taken.append(received)
            origin = ack_origin(self.topics, received.topic)
            username = origin.username if origin is not None else None
            refusal = self.pipeline.operator_ack(
                username, received.payload, time.time(), batch, retained=received.retained
            )
            if refusal is None:
                self._acks_unsaved = True
            else:
                self._refused(refusal)
        if batch.records:
            try:
                self.outbox.append(batch.records)
            except OutboxError as exc:
                log.error(
                    "cannot store an acknowledgement: %s; it is not confirmed to the broker, "
                    "which delivers it again when the gateway reconnects",
                    exc,
                )
                return
            finally:
                self._wake_sinks()
        if self.sinks.mqtt is not None:
            for received in taken:
                self.sinks.mqtt.confirm(received)

    def _refused(self, refusal: AckRefusal) -> None:
        """Log a refused acknowledgement (WARNING, rate-limited with a count) and tell the
        operator's console why on the refusal topic."""
        self._refusal_log.warning(
            f"ack-refused:{refusal.reason_kind}",
            "acknowledgement from MQTT user %r of alert %r refused: %s",
            refusal.username,
            refusal.alert_id,
            refusal.reason,
        )
        if self.sinks.mqtt is not None:
            self.sinks.mqtt.send_refusal(refusal.model_dump_json().encode())

    # -- retained state ------------------------------------------------------------------

    def _refresh_state(self, batch: Batch) -> None:
        """Publish the retained state again, with fresh seqs, after every (re)connect or
        replay and every gateway.state_refresh_s (not while the outbox is full)."""
        mqtt = self.sinks.mqtt
        if mqtt is None or self._full:
            return
        now_m = time.monotonic()
        epoch = mqtt.state_epoch
        if epoch == self._state_epoch and now_m < self._refresh_due_m:
            return
        self._state_epoch = epoch
        self._refresh_due_m = now_m + self.settings.gateway.state_refresh_s
        self.pipeline.reassert(time.time(), batch)
        batch.records.append(self._status_record())

    # -- outbox fill -------------------------------------------------------------

    def _report_freed(self) -> None:
        freed = self.outbox.freed_rows - self._freed_reported
        if freed:
            self._freed_reported += freed
            self._quiet.warning(
                "history-freed",
                "disk full: deleted %d delivered records before their retention ended",
                freed,
            )

    def _on_full(self, reason: str) -> None:
        if not self._full:
            log.error("outbox full, reading paused until the sinks catch up: %s", reason)
        self._set_full(True)

    def _set_full(self, full: bool) -> None:
        """Raise or end the outbox_full technical alert (stored through the reserve)."""
        if full == self._full:
            return
        self._full = full
        batch = Batch()
        self.pipeline.condition(*self._full_condition(full), time.time(), batch, high=True)
        try:
            self.outbox.append(batch.records)
        except OutboxError as exc:
            log.error("cannot store the outbox_full alert: %s", exc)

    def _full_condition(self, full: bool) -> tuple[str, bool, str, float, float]:
        limit = float(self.outbox.max_pending)
        text = (
            "Outbox full: the gateway has stopped accepting pump telemetry until the "
            f"{self._slowest_sink()} sink catches up; nothing has been dropped."
        )
        return "outbox_full", full, text, float(self.outbox.pending()), limit

    def _slowest_sink(self) -> str:
        """The sink with the largest backlog (mqtt, influx, hl7 or fhir)."""
        return max(self.sinks.names(), key=lambda name: self.outbox.backlog(name)[0])

    def _check_fill(self, batch: Batch) -> None:
        limit = self.outbox.max_pending
        pending = self.outbox.pending()
        warn = self.settings.store.warn_at_fraction
        near = pending >= warn * limit
        clear = pending < 0.9 * warn * limit
        if near != self._near_full and (near or clear):
            self._near_full = near
            text = (
                f"Outbox {pending / limit:.0%} full ({pending} records wait for delivery): "
                f"check the receiver of the {self._slowest_sink()} sink."
            )
            self.pipeline.condition(
                "outbox_near_full",
                near,
                text,
                float(pending),
                warn * limit,
                time.time(),
                batch,
                high=False,
            )

    # -- status ------------------------------------------------------------------

    def _connection_status(self) -> tuple[bytes, bytes]:
        """Birth and will of a new MQTT connection (called on the MQTT sink's thread before it)."""
        birth_seq, will_seq = self._status_seq.connection()
        return self._gateway_status("online", birth_seq), self._gateway_status("offline", will_seq)

    def _gateway_status(self, state: str, seq: int) -> bytes:
        status = GatewayStatus(
            site=self.settings.gateway.site,
            station=self.settings.gateway.station,
            session_id=self.session_id,
            seq=seq,
            state=state,
            at=datetime.now(UTC),
            version=__version__,
            sources=tuple(s.status() for s in self.sources),
        )
        return status.model_dump_json().encode()

    def _check_sources(self, batch: Batch) -> None:
        """Store a gateway status record when a source connects or drops."""
        connected = tuple(s.connected for s in self.sources)
        if connected == self._sources_seen:
            return
        self._sources_seen = connected
        batch.records.append(self._status_record())

    def _status_record(self) -> OutRecord:
        """An `online` GatewayStatus to store and publish, with the next seq."""
        seq = self._status_seq.next()
        payload = self._gateway_status("online", seq)
        record_id = f"gateway:{self.session_id}:{seq}"
        return OutRecord("gateway_status", record_id, None, payload, None, True)

    # -- observation ---------------------------------------------------------------

    def observe(self) -> Observation:
        """A consistent-enough reading of counters and backlogs for /healthz, /metrics, the view."""
        counts = self.pipeline.counts
        now_s = time.time()
        sinks = []
        for sink in self.sinks.all():
            backlog = self.outbox.backlog(sink.name)
            sinks.append(sink_observation(sink.name, sink.health(), backlog, now_s))
        lost = sum(1 for p in list(self.pipeline.pumps.values()) if p.telemetry != "ok")
        intake = Intake(
            frames_in=counts.frames_in,
            accepted_by_kind=dict(counts.accepted_by_kind),
            quarantined_by_reason=dict(counts.quarantined),
            duplicates=counts.duplicates,
            alert_transitions=counts.alerts,
            acks_in=counts.acks_in,
            acks_rejected=counts.acks_rejected,
            acks_refused_by_reason=dict(counts.acks_refused),
            acknowledgement_delays={
                priority.value: delays
                for priority, delays in self.pipeline.engine.acknowledgement_delays().items()
            },
            pumps_total=len(self.pipeline.pumps),
            pumps_telemetry_lost=lost,
        )
        sources = tuple(
            SourceObservation(s.label, s.connected, s.reconnects, s.bytes_in, s.last_error)
            for s in self.sources
        )
        return observation(
            self.outbox,
            intake,
            outbox_full=self._full,
            uptime_s=now_s - self.started_s,
            sources=sources,
            sinks=tuple(sinks),
            max_backlog_age_s=self.settings.health.max_backlog_age_s,
            latencies=self._latencies(),
        )

    def _latencies(self) -> tuple[Histogram, ...]:
        mqtt = self.sinks.mqtt
        return (self.frame_to_commit,) + (() if mqtt is None else (mqtt.puback_latency,))

    def feed(self, label: str, data: bytes, received_s: float | None = None) -> None:
        """Push bytes from a capture through the same path as a live line (pumpgw replay)."""
        decoder = FrameDecoder()
        items: list[Frame | FrameError] = [*decoder.feed(data), *decoder.flush()]
        self._queue.put(("capture", label, received_s or time.time(), items))

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is committed (used by replay and tests)."""
        deadline = time.monotonic() + timeout_s
        target = self._batches_done + 2
        while time.monotonic() < deadline:
            if self._queue.empty() and self._batches_done >= target:
                return True
            time.sleep(0.02)
        return False

    def wait_delivered(self, timeout_s: float) -> bool:
        """Wait until every sink has delivered everything stored."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.outbox.backlog(n)[0] == 0 for n in self.sinks.names()):
                return True
            self._wake_sinks()
            time.sleep(0.05)
        return False


def run_gateway(settings: Settings, stop: threading.Event) -> None:
    """Run until `stop` is set: the body of `pumpgw run`."""
    gateway = Gateway(settings)
    with serving_health(settings.health, gateway.observe):
        gateway.start()
        try:
            stop.wait()
        finally:
            gateway.stop()


def replay_capture(settings: Settings, capture: Path) -> dict[str, int]:
    """Feed a capture file through the pipeline, wait for delivery, return the accounting."""
    data = capture.read_bytes()
    # The same capture gives the same alert ids, so replaying it again adds nothing.
    salt = hashlib.sha256(b"pumpgw-replay:" + data).digest()[:16]
    gateway = Gateway(settings.model_copy(update={"sources": []}), alert_salt=salt)
    gateway.start()
    try:
        gateway.feed(f"replay:{capture.name}", data)
        gateway.drain()
        gateway.wait_delivered(60.0)
    finally:
        gateway.stop()
    counts = gateway.pipeline.counts
    return {
        "frames_in": counts.frames_in,
        "accepted": counts.accepted,
        "quarantined": sum(counts.quarantined.values()),
        "duplicates": counts.duplicates,
        "alert_transitions": counts.alerts,
    }
