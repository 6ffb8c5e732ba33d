"""End-to-end helpers: a simulated ward, a gateway process and an MQTT collector.

Everything runs as real processes: `python -m simulator` over TCP, `python -m
gateway.cli run` with a TOML config written here, and an MQTT subscriber that
collects every message by its record id. Tests compare the three counts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.mqtt_helpers import Probe, Received, settings_for
from tests.servers import Mosquitto, free_port, log_tail

PROCESS_STOP_S = 15.0
HTTP_TIMEOUT_S = 5.0
POLL_S = 0.1
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = POLL_S) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; return whether it held."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def broker_dropped(broker: Mosquitto) -> bool:
    """Whether the broker logged that it dropped messages for a slow client."""
    return "are being dropped" in broker.broker_log.read_text(errors="replace")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write TOML from {section: {key: value}} or {"sources": [{...}]}; nested dicts allowed."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {toml_value(value)}")
        for key, value in nested.items():
            table(f"{name}.{key}", value)

    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
        else:
            table(name, body)
    path.write_text("\n".join(lines) + "\n")
    return path


def gateway_config(
    workdir: Path,
    *,
    sim_port: int,
    mqtt_port: int,
    prefix: str,
    influx: dict[str, Any] | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A gateway config for one test: its own outbox, topic prefix and health port."""
    sections: dict[str, Any] = {
        "gateway": {"site": "test", "station": "bed-1"},
        "sources": [{"url": f"socket://127.0.0.1:{sim_port}", "name": "line-1"}],
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}", "topic_prefix": prefix},
        "store": {"path": str(workdir / "outbox.db"), "durability": "normal"},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
    }
    if influx is not None:
        sections["influx"] = influx
    for name, body in (extra or {}).items():
        sections[name] = {**sections.get(name, {}), **body}
    return write_config(workdir / "pumpgw.toml", sections)


@dataclass
class Ward:
    """A `pumpsim` process serving pumps over TCP; `summary()` waits for its exit line."""

    port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    _summary: dict[str, Any] | None = None

    @classmethod
    def start(cls, workdir: Path, *args: str, port: int | None = None) -> Ward:
        port = port or free_port()
        stderr_path = workdir / f"pumpsim-{port}.log"
        argv = [
            sys.executable,
            "-m",
            "simulator",
            "--transport",
            "tcp",
            "--listen",
            f"127.0.0.1:{port}",
            *args,
        ]
        with open(stderr_path, "ab") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(b"socket://"), f"pumpsim did not start: {first!r}"
        return cls(port, proc, stderr_path)

    def summary(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """The simulator's JSON summary line (waits for the process to end)."""
        if self._summary is None:
            out, _ = self.proc.communicate(timeout=timeout_s)
            lines = [line for line in out.splitlines() if line.startswith(b"{")]
            assert lines, f"no summary from pumpsim; log: {self.stderr_path.read_text()[-2000:]}"
            self._summary = json.loads(lines[-1])
        return self._summary

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.summary(PROCESS_STOP_S)


def expected_ids(summary: dict[str, Any]) -> set[str]:
    """Record ids of every device frame (reading, info, event) the simulator sent intact."""
    ids: set[str] = set()
    for pump in summary["pumps"]:
        if pump["first_seq"] is None:
            continue
        damaged = set(pump["damaged_seqs"])
        ids.update(
            f"{pump['pump_id']}:{pump['boot_id']}:{seq}"
            for seq in range(pump["first_seq"], pump["last_seq"] + 1)
            if seq not in damaged
        )
    return ids


def sent_count(summary: dict[str, Any], kind: str = "reading") -> int:
    return sum(int(p["sent"].get(kind, 0)) for p in summary["pumps"])


def damaged_count(summary: dict[str, Any]) -> int:
    return sum(sum(p["damaged"].values()) for p in summary["pumps"])


@dataclass
class GatewayProcess:
    """`pumpgw run --config FILE` as a child process, so it can be killed with SIGKILL."""

    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> GatewayProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to flush or close anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(PROCESS_STOP_S)

    def stop(self) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(PROCESS_STOP_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def health_url(self) -> str:
        """http://host:port of /healthz and /metrics, from the config's [health] listen."""
        listen = tomllib.loads(self.config.read_text())["health"]["listen"]
        return f"http://{listen}"

    def health(self) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, body) of /healthz, or None while nothing answers."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - a loopback URL from our own config
                f"{self.health_url}/healthz", timeout=HTTP_TIMEOUT_S
            ) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def metrics(self) -> Metrics | None:
        """The parsed /metrics, or None while nothing answers."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - a loopback URL from our own config
                f"{self.health_url}/metrics", timeout=HTTP_TIMEOUT_S
            ) as response:
                return Metrics.parse(response.read().decode())
        except (urllib.error.URLError, OSError):
            return None

    def wait_metrics(self, predicate: Callable[[Metrics], bool], timeout_s: float) -> Metrics:
        """Poll /metrics until `predicate` holds; return the last reading (it may not hold)."""
        last = Metrics([])

        def check() -> bool:
            nonlocal last
            last = self.metrics() or last
            return predicate(last)

        wait_until(check, timeout_s, poll_s=0.2)
        return last


@dataclass(frozen=True)
class Metrics:
    """Samples of a Prometheus text exposition: (name, labels, value)."""

    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = []
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None or line.startswith("#"):
                continue
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
        return cls(samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels` (0 if none)."""
        return sum(
            v
            for n, have, v in self.samples
            if n == name and all(have.get(k) == want for k, want in labels.items())
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """Samples of `name` keyed by one label's value."""
        return {have.get(label, ""): v for n, have, v in self.samples if n == name}


def outbox_record_ids(
    path: Path, kinds: Iterable[str] = ("reading", "info", "event")
) -> Counter[str]:
    """How often each record id of these kinds is stored in an outbox (read-only)."""
    kinds = tuple(kinds)
    marks = ", ".join("?" for _ in kinds)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            f"SELECT record_id FROM records WHERE kind IN ({marks})",  # noqa: S608
            kinds,
        ).fetchall()
    finally:
        db.close()
    return Counter(str(r[0]) for r in rows)


