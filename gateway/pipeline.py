"""Turning decoded frames into stored records: validation, quarantine, dedup, alerts.

Pure apart from the clock value passed in: no threads, no I/O. The service owns
one Pipeline and calls it from a single thread; it returns the records to commit
and the acknowledgements to send once they are committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from gateway.points import PointTags, line_for
from gateway.records import GATEWAY_PUMP_ID, RETAINED_KINDS, OutRecord
from gateway.rules import AlertEngine
from schemas.codec import Frame, FrameError, MessageError, message_from_frame
from schemas.models import (
    OPERATOR_PATTERN,
    Acknowledgement,
    AckRefusal,
    ActiveAlerts,
    AlertTransition,
    AlertType,
    DeviceInfo,
    DeviceMessageModel,
    Priority,
    PumpStatus,
    Quarantined,
    Reading,
    describe_errors,
)

RECENT_ALERTS_KEPT = 12
BOOTS_REMEMBERED = 4
ACK_TOPIC_HINT = "{root}/ack/{your MQTT user name}"
SYSTEM_ALERT_KINDS = frozenset({"telemetry_lost"})
"""Alerts about the monitoring chain rather than the pump's therapy; with every alert of the
gateway itself (pump id `_gateway`: outbox_full, outbox_near_full), only the technical role
(gateway.ack_technical) may acknowledge them."""
SEQS_REMEMBERED = 20_000
"""Per pump boot, sequence numbers kept for duplicate detection above the gap-free floor."""
SINK_SOURCES = frozenset({"influx", "hl7", "fhir"})
"""Quarantine sources that are sinks: their raw bytes hold only ids as they left the station."""
QUARANTINE_RECORDS_PER_S = 50.0
"""Quarantine records stored per second per source, sustained; more are counted, not stored."""
QUARANTINE_BURST_RECORDS = 500
"""Quarantine records a source may produce at once before the rate bound applies."""
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


@dataclass(frozen=True, slots=True)
class AckKey:
    """Where an acknowledgement goes: the source line and the device's own identity."""

    source: str
    pump_id: str
    boot_id: str


@dataclass
class PumpView:
    """What the live view and the status topic show of one pump."""

    pump_id: str
    drug: str = "?"
    reservoir_ml: float | None = None
    low_reservoir_alarm_ml: float | None = None
    pump_state: str | None = None
    battery_state: str | None = None
    last_record_id: str | None = None
    last_device_time: datetime | None = None
    last_received_s: float = 0.0
    telemetry: str = "ok"
    readings: int = 0
    status_sent_s: float = 0.0


@dataclass
class Counts:
    """The gateway's own accounting: frames in = accepted + quarantined + duplicates."""

    frames_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    accepted_by_kind: Counter[str] = field(default_factory=Counter)
    alerts: int = 0
    acks_in: int = 0
    """Acknowledgements applied."""
    acks_rejected: int = 0
    """Messages on the ack topics refused, for any reason (acks_refused says which)."""
    acks_refused: Counter[str] = field(default_factory=Counter)
    poisoned: int = 0
    """Points the time-series database refused for good (quarantined, not frames)."""


@dataclass
class Batch:
    """The outcome of one batch: records to commit and device acknowledgements to send after."""

    records: list[OutRecord] = field(default_factory=list)
    acks: dict[AckKey, list[int]] = field(default_factory=dict)
    alerts_changed: bool = False
    quarantined: list[Quarantined] = field(default_factory=list)


