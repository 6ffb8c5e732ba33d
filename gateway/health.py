"""HTTP /healthz and Prometheus /metrics.

`observe` (in the service) gathers an Observation; the functions here only render
it, so they are tested without a server. /metrics is prometheus-client's exposition of a
private registry: a collector that reads one Observation per scrape, its latency
histograms, and the library's standard process and Python collectors. The server is the
standard library's ThreadingHTTPServer on its own thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
"""A connection that sends nothing for this long is closed (a half-sent request holds a thread)."""
MAX_CONNECTIONS = 16
"""Connections served at once; more are closed at once, so idle peers cannot pile up threads."""


@dataclass(frozen=True)
class SinkObservation:
    name: str
    connected: bool
    backlog_records: int
    oldest_age_s: float | None
    delivered: int
    last_error: str | None
    counters: Mapping[str, int] = field(default_factory=dict)
    """Exported as pumpgw_sink_<name>_total."""
    gauges: Mapping[str, int] = field(default_factory=dict)
    """Exported as pumpgw_sink_<name> (current values: a window size, an outbox position)."""


@dataclass(frozen=True)
class SourceObservation:
    name: str
    connected: bool
    reconnects: int
    bytes_in: int
    last_error: str | None


@dataclass(frozen=True)
class Observation:
    """Everything /healthz and /metrics report, read at one moment."""

    uptime_s: float
    frames_in: int
    accepted_by_kind: dict[str, int]
    quarantined_by_reason: dict[str, int]
    duplicates: int
    alert_transitions: int
    acks_in: int
    acks_rejected: int
    outbox_pending: int
    outbox_max_pending: int
    outbox_full: bool
    outbox_free_disk_bytes: int
    outbox_history_freed: int
    sources: tuple[SourceObservation, ...]
    sinks: tuple[SinkObservation, ...]
    pumps_total: int
    pumps_telemetry_lost: int
    max_backlog_age_s: float
    acks_refused_by_reason: dict[str, int] = field(default_factory=dict)
    latencies: tuple[Histogram, ...] = ()
    """Live latency histograms (frame->commit, commit->PUBACK), read when rendered."""
    acknowledgement_delays: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    """Per alert priority: acknowledgements, total and longest delay from start, in s."""


def health_report(obs: Observation) -> tuple[bool, dict[str, Any]]:
    """(ready, body): live while the process answers; ready when data can flow and is flowing."""
    reasons = []
    for src in obs.sources:
        if not src.connected:
            reasons.append(f"source {src.name} not connected: {src.last_error or 'connecting'}")
    for sink in obs.sinks:
        if not sink.connected:
            reasons.append(f"{sink.name} not connected: {sink.last_error or 'connecting'}")
        elif sink.last_error:  # connected, yet refusing records (an ACL denial)
            reasons.append(f"{sink.name}: {sink.last_error}")
        if sink.oldest_age_s is not None and sink.oldest_age_s > obs.max_backlog_age_s:
            reasons.append(
                f"{sink.name}: oldest unsent record is {sink.oldest_age_s:.0f} s old "
                f"(limit {obs.max_backlog_age_s:.0f} s)"
            )
    if obs.outbox_full:
        reasons.append("outbox full: reading is paused")
    body = {
        "live": True,
        "ready": not reasons,
        "reasons": reasons,
        "uptime_s": round(obs.uptime_s, 1),
        "sources": [
            {
                "name": s.name,
                "connected": s.connected,
                "reconnects": s.reconnects,
                "last_error": s.last_error,
            }
            for s in obs.sources
        ],
        "sinks": [
            {
                "name": s.name,
                "connected": s.connected,
                "backlog_records": s.backlog_records,
                "oldest_unsent_age_s": s.oldest_age_s,
                "last_error": s.last_error,
            }
            for s in obs.sinks
        ],
        "outbox": {"pending": obs.outbox_pending, "max_pending": obs.outbox_max_pending},
    }
    return not reasons, body


LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Histogram bounds for frame->commit and commit->PUBACK: sub-millisecond to a broker outage."""

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""What generate_latest writes: the classic text format every Prometheus version reads."""


def latency_histogram(name: str, help_text: str) -> Histogram:
    """A thread-safe latency histogram in seconds, for an Observation's `latencies`."""
    return Histogram(name, help_text, buckets=LATENCY_BUCKETS_S, registry=None)


def _counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, labels=list(labels))


def _gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, labels=list(labels))


def _single(family: CounterMetricFamily | GaugeMetricFamily, value: float) -> Metric:
    family.add_metric([], value)
    return family


def _accounting(obs: Observation) -> Iterator[Metric]:
    """Frames, records, quarantine, duplicates, alerts and acknowledgements (counters)."""
    yield _single(
        _counter("pumpgw_frames_in_total", "Frames and garbage runs read from sources."),
        obs.frames_in,
    )
    accepted = _counter("pumpgw_records_accepted_total", "Valid device messages stored.", ("kind",))
    for kind, count in sorted(obs.accepted_by_kind.items()):
        accepted.add_metric([kind], count)
    yield accepted
    quarantined = _counter("pumpgw_quarantined_total", "Rejected frames by reason.", ("reason",))
    for reason, count in sorted(obs.quarantined_by_reason.items()):
        quarantined.add_metric([reason], count)
    yield quarantined
    yield _single(
        _counter("pumpgw_duplicates_total", "Frames already stored (resent by device)."),
        obs.duplicates,
    )
    yield _single(
        _counter("pumpgw_alert_transitions_total", "Alert transitions emitted."),
        obs.alert_transitions,
    )
    acks = _counter(
        "pumpgw_operator_acks_total", "Operator acknowledgements by result.", ("result",)
    )
    acks.add_metric(["accepted"], obs.acks_in)
    acks.add_metric(["rejected"], obs.acks_rejected)
    yield acks
    refused = _counter(
        "pumpgw_operator_acks_refused_total",
        "Operator acknowledgements refused, by reason (docs/topics.md).",
        ("reason",),
    )
    for reason, count in sorted(obs.acks_refused_by_reason.items()):
        refused.add_metric([reason], count)
    yield refused
    yield from _acknowledgement_delays(obs.acknowledgement_delays)


def _acknowledgement_delays(delays: dict[str, tuple[int, float, float]]) -> Iterator[Metric]:
    """Time to acknowledge per priority: a summary (count, sum) and a gauge of the longest."""
    summary = SummaryMetricFamily(
        "pumpgw_alert_acknowledgement_delay_seconds",
        "Time from an alert's start (or escalation in place) to its acknowledgement, "
        "by priority.",
        labels=["priority"],
    )
    longest = _gauge(
        "pumpgw_alert_acknowledgement_delay_max_seconds",
        "Longest time to acknowledge an alert, by priority.",
        ("priority",),
    )
    for priority, (count, total_s, longest_s) in sorted(delays.items()):
        summary.add_metric([priority], count_value=count, sum_value=total_s)
        longest.add_metric([priority], longest_s)
    yield summary
    yield longest


def _outbox(obs: Observation) -> Iterator[Metric]:
    yield _single(
        _gauge("pumpgw_outbox_pending_records", "Records waiting for the slowest sink."),
        obs.outbox_pending,
    )
    yield _single(
        _gauge("pumpgw_outbox_max_pending_records", "Back-pressure limit."),
        obs.outbox_max_pending,
    )
    yield _single(
        _gauge("pumpgw_outbox_full", "1 while reading is paused by a full outbox."),
        1 if obs.outbox_full else 0,
    )
    yield _single(
        _gauge(
            "pumpgw_outbox_free_disk_bytes",
            "Free bytes on the outbox's filesystem (store.min_free_disk_kb is the floor).",
        ),
        obs.outbox_free_disk_bytes,
    )
    yield _single(
        _counter(
            "pumpgw_outbox_history_freed_total",
            "Delivered records deleted before their retention ended to make room on the disk.",
        ),
        obs.outbox_history_freed,
    )


def _sinks(obs: Observation) -> Iterator[Metric]:
    backlog = _gauge(
        "pumpgw_sink_backlog_records", "Records not yet delivered, per sink.", ("sink",)
    )
    oldest = _gauge(
        "pumpgw_sink_oldest_unsent_age_seconds", "Age of the oldest unsent record.", ("sink",)
    )
    delivered = _counter(
        "pumpgw_sink_delivered_total", "Records acknowledged by the server.", ("sink",)
    )
    connected = _gauge("pumpgw_sink_connected", "1 when the sink's server is reachable.", ("sink",))
    for sink in obs.sinks:
        backlog.add_metric([sink.name], sink.backlog_records)
        oldest.add_metric([sink.name], sink.oldest_age_s or 0.0)
        delivered.add_metric([sink.name], sink.delivered)
        connected.add_metric([sink.name], 1 if sink.connected else 0)
    yield from (backlog, oldest, delivered, connected)
    yield from _sink_counts(obs.sinks)


