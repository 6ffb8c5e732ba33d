"""/healthz and /metrics rendering from an Observation."""

from __future__ import annotations

import dataclasses
import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.health import (
    HealthServer,
    Observation,
    SinkObservation,
    SourceObservation,
    health_report,
    latency_histogram,
    render_metrics,
)


def observation(**changes: object) -> Observation:
    base = Observation(
        uptime_s=12.0,
        frames_in=10,
        accepted_by_kind={"reading": 8},
        quarantined_by_reason={"checksum": 2},
        duplicates=1,
        alert_transitions=3,
        acks_in=1,
        acks_rejected=0,
        outbox_pending=4,
        outbox_max_pending=100,
        outbox_full=False,
        outbox_free_disk_bytes=1 << 30,
        outbox_history_freed=0,
        sources=(SourceObservation("line-1", True, 2, 1000, None),),
        sinks=(SinkObservation("mqtt", True, 4, 1.5, 8, None, {"denied": 0}),),
        pumps_total=3,
        pumps_telemetry_lost=1,
        max_backlog_age_s=300.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_ready_when_lines_and_sinks_are_up_and_the_backlog_is_young() -> None:
    ready, body = health_report(observation())
    assert ready
    assert body["reasons"] == []


def test_not_ready_names_each_reason() -> None:
    obs = observation(
        sources=(SourceObservation("line-1", False, 3, 0, "line-1: cannot open"),),
        sinks=(SinkObservation("mqtt", False, 50, 900.0, 0, "not authorised", {}),),
        outbox_full=True,
    )
    ready, body = health_report(obs)
    assert not ready
    reasons = " | ".join(body["reasons"])
    assert "source line-1 not connected: line-1: cannot open" in reasons
    assert "mqtt not connected: not authorised" in reasons
    assert "oldest unsent record is 900 s old" in reasons
    assert "outbox full" in reasons


def test_not_ready_while_a_connected_sink_reports_an_error() -> None:
    denial = "broker denied publishing to pumpgw/s/st/pumps/P1/telemetry: Not authorized (0x87)"
    obs = observation(sinks=(SinkObservation("mqtt", True, 5, 2.0, 0, denial, {"denied": 5}),))
    ready, body = health_report(obs)
    assert not ready
    assert body["reasons"] == [f"mqtt: {denial}"]


def test_metrics_expose_the_accounting_in_prometheus_text() -> None:
    text = render_metrics(observation())
    assert "pumpgw_frames_in_total 10" in text
    assert 'pumpgw_quarantined_total{reason="checksum"} 2' in text
    assert 'pumpgw_records_accepted_total{kind="reading"} 8' in text
    assert 'pumpgw_sink_backlog_records{sink="mqtt"} 4' in text
    assert 'pumpgw_source_reconnects_total{source="line-1"} 2' in text
    assert 'pumpgw_pumps{telemetry="lost"} 1' in text
    assert "# TYPE pumpgw_outbox_pending_records gauge" in text


def test_metrics_expose_time_to_acknowledge_per_priority() -> None:
    delays = {"PH": (3, 1234567.5, 900.25), "PM": (1, 60.0, 60.0)}
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            render_metrics(observation(acknowledgement_delays=delays))
        )
    }
    summary = families["pumpgw_alert_acknowledgement_delay_seconds"]
    assert summary.type == "summary"
    values = {(s.name, s.labels["priority"]): s.value for s in summary.samples}
    assert values == {
        ("pumpgw_alert_acknowledgement_delay_seconds_count", "PH"): 3,
        ("pumpgw_alert_acknowledgement_delay_seconds_sum", "PH"): 1234567.5,
        ("pumpgw_alert_acknowledgement_delay_seconds_count", "PM"): 1,
        ("pumpgw_alert_acknowledgement_delay_seconds_sum", "PM"): 60.0,
    }
    longest = families["pumpgw_alert_acknowledgement_delay_max_seconds"]
    assert {s.labels["priority"]: s.value for s in longest.samples} == {"PH": 900.25, "PM": 60.0}


def test_metrics_declare_time_to_acknowledge_before_any_acknowledgement() -> None:
    text = render_metrics(observation())
    assert "# TYPE pumpgw_alert_acknowledgement_delay_seconds summary" in text
    assert "pumpgw_alert_acknowledgement_delay_seconds_count" not in text


ALERT_RULES = Path(__file__).parents[2] / "deploy" / "prometheus" / "pumpgw-alerts.yml"


def test_each_family_has_one_type_and_gauges_carry_no_total_suffix() -> None:
    sink = SinkObservation("mqtt", True, 4, 1.5, 8, None, {"denied": 1}, {"inflight": 7})
    families = {
        f.name: f
        for f in text_string_to_metric_families(render_metrics(observation(sinks=(sink,))))
    }
    assert families["pumpgw_sink_inflight"].type == "gauge"
    assert families["pumpgw_sink_inflight"].samples[0].value == 7
    assert "pumpgw_sink_inflight_total" not in render_metrics(observation(sinks=(sink,)))
    assert families["pumpgw_sink_denied"].type == "counter"  # the parser strips `_total`
    assert families["pumpgw_frames_in"].type == "counter"
    assert families["pumpgw_outbox_full"].type == "gauge"


def test_latency_histograms_are_exported_with_buckets_sum_and_count() -> None:
    frame_to_commit = latency_histogram("pumpgw_frame_to_commit_seconds", "frame to commit")
    frame_to_commit.observe(0.004)
    frame_to_commit.observe(0.2)
    text = render_metrics(observation(latencies=(frame_to_commit,)))
    assert "# TYPE pumpgw_frame_to_commit_seconds histogram" in text
    assert 'pumpgw_frame_to_commit_seconds_bucket{le="0.005"} 1.0' in text
    assert 'pumpgw_frame_to_commit_seconds_bucket{le="+Inf"} 2.0' in text
    assert "pumpgw_frame_to_commit_seconds_count 2.0" in text
    assert "_created" not in text


def test_every_metric_the_alert_rules_use_is_exported() -> None:
    sink = SinkObservation("mqtt", True, 0, None, 0, None, {"denied": 0, "poisoned": 0})
    exported = render_metrics(observation(sinks=(sink,)))
    used = set(re.findall(r"pumpgw_[a-z_]+", ALERT_RULES.read_text()))
    assert used
    missing = sorted(name for name in used if f"\n{name}" not in exported)
    assert missing == []


def test_metrics_endpoint_serves_process_metrics_beside_the_gateways() -> None:
    server = HealthServer("127.0.0.1:0", observation)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            content_type = answer.headers["Content-Type"]
            text = answer.read().decode()
    finally:
        server.stop()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "pumpgw_frames_in_total 10.0" in text
    assert "# TYPE process_cpu_seconds_total counter" in text
    assert "process_resident_memory_bytes " in text
    assert "process_open_fds " in text
