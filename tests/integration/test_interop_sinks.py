"""End to end: pumpsim -> `pumpgw run` -> HL7 v2 over MLLP and FHIR R4, real processes.

The MLLP receiver validates every message with hl7apy (v2.6) and the FHIR endpoint every
Bundle and resource with fhir.resources (R4B); both answer on demand (tests/receivers/).
Each test accounts for every reading and alert transition the gateway stored, by identity.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.adapters.delivery import Outgoing, Verdict
from gateway.adapters.mllp import Hl7Settings, MllpTransport
from gateway.hl7_messages import hl7_time
from tests.e2e import (
    GatewayProcess,
    Metrics,
    gateway_config,
    outbox_record_ids,
    wait_until,
    ward_running,
)
from tests.interop_servers import FhirEndpoint, MllpReceiver
from tests.mqtt_helpers import publisher
from tests.servers import Mosquitto, Pki

pytestmark = pytest.mark.integration

SINKS = ("mqtt", "hl7", "fhir")
DELIVERED_S = 240.0
"""Longest wait for both receivers to hold everything (hl7apy validates ~15 OBR groups/s)."""
STATION = "bed-1"


@pytest.fixture
def mllp_receiver(tmp_path: Path) -> Iterator[MllpReceiver]:
    with MllpReceiver(tmp_path / "mllp") as receiver:
        yield receiver


@pytest.fixture
def fhir_endpoint(tmp_path: Path) -> Iterator[FhirEndpoint]:
    with FhirEndpoint(tmp_path / "fhir") as endpoint:
        yield endpoint


def interop_config(
    tmp_path: Path,
    sim_port: int,
    mosquitto: Mosquitto,
    receiver: MllpReceiver,
    endpoint: FhirEndpoint,
    reading_interval_s: float,
) -> tuple[Path, str]:
    """A gateway config with [hl7] and [fhir]; returns it and the MQTT topic prefix."""
    prefix = f"interop-{uuid.uuid4().hex[:8]}"
    hl7 = {
        "url": receiver.url,
        "sending_facility": "north.bed-1",
        "receiving_application": "ENGINE",
        "reading_interval_s": reading_interval_s,
        "send_every_s": 0.2,
        "retry_initial_s": 0.1,
        "retry_max_s": 1.0,
    }
    fhir = {
        "base_url": endpoint.url,
        "records_per_bundle": 50,
        "send_every_s": 0.2,
        "retry_initial_s": 0.1,
        "retry_max_s": 1.0,
    }
    config = gateway_config(
        tmp_path,
        sim_port=sim_port,
        mqtt_port=mosquitto.port,
        prefix=prefix,
        extra={"gateway": {"site": prefix, "station": STATION}, "hl7": hl7, "fhir": fhir},
    )
    return config, prefix


def delivered(metrics: Metrics) -> bool:
    backlog = metrics.by_label("pumpgw_sink_backlog_records", "sink")
    return all(name in backlog and backlog[name] == 0 for name in SINKS)


def wait_delivered(gateway: GatewayProcess) -> Metrics:
    metrics = gateway.wait_metrics(delivered, DELIVERED_S)
    assert delivered(metrics), explain(gateway)
    return metrics


def explain(gateway: GatewayProcess) -> str:
    return f"\n--- gateway log tail:\n{gateway.log()[-3000:]}"


def stored_ids(outbox: Path, kind: str) -> set[str]:
    return set(outbox_record_ids(outbox, (kind,)))


def quarantined(outbox: Path, source: str) -> list[dict[str, Any]]:
    """Quarantine entries of the outbox that came from one sink."""
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM records WHERE kind = 'quarantine'").fetchall()
    finally:
        db.close()
    entries = [json.loads(r[0]) for r in rows]
    return [e for e in entries if e["source"] == source]


OPERATOR = "nurse.jones"


def ack_topic(prefix: str) -> str:
    """Where an operator acknowledges alerts: the one place that knows the ack topic's form."""
    return f"{prefix}/{prefix}/{STATION}/ack/{OPERATOR}"


def acknowledge(mosquitto: Mosquitto, prefix: str, alert_id: str) -> None:
    body = {"alert_id": alert_id, "by": OPERATOR, "at": "2026-01-05T08:30:00Z"}
    with publisher(mosquitto.port) as client:
        assert client.publish(ack_topic(prefix), json.dumps(body).encode()).accepted


def assert_same_id_same_message(receiver: MllpReceiver) -> None:
    """A resend carries the same MSH-10 for the same records: one body per control id."""
    bodies: dict[str, set[str]] = {}
    for m in receiver.messages():
        bodies.setdefault(m.control_id, set()).add(m.body)
    differing = [cid for cid, texts in bodies.items() if len(texts) > 1]
    assert not differing, f"control ids reused for different content: {differing[:3]}"


# --- 1. completeness across a receiver restart and a gateway SIGKILL ---------------------

WARD = "--scenario ward --pumps 3 --seed 2 --count 120 --interval 300 --speed max --wait-for-ack"
"""Ten simulated hours of a normal, a low-reservoir and an emptying pump: readings and alerts."""


def test_ward_reaches_hl7_and_fhir_completely_across_receiver_restarts_and_a_gateway_sigkill(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mllp_receiver: MllpReceiver,
    fhir_endpoint: FhirEndpoint,
) -> None:
    outbox = tmp_path / "outbox.db"
    with ward_running(tmp_path, WARD) as ward:
        config, _ = interop_config(
            tmp_path, ward.port, mosquitto, mllp_receiver, fhir_endpoint, 3600
        )
        gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
        try:
            assert wait_until(lambda: len(mllp_receiver.accepted_ids()) >= 40, DELIVERED_S)
            mllp_receiver.restart()
            fhir_endpoint.restart()
            assert wait_until(lambda: len(mllp_receiver.accepted_ids()) >= 100, DELIVERED_S)
            gateway.kill()
            gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
            summary = ward.summary()
            metrics = wait_delivered(gateway)
        finally:
            if gateway.running:
                gateway.stop()
    assert summary["all_acked"] is True
    readings, alerts = stored_ids(outbox, "reading"), stored_ids(outbox, "alert")
    assert len(readings) == sum(int(p["sent"]["reading"]) for p in summary["pumps"])
    assert alerts, "the ward raised no alert: the scenario no longer exercises PCD-04"

    hl7_ids = mllp_receiver.accepted_ids()
    assert set(hl7_ids) == readings | alerts
    assert all(m.answer == "AA" for m in mllp_receiver.messages()), "hl7apy refused a message"
    assert_same_id_same_message(mllp_receiver)

    assert fhir_endpoint.record_ids("Observation") == readings
    assert fhir_endpoint.record_ids("DetectedIssue") == alerts
    pumps = {f"urn:pumpgw:pump-id|{p['pump_id']}" for p in summary["pumps"]}
    assert set(fhir_endpoint.resources("Device")) >= pumps
    assert not quarantined(outbox, "hl7")
    assert not quarantined(outbox, "fhir")
    assert metrics.value("pumpgw_sink_poisoned_total", sink="hl7") == 0
    fhir_again = sum(fhir_endpoint.posted_ids().values()) - len(readings | alerts)
    print(
        f"\n{len(readings)} readings, {len(alerts)} alert transitions; HL7 messages "
        f"{len(mllp_receiver.messages())}, records resent {sum(hl7_ids.values()) - len(hl7_ids)}; "
        f"FHIR records posted again {fhir_again}"
    )


# --- 2. refusals: AR and 422 quarantine exactly one; AE and 503 are retried --------------

TIMING = "--interval 300 --speed max --wait-for-ack"
SMALL_WARD = f"--scenario normal --pumps 2 --seed 3 --count 30 {TIMING}"
HL7_REJECTED = "P0001:*:7"
HL7_BUSY = "P0002:*:5"
FHIR_REJECTED = "P0001:*:9"
FHIR_BUSY = "P0002:*:6"


def test_ar_and_422_quarantine_exactly_one_record_and_ae_and_503_are_resent(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mllp_receiver: MllpReceiver,
    fhir_endpoint: FhirEndpoint,
) -> None:
    mllp_receiver.control({"reject": {HL7_REJECTED: "AR"}, "transient": {HL7_BUSY: 2}})
    fhir_endpoint.control({"reject": {FHIR_REJECTED: 422}, "transient": {FHIR_BUSY: 1}})
    outbox = tmp_path / "outbox.db"
    with ward_running(tmp_path, SMALL_WARD) as ward:
        config, _ = interop_config(tmp_path, ward.port, mosquitto, mllp_receiver, fhir_endpoint, 0)
        gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
        try:
            summary = ward.summary()
            metrics = wait_delivered(gateway)
        finally:
            gateway.stop()
    assert summary["all_acked"] is True
    readings = stored_ids(outbox, "reading")
    rejected = {r for r in readings if r.startswith("P0001:") and r.endswith(":7")}
    refused_fhir = {r for r in readings if r.startswith("P0001:") and r.endswith(":9")}
    assert len(rejected) == 1
    assert len(refused_fhir) == 1

    messages = mllp_receiver.messages()
    assert [m.answer for m in messages if set(m.record_ids) & rejected] == ["AR"]
    busy = [m for m in messages if any(busy_id(i) for i in m.record_ids)]
    assert [m.answer for m in busy] == ["AE", "AE", "AA"]
    assert len({m.control_id for m in busy}) == 1, "a resend must carry the same MSH-10"
    assert set(mllp_receiver.accepted_ids()) == readings - rejected
    hl7_quarantine = quarantined(outbox, "hl7")
    assert len(hl7_quarantine) == 1
    assert hl7_quarantine[0]["reason_kind"] == "hl7_rejected"
    assert "AR: rejected on demand" in hl7_quarantine[0]["reason"]
    assert next(iter(rejected)) in hl7_quarantine[0]["reason"]
    kept = json.loads(bytes.fromhex(hl7_quarantine[0]["raw_hex"]))
    assert f"{kept['pump_id']}:{kept['boot_id']}:{kept['seq']}" in rejected  # the record, not PID

    assert fhir_endpoint.record_ids("Observation") == readings - refused_fhir
    fhir_quarantine = quarantined(outbox, "fhir")
    assert len(fhir_quarantine) == 1
    assert "HTTP 422: rejected on demand" in fhir_quarantine[0]["reason"]
    assert next(iter(refused_fhir)) in fhir_quarantine[0]["reason"]
    assert metrics.value("pumpgw_sink_poisoned_total", sink="hl7") == 1
    assert metrics.value("pumpgw_sink_poisoned_total", sink="fhir") == 1
    assert metrics.value("pumpgw_sink_retries_total", sink="hl7") >= 2
    assert metrics.value("pumpgw_sink_retries_total", sink="fhir") >= 1


# --- 3. alert lifecycle: PCD-04 start, acknowledged (MQTT ack), end ---------------------

LOW_WARD = f"--scenario low-reservoir --pumps 1 --seed 1 --count 96 {TIMING}"
REFILLED = f"--scenario normal --pumps 1 --seed 1 --count 12 {TIMING}"
LOW_PREFIX = "P0001:low_reservoir:"
"""Alert ids end in a keyed token nobody outside can predict: the test finds the id by kind."""


def test_low_reservoir_alert_goes_out_as_pcd04_start_acknowledged_end_and_as_detected_issues(
    tmp_path: Path,
    mosquitto: Mosquitto,
    mllp_receiver: MllpReceiver,
    fhir_endpoint: FhirEndpoint,
) -> None:
    with ward_running(tmp_path, LOW_WARD) as ward:
        sim_port = ward.port
        config, prefix = interop_config(
            tmp_path, sim_port, mosquitto, mllp_receiver, fhir_endpoint, 3600
        )
        gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
        try:
            assert ward.summary()["all_acked"] is True
            wait_delivered(gateway)
            assert phases(mllp_receiver) == ["start"], explain(gateway)
            acknowledge(mosquitto, prefix, low_alert_id(mllp_receiver))
            assert wait_until(lambda: phases(mllp_receiver) == ["start", "acknowledged"], 30)
        except BaseException:
            gateway.stop()
            raise
    try:
        with ward_running(tmp_path, REFILLED, port=sim_port) as refilled:
            assert refilled.summary()["all_acked"] is True
        assert wait_until(
            lambda: phases(mllp_receiver) == ["start", "acknowledged", "end"], DELIVERED_S
        ), explain(gateway)
        wait_delivered(gateway)
    finally:
        gateway.stop()
    acked = next(m for m in alert_messages(mllp_receiver) if m.phase == "acknowledged")
    assert "nurse.jones" in acked.body
    low = low_alert_id(mllp_receiver)
    assert {m.alert_id for m in alert_messages(mllp_receiver)} == {low}

    issues = [
        r for r in fhir_endpoint.resources("DetectedIssue").values()
        if {"system": "urn:pumpgw:alert-id", "value": low} in r["identifier"]
    ]
    fhir_phases = [r["evidence"][0]["code"][0]["coding"][0]["code"] for r in issues]
    assert fhir_phases == ["start", "acknowledged", "end"]  # in the order they were stored
    statuses = {r["evidence"][0]["code"][0]["coding"][0]["code"]: r["status"] for r in issues}
    assert statuses == {"start": "preliminary", "acknowledged": "preliminary", "end": "final"}
    acked_issue = next(r for r in issues if "mitigation" in r)
    assert acked_issue["mitigation"][0]["author"]["display"] == "nurse.jones"
    # Both sinks carry the same acknowledgement time (the console's claim, bounded to the
    # alert's life by the gateway): FHIR's mitigation date, HL7's OBX-14.
    acked_at = datetime.fromisoformat(acked_issue["mitigation"][0]["date"])
    assert f"|||{hl7_time(acked_at)[:14]}" in acked.body  # FHIR keeps milliseconds only


