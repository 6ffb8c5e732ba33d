"""The shape every message sink of the outbox shares: read from its cursor, send, advance only
on the receiver's positive acknowledgement, isolate what the receiver refuses for good.

A sink here is an `Encoder` (outbox rows -> messages, pure) and a `Transport` (one message ->
an `Answer`, the only I/O), driven by `MessageSink`. The HL7 v2 MLLP sink (adapters/mllp.py)
and the FHIR sink (adapters/fhir_rest.py) are two pairs. Answers:

    ACCEPTED   the cursor advances past the message (AA/CA, HTTP 2xx)
    RETRY      the same message again after a capped, jittered backoff, without limit
               (AE/CE, no answer, timeouts, HTTP 5xx/429, refused credentials)
    REJECTED   refused for good (AR/CR, HTTP 4xx with an OperationOutcome): a message of one
               record is quarantined with the receiver's reason; a larger one is split in
               halves when the encoder allows it (FHIR), else quarantined whole (HL7)

Rows the encoder does not turn into messages (other kinds) only move the cursor.

`SinkCore` holds what every outbox sink shares (the cursor, the run loop, backoff with jitter,
the health counters); `MessageSink` and the InfluxDB sink (adapters/influx.py) build on it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from pydantic import ValidationError

from gateway.errors import StoppedError
from gateway.outbox import Outbox, OutboxError
from gateway.quiet import QuietLog
from gateway.records import StoredRecord
from gateway.sink_health import SinkHealth
from schemas.models import AlertTransition, Reading, describe_errors

log = logging.getLogger(__name__)

IDLE_WAIT_S: Final = 0.5
MAX_BACKOFF_DOUBLINGS: Final = 32
REASON_MAX_CHARS: Final = 500


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the receiver said about one message; `wait_s` overrides the backoff (Retry-After)."""

    verdict: Verdict
    reason: str = ""
    wait_s: float | None = None
    connected: bool = True
    """False when nothing answered (connection refused, timeout)."""


