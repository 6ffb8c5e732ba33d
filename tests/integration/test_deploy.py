"""The compose stack's services run outside Docker, from the very files compose mounts.

No Docker engine runs here, so each service's own command and configuration run as local
processes: Mosquitto from deploy/mosquitto/ (paths rewritten to a temporary directory,
its password file made by make-passwd.sh from the example users), the gateway from
config/pumpgw.compose.toml with host names and paths overridden by PUMPGW_* variables,
the simulator with the compose command, an ingest worker from deploy/ingest/, and the
systemd units through `systemd-analyze`.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import re
import shlex
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.ingest import IngestWorker, load_ingest_settings
from schemas.models import Reading
from tests.e2e import Collector, GatewayProcess, wait_until
from tests.servers import (
    MOSQUITTO_RUNNING,
    ServerProcess,
    VictoriaMetrics,
    find_binary,
    free_port,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_CONFIG = ROOT / "config" / "pumpgw.compose.toml"
WAIT_S = 30.0
STOP_S = 15.0
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def example_env(relative: str) -> dict[str, str]:
    """KEY=value lines of a deploy/*.env.example file."""
    values = {}
    for line in (DEPLOY / relative).read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


USERS = example_env("mosquitto/users.env.example")
PASSWORDS = {
    USERS["MQTT_GATEWAY_USER"]: USERS["MQTT_GATEWAY_PASSWORD"],
    "ingest-1": USERS["MQTT_INGEST_PASSWORD"],
    "ingest-2": USERS["MQTT_INGEST_PASSWORD"],
    "dashboard": USERS["MQTT_DASHBOARD_PASSWORD"],
    "technician": USERS["MQTT_TECHNICIAN_PASSWORD"],
}
"""The users make-passwd.sh makes from the example, and their passwords."""


# --- Mosquitto from deploy/mosquitto --------------------------------------------------------


class ComposeMosquitto(ServerProcess):
    """Mosquitto from deploy/mosquitto/mosquitto.conf, with compose's mounts as local paths."""

    name = "mosquitto (deploy/mosquitto)"
    package = "mosquitto"
    binary = "mosquitto"

    def __init__(self, workdir: Path, users: dict[str, str] | None = None) -> None:
        """users: users.env values to use instead of the example's (e.g. another station)."""
        super().__init__(workdir)
        self.users = {**USERS, **(users or {})}
        self.port = self.ws_port = 0
        self.config_file = workdir / "mosquitto.conf"
        self.broker_log = workdir / "mosquitto.log"
        self.paths = self._local_paths()
        self._make_passwords()

    def _local_paths(self) -> dict[str, Path]:
        """Container path -> local path for every volume of the compose service."""
        paths = {}
        for entry in compose()["services"]["mosquitto"]["volumes"]:
            source, target = entry.split(":")[:2]
            local = ROOT / source if source.startswith(".") else self.workdir / source
            if not source.startswith("."):
                local.mkdir(parents=True, exist_ok=True)
            paths[target] = local
        return paths

    def _make_passwords(self) -> None:
        """Run the mosquitto-init service's command with the example users."""
        entrypoint = compose()["services"]["mosquitto-init"]["entrypoint"]
        password_file = self._local(entrypoint[-1])
        password_file.parent.mkdir(parents=True, exist_ok=True)
        script = DEPLOY / "mosquitto" / "make-passwd.sh"
        env = {**os.environ, **self.users}
        subprocess.run(["sh", str(script), str(password_file)], env=env, check=True,
                       capture_output=True)  # fmt: skip

    def _local(self, container_path: str) -> Path:
        for target in sorted(self.paths, key=len, reverse=True):
            if container_path.startswith(target):
                return Path(str(self.paths[target]) + container_path[len(target) :])
        raise AssertionError(f"{container_path} is in no volume of the mosquitto service")

    def _choose_ports(self) -> None:
        self.port, self.ws_port = free_port(), free_port()

    def _write_config(self) -> None:
        lines = []
        for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("password_file", "acl_file", "persistence_location",
                       "plugin_opt_config_file"):  # fmt: skip
                line = f"{key} {self._local(value.strip())}"
            elif key == "plugin":
                line = f"{key} {local_plugin(Path(value.strip()).name)}"
            elif line == "listener 1883":
                line = f"listener {self.port} 127.0.0.1"
            elif line == "listener 9001":
                line = f"listener {self.ws_port} 127.0.0.1"
            elif line == "log_dest stdout":
                line = f"log_dest file {self.broker_log}"
            lines.append(line)
        lines.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
        self.config_file.write_text("\n".join(lines) + "\n")

    def _argv(self) -> list[str]:
        return ["-c", str(self.config_file)]

    def _is_ready(self) -> bool:
        return MOSQUITTO_RUNNING.search(self._log_since_launch(self.broker_log)) is not None

    def _log_paths(self) -> list[Path]:
        return [self.output_log, self.broker_log]


def local_plugin(name: str) -> Path:
    """Where this machine's Mosquitto package put a plugin the image has in /usr/lib."""
    for directory in (Path("/usr/lib"), *sorted(Path("/usr/lib").glob("*-linux-gnu*"))):
        if (directory / name).exists():
            return directory / name
    raise AssertionError(f"{name} not found under /usr/lib: install the Debian package mosquitto")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[ComposeMosquitto]:
    with ComposeMosquitto(tmp_path / "mosquitto") as server:
        yield server


# Raw paho on purpose: the ACL checks need the WebSocket transport and each SUBACK's reason
# code per call, neither of which the gateway's MqttClient seam exposes.
class Client:
    """A blocking MQTT 5 client for ACL checks: each call waits for the broker's answer."""

    def __init__(self, port: int, user: str | None, *, websockets: bool = False) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            transport="websockets" if websockets else "tcp",
            client_id=f"{user}-{uuid.uuid4().hex[:6]}",
        )
        if user is not None:
            self.client.username_pw_set(user, PASSWORDS.get(user, "x"))
        self.answers: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.messages: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self.client.on_connect = lambda c, u, f, rc, p: self.answers.put(("connack", rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.answers.put(("suback", rcs))
        self.client.on_publish = lambda c, u, mid, rc, p: self.answers.put(("puback", rc))
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.port = port

    def connect(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        code: ReasonCode = self._answer("connack")
        return code

    def subscribe(self, topic_filter: str) -> ReasonCode:
        self.client.subscribe(topic_filter, qos=1)
        codes = self._answer("suback")
        assert isinstance(codes, list)
        code: ReasonCode = codes[0]
        return code

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        self.client.publish(topic, payload, qos=1)
        code: ReasonCode = self._answer("puback")
        return code

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)

    def _answer(self, kind: str) -> Any:
        got, value = self.answers.get(timeout=WAIT_S)
        assert got == kind, (got, value)
        return value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connected(port: int, user: str, **options: Any) -> Client:
    client = Client(port, user, **options)
    code = client.connect()
    assert not code.is_failure, f"{user}: {code}"
    return client


def test_compose_broker_refuses_anonymous_and_wrong_passwords(broker: ComposeMosquitto) -> None:
    anonymous = Client(broker.port, None)
    assert anonymous.connect().value == NOT_AUTHORIZED
    anonymous.close()
    intruder = Client(broker.port, "dashboard")
    intruder.client.username_pw_set("dashboard", "not-the-password")
    assert intruder.connect().value in (BAD_CREDENTIALS, NOT_AUTHORIZED)
    intruder.close()


# Each role's rights and the attacks on them: tests/integration/test_broker_acl.py.


# --- the gateway and the simulator with the compose configuration ---------------------------


def pumpgw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)  # fmt: skip


def test_check_config_accepts_the_compose_config() -> None:
    done = pumpgw("check-config", str(COMPOSE_CONFIG))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert "mqtt://mosquitto:1883" in done.stdout


class Simulator:
    """The compose `simulator` command, listening on a free loopback port instead of 7001."""

    def __init__(self, workdir: Path) -> None:
        sim = compose()["services"]["simulator"]
        command = list(sim["command"])
        self.port = free_port()
        command[command.index("--listen") + 1] = f"127.0.0.1:{self.port}"
        assert sim["entrypoint"] == ["pumpsim"]
        self.log = workdir / "pumpsim.log"
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "simulator", *command],
                                         stdout=subprocess.PIPE, stderr=err)  # fmt: skip
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.strip() == f"socket://127.0.0.1:{self.port}".encode(), first

    def stop(self) -> dict[str, Any]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=STOP_S)
        summary: dict[str, Any] = json.loads(out.splitlines()[-1])
        return summary


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator(tmp_path)
    try:
        yield sim
    finally:
        if sim.proc.poll() is None:
            sim.stop()


def healthz(port: int) -> int | None:
    """HTTP status of /healthz, or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def healthcheck_command(port: int) -> list[str]:
    """The Dockerfile's HEALTHCHECK command, aimed at a local port."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("HEALTHCHECK"))
    command: list[str] = json.loads(line.split("CMD", 1)[1])
    command[2] = command[2].replace("127.0.0.1:9108", f"127.0.0.1:{port}")
    return [sys.executable if command[0] == "python" else command[0], *command[1:]]


def test_gateway_runs_the_compose_config_against_local_servers(
    tmp_path: Path,
    simulator: Simulator,
    victoria_metrics: VictoriaMetrics,
) -> None:
    station = f"ward-sim-{uuid.uuid4().hex[:6]}"
    # A station of its own in the shared database; the broker lets only its user publish there.
    user = f"demo/{station}"
    with ComposeMosquitto(tmp_path / "mosquitto", users={"MQTT_GATEWAY_USER": user}) as broker:
        run_compose_gateway(tmp_path, broker, simulator, victoria_metrics, station, user)


def run_compose_gateway(
    tmp_path: Path,
    broker: ComposeMosquitto,
    simulator: Simulator,
    victoria_metrics: VictoriaMetrics,
    station: str,
    user: str,
) -> None:
    health_port = free_port()
    env = {
        **example_env("pumpgw.env.example"),
        "PUMPGW_SOURCES": json.dumps(
            [{"url": f"socket://127.0.0.1:{simulator.port}", "name": "ward simulator"}]
        ),
        "PUMPGW_MQTT__URL": f"mqtt://127.0.0.1:{broker.port}",
        "PUMPGW_INFLUX__URL": victoria_metrics.url,
        "PUMPGW_STORE__PATH": str(tmp_path / "outbox.db"),
        "PUMPGW_HEALTH__LISTEN": f"127.0.0.1:{health_port}",
        "PUMPGW_GATEWAY__STATION": station,
        "PUMPGW_MQTT__USERNAME": user,
    }
    collector = Collector(broker.port, f"pumpgw/demo/{station}/#",
                          user=("dashboard", USERS["MQTT_DASHBOARD_PASSWORD"]))  # fmt: skip
    gateway = GatewayProcess(COMPOSE_CONFIG, tmp_path / "gateway.log", env=env)
    try:
        gateway.start()
        assert collector.wait_for(lambda: len(collector.by_kind["reading"]) >= 20, WAIT_S), (
            gateway.log()
        )
        assert collector.wait_for(lambda: bool(collector.payloads["gateway_status"]), WAIT_S)
        assert collector.payloads["gateway_status"][0]["state"] == "online"
        match = f'{{__name__="pump_reading_reservoir_ml",station="{station}"}}'
        assert victoria_metrics.export(match, min_points=20, timeout_s=WAIT_S)
        assert wait_until(lambda: healthz(health_port) == 200, WAIT_S), healthz(health_port)
        check = subprocess.run(healthcheck_command(health_port), capture_output=True, timeout=30,
                               check=False)  # fmt: skip
        assert check.returncode == 0, check.stderr
        assert gateway.stop() == 0
        assert subprocess.run(healthcheck_command(health_port), capture_output=True, timeout=30,
                              check=False).returncode != 0  # fmt: skip
    finally:
        collector.close()
        if gateway.running:
            gateway.kill()
    log = gateway.log()
    assert "Traceback" not in log
    for secret in (env["PUMPGW_MQTT__PASSWORD"], env["PUMPGW_INFLUX__TOKEN"]):
        assert secret not in log
    summary = simulator.stop()
    assert len(summary["pumps"]) == 10


def test_compose_ingest_config_runs_with_the_ingest_user(
    tmp_path: Path,
    broker: ComposeMosquitto,
    victoria_metrics: VictoriaMetrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"ing{uuid.uuid4().hex[:6]}_"
    env = {
        **example_env("ingest.env.example"),
        "PUMPGW_MQTT__URL": f"mqtt://127.0.0.1:{broker.port}",
        "PUMPGW_INFLUX__URL": victoria_metrics.url,
        "PUMPGW_STORE__PATH": str(tmp_path / "ingest.db"),
        "PUMPGW_INGEST__CLIENT_ID": "ingest-test",
        "PUMPGW_INGEST__MEASUREMENT_PREFIX": prefix,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_ingest_settings(DEPLOY / "ingest" / "pumpgw-ingest.toml")
    worker = IngestWorker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="ingest worker")
    thread.start()
    gateway = connected(broker.port, USERS["MQTT_GATEWAY_USER"])
    try:
        assert wait_until(lambda: worker.subscription.subscribed, WAIT_S), worker.observe()
        now = datetime.now(UTC)
        reading = Reading(
            pump_id="P0001", boot_id="b1", seq=1, device_time=now, received_at=now,
            drug="ziconotide", pump_state="running", reservoir_ml=10.0,
            reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=2.0, basal_rate_ml_per_day=0.5,
            delivered_total_ml=1.0,
        )  # fmt: skip
        topic = "pumpgw/demo/ward-sim/pumps/P0001/telemetry"
        assert not gateway.publish(topic, reading.model_dump_json().encode()).is_failure
        match = f'{{__name__="{prefix}pump_reading_reservoir_ml"}}'
        series = victoria_metrics.export(match, min_points=1, timeout_s=WAIT_S)
        assert series[0]["metric"]["station"] == "ward-sim"
        assert worker.counts.acked == 1
    finally:
        gateway.close()
        stop.set()
        thread.join(STOP_S)
    assert not thread.is_alive()


# --- systemd --------------------------------------------------------------------------------


def local_unit(tmp_path: Path, name: str, instance: str = "") -> Path:
    """A copy of a unit whose ExecStart points at this checkout's pumpgw."""
    text = (DEPLOY / "systemd" / name).read_text()
    text = text.replace("/opt/pumpgw/bin/pumpgw", str(Path(sys.executable).parent / "pumpgw"))
    path = tmp_path / name.replace("@.", f"@{instance}.")
    path.write_text(text)
    return path


def test_systemd_units_verify_and_are_well_hardened(tmp_path: Path) -> None:
    analyze = find_binary("systemd-analyze", "systemd")
    units = [local_unit(tmp_path, "pumpgw.service"),
             local_unit(tmp_path, "pumpgw-ingest@.service", "1")]  # fmt: skip
    verify = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    for path in units:
        security = subprocess.run(
            [analyze, "security", "--offline=true", "--no-pager", str(path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
        assert level is not None, security.stdout[-2000:] + security.stderr
        assert float(level.group(1)) <= 2.5, security.stdout[-3000:]


def test_unit_command_line_runs_and_names_a_real_subcommand() -> None:
    line = next(x for x in (DEPLOY / "systemd" / "pumpgw.service").read_text().splitlines()
                if x.startswith("ExecStart="))  # fmt: skip
    argv = shlex.split(line.split("=", 1)[1])
    done = pumpgw(argv[1], "--help")
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout
