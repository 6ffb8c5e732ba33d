"""`pumpgw demo`: a simulated ward, the gateway, a broker and a live view on one machine.

The broker is a private Mosquitto on free loopback ports (MQTT, and MQTT over
WebSockets for the dashboard) with a temporary config; without the `mosquitto` package
the demo stops with a message naming it. The ward dashboard is served on
http://127.0.0.1:8090/ (or a free port when that one is taken). The simulator and the
broker run in their own process group, so Ctrl-C, SIGTERM and a closing terminal (SIGHUP)
reach the demo alone, which stops the gateway and then them. A demo
operator acknowledges each alert a few seconds after it starts, so the whole
lifecycle (start, acknowledged, end) is visible.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as mqtt

from gateway.adapters.mqtt_client import Connected, MqttClient, MqttSettings
from gateway.adapters.serial_port import SourceSettings
from gateway.config import GatewaySection, HealthSection, Settings, StoreSection
from gateway.dashboard.server import DashboardError, DashboardServer, page_config
from gateway.errors import PumpgwError
from gateway.health import HealthServer
from gateway.service import Gateway
from gateway.topics import ack_topic

log = logging.getLogger(__name__)

DEMO_OPERATOR = "demo-operator"
ACK_AFTER_S = 6.0
VIEW_REFRESH_PER_S = 4
READING_INTERVAL_S = 1800
"""Simulated seconds between a pump's readings in the demo."""
EPISODE_READINGS = 200
"""Readings per pump in one demo episode: 100 simulated hours, in which every scenario plays."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)
    return False


MOSQUITTO_PACKAGE = "mosquitto"
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
"""Where Debian and a source build put the broker: /usr/sbin is often off a user's PATH."""
CHILD_STOP_S = 10.0
"""How long a child process has to exit after SIGTERM before it is killed."""


class MosquittoMissingError(PumpgwError):
    """The demo needs the Mosquitto broker and it is not installed."""


def mosquitto_binary() -> str:
    """The mosquitto executable, or an error that names the package to install."""
    found = shutil.which("mosquitto") or next(
        (path for path in MOSQUITTO_PATHS if Path(path).is_file()), None
    )
    if found is None:
        raise MosquittoMissingError(
            f"the demo needs the Mosquitto MQTT broker, which is not installed: install the "
            f"Debian package '{MOSQUITTO_PACKAGE}' (sudo apt-get install {MOSQUITTO_PACKAGE}), "
            "or start the demo with scripts/demo, which installs it"
        )
    return found


def mosquitto_config(port: int, ws_port: int) -> str:
    """A private, anonymous broker on loopback: MQTT on `port`, MQTT over WebSockets on
    `ws_port` (for the dashboard), nothing kept on disk."""
    return (
        "persistence false\n"
        "allow_anonymous true\n"
        f"listener {port} 127.0.0.1\n"
        f"listener {ws_port} 127.0.0.1\n"
        "protocol websockets\n"
    )


DASHBOARD_PORT = 8090


@dataclass(frozen=True)
class DemoBroker:
    port: int
    description: str
    ws_port: int
    """MQTT over WebSockets, for the dashboard."""


def start_child(argv: list[str], logfile: Path) -> subprocess.Popen[bytes]:
    """A child in its own process group: Ctrl-C and a closing terminal reach the demo only,
    which then stops its children in order (the gateway before its broker and its line)."""
    with open(logfile, "ab") as log_out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_out, stderr=log_out, process_group=0
        )


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within CHILD_STOP_S."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(CHILD_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def demo_broker(workdir: Path) -> Iterator[DemoBroker]:
    """A private Mosquitto on free loopback ports with a temporary config in `workdir`."""
    binary = mosquitto_binary()
    port, ws_port = free_port(), free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, ws_port))
    proc = start_child([binary, "-c", str(conf)], workdir / "mosquitto.log")
    try:
        if not (_wait_port(port, 10) and _wait_port(ws_port, 10)):
            raise RuntimeError(f"mosquitto did not start; see {workdir / 'mosquitto.log'}")
        yield DemoBroker(port, f"Mosquitto ({binary}) on 127.0.0.1:{port}", ws_port)
    finally:
        stop_child(proc)


class SimulatedWard:
    """Runs `pumpsim` episodes back to back on one TCP port, so the scenarios replay forever.

    Each episode is a bounded run (EPISODE_READINGS readings per pump); the next one starts
    with new boot ids, as if every pump had been refilled and restarted, so latched alerts
    resolve and end.
    """

    def __init__(self, workdir: Path, pumps: int, speed: float, seed: int) -> None:
        self.port = free_port()
        self.episodes = 0
        self._workdir = workdir
        self._argv = [
            sys.executable,
            "-m",
            "simulator",
            "--transport",
            "tcp",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--pumps",
            str(pumps),
            "--scenario",
            "ward",
            "--speed",
            str(speed),
            "--interval",
            str(READING_INTERVAL_S),
            "--count",
            str(EPISODE_READINGS),
        ]
        self._seed = seed
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo ward", daemon=True)

    def start(self) -> None:
        self._launch()
        if not _wait_port(self.port, 15):
            raise RuntimeError(f"the simulator did not start; see {self._workdir / 'pumpsim.log'}")
        self._thread.start()

    def _launch(self) -> None:
        self.episodes += 1
        argv = [*self._argv, "--seed", str(self._seed + self.episodes)]
        self._proc = start_child(argv, self._workdir / "pumpsim.log")

    def _run(self) -> None:
        while not self._stop.is_set():
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._launch()
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._proc is not None:
            stop_child(self._proc)


