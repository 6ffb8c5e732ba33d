"""HTTP /healthz and Prometheus /metrics.

`observe` (in the service) gathers an Observation; the functions here only render
it, so they are pure and tested without a server. The server is the standard
library's ThreadingHTTPServer on its own thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    extra: dict[str, int] = field(default_factory=dict)


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


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(
    out: list[str],
    name: str,
    kind: str,
    help_text: str,
    samples: list[tuple[dict[str, str], float]],
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        out.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")


def _acknowledgement_delays(out: list[str], delays: dict[str, tuple[int, float, float]]) -> None:
    """Time to acknowledge per priority: a summary (count, sum) and a gauge of the longest.

    Written at full precision: a sum of seconds passes a million within days."""
    name, longest = (
        "pumpgw_alert_acknowledgement_delay_seconds",
        "pumpgw_alert_acknowledgement_delay_max_seconds",
    )
    out.append(
        f"# HELP {name} Time from an alert's start (or escalation in place) to its "
        "acknowledgement, by priority."
    )
    out.append(f"# TYPE {name} summary")
    for priority, (count, total_s, _) in sorted(delays.items()):
        out.append(f'{name}_sum{{priority="{_label(priority)}"}} {float(total_s)!r}')
        out.append(f'{name}_count{{priority="{_label(priority)}"}} {count:d}')
    out.append(f"# HELP {longest} Longest time to acknowledge an alert, by priority.")
    out.append(f"# TYPE {longest} gauge")
    for priority, (_, _, longest_s) in sorted(delays.items()):
        out.append(f'{longest}{{priority="{_label(priority)}"}} {float(longest_s)!r}')


def render_metrics(obs: Observation) -> str:
    """Prometheus text exposition format."""
    out: list[str] = []
    _metric(
        out,
        "pumpgw_frames_in_total",
        "counter",
        "Frames and garbage runs read from sources.",
        [({}, obs.frames_in)],
    )
    _metric(
        out,
        "pumpgw_records_accepted_total",
        "counter",
        "Valid device messages stored.",
        [({"kind": k}, v) for k, v in sorted(obs.accepted_by_kind.items())],
    )
    _metric(
        out,
        "pumpgw_quarantined_total",
        "counter",
        "Rejected frames by reason.",
        [({"reason": k}, v) for k, v in sorted(obs.quarantined_by_reason.items())],
    )
    _metric(
        out,
        "pumpgw_duplicates_total",
        "counter",
        "Frames already stored (resent by device).",
        [({}, obs.duplicates)],
    )
    _metric(
        out,
        "pumpgw_alert_transitions_total",
        "counter",
        "Alert transitions emitted.",
        [({}, obs.alert_transitions)],
    )
    _metric(
        out,
        "pumpgw_operator_acks_total",
        "counter",
        "Operator acknowledgements by result.",
        [({"result": "accepted"}, obs.acks_in), ({"result": "rejected"}, obs.acks_rejected)],
    )
    _metric(
        out,
        "pumpgw_operator_acks_refused_total",
        "counter",
        "Operator acknowledgements refused, by reason (docs/topics.md).",
        [({"reason": k}, v) for k, v in sorted(obs.acks_refused_by_reason.items())],
    )
    _acknowledgement_delays(out, obs.acknowledgement_delays)
    _metric(
        out,
        "pumpgw_outbox_pending_records",
        "gauge",
        "Records waiting for the slowest sink.",
        [({}, obs.outbox_pending)],
    )
    _metric(
        out,
        "pumpgw_outbox_max_pending_records",
        "gauge",
        "Back-pressure limit.",
        [({}, obs.outbox_max_pending)],
    )
    _metric(
        out,
        "pumpgw_outbox_full",
        "gauge",
        "1 while reading is paused by a full outbox.",
        [({}, 1 if obs.outbox_full else 0)],
    )
    _metric(
        out,
        "pumpgw_outbox_free_disk_bytes",
        "gauge",
        "Free bytes on the outbox's filesystem (store.min_free_disk_kb is the floor).",
        [({}, obs.outbox_free_disk_bytes)],
    )
    _metric(
        out,
        "pumpgw_outbox_history_freed_total",
        "counter",
        "Delivered records deleted before their retention ended to make room on the disk.",
        [({}, obs.outbox_history_freed)],
    )
    _metric(
        out,
        "pumpgw_sink_backlog_records",
        "gauge",
        "Records not yet delivered, per sink.",
        [({"sink": s.name}, s.backlog_records) for s in obs.sinks],
    )
    _metric(
        out,
        "pumpgw_sink_oldest_unsent_age_seconds",
        "gauge",
        "Age of the oldest unsent record.",
        [({"sink": s.name}, s.oldest_age_s or 0.0) for s in obs.sinks],
    )
    _metric(
        out,
        "pumpgw_sink_delivered_total",
        "counter",
        "Records acknowledged by the server.",
        [({"sink": s.name}, s.delivered) for s in obs.sinks],
    )
    _metric(
        out,
        "pumpgw_sink_connected",
        "gauge",
        "1 when the sink's server is reachable.",
        [({"sink": s.name}, 1 if s.connected else 0) for s in obs.sinks],
    )
    extra = sorted({k for s in obs.sinks for k in s.extra})
    for key in extra:
        _metric(
            out,
            f"pumpgw_sink_{key}_total",
            "counter",
            f"Sink counter {key}.",
            [({"sink": s.name}, s.extra[key]) for s in obs.sinks if key in s.extra],
        )
    _metric(
        out,
        "pumpgw_source_connected",
        "gauge",
        "1 when the serial line is open.",
        [({"source": s.name}, 1 if s.connected else 0) for s in obs.sources],
    )
    _metric(
        out,
        "pumpgw_source_reconnects_total",
        "counter",
        "Times a line was reopened.",
        [({"source": s.name}, s.reconnects) for s in obs.sources],
    )
    _metric(
        out,
        "pumpgw_source_bytes_total",
        "counter",
        "Bytes read per line.",
        [({"source": s.name}, s.bytes_in) for s in obs.sources],
    )
    _metric(
        out,
        "pumpgw_pumps",
        "gauge",
        "Pumps seen, by telemetry state.",
        [
            ({"telemetry": "ok"}, obs.pumps_total - obs.pumps_telemetry_lost),
            ({"telemetry": "lost"}, obs.pumps_telemetry_lost),
        ],
    )
    return "\n".join(out) + "\n"


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
                    self._send(200, "text/plain; version=0.0.4", render_metrics(observe()).encode())
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