class Collector:
    """Subscribes (before anything is published) and keeps every message by kind and id."""

    def __init__(
        self,
        port: int,
        topic_filter: str,
        *,
        user: tuple[str, str] | None = None,
        persistent: bool = False,
    ) -> None:
        """persistent: keep the session (and messages queued for it) across broker restarts."""
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.retained: dict[str, bytes] = {}
        self.topics: dict[str, set[str]] = defaultdict(set)
        """Topics each kind arrived on."""
        self.historical = 0
        self._lock = threading.RLock()  # wait_for predicates may call ids() or count()
        self._changed = threading.Condition(self._lock)
        settings = settings_for(port, user=user, persistent=persistent)
        self._probe = Probe(settings, [topic_filter], client_id=f"collector-{free_port()}",
                            on_message=self._on_message)  # fmt: skip
        # A filter the broker refuses is a test's finding (nothing arrives), not a setup error.
        self._probe.start(refused_ok=True)

    def _on_message(self, msg: Received) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        kind = str(data.get("kind", "ack"))
        key = _record_key(kind, data)
        with self._changed:
            if msg.retain:
                self.retained[msg.topic] = msg.payload
            self.by_kind[kind][key] += 1
            self.payloads[kind].append(data)
            self.topics[kind].add(msg.topic)
            if msg.user_properties.get("historical") == "true":
                self.historical += 1
            self._changed.notify_all()

    def ids(self, *kinds: str) -> set[str]:
        with self._lock:
            return {key for kind in kinds for key in self.by_kind[kind]}

    def device_ids(self) -> set[str]:
        """Ids of every device message received: readings, device info and events."""
        return self.ids("reading", "info", "event")

    def count(self, *kinds: str) -> int:
        """Distinct ids received of these kinds."""
        with self._lock:
            return sum(len(self.by_kind[kind]) for kind in kinds)

    def conflicting_ids(self, *kinds: str) -> set[str]:
        """Ids received more than once with different payloads (a duplicate must be identical)."""
        seen: dict[str, str] = {}
        conflicts: set[str] = set()
        with self._lock:
            for kind in kinds:
                for data in self.payloads[kind]:
                    key = _record_key(kind, data)
                    text = json.dumps(data, sort_keys=True)
                    if seen.setdefault(key, text) != text:
                        conflicts.add(key)
        return conflicts

    def duplicates(self, kind: str) -> int:
        with self._lock:
            return sum(n - 1 for n in self.by_kind[kind].values())

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def wait_device_ids(self, wanted: Iterable[str], timeout_s: float) -> set[str]:
        """Wait until every wanted device record arrived; return the ids still missing."""
        wanted = set(wanted)
        kinds = ("reading", "info", "event")
        self.wait_for(
            lambda: wanted <= {k for kind in kinds for k in self.by_kind[kind]}, timeout_s
        )
        return wanted - self.device_ids()

    def stall(self) -> None:
        """Stay connected and subscribed but read nothing more (a stuck subscriber)."""
        self._probe.paho.loop_stop()

    def close(self) -> None:
        self._probe.close()