def busy_id(record_id: str) -> bool:
    return record_id.startswith("P0002:") and record_id.endswith(":5")


def alert_messages(receiver: MllpReceiver) -> list[Any]:
    return [
        m for m in receiver.messages()
        if m.alert_id is not None and m.alert_id.startswith(LOW_PREFIX) and m.answer == "AA"
    ]


def low_alert_id(receiver: MllpReceiver) -> str:
    """The low-reservoir alert's id as the gateway made it (one such alert in these tests)."""
    ids: set[str] = {m.alert_id for m in alert_messages(receiver)}
    assert len(ids) == 1, ids
    return ids.pop()


def phases(receiver: MllpReceiver) -> list[str]:
    """The low-reservoir alert's accepted PCD-04 phases, in order, resends counted once."""
    seen: Counter[str] = Counter()
    ordered = []
    for m in alert_messages(receiver):
        if not seen[m.control_id]:
            ordered.append(m.phase or "?")
        seen[m.control_id] += 1
    return ordered


# --- 4. MLLP over TLS --------------------------------------------------------------------

TLS_WARD = f"--scenario normal --pumps 1 --seed 4 --count 20 {TIMING}"


def test_mllps_delivers_with_the_clinic_ca_and_a_client_certificate_and_refuses_a_rogue_ca(
    tmp_path: Path, mosquitto: Mosquitto, pki: Pki
) -> None:
    tls = (pki.server_cert, pki.server_key, pki.ca_cert)
    with MllpReceiver(tmp_path / "mllps", tls=tls) as receiver:
        rogue = Hl7Settings(url=receiver.url, ca_file=pki.rogue_ca_cert, ack_timeout_s=5.0)
        probe = b"MSH|^~\\&|PUMPGW||||20260105||ORU^R01^ORU_R01|PROBE|P|2.6"
        answer = MllpTransport(rogue).send(Outgoing((), probe, "probe"))
        assert answer.verdict is Verdict.RETRY
        assert "CERTIFICATE_VERIFY_FAILED" in answer.reason
        assert receiver.messages() == []

        outbox = tmp_path / "outbox.db"
        hl7 = {
            "url": receiver.url,
            "ca_file": str(pki.ca_cert),
            "cert_file": str(pki.client_cert),
            "key_file": str(pki.client_key),
            "reading_interval_s": 0,
            "send_every_s": 0.2,
        }
        with ward_running(tmp_path, TLS_WARD) as ward:
            config = gateway_config(
                tmp_path, sim_port=ward.port, mqtt_port=mosquitto.port,
                prefix=f"tls-{uuid.uuid4().hex[:8]}", extra={"hl7": hl7},
            )  # fmt: skip
            gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
            try:
                assert ward.summary()["all_acked"] is True
                metrics = gateway.wait_metrics(
                    lambda m: m.value("pumpgw_sink_backlog_records", sink="hl7") == 0
                    and m.value("pumpgw_sink_connected", sink="hl7") == 1,
                    DELIVERED_S,
                )
            finally:
                gateway.stop()
        readings = stored_ids(outbox, "reading")
        assert len(readings) == 20
        assert set(receiver.accepted_ids()) == readings
        assert metrics.value("pumpgw_sink_messages_total", sink="hl7") >= 20