class SeqWindow:
    """Sequence numbers seen in one pump boot: all at or below `floor`, plus a bounded set above."""

    def __init__(self) -> None:
        self.floor = -1
        self.above: set[int] = set()

    def add(self, seq: int) -> bool:
        """Note `seq`; False when it was seen before."""
        if seq <= self.floor or seq in self.above:
            return False
        self.above.add(seq)
        while self.floor + 1 in self.above:
            self.floor += 1
            self.above.discard(self.floor)
        if len(self.above) > SEQS_REMEMBERED:
            # A gap that never fills (a frame damaged for good): give up on the oldest half.
            self.floor = sorted(self.above)[SEQS_REMEMBERED // 2]
            self.above = {s for s in self.above if s > self.floor}
        return True


def ack_runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Contiguous (first, last) runs of sequence numbers, for range acknowledgements."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if runs and seq == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


@dataclass
class QuarantineBudget:
    """A token bucket bounding one source's quarantine records; what it held back, by kind."""

    tokens: float = float(QUARANTINE_BURST_RECORDS)
    updated_s: float = 0.0
    held_back: Counter[str] = field(default_factory=Counter)

    def take(self, now_s: float) -> bool:
        """Spend one record's worth; False when the source is over its rate."""
        elapsed_s = max(0.0, now_s - self.updated_s)
        self.tokens = min(
            QUARANTINE_BURST_RECORDS, self.tokens + elapsed_s * QUARANTINE_RECORDS_PER_S
        )
        self.updated_s = now_s
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def without_quoted_values(reason: str) -> str:
    """A frame error's reason with every quoted value (ids, header fields) replaced by '…'."""
    return _QUOTED.sub("'…'", reason)


def pseudonym(key: bytes, value: str) -> str:
    """A keyed hash standing in for a pump id or serial number (HMAC-SHA256, 16 hex digits)."""
    return "p" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]


def is_system_alert(alert: AlertTransition) -> bool:
    """An alert for the technical role: the gateway's own, or lost telemetry."""
    return alert.pump_id == GATEWAY_PUMP_ID or alert.alert_kind in SYSTEM_ALERT_KINDS


