"""End to end: pumpsim -> pumpgw (a child process) -> a private Mosquitto -> a subscriber.

Every test counts against the simulator's own summary: each frame it sent intact must
arrive at the subscriber by its record id (pump:boot:seq), whatever happened on the way
(a `kill -9` of the gateway, a broker outage, a noisy line, a dropped source).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import (
    PROCESS_STOP_S,
    Collector,
    GatewayProcess,
    Metrics,
    Ward,
    broker_dropped,
    expected_ids,
    gateway_config,
    outbox_record_ids,
    sent_count,
    wait_until,
)
from tests.servers import Mosquitto, log_tail

pytestmark = pytest.mark.integration

DEVICE_KINDS = ("reading", "info", "event")
ARRIVE_S = 60.0
"""Longest wait for the last frames to reach the subscriber (a loaded CI machine)."""
METRICS_S = 15.0
DAMAGE_TO_REASON = {
    "bitflip": "checksum",
    "truncated": "truncated",
    "oversized": "oversized",
}


def unique_prefix() -> str:
    return f"e2e-{uuid.uuid4().hex[:8]}"


@contextmanager
def collecting(port: int, prefix: str, **options: Any) -> Iterator[Collector]:
    """A subscriber to the whole station tree, subscribed before anything is published."""
    collector = Collector(port, f"{prefix}/#", **options)
    try:
        yield collector
    finally:
        collector.close()


@contextmanager
def gateway_running(config: Path, log_path: Path, **env: str) -> Iterator[GatewayProcess]:
    """`pumpgw run` until the block ends; then a clean stop, or a kill if it hangs."""
    gateway = GatewayProcess(config, log_path, env=dict(env)).start()
    try:
        yield gateway
    finally:
        if gateway.running:
            try:
                gateway.stop()
            except Exception:
                gateway.kill()
                raise


@contextmanager
def ward_running(workdir: Path, *args: str, port: int | None = None) -> Iterator[Ward]:
    """A simulated ward; killed if the test leaves before it ends."""
    ward = Ward.start(workdir, *args, port=port)
    try:
        yield ward
    finally:
        if ward.proc.poll() is None:
            ward.proc.kill()
        ward.proc.communicate(timeout=PROCESS_STOP_S)  # reaps it and closes its stdout pipe


def explain(
    gateway: GatewayProcess, ward: Ward | None = None, broker: Mosquitto | None = None
) -> str:
    """Logs for a failure message."""
    text = f"\n--- gateway log\n{gateway.log()[-4000:]}"
    if ward is not None:
        text += f"\n--- pumpsim log\n{log_tail(ward.stderr_path)}"
    if broker is not None and broker_dropped(broker):
        text += "\n--- the broker dropped messages for a slow client (see its log)"
    return text


def assert_all_arrived(
    collector: Collector,
    summaries: dict[str, Any] | list[dict[str, Any]],
    gateway: GatewayProcess,
    ward: Ward,
    broker: Mosquitto | None = None,
) -> set[str]:
    """Every intact frame arrived by id, nothing else arrived, duplicates are identical."""
    runs = summaries if isinstance(summaries, list) else [summaries]
    expected = set().union(*(expected_ids(summary) for summary in runs))
    assert expected, "the simulator sent nothing"
    missing = collector.wait_device_ids(expected, ARRIVE_S)
    assert not missing, (
        f"{len(missing)} of {len(expected)} frames never arrived, e.g. {sorted(missing)[:5]}"
        + explain(gateway, ward, broker)
    )
    unexpected = collector.device_ids() - expected
    assert not unexpected, f"ids the simulator never sent intact: {sorted(unexpected)[:5]}"
    conflicts = collector.conflicting_ids(*DEVICE_KINDS)
    assert not conflicts, f"same id, different payload: {sorted(conflicts)[:5]}"
    return expected


def wait_readings(collector: Collector, count: int) -> bool:
    """Wait until the subscriber holds `count` distinct readings."""
    return collector.wait_for(lambda: collector.count("reading") >= count, ARRIVE_S)


def duplicates_seen(collector: Collector) -> dict[str, int]:
    return {kind: collector.duplicates(kind) for kind in DEVICE_KINDS}


def accounting_balances(metrics: Metrics) -> bool:
    """frames in = accepted + quarantined + duplicates (one gateway process's counters)."""
    accepted = metrics.value("pumpgw_records_accepted_total")
    quarantined = metrics.value("pumpgw_quarantined_total")
    duplicates = metrics.value("pumpgw_duplicates_total")
    return metrics.value("pumpgw_frames_in_total") == accepted + quarantined + duplicates


def delivered_everything(metrics: Metrics) -> bool:
    return (
        metrics.value("pumpgw_sink_backlog_records", sink="mqtt") == 0
        and metrics.value("pumpgw_outbox_pending_records") == 0
    )


# --- 1. the plain data path -------------------------------------------------------------


def test_every_intact_frame_reaches_a_subscriber_by_its_id(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique_prefix()
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(
            tmp_path, "--pumps", "10", "--count", "300", "--speed", "max", "--wait-for-ack"
        ) as ward,
    ):
        config = gateway_config(
            tmp_path, sim_port=ward.port, mqtt_port=mosquitto.port, prefix=prefix
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            expected = assert_all_arrived(collector, summary, gateway, ward, mosquitto)
            metrics = gateway.wait_metrics(delivered_everything, METRICS_S)
        assert gateway.proc is not None
        assert gateway.proc.returncode == 0, explain(gateway, ward)
    assert summary["all_acked"] is True
    assert collector.count("reading") == sent_count(summary, "reading") == 10 * 300
    assert metrics.value("pumpgw_records_accepted_total") == len(expected)
    assert metrics.value("pumpgw_quarantined_total") == 0
    assert accounting_balances(metrics)
    assert delivered_everything(metrics)
    delivered = metrics.value("pumpgw_sink_delivered_total", sink="mqtt")
    assert metrics.value("pumpgw_commit_to_puback_seconds_count") == delivered > 0
    reads = metrics.value("pumpgw_frame_to_commit_seconds_count")
    assert 0 < reads <= metrics.value("pumpgw_frames_in_total")
    assert metrics.value("process_resident_memory_bytes") > 0
    print(f"\n{len(expected)} frames, duplicates at the subscriber: {duplicates_seen(collector)}")


# --- 2. kill -9 of the gateway mid-stream ------------------------------------------------

KILL_PUMPS, KILL_COUNT = 5, 1500
KILL_WARD = f"--pumps {KILL_PUMPS} --count {KILL_COUNT} --speed 6000 --wait-for-ack"
"""About 500 readings a second for 15 s (the clock pauses while no gateway reads)."""
KILL_AT_READINGS = (0.15, 0.4, 0.65)
"""Fractions of the run's readings seen by the subscriber when the gateway is killed."""


def test_gateway_killed_mid_stream_three_times_loses_nothing_and_stores_each_frame_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique_prefix()
    log_path = tmp_path / "gateway.log"
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, *KILL_WARD.split()) as ward,
    ):
        config = gateway_config(
            tmp_path, sim_port=ward.port, mqtt_port=mosquitto.port, prefix=prefix
        )
        gateway = GatewayProcess(config, log_path).start()
        try:
            for fraction in KILL_AT_READINGS:
                want = int(fraction * KILL_PUMPS * KILL_COUNT)
                assert wait_readings(collector, want), explain(gateway, ward)
                assert ward.proc.poll() is None, "the ward finished before the kill: not mid-stream"
                gateway.kill()
                gateway = GatewayProcess(config, log_path).start()
            summary = ward.summary()
            assert_all_arrived(collector, summary, gateway, ward, mosquitto)
            metrics = gateway.wait_metrics(delivered_everything, METRICS_S)
        finally:
            if gateway.running:
                gateway.stop()
    assert summary["all_acked"] is True, "the simulator still holds unacknowledged frames"
    stored = outbox_record_ids(tmp_path / "outbox.db")
    assert set(stored) == expected_ids(summary)
    twice = {rid: n for rid, n in stored.items() if n > 1}
    assert not twice, f"stored more than once (dedup across restarts failed): {list(twice)[:5]}"
    assert accounting_balances(metrics)
    assert delivered_everything(metrics)
    print(
        f"\nretransmitted by the ward: {summary['totals']['retransmitted']}, "
        f"duplicates dropped by the last gateway: {metrics.value('pumpgw_duplicates_total'):.0f}, "
        f"duplicates at the subscriber: {duplicates_seen(collector)}"
    )


