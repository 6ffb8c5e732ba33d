"""Private server processes for integration tests: Mosquitto, VictoriaMetrics, InfluxDB 1.x.

Each server runs from its Debian package's binary on free loopback ports with its own data
directory, is polled until ready, and can be stopped and started again on the same ports
(an outage). A missing binary raises RuntimeError naming the Debian package; nothing skips.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import urllib3

from tests.pki import Pki, generate_test_pki

__all__ = [
    "Influx1",
    "Mosquitto",
    "MosquittoFactory",
    "MosquittoTls",
    "Pki",
    "ServerProcess",
    "VictoriaMetrics",
    "accepts_tcp",
    "find_binary",
    "free_port",
    "generate_test_pki",
    "http_request",
    "http_status",
]

LOOPBACK = "127.0.0.1"
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
READY_TIMEOUT_S = 20.0
READY_POLL_S = 0.05
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 5
LOG_TAIL_BYTES = 4000
PORT_CLASH = b"address already in use"
MOSQUITTO_RUNNING = re.compile(rb"mosquitto version \S+ running")
EXPORT_TIMEOUT_S = 10.0
EXPORT_POLL_S = 0.1


# --- finding binaries and ports ---------------------------------------------------------


def find_binary(name: str, package: str) -> str:
    """Return the path of `name` from PATH or an sbin directory, or say which package to install."""
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise RuntimeError(
            f"{name} not found: install the Debian package '{package}' (scripts/test does this)"
        )
    return found


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def accepts_tcp(port: int) -> bool:
    """Return whether something accepts TCP connections on the loopback port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=HTTP_TIMEOUT_S):
            return True
    except OSError:
        return False


def http_status(url: str) -> int | None:
    """Return the HTTP status of GET url, or None when nothing answers."""
    try:
        return http_request("GET", url).status
    except urllib3.exceptions.HTTPError:
        return None


def http_request(method: str, url: str, body: bytes | None = None) -> urllib3.BaseHTTPResponse:
    """Send one HTTP request without retries; the caller checks the status."""
    return urllib3.request(method, url, body=body, timeout=HTTP_TIMEOUT_S, retries=False)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def log_tail(path: Path) -> str:
    """Return the last LOG_TAIL_BYTES of a log file, or a note that it is missing."""
    if not path.exists():
        return f"({path.name} not written)"
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        return log.read().decode(errors="replace")


# --- the process life cycle shared by every server --------------------------------------


class ServerProcess:
    """One private server process: ports chosen on first start, kept across restarts."""

    name = "server"
    package = "server"
    binary = "server"

    def __init__(self, workdir: Path) -> None:
        self.host = LOOPBACK
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output_log = workdir / "output.log"
        self._executable = find_binary(self.binary, self.package)
        self._process: subprocess.Popen[bytes] | None = None
        self._ports_chosen = False
        self._log_offsets: dict[Path, int] = {}

    # Subclasses say how to configure, launch and probe their server.
    def _choose_ports(self) -> None:
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _log_paths(self) -> list[Path]:
        return [self.output_log]

    @property
    def is_running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it serves; the first start picks free ports."""
        if self._ports_chosen:
            self._launch_and_wait()
            return
        for _attempt in range(PORT_ATTEMPTS):
            self._choose_ports()
            self._write_config()
            if self._launch_and_wait(retry_on_port_clash=True):
                self._ports_chosen = True
                return
        raise RuntimeError(f"{self.name}: no free port after {PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Terminate the server (a clean shutdown), killing it if it does not exit in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same ports with the same configuration and data."""
        self.stop()
        self.start()

    def ensure_running(self) -> None:
        """Start the server again if a test left it stopped."""
        if not self.is_running:
            self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch_and_wait(self, *, retry_on_port_clash: bool = False) -> bool:
        """Launch and wait until ready; False means the port was taken and may be retried."""
        self._log_offsets = {path: _size(path) for path in self._log_paths()}
        with self.output_log.open("ab") as output:
            self._process = subprocess.Popen(
                [self._executable, *self._argv()],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # a Ctrl-C in pytest reaches pytest, which stops us
            )
        try:
            self._wait_until_ready()
        except RuntimeError:
            self.stop()
            if retry_on_port_clash and self._port_clashed():
                return False
            raise
        return True

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.is_running:
                self._fail("exited during start-up")
            if self._is_ready() and self.is_running:
                return
            time.sleep(READY_POLL_S)
        self._fail(f"not ready after {READY_TIMEOUT_S:.0f} s")

    def _fail(self, problem: str) -> NoReturn:
        raise RuntimeError(f"{self.name} {problem}; log tail:\n{self._logs()}")

    def _port_clashed(self) -> bool:
        return any(PORT_CLASH in self._log_since_launch(path).lower() for path in self._log_paths())

    def _log_since_launch(self, path: Path) -> bytes:
        """Return what the latest launch wrote to a log (logs are kept across restarts)."""
        if not path.exists():
            return b""
        with path.open("rb") as log:
            log.seek(self._log_offsets.get(path, 0))
            return log.read()

    def _logs(self) -> str:
        return "\n".join(f"--- {path}\n{log_tail(path)}" for path in self._log_paths())


