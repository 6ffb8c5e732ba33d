"""/healthz and /metrics rendering from an Observation."""

from __future__ import annotations

import dataclasses

from gateway.health import (
    Observation,
    SinkObservation,
    SourceObservation,
    health_report,
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
    lines = render_metrics(observation(acknowledgement_delays=delays)).splitlines()
    name = "pumpgw_alert_acknowledgement_delay_seconds"
    start = lines.index(f"# TYPE {name} summary")
    assert lines[start + 1 : start + 5] == [
        f'{name}_sum{{priority="PH"}} 1234567.5',
        f'{name}_count{{priority="PH"}} 3',
        f'{name}_sum{{priority="PM"}} 60.0',
        f'{name}_count{{priority="PM"}} 1',
    ]
    assert 'pumpgw_alert_acknowledgement_delay_max_seconds{priority="PH"} 900.25' in lines


def test_metrics_declare_time_to_acknowledge_before_any_acknowledgement() -> None:
    text = render_metrics(observation())
    assert "# TYPE pumpgw_alert_acknowledgement_delay_seconds summary" in text
    assert "pumpgw_alert_acknowledgement_delay_seconds_count" not in text