class DemoOperator:
    """Acknowledges each alert a few seconds after it starts, as a nurse at a dashboard would."""

    def __init__(self, broker_port: int, alerts_filter: str, ack_to: str) -> None:
        self._ack_to = ack_to
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()
        self._alerts_filter = alerts_filter
        self._client = MqttClient(
            MqttSettings(url=f"mqtt://127.0.0.1:{broker_port}", session_expiry_s=0),
            "pumpgw-demo-operator",
            emit=lambda _event: None,  # the demo's own view shows the broker's state
            on_message=self._on_message,
            on_connect=self._subscribe,
        )
        self._client.start()

    def _subscribe(self, client: mqtt.Client, _connected: Connected) -> None:
        client.subscribe(self._alerts_filter, qos=1)

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError, KeyError):
            alert = json.loads(message.payload)
            if alert.get("phase") == "start":
                with self._lock:
                    self._due[alert["alert_id"]] = time.monotonic() + ACK_AFTER_S

    def poll(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [a for a, t in self._due.items() if t <= now]
            for alert_id in due:
                del self._due[alert_id]
        for alert_id in due:
            ack = {"alert_id": alert_id, "by": DEMO_OPERATOR, "note": "seen on the demo dashboard"}
            self._client.paho.publish(self._ack_to, json.dumps(ack), qos=1)

    def close(self) -> None:
        self._client.stop()


def start_dashboard(settings: Settings, ws_port: int | None) -> DashboardServer | None:
    """The ward page on 127.0.0.1:8090 (or a free port); None without a WebSocket listener."""
    if ws_port is None:
        return None
    config = page_config(
        settings.dashboard,
        topic_prefix=settings.mqtt.topic_prefix,
        site=settings.gateway.site,
        station=settings.gateway.station,
    )
    config = replace(config, broker_url=f"ws://127.0.0.1:{ws_port}")
    for port in (DASHBOARD_PORT, 0):
        with contextlib.suppress(DashboardError):
            server = DashboardServer(f"127.0.0.1:{port}", config).start()
            log.info(
                "demo: dashboard on %s (sign in with any user name and password: the demo "
                "broker is open)", server.url,
            )
            return server
    return None


def demo_settings(workdir: Path, broker_port: int, sim_port: int) -> Settings:
    return Settings(
        gateway=GatewaySection(
            site="demo",
            station="ward-1",
            status_interval_s=5.0,
            ack_allowed=[DEMO_OPERATOR],
            ack_technical=[DEMO_OPERATOR],
        ),
        sources=[SourceSettings(url=f"socket://127.0.0.1:{sim_port}", name="ward-1 line")],
        mqtt=MqttSettings(url=f"mqtt://127.0.0.1:{broker_port}"),
        store=StoreSection(path=workdir / "outbox.db", durability="normal"),
        health=HealthSection(listen=f"127.0.0.1:{free_port()}"),
    )


def _loop(
    gateway: Gateway,
    operator: DemoOperator,
    header: str,
    live_view: bool,
    until: float,
    stop: threading.Event,
) -> None:
    if not live_view:
        while not stop.wait(2.0) and time.monotonic() < until:
            operator.poll()
            obs = gateway.observe()
            log.info(
                "frames %d accepted %d alerts %d",
                obs.frames_in,
                sum(obs.accepted_by_kind.values()),
                obs.alert_transitions,
            )
        return
    from rich.live import Live

    from gateway.view import render

    def frame() -> object:
        pumps = list(gateway.pipeline.pumps.values())
        active = {p.pump_id: gateway.pipeline.engine.active_alerts(p.pump_id) for p in pumps}
        return render(
            gateway.observe(), pumps, active, list(gateway.pipeline.recent_alerts), header
        )

    with Live(frame(), refresh_per_second=VIEW_REFRESH_PER_S, screen=False) as live:  # type: ignore[arg-type]
        while not stop.wait(1 / VIEW_REFRESH_PER_S) and time.monotonic() < until:
            operator.poll()
            live.update(frame())  # type: ignore[arg-type]


def run_demo(
    *,
    pumps: int,
    speed: float,
    seed: int,
    duration_s: float | None,
    live_view: bool,
    workdir: Path | None,
    stop: threading.Event,
) -> int:
    """Run the demo until Ctrl-C (or `duration_s`); returns the exit code."""
    keep = workdir is not None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="pumpgw-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    until = time.monotonic() + (duration_s if duration_s is not None else float("inf"))
    try:
        with contextlib.ExitStack() as running:  # unwinds in reverse: the gateway stops first
            broker = running.enter_context(demo_broker(workdir))
            ward = SimulatedWard(workdir, pumps, speed, seed)
            running.callback(ward.stop)
            ward.start()
            settings = demo_settings(workdir, broker.port, ward.port)
            gateway = Gateway(settings)
            health = HealthServer(settings.health.listen, gateway.observe)
            health.start()
            running.callback(health.stop)
            gateway.start()
            running.callback(gateway.stop)
            operator = DemoOperator(
                broker.port, f"{gateway.topics.prefix}/#", ack_topic(gateway.topics, DEMO_OPERATOR)
            )
            running.callback(operator.close)
            dashboard = start_dashboard(settings, broker.ws_port)
            if dashboard is not None:
                running.callback(dashboard.stop)
            shown = "none (port taken)" if dashboard is None else dashboard.url
            header = (
                f"dashboard: {shown}   broker: {broker.description}   "
                f"store: {settings.store.path}   "
                f"health: http://{settings.health.listen}/healthz   "
                f"{pumps} pumps at {speed:g}x   Ctrl-C to stop"
            )
            log.info("demo: %s", header)
            _loop(gateway, operator, header, live_view, until, stop)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