def _sink_counts(sinks: tuple[SinkObservation, ...]) -> Iterator[Metric]:
    """Each sink's own counters and gauges, one family per name, in name order."""
    gauge_names = {k for s in sinks for k in s.gauges}
    for key in sorted(gauge_names | {k for s in sinks for k in s.counters}):
        family: CounterMetricFamily | GaugeMetricFamily
        if key in gauge_names:
            family = _gauge(f"pumpgw_sink_{key}", f"Sink gauge {key}.", ("sink",))
        else:
            family = _counter(f"pumpgw_sink_{key}_total", f"Sink counter {key}.", ("sink",))
        for sink in sinks:
            values = sink.gauges if key in gauge_names else sink.counters
            if key in values:
                family.add_metric([sink.name], values[key])
        yield family


def _sources_and_pumps(obs: Observation) -> Iterator[Metric]:
    connected = _gauge("pumpgw_source_connected", "1 when the serial line is open.", ("source",))
    reconnects = _counter(
        "pumpgw_source_reconnects_total", "Times a line was reopened.", ("source",)
    )
    bytes_in = _counter("pumpgw_source_bytes_total", "Bytes read per line.", ("source",))
    for source in obs.sources:
        connected.add_metric([source.name], 1 if source.connected else 0)
        reconnects.add_metric([source.name], source.reconnects)
        bytes_in.add_metric([source.name], source.bytes_in)
    yield from (connected, reconnects, bytes_in)
    pumps = _gauge("pumpgw_pumps", "Pumps seen, by telemetry state.", ("telemetry",))
    pumps.add_metric(["ok"], obs.pumps_total - obs.pumps_telemetry_lost)
    pumps.add_metric(["lost"], obs.pumps_telemetry_lost)
    yield pumps


def _latencies(obs: Observation) -> Iterator[Metric]:
    """The histograms as they are now, without the `_created` series (not used here)."""
    for histogram in obs.latencies:
        for family in histogram.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class ObservationCollector(Collector):
    """Collects the gateway's metrics from one fresh Observation per scrape."""

    def __init__(self, observe: Callable[[], Observation]) -> None:
        self._observe = observe

    def collect(self) -> Iterator[Metric]:
        obs = self._observe()
        yield from _accounting(obs)
        yield from _outbox(obs)
        yield from _sinks(obs)
        yield from _sources_and_pumps(obs)
        yield from _latencies(obs)


def metrics_registry(
    observe: Callable[[], Observation], *, process: bool = True
) -> CollectorRegistry:
    """A private registry: the Observation's metrics plus, with `process`, the standard
    process_* (CPU, memory, file descriptors) and python_* (GC, version) metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ObservationCollector(observe))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render_metrics(obs: Observation) -> str:
    """Prometheus text exposition format of one Observation (no process metrics)."""
    return generate_latest(metrics_registry(lambda: obs, process=False)).decode()


def printable(text: str) -> str:
    """A request line or header as a log can show it: control characters escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int
    ) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HealthServer:
    """Serves /healthz and /metrics from an observe() callable on a daemon thread."""

    def __init__(
        self,
        listen: str,
        observe: Callable[[], Observation],
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._observe = observe
        handler = self._handler(request_timeout_s)
        self._server = _BoundedServer((host, int(port)), handler, max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def refused(self) -> int:
        """Connections closed unserved because MAX_CONNECTIONS were open."""
        return self._server.refused

    def _handler(self, request_timeout_s: float) -> type[BaseHTTPRequestHandler]:
        observe = self._observe
        registry = metrics_registry(observe)

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout_s  # per connection: applies to every read and write

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/healthz":
                    ready, body = health_report(observe())
                    self._send(
                        200 if ready else 503,
                        "application/json",
                        json.dumps(body, indent=2).encode(),
                    )
                elif path == "/metrics":
                    self._send(200, METRICS_CONTENT_TYPE, generate_latest(registry))
                else:
                    self._send(404, "text/plain", b"try /healthz or /metrics\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health: %s", printable(format % args))

        return Handler