# --- 3. broker outage ----------------------------------------------------------------------

OUTAGE_S = 10.0
OUTAGE_WARD = "--pumps 5 --count 300 --speed 600 --wait-for-ack"
"""50 readings a second for 30 s: the outage falls in the middle of the stream."""
OUTAGE_MQTT = {"reconnect_max_s": 4}
"""Back within seconds of the broker (the default backoff grows to 30 s)."""


def test_broker_down_for_ten_seconds_loses_nothing_and_healthz_says_why(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique_prefix()
    with (
        collecting(mosquitto.port, prefix, persistent=True) as collector,
        ward_running(tmp_path, *OUTAGE_WARD.split()) as ward,
    ):
        config = gateway_config(
            tmp_path,
            sim_port=ward.port,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            extra={"mqtt": OUTAGE_MQTT},
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            assert wait_readings(collector, 50), explain(gateway, ward)
            assert wait_until(lambda: (gateway.health() or (0, {}))[0] == 200, METRICS_S), (
                f"not ready before the outage: {gateway.health()}" + explain(gateway, ward)
            )
            mosquitto.stop()
            down_at = time.monotonic()
            health: tuple[int, dict[str, Any]] | None = None

            broker_url = f"mqtt://127.0.0.1:{mosquitto.port}"

            def not_ready_naming_the_broker() -> bool:
                nonlocal health
                health = gateway.health()
                return (
                    health is not None
                    and health[0] == 503
                    and any(broker_url in r for r in health[1]["reasons"])
                )

            assert wait_until(not_ready_naming_the_broker, OUTAGE_S), f"no clear reason: {health}"
            assert health is not None
            reasons = health[1]["reasons"]
            assert any(r.startswith("mqtt not connected: ") for r in reasons), reasons
            assert health[1]["ready"] is False
            during = gateway.wait_metrics(
                lambda m: m.value("pumpgw_sink_backlog_records", sink="mqtt") > 0, OUTAGE_S
            )
            assert during.value("pumpgw_sink_connected", sink="mqtt") == 0
            assert during.value("pumpgw_sink_backlog_records", sink="mqtt") > 0
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))  # hold the outage
            assert ward.proc.poll() is None, "the ward ended during the outage: not mid-stream"
            mosquitto.start()
            assert wait_until(lambda: (gateway.health() or (0, {}))[0] == 200, ARRIVE_S), (
                f"not ready after the outage: {gateway.health()}" + explain(gateway, ward)
            )
            assert ward.proc.poll() is None, "ready only after the ward ended: reconnect too slow"
            summary = ward.summary()
            assert_all_arrived(collector, summary, gateway, ward, mosquitto)
            metrics = gateway.wait_metrics(delivered_everything, METRICS_S)
    assert summary["all_acked"] is True
    assert accounting_balances(metrics)
    assert metrics.value("pumpgw_sink_reconnects_total", sink="mqtt") >= 1
    assert "connection to mqtt://" in gateway.log()
    print(f"\nduplicates at the subscriber: {duplicates_seen(collector)}; reasons: {reasons}")