def _to_datetime(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


class Pipeline:
    """Validation, dedup and alert evaluation for one gateway; single-threaded."""

    def __init__(
        self,
        engine: AlertEngine,
        tags: PointTags,
        *,
        pseudonymize_key: bytes | None = None,
        status_interval_s: float = 10.0,
        ack_allowed: frozenset[str] | None = None,
        ack_technical: frozenset[str] = frozenset(),
        session_id: str | None = None,
        ack_topic_hint: str = ACK_TOPIC_HINT,
    ) -> None:
        self.engine = engine
        self.tags = tags
        self.counts = Counts()
        self.pumps: dict[str, PumpView] = {}
        self._key = pseudonymize_key
        self._status_interval_s = status_interval_s
        self._ack_allowed = ack_allowed
        self._ack_technical = ack_technical
        self._ack_topic_hint = ack_topic_hint
        self._session_id = session_id
        self._state_seq = 0
        """Last seq given to a retained state message (status, active alerts) this session."""
        self._alert_pumps: set[str] = set()
        """Pumps whose active-alert set was published by this process."""
        self._alert_started: dict[str, datetime] = {}
        """Start time of each alert that started in this process and has not ended."""
        self._seen: dict[str, OrderedDict[str, SeqWindow]] = {}
        self._quarantine_n = 0
        self._budgets: dict[str, QuarantineBudget] = {}
        self.recent_alerts: deque[AlertTransition] = deque(maxlen=RECENT_ALERTS_KEPT)

    def remember(self, record_ids: Iterable[str]) -> None:
        """Seed duplicate detection from record ids already in the outbox (oldest first)."""
        for record_id in record_ids:
            pump_id, _, rest = record_id.partition(":")
            boot_id, _, seq = rest.partition(":")
            if seq.isdigit():
                self._note_seq(pump_id, boot_id, int(seq))

    def _note_seq(self, pump_id: str, boot_id: str, seq: int) -> bool:
        """Record a device sequence number; False when it was already seen (a resend)."""
        boots = self._seen.setdefault(pump_id, OrderedDict())
        window = boots.get(boot_id)
        if window is None:
            window = boots[boot_id] = SeqWindow()
            if len(boots) > BOOTS_REMEMBERED:
                boots.popitem(last=False)
        return window.add(seq)

    def frames(
        self, source: str, received_s: float, items: list[Frame | FrameError], batch: Batch
    ) -> None:
        """Validate decoded items from one read into records."""
        received_at = _to_datetime(received_s)
        for item in items:
            self.counts.frames_in += 1
            if isinstance(item, FrameError):
                reason = item.reason if self._key is None else without_quoted_values(item.reason)
                self._quarantine(batch, source, item.kind, reason, item.raw, received_at)
                continue
            ack = AckKey(source, item.pump_id, item.boot_id)
            batch.acks.setdefault(ack, []).append(item.seq)
            self._frame(source, item, received_at, batch)

    def _frame(self, source: str, frame: Frame, received_at: datetime, batch: Batch) -> None:
        if self._key is not None:
            frame = dataclasses.replace(frame, pump_id=pseudonym(self._key, frame.pump_id))
        try:
            message = message_from_frame(frame, received_at)
        except MessageError as exc:
            reason = exc.reason if self._key is None else exc.reason_without_values
            self._quarantine(batch, source, exc.kind, reason, frame.raw, received_at, frame.pump_id)
            return
        if not self._note_seq(message.pump_id, message.boot_id, message.seq):
            self.counts.duplicates += 1
            return
        if self._key is not None and isinstance(message, DeviceInfo):
            message = message.model_copy(update={"serial": pseudonym(self._key, message.serial)})
        self._accept(message, received_at, batch)

    def _accept(self, message: DeviceMessageModel, now: datetime, batch: Batch) -> None:
        self.counts.accepted += 1
        self.counts.accepted_by_kind[message.kind] += 1
        batch.records.append(
            OutRecord(
                message.kind,
                message.record_id,
                message.pump_id,
                message.model_dump_json().encode(),
                line_for(message, self.tags),
                message.kind in RETAINED_KINDS,
            )
        )
        self._add_transitions(self.engine.on_message(message, now), now, batch)
        self._update_view(message, now, batch)

    def _update_view(self, message: DeviceMessageModel, now: datetime, batch: Batch) -> None:
        view = self.pumps.get(message.pump_id)
        if view is None:
            view = self.pumps[message.pump_id] = PumpView(message.pump_id)
        changed = view.telemetry != "ok"
        view.telemetry = "ok"
        view.last_received_s = now.timestamp()
        view.last_record_id = message.record_id
        view.last_device_time = message.device_time
        if isinstance(message, Reading):
            changed |= (view.pump_state, view.battery_state) != (
                message.pump_state.value,
                message.battery_state.value,
            )
            view.readings += 1
            view.drug = message.drug.value
            view.reservoir_ml = message.reservoir_ml
            view.low_reservoir_alarm_ml = message.low_reservoir_alarm_ml
            view.pump_state = message.pump_state.value
            view.battery_state = message.battery_state.value
        elif isinstance(message, DeviceInfo):
            view.drug = message.drug.value
        if changed or now.timestamp() - view.status_sent_s >= self._status_interval_s:
            batch.records.append(self._status_record(view, now))

    def _next_state_seq(self) -> int:
        self._state_seq += 1
        return self._state_seq

    def _status_record(self, view: PumpView, now: datetime) -> OutRecord:
        view.status_sent_s = now.timestamp()
        seq = self._next_state_seq()
        status = PumpStatus(
            pump_id=view.pump_id,
            telemetry="ok" if view.telemetry == "ok" else "lost",
            at=now,
            last_record_id=view.last_record_id,
            last_device_time=view.last_device_time,
            reservoir_ml=view.reservoir_ml,
            pump_state=view.pump_state,
            battery_state=view.battery_state,
            session_id=self._session_id,
            seq=seq,
        )
        return OutRecord(
            "pump_status",
            f"{view.pump_id}:status:{self._session_id}:{seq}",
            view.pump_id,
            status.model_dump_json().encode(),
            None,
            True,
        )

    def _add_transitions(
        self, transitions: list[AlertTransition], now: datetime, batch: Batch
    ) -> None:
        if not transitions:
            return
        batch.alerts_changed = True
        touched: dict[str, None] = {}
        for transition in transitions:
            self.counts.alerts += 1
            self._note_life(transition)
            self.recent_alerts.append(transition)
            touched[transition.pump_id] = None
            batch.records.append(
                OutRecord(
                    "alert",
                    transition.transition_id,
                    transition.pump_id,
                    transition.model_dump_json().encode(),
                    line_for(transition, self.tags),
                )
            )
            if transition.alert_kind == "telemetry_lost" and transition.pump_id in self.pumps:
                view = self.pumps[transition.pump_id]
                view.telemetry = "ok" if transition.phase.value == "end" else "lost"
                batch.records.append(self._status_record(view, now))
        for pump_id in touched:
            batch.records.append(self._active_record(pump_id, now))

    def _active_record(self, pump_id: str, now: datetime) -> OutRecord:
        self._alert_pumps.add(pump_id)
        seq = self._next_state_seq()
        active = ActiveAlerts(
            pump_id=pump_id,
            at=now,
            alerts=self.engine.active_alerts(pump_id),
            session_id=self._session_id,
            seq=seq,
        )
        return OutRecord(
            "active_alerts",
            f"{pump_id}:active:{self._session_id}:{seq}",
            pump_id,
            active.model_dump_json().encode(),
            None,
            True,
        )

    def _note_life(self, transition: AlertTransition) -> None:
        """Remember when each alert started, to bound an acknowledgement's claimed time."""
        if transition.phase.value == "start":
            self._alert_started[transition.alert_id] = transition.at
        elif transition.phase.value == "end":
            self._alert_started.pop(transition.alert_id, None)

    def reassert(self, now_s: float, batch: Batch) -> None:
        """Retained state again, with fresh seqs: every pump's status, and the active alerts of
        every pump that has some or had a set published (then maybe empty), so a stale or
        forged retained copy on the broker is soon replaced."""
        now = _to_datetime(now_s)
        for view in self.pumps.values():
            batch.records.append(self._status_record(view, now))
        alerting = {p for p in self.engine.pumps() if self.engine.active_alerts(p)}
        for pump_id in sorted(alerting | self._alert_pumps):
            batch.records.append(self._active_record(pump_id, now))

    def tick(self, now_s: float, batch: Batch) -> None:
        """Wall-clock checks (telemetry lost)."""
        now = _to_datetime(now_s)
        self._add_transitions(self.engine.on_tick(now), now, batch)
        for source, budget in self._budgets.items():
            if budget.held_back and budget.take(now_s):
                self._held_back_record(source, budget, now, batch)

    def condition(
        self,
        kind: str,
        active: bool,
        text: str,
        value: float,
        threshold: float,
        now_s: float,
        batch: Batch,
        *,
        high: bool,
    ) -> None:
        """A condition the gateway detects about itself (outbox filling up)."""
        now = _to_datetime(now_s)
        transitions = self.engine.set_condition(
            "_gateway",
            kind,
            active,
            priority=Priority.HIGH if high else Priority.MEDIUM,
            alert_type=AlertType.TECHNICAL,
            latching=False,
            text=text,
            value=value,
            threshold=threshold,
            unit="records",
            now=now,
        )
        self._add_transitions(transitions, now, batch)

    def operator_ack(
        self,
        username: str | None,
        payload: bytes,
        now_s: float,
        batch: Batch,
        *,
        retained: bool = False,
    ) -> AckRefusal | None:
        """Apply an acknowledgement published on `.../ack/{username}` (None: the legacy topic)
        and received at `now_s`; return why it was refused, or None when it was applied."""
        now = _to_datetime(now_s)
        user = username if username and re.fullmatch(OPERATOR_PATTERN, username) else None
        if username is None:
            return self._refuse(
                None, None, "legacy_topic", f"the ack topic without a user name is no longer "
                f"read: publish on {self._ack_topic_hint}", now)
        if user is None:
            return self._refuse(
                None, None, "bad_user", f"MQTT user name {username[:40]!r} cannot acknowledge: "
                "use letters, digits and ._@- only", now)
        if retained:
            return self._refuse(
                user, None, "retained", "retained acknowledgement ignored: publish "
                "acknowledgements without the retain flag", now)
        try:
            ack = Acknowledgement.model_validate_json(payload)
        except ValidationError as exc:
            return self._refuse(user, None, "invalid", describe_errors(exc.errors()), now)
        problem = self._ack_problem(user, ack)
        if problem is not None:
            return self._refuse(user, ack.alert_id, *problem, now)
        applied = ack.model_copy(update={"by": user, "at": self._claimed_time(ack, now)})
        self.counts.acks_in += 1
        self._add_transitions(self.engine.on_acknowledgement(applied, now), now, batch)
        return None

    def _ack_problem(self, user: str, ack: Acknowledgement) -> tuple[str, str] | None:
        """Why `user` may not acknowledge `ack` (reason kind, text), or None."""
        if ack.by is not None and ack.by != user:
            return "by_mismatch", (
                f"'by' is {ack.by!r} but the message was published by MQTT user {user!r}")
        alert = self._active_alert(ack.alert_id)
        if alert is None:
            return "unknown_alert", f"no active alert {ack.alert_id!r} (unknown or ended)"
        if is_system_alert(alert):
            if user not in self._ack_technical:
                return "technical_role", (
                    f"{alert.alert_kind} is a technical alert: only the users in "
                    "gateway.ack_technical may acknowledge it")
        elif self._ack_allowed is not None and user not in self._ack_allowed:
            return "not_allowed", f"MQTT user {user!r} is not in gateway.ack_allowed"
        if alert.acknowledged_by is not None:
            return "already_acknowledged", f"already acknowledged by {alert.acknowledged_by}"
        return None

    def _active_alert(self, alert_id: str) -> AlertTransition | None:
        """The latest transition of an alert that has not ended: among the alerts of the pump
        its id starts with, else (another id scheme) among all; acknowledgements are rare."""
        first = alert_id.partition(":")[0]
        for pump_id in (first, *(p for p in self.engine.pumps() if p != first)):
            for transition in self.engine.active_alerts(pump_id):
                if transition.alert_id == alert_id:
                    return transition
        return None

    def _claimed_time(self, ack: Acknowledgement, now: datetime) -> datetime | None:
        """The console's time of the acknowledgement, bounded to the alert's life so far."""
        if ack.at is None:
            return None
        alert = self._active_alert(ack.alert_id)
        began = self._alert_started.get(ack.alert_id, alert.at if alert else now)
        return min(max(ack.at, began), now)

    def _refuse(
        self, user: str | None, alert_id: str | None, kind: str, reason: str, now: datetime
    ) -> AckRefusal:
        self.counts.acks_rejected += 1
        self.counts.acks_refused[kind] += 1
        return AckRefusal(
            username=user, alert_id=alert_id, reason_kind=kind, reason=reason[:500], at=now
        )

    def poisoned_point(
        self,
        record_id: str,
        line: bytes,
        reason: str,
        now_s: float,
        batch: Batch,
        sink: str = "influx",
    ) -> None:
        """A sink's receiver refused a record for good: quarantine it with the reason."""
        self.counts.poisoned += 1
        self._quarantine(
            batch,
            sink,
            f"{sink}_rejected",
            f"{record_id}: {reason}",
            line,
            _to_datetime(now_s),
            counted=False,
        )

    def _quarantine(
        self,
        batch: Batch,
        source: str,
        kind: str,
        reason: str,
        raw: bytes,
        received_at: datetime,
        pump_id: str | None = None,
        *,
        counted: bool = True,
    ) -> None:
        if counted:  # a frame: part of the accounting frames_in = accepted + quarantined + dup
            self.counts.quarantined[kind] += 1
            now_s = received_at.timestamp()
            budget = self._budgets.setdefault(source, QuarantineBudget(updated_s=now_s))
            if not budget.take(now_s):
                budget.held_back[kind] += 1
                return
            if budget.held_back:
                self._held_back_record(source, budget, received_at, batch)
        if self._key is not None and source not in SINK_SOURCES:
            # The raw frame holds the real pump id and serial: it never leaves the station.
            raw, reason = b"", f"{reason} (raw bytes withheld: pump ids are pseudonymised)"
        self._store_quarantined(batch, source, kind, reason, raw, received_at, pump_id)

    def _held_back_record(
        self, source: str, budget: QuarantineBudget, now: datetime, batch: Batch
    ) -> None:
        """One record for everything the rate bound kept from being stored one by one."""
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(budget.held_back.items()))
        reason = (
            f"{budget.held_back.total()} more quarantined items from this source were counted "
            f"but not stored one by one ({kinds}): over {QUARANTINE_RECORDS_PER_S:g} a second"
        )
        budget.held_back.clear()
        self._store_quarantined(batch, source, "rate_limited", reason, b"", now, None)

    def _store_quarantined(
        self,
        batch: Batch,
        source: str,
        kind: str,
        reason: str,
        raw: bytes,
        received_at: datetime,
        pump_id: str | None,
    ) -> None:
        self._quarantine_n += 1
        entry = Quarantined(
            quarantine_id=f"q:{received_at.timestamp():.6f}:{self._quarantine_n}",
            source=source,
            reason_kind=kind,
            reason=reason[:1000],
            raw_hex=raw[:4096].hex(),
            received_at=received_at,
            pump_id=pump_id if pump_id and len(pump_id) <= 64 else None,
        )
        batch.quarantined.append(entry)
        batch.records.append(
            OutRecord("quarantine", entry.quarantine_id, None, entry.model_dump_json().encode())
        )