# --- Mosquitto --------------------------------------------------------------------------


@dataclass(frozen=True)
class MosquittoTls:
    """A TLS listener's certificates; require_certificate makes clients present one too."""

    pki: Pki
    require_certificate: bool = False


class Mosquitto(ServerProcess):
    """A private Mosquitto 2.0 broker: a plain listener on `port`, TLS on `tls_port`.

    users= makes a password file (anonymous clients are then refused unless
    allow_anonymous=True), acl= is the text of an ACL file, tls= adds the TLS listener.
    Sessions persist in workdir, so stop() then start() is an outage that keeps them.
    """

    name = "mosquitto"
    package = "mosquitto"
    binary = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: MosquittoTls | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        super().__init__(workdir)
        self.port = 0
        self.tls_port: int | None = None
        self.tls = tls
        self.allow_anonymous = users is None if allow_anonymous is None else allow_anonymous
        self.password_file = workdir / "passwords" if users is not None else None
        self.acl_file = None if acl is None else workdir / "acl"
        self.broker_log = workdir / "mosquitto.log"
        self.config_file = workdir / "mosquitto.conf"
        self._users = dict(users or {})
        if self.acl_file is not None:
            self.acl_file.write_text(acl or "")
        self._write_passwords()

    def add_user(self, name: str, password: str) -> None:
        """Add or change a user in the password file and make a running broker reload it."""
        if self.password_file is None:
            raise RuntimeError("this broker was made without users= and has no password file")
        self._users[name] = password
        self._write_passwords()
        if self._process is not None and self.is_running:
            self._process.send_signal(signal.SIGHUP)

    def _write_passwords(self) -> None:
        if self.password_file is None:
            return
        self.password_file.write_text("")
        passwd = find_binary("mosquitto_passwd", self.package)
        for name, password in self._users.items():
            subprocess.run([passwd, "-b", str(self.password_file), name, password], check=True)

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.tls_port = free_port() if self.tls is not None else None

    def _write_config(self) -> None:
        self.config_file.write_text("\n".join([*self._general_config(), *self._listeners()]))

    def _general_config(self) -> list[str]:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {str(self.allow_anonymous).lower()}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.broker_log}",
            "log_type all",
            "connection_messages true",
            # tests count every message: never let the broker drop a slow subscriber's queue
            "max_queued_messages 0",
            # run as whoever started us (as root, stay root): the files here are private
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        return lines

    def _listeners(self) -> list[str]:
        lines = [f"listener {self.port} {LOOPBACK}"]
        if self.tls is not None:
            pki = self.tls.pki
            lines += [
                f"listener {self.tls_port} {LOOPBACK}",
                f"cafile {pki.ca_cert}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
                f"require_certificate {str(self.tls.require_certificate).lower()}",
            ]
        return [*lines, ""]

    def _argv(self) -> list[str]:
        return ["-c", str(self.config_file)]

    def _is_ready(self) -> bool:
        # The broker's own "running" line, not a TCP connect: another process may hold the port.
        return MOSQUITTO_RUNNING.search(self._log_since_launch(self.broker_log)) is not None

    def _log_paths(self) -> list[Path]:
        return [self.output_log, self.broker_log]


class MosquittoFactory:
    """Starts brokers with options, each in its own folder under root; stop_all ends them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.brokers: list[Mosquitto] = []

    def __call__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: MosquittoTls | None = None,
        allow_anonymous: bool | None = None,
    ) -> Mosquitto:
        """Return a started broker; see Mosquitto for the options."""
        workdir = self.root / f"mosquitto-{len(self.brokers)}"
        broker = Mosquitto(workdir, users=users, acl=acl, tls=tls, allow_anonymous=allow_anonymous)
        self.brokers.append(broker)
        broker.start()
        return broker

    def stop_all(self) -> None:
        """Stop every broker this factory started."""
        for broker in self.brokers:
            broker.stop()


# --- VictoriaMetrics --------------------------------------------------------------------


class VictoriaMetrics(ServerProcess):
    """A private VictoriaMetrics; influx `m,tag=v f=1` becomes metric `m_f` with label tag."""

    name = "victoria-metrics"
    package = "victoria-metrics"
    binary = "victoria-metrics"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. for influxdb-client or a POST to /write and /api/v2/write."""
        return f"http://{self.host}:{self.port}"

    def export(
        self, match: str, *, min_points: int = 1, timeout_s: float = EXPORT_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Return the series matching a selector such as `{__name__="m_f"}` (JSON lines).

        VictoriaMetrics 1.79 makes new rows searchable about a second after the write, even
        after /internal/force_flush, so this polls until the series hold min_points values
        in all, and returns what it has at timeout_s (min_points=0: one look, no waiting).
        """
        deadline = time.monotonic() + timeout_s
        series = self._export_once(match)
        while _count_points(series) < min_points and time.monotonic() < deadline:
            time.sleep(EXPORT_POLL_S)
            series = self._export_once(match)
        return series

    def _export_once(self, match: str) -> list[dict[str, Any]]:
        flushed = http_request("GET", f"{self.url}/internal/force_flush")
        _check_status(flushed, 200, "force_flush")
        query = urllib.parse.urlencode({"match[]": match})
        response = http_request("GET", f"{self.url}/api/v1/export?{query}")
        _check_status(response, 200, "export")
        return [json.loads(line) for line in response.data.decode().splitlines() if line]

    def _choose_ports(self) -> None:
        self.port = free_port()

    def _write_config(self) -> None:
        """Configured by flags only."""

    def _argv(self) -> list[str]:
        return [
            f"-storageDataPath={self.workdir / 'data'}",
            f"-httpListenAddr={self.host}:{self.port}",
            "-retentionPeriod=100y",
            "-search.latencyOffset=0s",  # queries see points written a moment ago
            "-search.disableCache",
        ]

    def _is_ready(self) -> bool:
        return http_status(f"{self.url}/health") == 200


# --- InfluxDB 1.x -----------------------------------------------------------------------


class Influx1(ServerProcess):
    """A private InfluxDB 1.6 (Debian `influxd`) speaking the v1 /write and /query API."""

    name = "influxd"
    package = "influxdb"
    binary = "influxd"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = 0
        self.rpc_port = 0
        self.config_file = workdir / "influxdb.conf"

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://{self.host}:{self.port}"

    def create_database(self, name: str) -> None:
        """Create a database (idempotent in InfluxDB 1.x)."""
        self._post_query(f'CREATE DATABASE "{name}"')

    def write(self, db: str, lines: str) -> None:
        """Write line protocol to a database through the v1 /write API."""
        query = urllib.parse.urlencode({"db": db})
        response = http_request("POST", f"{self.url}/write?{query}", body=lines.encode())
        _check_status(response, 204, "write")

    def query(self, influxql: str, db: str) -> dict[str, Any]:
        """Run an InfluxQL query with GET /query and return the decoded JSON answer."""
        query = urllib.parse.urlencode({"db": db, "q": influxql})
        response = http_request("GET", f"{self.url}/query?{query}")
        _check_status(response, 200, "query")
        answer: dict[str, Any] = json.loads(response.data)
        return answer

    def _post_query(self, influxql: str) -> None:
        query = urllib.parse.urlencode({"q": influxql})
        response = http_request("POST", f"{self.url}/query?{query}")
        _check_status(response, 200, "query")

    def _choose_ports(self) -> None:
        self.port = free_port()
        self.rpc_port = free_port()

    def _write_config(self) -> None:
        self.config_file.write_text(_influx1_config(self.workdir, self.port, self.rpc_port))

    def _argv(self) -> list[str]:
        return ["-config", str(self.config_file)]

    def _is_ready(self) -> bool:
        return http_status(f"{self.url}/ping") == 204


def _influx1_config(workdir: Path, http_port: int, rpc_port: int) -> str:
    """Return an influxd 1.6 config that keeps everything in workdir and opens two ports."""
    # Upstream says reporting-disabled, Debian's build reporting-enabled; unknown keys pass.
    disabled_services = "\n".join(
        f"[[{service}]]\n  enabled = false"
        for service in ("graphite", "collectd", "opentsdb", "udp")
    )
    return f"""\
reporting-disabled = true
reporting-enabled = false
bind-address = "{LOOPBACK}:{rpc_port}"

[meta]
  dir = "{workdir / "meta"}"

[data]
  dir = "{workdir / "data"}"
  wal-dir = "{workdir / "wal"}"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "{LOOPBACK}:{http_port}"
  log-enabled = false

[admin]
  enabled = false

[ifql]
  enabled = false

[subscriber]
  enabled = false

[logging]
  suppress-logo = true

{disabled_services}
"""


def _count_points(series: list[dict[str, Any]]) -> int:
    return sum(len(one["values"]) for one in series)


def _check_status(response: urllib3.BaseHTTPResponse, expected: int, what: str) -> None:
    if response.status != expected:
        body = response.data.decode(errors="replace")[:500]
        raise RuntimeError(f"{what}: HTTP {response.status}, expected {expected}: {body}")