# --- 4. a noisy line -----------------------------------------------------------------------

NOISY_WARD = "--pumps 5 --count 400 --scenario noisy-line --speed max --wait-for-ack"


def damage_by_reason(summary: dict[str, Any]) -> Counter[str]:
    """What the simulator damaged on purpose, as the quarantine reasons it must produce."""
    totals = summary["totals"]
    want: Counter[str] = Counter()
    for kind, n in totals["damaged"].items():
        want[DAMAGE_TO_REASON[kind]] += n
    want["garbage"] += totals["garbage_runs"]
    return +want


def merge_bitflips(by_reason: Counter[str]) -> Counter[str]:
    """A flipped bit fails the checksum, or (when it hits the `*`) the frame's shape."""
    merged = Counter(by_reason)
    merged["checksum"] += merged.pop("malformed", 0)
    return +merged


def test_noisy_line_quarantines_exactly_what_was_damaged_and_delivers_the_rest(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique_prefix()
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, *NOISY_WARD.split()) as ward,
    ):
        config = gateway_config(
            tmp_path, sim_port=ward.port, mqtt_port=mosquitto.port, prefix=prefix
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            want = damage_by_reason(summary)
            total = sum(want.values())
            assert_all_arrived(collector, summary, gateway, ward, mosquitto)
            assert collector.wait_for(lambda: collector.count("quarantine") >= total, ARRIVE_S)
            metrics = gateway.wait_metrics(
                lambda m: m.value("pumpgw_quarantined_total") >= total and delivered_everything(m),
                METRICS_S,
            )
    assert summary["all_acked"] is True
    assert set(want) == {"checksum", "truncated", "oversized", "garbage"}, f"damage: {want}"
    counted = metrics.by_label("pumpgw_quarantined_total", "reason")
    assert merge_bitflips(Counter({k: int(v) for k, v in counted.items()})) == want, explain(
        gateway, ward
    )
    dead = {q["quarantine_id"]: q["reason_kind"] for q in collector.payloads["quarantine"]}
    assert merge_bitflips(Counter(dead.values())) == want
    assert collector.topics["quarantine"] == {f"{prefix}/test/bed-1/deadletter"}
    assert accounting_balances(metrics)
    assert metrics.value("pumpgw_records_accepted_total") == len(expected_ids(summary))
    print(f"\nquarantined by reason: {counted}; the simulator damaged: {dict(want)}")


# --- 6. the source drops and comes back -----------------------------------------------------

FIRST_WARD = "--pumps 3 --count 600 --speed 3600 --wait-for-ack"
"""180 readings a second for 10 s: stopped part way through."""
SECOND_WARD = "--pumps 3 --count 200 --speed max --wait-for-ack"


def test_source_that_drops_and_returns_with_a_new_boot_delivers_both_runs(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique_prefix()
    log_path = tmp_path / "gateway.log"
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, *FIRST_WARD.split()) as first,
    ):
        config = gateway_config(
            tmp_path, sim_port=first.port, mqtt_port=mosquitto.port, prefix=prefix
        )
        with gateway_running(config, log_path) as gateway:
            assert wait_readings(collector, 300), explain(gateway, first)
            assert first.proc.poll() is None, "the first ward ended before it was stopped"
            first_summary = first.stop()
            dropped = gateway.wait_metrics(
                lambda m: m.value("pumpgw_source_connected", source="line-1") == 0, METRICS_S
            )
            assert dropped.value("pumpgw_source_connected", source="line-1") == 0
            with ward_running(tmp_path, *SECOND_WARD.split(), port=first.port) as second:
                second_summary = second.summary()
            summaries = [first_summary, second_summary]
            assert_all_arrived(collector, summaries, gateway, second, mosquitto)
            metrics = gateway.wait_metrics(delivered_everything, METRICS_S)
    assert first_summary["stopped_by"] == "signal"
    assert second_summary["all_acked"] is True
    boots = {p["boot_id"] for s in summaries for p in s["pumps"]}
    assert len(boots) == 6, "each run must have its own boot ids"
    assert metrics.value("pumpgw_source_reconnects_total", source="line-1") >= 1
    assert "line-1: line connected again" in gateway.log()
    assert accounting_balances(metrics)
