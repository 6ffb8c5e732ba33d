"""Acknowledgements bound to the MQTT user, and retained state a consumer can verify.

Against a real `pumpgw run`, a real Mosquitto and `pumpsim`: a forged `by`, a retained ack,
the legacy ack topic, a dashboard acknowledging a technical alert, an ack while the outbox is
full, a client-id takeover with the births and the retained state that follow it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.service import STATUS_SEQ_BLOCK as BLOCK
from tests.e2e import Collector, GatewayProcess, gateway_config, wait_until
from tests.integration.test_faults import mqtt_publish
from tests.integration.test_gateway_e2e import (
    METRICS_S,
    collecting,
    explain,
    gateway_running,
    unique_prefix,
    ward_running,
)
from tests.mqtt_helpers import Probe, probing, publisher, settings_for
from tests.servers import Mosquitto, free_port

pytestmark = pytest.mark.integration

SITE, STATION = "north", "bed-12"
ALERT_WARD = ("--pumps", "2", "--count", "200", "--scenario", "low-reservoir", "--speed", "max",
              "--wait-for-ack")  # fmt: skip
NURSE, TECH = "nurse.jones", "biomed.tech"
FULL_WARD = ("--pumps", "2", "--count", "2000", "--speed", "max", "--wait-for-ack")
ACK_RIGHTS = {"ack_allowed": [NURSE], "ack_technical": [TECH]}
ACK_DELAY = "pumpgw_alert_acknowledgement_delay_seconds"
ACK_DELAY_MAX = "pumpgw_alert_acknowledgement_delay_max_seconds"


def station_config(tmp_path: Path, ward_port: int, port: int, prefix: str, **extra: Any) -> Path:
    gateway = {"site": SITE, "station": STATION, **ACK_RIGHTS, **extra.pop("gateway", {})}
    return gateway_config(
        tmp_path,
        sim_port=ward_port,
        mqtt_port=port,
        prefix=prefix,
        extra={"gateway": gateway, **extra},
    )


def ack(alert_id: str, **fields: str) -> bytes:
    return json.dumps({"alert_id": alert_id, **fields}).encode()


def publish_retained(port: int, topic: str, payload: bytes) -> None:
    with publisher(port) as client:
        assert client.publish(topic, payload, retain=True).accepted


def alerts(collector: Collector, **match: Any) -> list[dict[str, Any]]:
    with collector._lock:
        return [
            t for t in collector.payloads["alert"]
            if all(t.get(k) == v for k, v in match.items())
        ]  # fmt: skip


def refusals(collector: Collector) -> list[dict[str, Any]]:
    with collector._lock:
        return list(collector.payloads["ack_refusal"])


def latching_active(collector: Collector) -> str | None:
    started = {t["alert_id"] for t in alerts(collector, phase="start", latching=True)}
    ended = {t["alert_id"] for t in alerts(collector, phase="end")}
    return min(started - ended, default=None)


# --- who acknowledges -----------------------------------------------------------------------


def test_an_ack_counts_only_for_the_user_in_its_topic_and_each_refusal_is_receipted(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port, prefix = mosquitto.port, unique_prefix()
    root = f"{prefix}/{SITE}/{STATION}"
    # Published before the gateway subscribes, for the alert id it will predictably raise.
    publish_retained(port, f"{root}/ack/{NURSE}", ack("P0001:low_reservoir:1", by=NURSE))
    with (
        collecting(port, root) as collector,
        ward_running(tmp_path, *ALERT_WARD) as ward,
    ):
        config = station_config(tmp_path, ward.port, port, prefix)
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            assert collector.wait_for(lambda: latching_active(collector) is not None, METRICS_S)
            alert_id = latching_active(collector)
            assert alert_id is not None
            codes = [
                # A client may write any `by`: only the topic's user counts.
                mqtt_publish(port, f"{root}/ack/nurse.smith", ack(alert_id, by=NURSE)),
                mqtt_publish(port, f"{root}/ack", ack(alert_id, by=NURSE)),  # the old topic
                mqtt_publish(port, f"{root}/ack/{NURSE}", ack(f"{alert_id}9")),  # no such alert
            ]
            publish_retained(port, f"{root}/ack/{NURSE}", ack(alert_id))  # retained live
            assert collector.wait_for(lambda: len(refusals(collector)) >= 4, METRICS_S)
            assert not alerts(collector, alert_id=alert_id, phase="acknowledged")
            assert mqtt_publish(port, f"{root}/ack/{NURSE}", ack(alert_id)) == 0
            assert collector.wait_for(
                lambda: bool(alerts(collector, alert_id=alert_id, phase="acknowledged")),
                METRICS_S,
            ), explain(gateway, ward)
            metrics = gateway.wait_metrics(
                lambda m: m.value("pumpgw_operator_acks_total", result="accepted") >= 1
                and m.value(f"{ACK_DELAY}_count") >= 1,
                METRICS_S,
            )
            log = gateway.log()
        publish_retained(port, f"{root}/ack/{NURSE}", b"")  # clear the retained ack
    assert codes == [0, 0, 0]
    # Exactly four refusals: the ack retained before the gateway subscribed never arrived.
    assert metrics.value("pumpgw_operator_acks_total", result="rejected") == 4
    assert metrics.value("pumpgw_operator_acks_total", result="accepted") == 1
    # Time to acknowledge: one acknowledgement, of the latching alert's priority.
    (priority,) = metrics.by_label(f"{ACK_DELAY}_count", "priority")
    assert metrics.value(f"{ACK_DELAY}_count", priority=priority) == 1
    assert metrics.value(f"{ACK_DELAY}_sum") == metrics.value(ACK_DELAY_MAX) > 0
    assert metrics.by_label("pumpgw_operator_acks_refused_total", "reason") == {
        "by_mismatch": 1, "legacy_topic": 1, "unknown_alert": 1, "retained": 1,
    }  # fmt: skip
    by_kind = {r["reason_kind"]: r for r in refusals(collector)}
    assert set(by_kind) == {"by_mismatch", "legacy_topic", "unknown_alert", "retained"}
    assert by_kind["by_mismatch"]["username"] == "nurse.smith"
    assert f"{root}/ack/" in by_kind["legacy_topic"]["reason"]
    assert by_kind["unknown_alert"]["alert_id"] == f"{alert_id}9"
    (receipt,) = alerts(collector, alert_id=alert_id, phase="acknowledged")
    assert receipt["acknowledged_by"] == NURSE
    warned = [line for line in log.splitlines() if "WARNING" in line and "refused" in line]
    assert len(warned) == 4, log[-3000:]


# --- technical alerts and a full outbox -----------------------------------------------------


def test_a_dashboard_cannot_ack_a_technical_alert_and_the_full_outbox_alert_is_acked_while_full(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port, prefix = mosquitto.port, unique_prefix()
    root = f"{prefix}/{SITE}/{STATION}"
    dead_influx = {"url": f"http://127.0.0.1:{free_port()}", "org": "o", "bucket": "b"}
    with (
        collecting(port, root) as collector,
        ward_running(tmp_path, *FULL_WARD) as ward,
    ):
        config = station_config(
            tmp_path, ward.port, port, prefix,
            store={"max_pending_records": 100}, influx=dead_influx,
        )  # fmt: skip
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            assert collector.wait_for(
                lambda: bool(alerts(collector, alert_kind="outbox_full", phase="start")), METRICS_S
            ), explain(gateway, ward)
            (full,) = alerts(collector, alert_kind="outbox_full", phase="start")
            assert full["priority"] == "PH"
            assert mqtt_publish(port, f"{root}/ack/{NURSE}", ack(full["alert_id"])) == 0
            assert collector.wait_for(lambda: len(refusals(collector)) >= 1, METRICS_S)
            assert mqtt_publish(port, f"{root}/ack/{TECH}", ack(full["alert_id"])) == 0
            assert collector.wait_for(
                lambda: bool(alerts(collector, alert_kind="outbox_full", phase="acknowledged")),
                METRICS_S,
            ), explain(gateway, ward)
            metrics = gateway.metrics()
    assert metrics is not None
    assert metrics.value("pumpgw_outbox_full") == 1, "the outbox was no longer full"
    (refused,) = refusals(collector)
    assert (refused["username"], refused["reason_kind"]) == (NURSE, "technical_role")
    (acked,) = alerts(collector, alert_kind="outbox_full", phase="acknowledged")
    assert acked["acknowledged_by"] == TECH


# --- takeover, births and retained state -------------------------------------------------------


def statuses(collector: Collector) -> list[dict[str, Any]]:
    with collector._lock:
        return list(collector.payloads["gateway_status"])


def retained_now(port: int, topic: str, session_id: str) -> dict[str, Any] | None:
    """The retained message on `topic` as a late subscriber gets it, once it is `session_id`'s."""
    found: dict[str, Any] = {}

    def current() -> bool:
        late = Collector(port, topic)
        try:
            late.wait_for(lambda: bool(late.retained), 2.0)
            payload = next(iter(late.retained.values()), b"{}")
        finally:
            late.close()
        found.update(json.loads(payload))
        return found.get("session_id") == session_id

    return found if wait_until(current, METRICS_S) else None


