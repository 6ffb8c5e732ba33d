"""Security: TLS, client certificates, secrets, pseudonymous ids, the broker ACL, who may ack.

Each test runs the real gateway process against a private Mosquitto (with TLS, passwords
or the ACL of docs/examples/mosquitto.acl) and looks at everything the gateway wrote.
docs/security.md explains the setup these tests prove.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.adapters.mqtt_client import MqttSettings
from gateway.pipeline import pseudonym
from tests.e2e import (
    GatewayProcess,
    collecting,
    expected_ids,
    explain,
    gateway_config,
    gateway_running,
    sent_count,
    stop_quietly,
    unique,
    wait_until,
    ward_running,
)
from tests.integration.test_faults import (
    METRICS_S,
    FaultyDatabase,
    acknowledged,
    active_alert_ids,
    check_three_counts,
    figures,
    mqtt_connected,
    mqtt_publish,
    outbox_alerts,
    publish_ack,
    station_config,
    wait_delivered,
)
from tests.servers import Mosquitto, MosquittoFactory, MosquittoTls, Pki, VictoriaMetrics

pytestmark = pytest.mark.integration
__all__ = ["figures"]  # the session fixture, shared with test_faults

ROOT = Path(__file__).resolve().parents[2]
ACL_EXAMPLE = ROOT / "docs" / "examples" / "mosquitto.acl"
SKIP_VERIFY_WARNING = "mqtt.tls.insecure_skip_verify is on"
SHORT_WARD = "--pumps 2 --count 40 --speed max --wait-for-ack"
PSEUDONYM_WARD = "--pumps 3 --count 80 --scenario noisy-line --speed max --wait-for-ack"
"""Damaged frames too: a quarantined frame must not carry the real id either."""
DENIED = 0x80
"""PUBACK/SUBACK reason codes from here up are failures (Mosquitto 2 denies with 0x87)."""


class VerboseGateway(GatewayProcess):
    """`pumpgw -v run`: debug logging, the most a log can reveal."""

    def start(self) -> VerboseGateway:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "-v", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
            )
        return self


@contextmanager
def verbose_gateway(config: Path, log_path: Path, env: dict[str, str]) -> Iterator[GatewayProcess]:
    gateway = VerboseGateway(config, log_path, env=env).start()
    try:
        yield gateway
    finally:
        stop_quietly(gateway)


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def not_ready_because(gateway: GatewayProcess, fragment: str) -> dict[str, Any]:
    last: tuple[int, dict[str, Any]] | None = None

    def check() -> bool:
        nonlocal last
        last = gateway.health()
        return last is not None and last[0] == 503 and fragment in " | ".join(last[1]["reasons"])

    assert wait_until(check, METRICS_S), f"/healthz never said {fragment!r}: {last}" + explain(
        gateway
    )
    assert last is not None
    return last[1]


def tls_extra(broker: Mosquitto, **tls: Any) -> dict[str, dict[str, Any]]:
    return {"mqtt": {"url": f"mqtts://localhost:{broker.tls_port}", "tls": tls}}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


# --- TLS: verification on by default, off only when asked, and loudly -----------------------


def test_tls_verification_is_on_by_default_so_an_untrusted_broker_gets_nothing(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    assert MqttSettings(url="mqtts://broker.example:8883").tls.insecure_skip_verify is False
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    prefix, site = unique("sec"), unique("site")
    with (
        collecting(broker.port, prefix) as collector,
        ward_running(tmp_path, SHORT_WARD) as ward,
    ):
        # No [mqtt.tls] at all: the system CAs, which do not know the test CA.
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=broker.port,
            prefix=prefix,
            site=site,
            influx_url=None,
            extra=tls_extra(broker),
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            body = not_ready_because(gateway, "certificate verify failed")
            summary = ward.summary()  # stored in the outbox, never sent over an unverified link
            metrics = gateway.metrics()
    assert summary["all_acked"] is True
    assert metrics is not None
    assert metrics.value("pumpgw_sink_connected", sink="mqtt") == 0
    assert metrics.value("pumpgw_sink_delivered_total", sink="mqtt") == 0
    assert collector.count("reading", "gateway_status") == 0
    assert SKIP_VERIFY_WARNING not in gateway.log()
    assert any("check mqtt.tls.ca_file" in r for r in body["reasons"]), body
    checked = cli("check-config", str(config))
    assert "(TLS verified with the system CAs)" in checked.stdout, checked.stdout


def test_skipping_verification_needs_the_explicit_setting_and_warns_at_every_start(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    prefix, site = unique("sec"), unique("site")
    log_path = tmp_path / "gateway.log"
    with (
        collecting(broker.port, prefix) as collector,
        ward_running(tmp_path, SHORT_WARD) as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=broker.port,
            prefix=prefix,
            site=site,
            influx_url=None,
            extra=tls_extra(broker, insecure_skip_verify=True),
        )
        for start in (1, 2):
            with gateway_running(config, log_path) as gateway:
                assert wait_until(lambda: mqtt_connected(gateway), METRICS_S), explain(gateway)
                if start == 1:
                    summary = ward.summary()
                    missing = collector.wait_device_ids(expected_ids(summary), METRICS_S)
                    assert not missing, explain(gateway, ward)
            assert log_path.read_text().count(SKIP_VERIFY_WARNING) == start
    warning = next(
        line for line in log_path.read_text().splitlines() if SKIP_VERIFY_WARNING in line
    )
    assert " WARNING " in warning
    assert "NOT verified" in warning
    checked = cli("check-config", str(config))
    assert "certificate NOT verified: mqtt.tls.insecure_skip_verify is on" in checked.stdout


def test_client_certificate_authentication_admits_only_a_certificate_the_broker_trusts(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki, figures: dict[str, Any]
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki, require_certificate=True))
    prefix, site = unique("sec"), unique("site")
    log_path = tmp_path / "gateway.log"
    with (
        collecting(broker.port, prefix) as collector,
        ward_running(tmp_path, SHORT_WARD) as ward,
    ):

        def config_with(**tls: Any) -> Path:
            return station_config(
                tmp_path,
                ward=ward,
                mqtt_port=broker.port,
                prefix=prefix,
                site=site,
                influx_url=None,
                extra=tls_extra(broker, ca_file=str(pki.ca_cert), **tls),
            )

        refused: dict[str, list[str]] = {}
        for name, tls in {
            "no client certificate": {},
            "a certificate from another CA": {
                "cert_file": str(pki.rogue_client_cert),
                "key_file": str(pki.rogue_client_key),
            },
        }.items():
            with gateway_running(config_with(**tls), log_path) as gateway:
                refused[name] = not_ready_because(gateway, "mqtt")["reasons"]
                assert not mqtt_connected(gateway)
        assert collector.count("gateway_status") == 0, "a gateway without a good cert got in"
        good = config_with(cert_file=str(pki.client_cert), key_file=str(pki.client_key))
        with gateway_running(good, log_path) as gateway:
            summary = ward.summary()
            missing = collector.wait_device_ids(expected_ids(summary), METRICS_S)
            assert not missing, explain(gateway, ward)
            assert mqtt_connected(gateway)
    assert all(any("mqtt" in r for r in reasons) for reasons in refused.values()), refused
    broker_log = broker.broker_log.read_text(errors="replace")
    assert "peer did not return a certificate" in broker_log
    assert "certificate verify failed" in broker_log
    figures["client_certificates"] = {"refused": refused, "accepted": "the test CA's client cert"}


def test_a_refused_client_certificate_is_named_in_healthz(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki, require_certificate=True))
    config = gateway_config(
        tmp_path, sim_port=9, mqtt_port=broker.port, prefix=unique("sec"),
        extra=tls_extra(broker, ca_file=str(pki.ca_cert)),
    )  # fmt: skip
    with gateway_running(config, tmp_path / "gateway.log") as gateway:
        last: list[str] = []

        def named() -> bool:
            health = gateway.health()
            last[:] = [] if health is None else health[1]["reasons"]
            return any("mqtt" in r and "certificate" in r for r in last)

        assert wait_until(named, 8.0), last


# --- secrets: from the environment or owner-only files, never shown ----------------------------


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("mqtt", "password_file"),
        ("influx", "token_file"),
        ("gateway", "pseudonymize_key_file"),
    ],
)
def test_a_secret_file_readable_by_others_is_refused_naming_the_key_and_the_fix(
    tmp_path: Path, section: str, key: str
) -> None:
    secret = private_file(tmp_path / "secret", secrets.token_hex(16), mode=0o644)
    sections: dict[str, Any] = {section: {key: str(secret)}}
    if section == "mqtt":
        sections["mqtt"]["username"] = "gw"
    if section == "influx":
        sections["influx"] |= {"url": "http://127.0.0.1:9", "org": "o"}
    config = gateway_config(tmp_path, sim_port=9, mqtt_port=9, prefix=unique("sec"), extra=sections)
    checked = cli("check-config", str(config))
    ran = cli("run", "--config", str(config))
    for done in (checked, ran):
        assert done.returncode == 2, done.stderr
        assert f"{section}.{key}" in done.stderr
        assert f"readable by group or others; run: chmod 600 {secret}" in done.stderr
        assert secret.read_text() not in done.stdout + done.stderr


def test_a_short_pseudonymisation_key_is_refused(tmp_path: Path) -> None:
    config = gateway_config(
        tmp_path,
        sim_port=9,
        mqtt_port=9,
        prefix=unique("sec"),
        extra={"gateway": {"pseudonymize_key_file": str(private_file(tmp_path / "k", "short"))}},
    )
    done = cli("run", "--config", str(config))
    assert done.returncode == 2
    assert "gateway.pseudonymize_key_file: the key in" in done.stderr
    assert "too short; use at least 16 random characters" in done.stderr
    env = {"PUMPGW_GATEWAY__PSEUDONYMIZE_KEY": "tiny"}
    done = cli(
        "check-config", str(gateway_config(tmp_path, sim_port=9, mqtt_port=9, prefix="p")), env=env
    )
    assert done.returncode == 2
    assert "gateway.pseudonymize_key: too short" in done.stderr
    assert "tiny" not in done.stderr.replace("gateway.pseudonymize_key: too short", "")


def everything_written(
    gateway: GatewayProcess, collector_payloads: list[bytes], outbox: Path
) -> dict[str, bytes]:
    """Every place the gateway writes to, as bytes, while it runs."""
    assert gateway.proc is not None
    places: dict[str, bytes] = {"log": gateway.log_path.read_bytes()}
    for path in ("/metrics", "/healthz"):
        try:
            with urllib.request.urlopen(gateway.health_url + path, timeout=5) as answer:  # noqa: S310
                places[path] = answer.read()
        except urllib.error.HTTPError as exc:  # /healthz answers 503 when not ready
            places[path] = exc.read()
    places["mqtt payloads"] = b"\n".join(collector_payloads)
    for suffix in ("", "-wal"):
        db = Path(f"{outbox}{suffix}")
        if db.exists():
            places[f"outbox{suffix}"] = db.read_bytes()
    places["/proc/cmdline"] = Path(f"/proc/{gateway.proc.pid}/cmdline").read_bytes()
    return places


def test_secrets_never_appear_in_logs_metrics_status_payloads_the_outbox_or_arguments(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    victoria_metrics: VictoriaMetrics,
    figures: dict[str, Any],
) -> None:
    password = f"pw-{secrets.token_hex(12)}"
    token = f"tok-{secrets.token_hex(16)}"
    user = "gw-sec"
    broker = mosquitto_factory(users={user: password, "reader": "reader-pass"})
    prefix, site = unique("sec"), unique("site")
    db = FaultyDatabase(victoria_metrics.url)
    seen_auth: list[str] = []
    original = db._answer

    def spy(path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        seen_auth.append(headers.get("Authorization", ""))
        return original(path, headers, body)

    db._answer = spy  # type: ignore[method-assign]
    try:
        with (
            collecting(broker.port, prefix, user=("reader", "reader-pass")) as collector,
            ward_running(tmp_path, "--pumps 2 --count 60 --speed max --wait-for-ack") as ward,
        ):
            config = station_config(
                tmp_path,
                ward=ward,
                mqtt_port=broker.port,
                prefix=prefix,
                site=site,
                influx_url=db.url,
                extra={
                    "mqtt": {
                        "username": user,
                        "password_file": str(private_file(tmp_path / "mqtt.pw", password)),
                    }
                },
            )
            gateway = VerboseGateway(
                config, tmp_path / "gateway.log", env={"PUMPGW_INFLUX__TOKEN": token}
            ).start()
            try:
                db.fail(401, for_s=4.0)  # an error path: InfluxDB refuses the token for a while
                summary = ward.summary()
                counts = check_three_counts(
                    [summary], collector, victoria_metrics, site, gateway, ward
                )
                payloads = [
                    json.dumps(p).encode() for kind in list(collector.payloads)
                    for p in collector.payloads[kind]
                ] + list(collector.retained.values())  # fmt: skip
                places = everything_written(gateway, payloads, tmp_path / "outbox.db")
            finally:
                gateway.stop()
        checked = cli("check-config", str(config), env={"PUMPGW_INFLUX__TOKEN": token})
        places["check-config"] = (checked.stdout + checked.stderr).encode()
    finally:
        db.close()
    assert f"Token {token}" in seen_auth, "the token was not used: the test proves nothing"
    assert db.statuses[401] >= 1
    forms = {
        "password": [password.encode(), base64.b64encode(password.encode())],
        "token": [token.encode(), base64.b64encode(token.encode())],
    }
    leaks = [
        f"{name} in {place}"
        for place, data in places.items()
        for name, shapes in forms.items()
        if any(shape in data for shape in shapes)
    ]
    assert not leaks, leaks
    assert len(places["log"]) > 1000, "the debug log is suspiciously short"
    figures["secrets_not_leaked"] = counts | {"places_checked": sorted(places)}


# --- pseudonymous pump ids ------------------------------------------------------------------


def test_pseudonymised_pump_ids_and_serials_never_leave_the_station(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    figures: dict[str, Any],
) -> None:
    key = secrets.token_hex(32)
    prefix, site = unique("sec"), unique("site")
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, PSEUDONYM_WARD) as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=victoria_metrics.url,
            extra={"gateway": {"pseudonymize_key_file": str(private_file(tmp_path / "key", key))}},
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            real = [p["pump_id"] for p in summary["pumps"]]
            hashed = {pseudonym(key.encode(), p): p for p in real}
            readings = sent_count(summary, "reading")
            assert collector.wait_for(lambda: collector.count("reading") >= readings, 30.0)
            assert collector.wait_for(lambda: collector.count("quarantine") >= 1, METRICS_S)
            wait_delivered(gateway)
    series = victoria_metrics.export(f'{{site="{site}"}}', min_points=readings)
    with collector._lock:
        published = json.dumps(collector.payloads) + json.dumps(
            sorted(collector.topics.items(), key=str), default=sorted
        )
    stored = json.dumps(series)
    identities = real + [f"SIM-{p}" for p in real]
    identities += [i.encode().hex() for i in identities]  # as raw bytes in a quarantine record
    for text, where in ((published, "MQTT"), (stored, "the time series")):
        found = [i for i in identities if i in text]
        assert not found, f"{found} in {where}"
    pumps_seen = {p["pump_id"] for p in collector.payloads["reading"]}
    assert pumps_seen == set(hashed), "readings do not carry exactly one pseudonym per pump"
    serials = {p["serial"] for p in collector.payloads["info"]}
    assert serials == {pseudonym(key.encode(), f"SIM-{p}") for p in real}
    assert {s["metric"]["pump"] for s in series if "pump" in s["metric"]} <= set(hashed)
    figures["pseudonymous_ids"] = {
        "pumps": len(real),
        "readings_received_mqtt": collector.count("reading"),
        "quarantined_frames_checked": collector.count("quarantine"),
        "series_checked": len(series),
        "real_ids_found": 0,
    }


# --- the broker ACL of docs/examples/mosquitto.acl, and who may acknowledge -------------------

ACL_USERS = {
    "pumpgw-north-bed-12": "gw12-Pa55",
    "pumpgw-north-bed-7": "gw7-Pa55",
    "dashboard": "dash-Pa55",
    "nurse.jones": "jones-Pa55",
    "nurse.smith": "smith-Pa55",
}
STATION = "pumpgw/north/bed-12"
OTHER_STATION = "pumpgw/north/bed-7"
JONES_ACKS = f"{STATION}/ack/nurse.jones"


def MALFORMED_ACKS(alert_id: str) -> list[bytes]:  # noqa: N802 - a table, like a constant
    """Acknowledgements the gateway must refuse: 4 rejected with a reason, 1 dropped unread."""
    return [
        b"not json at all",
        json.dumps({"by": "nurse.jones"}).encode(),
        json.dumps({"alert_id": alert_id, "by": ""}).encode(),
        json.dumps({"alert_id": alert_id, "by": "nurse.jones", "clear_pump_alarm": True}).encode(),
        b"{" + b" " * 20_000 + b"}",
    ]


def ack_of(alert_id: str, by: str) -> bytes:
    return json.dumps({"alert_id": alert_id, "by": by}).encode()


def as_user(name: str) -> tuple[str, str]:
    return name, ACL_USERS[name]


def test_the_documented_acl_lets_each_role_do_only_its_job_and_acks_are_checked_and_recorded(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, figures: dict[str, Any]
) -> None:
    broker = mosquitto_factory(users=ACL_USERS, acl=ACL_EXAMPLE.read_text())
    port = broker.port
    fake = json.dumps({"kind": "reading", "pump_id": "FAKE"}).encode()
    with (
        collecting(port, "pumpgw", user=as_user("dashboard")) as dashboard,
        collecting(port, f"{STATION}/ack/+", raw=True, user=as_user("pumpgw-north-bed-7")) as snoop,
        ward_running(
            tmp_path, "--pumps 2 --count 200 --scenario low-reservoir --speed max --wait-for-ack"
        ) as ward,
    ):
        config = gateway_config(
            tmp_path,
            sim_port=ward.port,
            mqtt_port=port,
            prefix="pumpgw",
            extra={
                "gateway": {"site": "north", "station": "bed-12", "ack_allowed": ["nurse.jones"]},
                "mqtt": {"username": "pumpgw-north-bed-12"},
            },
        )
        env = {"PUMPGW_MQTT__PASSWORD": ACL_USERS["pumpgw-north-bed-12"]}
        # -v: the first refusal of a kind is a WARNING, repeats are logged at debug
        with verbose_gateway(config, tmp_path / "gateway.log", env) as gateway:
            counts = check_three_counts([ward.summary()], dashboard, None, "north", gateway, ward)
            latching = {t["alert_id"] for t in dashboard.payloads["alert"] if t["latching"]} & set(
                active_alert_ids(dashboard)
            )
            assert latching, "the scenario raised no latching alert to acknowledge"
            alert_id = sorted(latching)[0]
            telemetry = f"{STATION}/pumps/P0001/telemetry"
            attempts = {
                "dashboard publishes telemetry": mqtt_publish(
                    port, telemetry, fake, user=as_user("dashboard")
                ),
                "dashboard acknowledges": publish_ack(
                    port, STATION, alert_id, by="dashboard", user=as_user("dashboard")
                ),
                "gateway acknowledges its own alert": publish_ack(
                    port, STATION, alert_id, by="x", user=as_user("pumpgw-north-bed-12")
                ),
                "gateway publishes into another station": mqtt_publish(
                    port,
                    f"{OTHER_STATION}/pumps/P0001/telemetry",
                    fake,
                    user=as_user("pumpgw-north-bed-12"),
                ),
                "another station's gateway publishes here": mqtt_publish(
                    port, telemetry, fake, user=as_user("pumpgw-north-bed-7")
                ),
                "an operator publishes on another operator's ack topic": mqtt_publish(
                    port, f"{STATION}/ack/nurse.jones", ack_of(alert_id, "nurse.jones"),
                    user=as_user("nurse.smith"),
                ),
                "an operator publishes on the old shared ack topic": mqtt_publish(
                    port, f"{STATION}/ack", ack_of(alert_id, "nurse.jones"),
                    user=as_user("nurse.jones"),
                ),
            }  # fmt: skip
            not_allowed = publish_ack(
                port, STATION, alert_id, by="nurse.smith", user=as_user("nurse.smith")
            )
            forged = publish_ack(  # on its own topic, in another operator's name
                port, STATION, alert_id, by="nurse.jones", user=as_user("nurse.smith")
            )
            malformed = [
                mqtt_publish(port, JONES_ACKS, payload, user=as_user("nurse.jones"))
                for payload in MALFORMED_ACKS(alert_id)
            ]
            rejected = gateway.wait_metrics(
                lambda m: (
                    m.value("pumpgw_operator_acks_total", result="rejected") >= 6
                    and m.value("pumpgw_sink_acks_dropped_total", sink="mqtt") >= 1
                ),
                METRICS_S,
            )
            receipts = dashboard.payloads["ack_refusal"]
            assert dashboard.wait_for(lambda: len(receipts) >= 6, METRICS_S)
            assert gateway.running, "a malformed acknowledgement stopped the gateway"
            assert not acknowledged(dashboard, alert_id), "a refused acknowledgement applied"
            allowed = publish_ack(
                port, STATION, alert_id, by="nurse.jones", user=as_user("nurse.jones")
            )
            assert dashboard.wait_for(lambda: bool(acknowledged(dashboard, alert_id)), METRICS_S)
            metrics = wait_delivered(gateway)
    # Mosquitto 2 grants the SUBSCRIBE and checks read rights per message: it delivers nothing.
    assert snoop.payloads == {}, "another station's gateway read this station's acks"
    acks_seen = {p.get("by") for p in dashboard.payloads["ack"]}
    assert {"nurse.jones", "nurse.smith"} <= acks_seen
    assert not acks_seen & {"dashboard", "x"}, "the broker let a denied acknowledgement through"
    denied = {name: code for name, code in attempts.items() if code < DENIED}
    assert not denied, f"the ACL allowed: {denied}"
    assert (not_allowed, forged, allowed) == (0, 0, 0), "operators may publish on their topic"
    assert malformed == [0] * len(malformed), "the ACL lets operators publish on the ack topic"
    assert rejected.value("pumpgw_operator_acks_total", result="rejected") == 6
    assert rejected.value("pumpgw_sink_acks_dropped_total", sink="mqtt") == 1
    log = gateway.log()
    for problem in ("alert_id: Field required", "by=''", "Extra inputs are not permitted"):
        assert problem in log, f"no clear error naming {problem!r}"
    assert metrics.value("pumpgw_operator_acks_total", result="accepted") == 1
    assert metrics.value("pumpgw_sink_denied_total", sink="mqtt") == 0
    assert "FAKE" not in json.dumps(dashboard.payloads), "a forged message reached the dashboard"
    assert "MQTT user 'nurse.smith' is not in gateway.ack_allowed" in gateway.log()
    refusals = {(r["username"], r["reason_kind"]) for r in dashboard.payloads["ack_refusal"]}
    assert refusals == {("nurse.smith", "not_allowed"), ("nurse.smith", "by_mismatch"),
                        ("nurse.jones", "invalid")}  # fmt: skip
    (receipt,) = acknowledged(dashboard, alert_id)
    assert (receipt["acknowledged_by"], receipt["inactivation"]) == (
        "nurse.jones",
        "alert-acknowledged",
    )
    stored = [a for a in outbox_alerts(tmp_path / "outbox.db") if a["phase"] == "acknowledged"]
    assert [(a["alert_id"], a["acknowledged_by"]) for a in stored] == [(alert_id, "nurse.jones")]
    figures["acl_and_ack_rights"] = counts | {
        "denied_by_broker": {name: hex(code) for name, code in attempts.items()},
        "rejected_by_allow_list": 1,
        "rejected_forged_by": 1,
        "malformed_rejected": 3,
        "oversized_dropped_unread": 1,
        "acknowledged": 1,
    }
