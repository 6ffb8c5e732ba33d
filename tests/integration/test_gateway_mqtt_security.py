"""End to end against a broker that says no: a wrong password, a denying ACL, a TLS CA mismatch.

Each refusal must be a clear error in the gateway's log, in /metrics and in /healthz, must
never lose a frame (the gateway keeps acknowledging the device from its outbox), and once
the operator fixes the cause every frame the simulator sent intact arrives.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import (
    GatewayProcess,
    Metrics,
    expected_ids,
    gateway_config,
    wait_until,
)
from tests.integration.test_gateway_e2e import (
    ARRIVE_S,
    METRICS_S,
    accounting_balances,
    assert_all_arrived,
    collecting,
    delivered_everything,
    explain,
    gateway_running,
    unique_prefix,
    ward_running,
)
from tests.servers import MosquittoFactory, MosquittoTls, Pki

pytestmark = pytest.mark.integration

WARD = "--pumps 3 --count 100 --speed max --wait-for-ack"
"""About 310 frames."""
GW_USER, GW_PASSWORD = "gw", "gw-right-Pa55"
READER = ("reader", "reader-pass")
HELD_STEADY_S = 3.0
"""With the denied kinds held back, the connection stays up at least this long (Mosquitto
drops it after every denial, so without the hold it would reconnect every second)."""
WRONG_PASSWORD = "Wr0ng-s3cret-Pa55"


def wait_not_ready(
    gateway: GatewayProcess, fragment: str, timeout_s: float = METRICS_S
) -> dict[str, Any]:
    """Poll /healthz until it is 503 with a reason containing `fragment`; return the body."""
    last: tuple[int, dict[str, Any]] | None = None

    def check() -> bool:
        nonlocal last
        last = gateway.health()
        return last is not None and last[0] == 503 and fragment in " | ".join(last[1]["reasons"])

    assert wait_until(check, timeout_s), f"/healthz never named {fragment!r}: {last}" + explain(
        gateway
    )
    assert last is not None
    return last[1]


def settles(gateway: GatewayProcess, steady_s: float, timeout_s: float) -> bool:
    """Whether the MQTT connection, within `timeout_s`, stays up for `steady_s` in a row."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stays_connected(gateway, steady_s):
            return True
    return False


def stays_connected(gateway: GatewayProcess, duration_s: float) -> bool:
    """Whether the MQTT sink stays connected, without reconnecting, for `duration_s`."""
    first = metrics_now(gateway)
    reconnects = first.value("pumpgw_sink_reconnects_total", sink="mqtt")

    def dropped() -> bool:
        now = metrics_now(gateway)
        return (
            now.value("pumpgw_sink_connected", sink="mqtt") != 1
            or now.value("pumpgw_sink_reconnects_total", sink="mqtt") != reconnects
        )

    return not wait_until(dropped, duration_s, poll_s=0.2)


def metrics_now(gateway: GatewayProcess) -> Metrics:
    metrics = gateway.metrics()
    assert metrics is not None, "no /metrics" + explain(gateway)
    return metrics


def metrics_text(gateway: GatewayProcess) -> str:
    return repr(metrics_now(gateway).samples)


# --- a wrong password ----------------------------------------------------------------------