@contextmanager
def taking_over(port: int, client_id: str) -> Iterator[Probe]:
    """A client that connects with the gateway's client id and a clean start (kicking it off)."""
    with probing(settings_for(port), client_id=client_id) as intruder:  # waits for its CONNACK
        yield intruder


def test_after_a_takeover_the_birth_outranks_the_will_and_retained_state_is_reasserted(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port, prefix = mosquitto.port, unique_prefix()
    root = f"{prefix}/{SITE}/{STATION}"
    forged = json.dumps({"kind": "active_alerts", "pump_id": "P0001",
                         "at": "2026-12-01T00:00:00Z", "alerts": []}).encode()  # fmt: skip
    with (
        collecting(port, root) as collector,
        ward_running(tmp_path, *ALERT_WARD) as ward,
    ):
        config = station_config(tmp_path, ward.port, port, prefix)
        gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
        try:
            ward.summary()
            assert collector.wait_for(lambda: latching_active(collector) is not None, METRICS_S)
            session = statuses(collector)[0]["session_id"]
            active = retained_now(port, f"{root}/pumps/P0001/alerts/active", session)
            assert active is not None, explain(gateway, ward)
            assert active["alerts"], "the low-reservoir pump has no active alert"
            status = retained_now(port, f"{root}/pumps/P0001/status", session)
            assert status is not None
            assert status["seq"] > 0

            publish_retained(port, f"{root}/pumps/P0001/alerts/active", forged)
            with taking_over(port, f"pumpgw-{SITE}-{STATION}"):
                time.sleep(0.5)  # the intruder holds the session a moment
            assert collector.wait_for(
                lambda: sum(s["state"] == "online" for s in statuses(collector)) >= 2, METRICS_S
            ), explain(gateway, ward)
            again = retained_now(port, f"{root}/pumps/P0001/alerts/active", session)
            metrics = gateway.wait_metrics(
                lambda m: m.value("pumpgw_sink_sessions_lost_total", sink="mqtt") >= 1,
                METRICS_S,
            )
        finally:
            gateway.stop()
        log = gateway.log()
    seen = statuses(collector)
    assert {s["session_id"] for s in seen} == {session}
    # Each connection's birth starts a block of STATUS_SEQ_BLOCK seqs and its will ends it.
    births = [s["seq"] for s in seen if s["state"] == "online" and s["seq"] % BLOCK == 0]
    assert len(births) >= 2, "no birth after the reconnect"
    assert births == sorted(births)
    wills = [s["seq"] for s in seen if s["state"] == "offline"]
    assert all(w < births[-1] for w in wills[:-1]), "an old will outranks the new birth"
    # A consumer that keeps the highest seq of the session: online until the clean stop.
    final = max(seen, key=lambda s: s["seq"])
    assert final["state"] == "offline"  # the clean stop's will, above every birth
    before_stop = max((s for s in seen if s["seq"] < final["seq"]), key=lambda s: s["seq"])
    assert before_stop["state"] == "online", "a consumer saw the station offline after reconnect"
    assert again is not None, "the forged empty set was not replaced"
    assert again["alerts"], "the reasserted set lost the active alert"
    assert again["seq"] > active["seq"]
    # Mosquitto 2.0 closes the socket without DISCONNECT 0x8E (Session taken over), so the
    # gateway learns of the takeover from the session the broker no longer has for it.
    assert metrics.value("pumpgw_sink_sessions_lost_total", sink="mqtt") == 1
    assert "did not keep this gateway's session" in log


def test_retained_state_is_reasserted_periodically_with_rising_seqs(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    port, prefix = mosquitto.port, unique_prefix()
    root = f"{prefix}/{SITE}/{STATION}"
    with (
        collecting(port, root) as collector,
        ward_running(tmp_path, *ALERT_WARD) as ward,
    ):
        config = station_config(tmp_path, ward.port, port, prefix, gateway={"state_refresh_s": 1.0})
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            ward.summary()  # the ward is done: from now on only re-assertions publish state

            def active_sets() -> list[dict[str, Any]]:
                with collector._lock:
                    sets = collector.payloads["active_alerts"]
                    return [a for a in sets if a["pump_id"] == "P0001"]

            assert collector.wait_for(lambda: len(active_sets()) >= 1, METRICS_S)
            seen = len(active_sets())
            assert collector.wait_for(lambda: len(active_sets()) >= seen + 2, METRICS_S), explain(
                gateway, ward
            )
            sets = active_sets()
    seqs = [s["seq"] for s in sets]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs), "a re-assertion repeated a seq"
    assert {s["session_id"] for s in sets} == {sets[0]["session_id"]}
    last, before = ({a["alert_id"] for a in s["alerts"]} for s in sets[-1:-3:-1])
    assert last, "the re-asserted set lost the active alerts"
    assert last == before, "nothing happened, yet the re-asserted sets differ"