ACCEPTED: Final = Answer(Verdict.ACCEPTED)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message ready to send and the outbox rows it carries (oldest first)."""

    rows: tuple[StoredRecord, ...]
    body: bytes
    label: str
    """How logs and quarantine reasons name it (an MSH-10, a bundle's first record id)."""
    unreadable: str | None = None
    """Why the encoder could not read this row (then it is quarantined, never sent)."""

    @property
    def first_seq(self) -> int:
        return self.rows[0].seq


class Encoder(Protocol):
    """Turns outbox rows into messages; pure. `splittable`: a rejected message may be halved.
    A row it cannot read becomes an Outgoing of its own with `unreadable` set."""

    splittable: bool

    def encode(self, rows: Sequence[StoredRecord]) -> list[Outgoing]: ...


class Transport(Protocol):
    """Sends one message and returns the receiver's answer; never raises for network trouble."""

    def send(self, message: Outgoing) -> Answer: ...

    def close(self) -> None: ...


class Sink(Protocol):
    """What the service needs of any outbox sink: run on a thread, report, close."""

    name: str

    def run(self, stop: threading.Event, wake: threading.Event) -> None: ...

    def health(self) -> SinkHealth: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Pacing:
    """How a MessageSink reads and retries (from its configuration section)."""

    batch_rows: int
    send_every_s: float
    retry_initial_s: float
    retry_max_s: float


def unreadable(row: StoredRecord, exc: ValidationError) -> Outgoing:
    """The stand-in for a stored row that no longer validates (a schema change)."""
    reason = f"stored {row.kind} no longer validates: {describe_errors(exc.errors())}"
    return Outgoing((row,), b"", row.record_id, unreadable=reason)


def read_records(
    rows: Sequence[StoredRecord], *, readings: bool, alerts: bool
) -> tuple[list[tuple[StoredRecord, Reading | AlertTransition]], list[Outgoing]]:
    """The readings and alert transitions among rows (those asked for) with their rows, and
    the stand-ins for rows that no longer validate; rows of other kinds are left out."""
    chosen: list[tuple[StoredRecord, Reading | AlertTransition]] = []
    broken: list[Outgoing] = []
    for row in rows:
        try:
            if row.kind == "reading" and readings:
                chosen.append((row, Reading.model_validate_json(row.payload)))
            elif row.kind == "alert" and alerts:
                chosen.append((row, AlertTransition.model_validate_json(row.payload)))
        except ValidationError as exc:
            broken.append(unreadable(row, exc))
    return chosen, broken


PoisonCallback = Callable[[str, StoredRecord, str, bytes], None]
"""(sink name, record, the receiver's reason, the refused message) -> None."""


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter: uniform in [d/2, d], d = min(max, initial * 2^n)."""
    ceiling = min(max_s, initial_s * 2.0 ** min(attempt, MAX_BACKOFF_DOUBLINGS))
    return ceiling / 2 + rng.random() * ceiling / 2


@dataclass(slots=True)
class SinkStats:
    """Counters for /healthz and /metrics."""

    connected: bool = False
    last_error: str | None = None
    written: int = 0
    sends: int = 0
    """Requests the receiver accepted (messages, batches)."""
    retries: int = 0
    poisoned: int = 0
    backoff_s: float = 0.0
    last_success_at_s: float | None = None


class SinkCore:
    """What every outbox sink shares: its cursor, the run loop, backoff with jitter, and the
    health counters. A subclass implements `drain` and may extend `_release` (on close)."""

    sends_key: str = "messages"
    """The health counter that counts accepted requests."""

    def __init__(
        self, name: str, outbox: Outbox, pacing: Pacing, rng: random.Random | None
    ) -> None:
        self.name = name
        self._outbox = outbox
        self._pacing = pacing
        self._rng = rng or random.Random()  # jitter only, not cryptography
        self._quiet = QuietLog(log)
        self._stats = SinkStats()
        self._changed = threading.Condition()
        self._attempt = 0
        self._closed = False
        self.sent_up_to = outbox.cursor(name)

    # -- life cycle ------------------------------------------------------------------------

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Drain until `stop` is set; after sending, let rows gather for send_every_s."""
        try:
            while not stop.is_set():
                wake.clear()
                if self._drain_guarded(stop):
                    stop.wait(self._pacing.send_every_s)
                else:
                    wake.wait(IDLE_WAIT_S)
        finally:
            self.close()

    def drain(self, stop: threading.Event) -> int:
        """Deliver everything after the cursor; return the rows covered."""
        raise NotImplementedError

    def _drain_guarded(self, stop: threading.Event) -> int:
        try:
            return self.drain(stop)
        except StoppedError:
            return 0
        except OutboxError as exc:
            self._quiet.error("outbox", "%s sink cannot read the outbox: %s", self.name, exc)
            self._note_failure(str(exc), connected=self._stats.connected)
        except Exception as exc:  # a sink thread must never die silently
            log.exception("%s sink: unexpected error, retrying", self.name)
            self._note_failure(f"unexpected: {exc!r}", connected=self._stats.connected)
        with contextlib.suppress(StoppedError):
            self._pause(stop, self._pacing.retry_max_s)
        return 0

    def close(self) -> None:
        """Release the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        """Free what the sink holds (connections, threads); called once, by close."""

    # -- waiting and the cursor ------------------------------------------------------------

    def _wait_then_retry(
        self, stop: threading.Event, error: str, *, connected: bool, wait_s: float | None
    ) -> None:
        """Note a failed send and wait: `wait_s`, or the next backoff step when None."""
        if wait_s is None:
            pacing = self._pacing
            wait_s = backoff_s(self._attempt, pacing.retry_initial_s, pacing.retry_max_s, self._rng)
        self._attempt += 1
        self._note_failure(error, connected=connected, backoff=wait_s)
        self._pause(stop, wait_s)

    def _pause(self, stop: threading.Event, wait_s: float) -> None:
        if stop.wait(wait_s):
            raise StoppedError

    def _acknowledge(self, seq: int) -> None:
        if seq > self.sent_up_to:
            self._outbox.ack(self.name, seq)
            self.sent_up_to = seq
            with self._changed:
                self._changed.notify_all()

    # -- health ----------------------------------------------------------------------------

    def _on_resumed(self) -> None:
        """Log that sending works again after failures."""
        log.info("%s sink: delivery resumed after %d retries", self.name, self._attempt)
        self._quiet.forget("retry")

    def _note_sent(self, records: int) -> None:
        if self._attempt:
            self._on_resumed()
        self._attempt = 0
        with self._changed:
            s = self._stats
            s.connected, s.last_error, s.backoff_s = True, None, 0.0
            s.written += records
            s.sends += 1
            s.last_success_at_s = time.time()
            self._changed.notify_all()

    def _note_answer(self, error: str) -> None:
        with self._changed:
            self._stats.connected, self._stats.last_error = True, error
            self._changed.notify_all()

    def _note_failure(self, error: str, *, connected: bool, backoff: float = 0.0) -> None:
        with self._changed:
            s = self._stats
            s.connected, s.last_error, s.backoff_s = connected, error, backoff
            s.retries += 1
            self._changed.notify_all()

    def _note_poisoned(self, records: int) -> None:
        with self._changed:
            self._stats.poisoned += records

    def _gauges(self) -> dict[str, int]:
        """Current values this kind of sink reports besides the shared counters."""
        return {}

    def health(self) -> SinkHealth:
        """`delivered` counts records; the `sends_key` counter counts accepted requests."""
        with self._changed:
            s = self._stats
            counters = {self.sends_key: s.sends, "retries": s.retries, "poisoned": s.poisoned}
            return SinkHealth(
                connected=s.connected,
                last_error=s.last_error,
                delivered=s.written,
                counters=counters,
                gauges=self._gauges(),
            )

    def wait_for(self, predicate: Callable[[SinkHealth], bool], timeout_s: float) -> bool:
        """Block until predicate(health()) holds or the timeout passes; return whether it held."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self.health()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True


class MessageSink(SinkCore):
    """Drains the outbox through an encoder and a transport, one message at a time."""

    def __init__(
        self,
        name: str,
        outbox: Outbox,
        encoder: Encoder,
        transport: Transport,
        pacing: Pacing,
        *,
        on_poison: PoisonCallback,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, outbox, pacing, rng)
        self._encoder = encoder
        self._transport = transport
        self._on_poison = on_poison

    def _release(self) -> None:
        self._transport.close()

    # -- draining --------------------------------------------------------------------------

    def drain(self, stop: threading.Event) -> int:
        covered = 0
        while not stop.is_set():
            rows = self._outbox.read(self.name, self.sent_up_to, self._pacing.batch_rows)
            if not rows:
                break
            self._deliver_window(rows, stop)
            covered += len(rows)
            if len(rows) < self._pacing.batch_rows:
                break
        return covered

    def _deliver_window(self, rows: Sequence[StoredRecord], stop: threading.Event) -> None:
        """Send the window's messages oldest first; after each, advance the cursor to just
        before the next one's first row (messages of different pumps interleave)."""
        messages = sorted(self._encoder.encode(rows), key=lambda m: m.first_seq)
        for i, message in enumerate(messages):
            self._deliver(message, stop)
            following = messages[i + 1].first_seq - 1 if i + 1 < len(messages) else None
            if following is not None:
                self._acknowledge(following)
        self._acknowledge(rows[-1].seq)

    def _deliver(self, message: Outgoing, stop: threading.Event) -> None:
        if message.unreadable is not None:
            self._poison(message, message.unreadable)
            return
        answer = self._send_until_answered(message, stop)
        if answer.verdict is Verdict.ACCEPTED:
            return
        if len(message.rows) > 1 and self._encoder.splittable:
            middle = len(message.rows) // 2
            for half in (message.rows[:middle], message.rows[middle:]):
                for part in self._encoder.encode(half):
                    self._deliver(part, stop)
            return
        self._poison(message, answer.reason)

    def _send_until_answered(self, message: Outgoing, stop: threading.Event) -> Answer:
        """Send until the answer is ACCEPTED or REJECTED; wait and resend on RETRY."""
        while True:
            if stop.is_set():
                raise StoppedError
            answer = self._transport.send(message)
            if answer.verdict is Verdict.RETRY:
                self._retry_later(message, answer, stop)
                continue
            if answer.verdict is Verdict.ACCEPTED:
                self._note_sent(len(message.rows))
            else:
                self._note_answer(answer.reason)
            return answer

    def _retry_later(self, message: Outgoing, answer: Answer, stop: threading.Event) -> None:
        self._quiet.warning(
            "retry",
            "%s sink: message %s not accepted (%s); resending with backoff, nothing is dropped",
            self.name,
            message.label,
            answer.reason,
        )
        self._wait_then_retry(stop, answer.reason, connected=answer.connected, wait_s=answer.wait_s)

    def _poison(self, message: Outgoing, reason: str) -> None:
        reason = reason[:REASON_MAX_CHARS] or "refused without a reason"
        self._quiet.warning(
            "poison",
            "%s sink: message %s refused for good (%s); quarantined",
            self.name,
            message.label,
            reason,
        )
        self._note_poisoned(len(message.rows))
        for row in message.rows:
            self._on_poison(self.name, row, reason, message.body)