def _record_key(kind: str, data: dict[str, Any]) -> str:
    if kind in ("reading", "info", "event"):
        return f"{data.get('pump_id')}:{data.get('boot_id')}:{data.get('seq')}"
    for key in ("transition_id", "quarantine_id", "alert_id"):
        if key in data:
            return str(data[key])
    return json.dumps(data, sort_keys=True)[:200]


# --- the scaffold: collector, ward, station config and running gateway ------------------------
# Context managers for a test that orders them itself, and a `Scaffold` (the `scaffold`
# fixture of tests/integration/conftest.py) that starts them and stops them after the test in
# reverse order.


def unique(name: str) -> str:
    """`name` with a random suffix: a topic prefix, site or database of one test alone."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def collecting(port: int, prefix: str, *, raw: bool = False, **options: Any) -> Iterator[Collector]:
    """A subscriber to the tree under `prefix` (raw: `prefix` is the whole topic filter),
    subscribed before the first publish."""
    collector = Collector(port, prefix if raw else f"{prefix}/#", **options)
    try:
        yield collector
    finally:
        collector.close()


@contextmanager
def ward_running(workdir: Path, *args: str, port: int | None = None) -> Iterator[Ward]:
    """`pumpsim` over TCP with these arguments, given as words or as lines of words
    ("--pumps 3 --count 120"); killed if the test leaves early."""
    ward = Ward.start(workdir, *(word for arg in args for word in arg.split()), port=port)
    try:
        yield ward
    finally:
        if ward.proc.poll() is None:
            ward.proc.kill()
            ward.proc.wait()
        if ward.proc.stdout is not None:  # summary() closes it; a failed test may not get there
            ward.proc.stdout.close()


def stop_quietly(gateway: GatewayProcess) -> None:
    """SIGTERM, and SIGKILL if the gateway does not exit in time."""
    if gateway.running:
        try:
            gateway.stop()
        except subprocess.TimeoutExpired:
            gateway.kill()


@contextmanager
def gateway_running(config: Path, log_path: Path, **env: str) -> Iterator[GatewayProcess]:
    """`pumpgw run` on `config`: stopped cleanly after the block, killed if the block failed."""
    gateway = GatewayProcess(config, log_path, env=dict(env)).start()
    try:
        yield gateway
    except BaseException:
        if gateway.running:  # the test failed: do not wait for a clean stop
            gateway.kill()
        raise
    finally:
        stop_quietly(gateway)


def explain(gateway: GatewayProcess | None, ward: Ward | None = None) -> str:
    """The end of the gateway's and the simulator's logs, for an assertion message."""
    text = "" if gateway is None else f"\n--- gateway log\n{gateway.log()[-4000:]}"
    if ward is not None:
        text += f"\n--- pumpsim log\n{log_tail(ward.stderr_path)}"
    return text


def delivered(metrics: Metrics, sinks: tuple[str, ...] = ("mqtt",)) -> bool:
    """Nothing left in the outbox for any of `sinks`."""
    return metrics.value("pumpgw_outbox_pending_records") == 0 and all(
        metrics.value("pumpgw_sink_backlog_records", sink=sink) == 0 for sink in sinks
    )


class Scaffold:
    """One test's collectors, wards and gateways, stopped in reverse order by `close()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = ExitStack()

    def collector(self, port: int, prefix: str, *, raw: bool = False, **options: Any) -> Collector:
        return self._stack.enter_context(collecting(port, prefix, raw=raw, **options))

    def ward(self, *args: str, port: int | None = None) -> Ward:
        return self._stack.enter_context(ward_running(self.workdir, *args, port=port))

    def station_config(self, ward: Ward, mqtt_port: int, prefix: str, **options: Any) -> Path:
        """gateway_config in this test's directory for `ward`'s line."""
        return gateway_config(
            self.workdir, sim_port=ward.port, mqtt_port=mqtt_port, prefix=prefix, **options
        )

    def gateway(self, config: Path, log_name: str = "gateway.log", **env: str) -> GatewayProcess:
        return self._stack.enter_context(gateway_running(config, self.workdir / log_name, **env))

    def close(self) -> None:
        self._stack.close()