def test_wrong_password_is_a_clear_error_and_every_frame_arrives_once_the_password_is_fixed(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory(users={GW_USER: GW_PASSWORD, READER[0]: READER[1]})
    prefix = unique_prefix()
    log_path = tmp_path / "gateway.log"
    with (
        collecting(broker.port, prefix, user=READER) as collector,
        ward_running(tmp_path, *WARD.split()) as ward,
    ):
        config = gateway_config(
            tmp_path,
            sim_port=ward.port,
            mqtt_port=broker.port,
            prefix=prefix,
            extra={"mqtt": {"username": GW_USER}},
        )
        with gateway_running(config, log_path, PUMPGW_MQTT__PASSWORD=WRONG_PASSWORD) as gateway:
            body = wait_not_ready(gateway, "refused the connection")
            reason = " | ".join(body["reasons"])
            # Mosquitto 2 answers a bad password over MQTT 5 with 0x87, not 0x86.
            assert "(0x86)" in reason or "Not authorized (0x87)" in reason, reason
            assert "check mqtt.username" in reason
            refused = metrics_now(gateway)
            assert refused.value("pumpgw_sink_refused_total", sink="mqtt") >= 1
            assert refused.value("pumpgw_sink_connected", sink="mqtt") == 0
            summary = ward.summary()  # the outbox took every frame: the device is acknowledged
            assert summary["all_acked"] is True
            assert collector.count("reading") == 0
            leaked = [WRONG_PASSWORD in text for text in (str(body), metrics_text(gateway))]
        assert "refused the connection" in gateway.log()
        assert WRONG_PASSWORD not in gateway.log()
        assert leaked == [False, False]
        with gateway_running(config, log_path, PUMPGW_MQTT__PASSWORD=GW_PASSWORD) as gateway:
            assert_all_arrived(collector, summary, gateway, ward, broker)
            metrics = gateway.wait_metrics(delivered_everything, METRICS_S)
        assert metrics.value("pumpgw_sink_refused_total", sink="mqtt") == 0
        assert GW_PASSWORD not in gateway.log()


# --- an ACL that denies the telemetry topics (MQTT 5: PUBACK 0x87) ---------------------------


def acl(prefix: str, *, telemetry: bool) -> str:
    """The reader reads everything; the gateway may publish all but telemetry and events."""
    root = f"{prefix}/test/bed-1"
    lines = ["user reader", f"topic read {prefix}/#", f"user {GW_USER}"]
    if telemetry:
        return "\n".join([*lines, f"topic readwrite {prefix}/#", ""])
    allowed = ["gateway/#", "ack", "deadletter", "pumps/+/status", "pumps/+/info"]
    allowed += ["pumps/+/alerts", "pumps/+/alerts/active"]
    return "\n".join([*lines, *(f"topic readwrite {root}/{leaf}" for leaf in allowed), ""])


def test_acl_denying_telemetry_is_a_clear_error_and_every_frame_arrives_once_it_allows(
    tmp_path: Path, mosquitto_factory: MosquittoFactory
) -> None:
    prefix = unique_prefix()
    broker = mosquitto_factory(
        users={GW_USER: GW_PASSWORD, READER[0]: READER[1]}, acl=acl(prefix, telemetry=False)
    )
    with (
        collecting(broker.port, prefix, user=READER, persistent=True) as collector,
        ward_running(tmp_path, *WARD.split()) as ward,
    ):
        config = gateway_config(
            tmp_path,
            sim_port=ward.port,
            mqtt_port=broker.port,
            prefix=prefix,
            extra={"mqtt": {"username": GW_USER, "protocol": "5"}},
        )
        with gateway_running(
            config, tmp_path / "gateway.log", PUMPGW_MQTT__PASSWORD=GW_PASSWORD
        ) as gateway:
            # Mosquitto 2.0 also drops the connection after a denial; the gateway holds the
            # denied kinds back, so it stays connected while it waits for the ACL to change.
            body = wait_not_ready(gateway, "mqtt: broker denied publishing to", ARRIVE_S)
            reason = " | ".join(body["reasons"])
            assert "Not authorized (0x87)" in reason
            assert f"{prefix}/test/bed-1/pumps/" in reason
            assert metrics_now(gateway).value("pumpgw_sink_denied_total", sink="mqtt") >= 1
            # One kick per denied kind (telemetry, events), then the connection holds.
            assert settles(gateway, HELD_STEADY_S, ARRIVE_S), "denials keep dropping the connection"
            summary = ward.summary()
            assert summary["all_acked"] is True
            assert collector.count("reading", "event") == 0, "the ACL let telemetry through"
            assert collector.count("info") > 0, "allowed topics must keep flowing"
            assert "broker denied publishing to" in gateway.log()
            assert broker.acl_file is not None
            broker.acl_file.write_text(acl(prefix, telemetry=True))
            broker.restart()
            assert_all_arrived(collector, summary, gateway, ward, broker)
            metrics = gateway.wait_metrics(delivered_everything, ARRIVE_S)
            assert wait_until(
                lambda: (
                    not any(
                        "denied" in r
                        for r in (gateway.health() or (0, {"reasons": []}))[1]["reasons"]
                    )
                ),
                METRICS_S,
            ), f"/healthz still reports the denial: {gateway.health()}"
    assert delivered_everything(metrics)
    assert accounting_balances(metrics)


# --- a broker certificate from a CA the gateway does not trust ------------------------------


# paho 2.2 does not close the socket when the TLS handshake fails (client.py _ssl_wrap_socket)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_untrusted_broker_certificate_is_a_clear_error_and_frames_arrive_with_the_right_ca(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    prefix = unique_prefix()
    log_path = tmp_path / "gateway.log"
    with (
        collecting(broker.port, prefix) as collector,
        ward_running(tmp_path, *WARD.split()) as ward,
    ):

        def tls_config(ca_file: Path) -> Path:
            return gateway_config(
                tmp_path,
                sim_port=ward.port,
                mqtt_port=broker.port,
                prefix=prefix,
                extra={
                    "mqtt": {
                        "url": f"mqtts://localhost:{broker.tls_port}",
                        "tls": {"ca_file": str(ca_file)},
                    }
                },
            )

        config = tls_config(pki.rogue_ca_cert)
        with gateway_running(config, log_path) as gateway:
            body = wait_not_ready(gateway, "certificate verify failed")
            reason = " | ".join(body["reasons"])
            assert "mqtt not connected: cannot reach the broker" in reason, reason
            assert "check mqtt.tls.ca_file" in reason, reason
            bad = metrics_now(gateway)
            assert bad.value("pumpgw_sink_connected", sink="mqtt") == 0
            assert bad.value("pumpgw_sink_unreachable_total", sink="mqtt") >= 1
            summary = ward.summary()
            assert summary["all_acked"] is True
        assert "certificate verify failed" in gateway.log()
        config = tls_config(pki.ca_cert)  # the operator fixes the CA in the config
        with gateway_running(config, log_path) as gateway:
            assert_all_arrived(collector, summary, gateway, ward, broker)
            metrics = gateway.wait_metrics(delivered_everything, METRICS_S)
    assert metrics.value("pumpgw_sink_connected", sink="mqtt") == 1
    assert metrics.value("pumpgw_sink_unreachable_total", sink="mqtt") == 0
    assert metrics.value("pumpgw_sink_delivered_total", sink="mqtt") >= len(expected_ids(summary))
