"""The store shell `pumpgw run` and `pumpgw ingest` share: outbox, commit, sinks' health, lifecycle.

The station gateway (gateway.service) and the central worker (gateway.ingest) differ in what
they read (serial lines; a shared MQTT subscription) and what they acknowledge (the pump's
frames; the broker's messages), not in how they store: both open the outbox from `[store]`,
commit with retry and split-on-full (nothing is acknowledged before it is stored), report
each sink as a SinkObservation for /healthz and /metrics, and serve those while they run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client import Histogram

from gateway.config import HealthSection, StoreSection
from gateway.health import HealthServer, Observation, SinkObservation, SourceObservation
from gateway.outbox import Outbox, OutboxError, OutboxFullError
from gateway.records import OutRecord
from gateway.sink_health import SinkHealth

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, systemd's stop, and the controlling terminal closing: each stops cleanly."""


def stop_on_signals(stop: threading.Event) -> None:
    """Set `stop` on SIGINT, SIGTERM or SIGHUP (main thread only): the process then commits
    what it read, says `offline` and exits, and every command stops the children it started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping cleanly", signal.Signals(signum).name)
        stop.set()

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def open_outbox(store: StoreSection, sink_names: Sequence[str]) -> Outbox:
    """The outbox `[store]` describes, with one cursor per sink."""
    return Outbox(
        store.path,
        list(sink_names),
        durability=store.durability,
        max_pending=store.max_pending_records,
        retention_s=store.retention_days * SECONDS_PER_DAY,
        min_free_bytes=store.min_free_disk_kb * 1024,
    )


def append_split(
    outbox: Outbox, records: list[OutRecord], state: Mapping[str, bytes | None] | None
) -> None:
    """Store the records, oldest first, removing each part from `records` once stored.

    On a nearly full disk, or with fewer rows left under max_pending_records than the batch
    holds, a part that fits goes in while the whole batch would not (a batch larger than the
    limit itself would otherwise wait forever). `state` goes with the last part, so it is
    never ahead of the stored records. Raises OutboxFullError when not even one record fits.
    """
    size = len(records)
    while True:
        last = size >= len(records)
        try:
            outbox.append(records[:size], state if last else None)
        except OutboxFullError:
            if size <= 1:
                raise
            size //= 2
            continue
        del records[:size]
        if last:
            return


def commit(
    outbox: Outbox,
    records: list[OutRecord],
    state: Mapping[str, bytes | None] | None,
    *,
    on_full: Callable[[OutboxFullError], None],
    on_error: Callable[[OutboxError], None],
    wait_to_retry: Callable[[], bool],
) -> bool:
    """append_split until it succeeds; between attempts report the failure and call
    `wait_to_retry`, which returns True to give up (stopping). Returns whether all is stored."""
    while True:
        try:
            append_split(outbox, records, state)
            return True
        except OutboxFullError as exc:
            on_full(exc)
        except OutboxError as exc:
            on_error(exc)
        if wait_to_retry():
            return False


def sink_observation(
    name: str,
    health: SinkHealth,
    backlog: tuple[int, float | None],
    now_s: float,
    extra: Mapping[str, int] | None = None,
) -> SinkObservation:
    """A sink's health() and outbox backlog as /healthz and /metrics show them; `extra` adds
    counters the process keeps about the sink's work (the ingest worker's MQTT side)."""
    count, oldest_s = backlog
    return SinkObservation(
        name=name,
        connected=health.connected,
        backlog_records=count,
        oldest_age_s=None if oldest_s is None else max(0.0, now_s - oldest_s),
        delivered=health.delivered,
        last_error=health.last_error,
        counters={**health.counters, **(extra or {})},
        gauges=dict(health.gauges),
    )


@contextlib.contextmanager
def serving_health(section: HealthSection, observe: Callable[[], Observation]) -> Iterator[None]:
    """Serve /healthz and /metrics on `[health] listen` (if set) while the block runs."""
    server = HealthServer(section.listen, observe) if section.listen else None
    if server is not None:
        server.start()
        log.info("health on http://%s/healthz and /metrics", section.listen)
    try:
        yield
    finally:
        if server is not None:
            server.stop()


@dataclass(frozen=True, slots=True)
class Intake:
    """What a process took in and decided, for its Observation (the rest is the store's)."""

    frames_in: int
    accepted_by_kind: dict[str, int]
    quarantined_by_reason: dict[str, int]
    duplicates: int
    alert_transitions: int
    acks_in: int = 0
    acks_rejected: int = 0
    acks_refused_by_reason: dict[str, int] = field(default_factory=dict)
    acknowledgement_delays: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    """Per priority: acknowledged alerts, total and longest seconds to acknowledge."""
    pumps_total: int = 0
    pumps_telemetry_lost: int = 0


def observation(
    outbox: Outbox,
    intake: Intake,
    *,
    outbox_full: bool,
    uptime_s: float,
    sources: tuple[SourceObservation, ...],
    sinks: tuple[SinkObservation, ...],
    max_backlog_age_s: float,
    latencies: tuple[Histogram, ...] = (),
) -> Observation:
    """The Observation /healthz and /metrics serve: the intake, the outbox, sources and sinks."""
    return Observation(
        uptime_s=uptime_s,
        frames_in=intake.frames_in,
        accepted_by_kind=intake.accepted_by_kind,
        quarantined_by_reason=intake.quarantined_by_reason,
        duplicates=intake.duplicates,
        alert_transitions=intake.alert_transitions,
        acks_in=intake.acks_in,
        acks_rejected=intake.acks_rejected,
        acks_refused_by_reason=intake.acks_refused_by_reason,
        acknowledgement_delays=intake.acknowledgement_delays,
        outbox_pending=outbox.pending(),
        outbox_max_pending=outbox.max_pending,
        outbox_full=outbox_full,
        outbox_free_disk_bytes=outbox.free_disk_bytes(),
        outbox_history_freed=outbox.freed_rows,
        sources=sources,
        sinks=sinks,
        pumps_total=intake.pumps_total,
        pumps_telemetry_lost=intake.pumps_telemetry_lost,
        max_backlog_age_s=max_backlog_age_s,
        latencies=latencies,
    )
