"""End-to-end helpers: a simulated ward, a gateway process and an MQTT collector.

Everything runs as real processes: `python -m simulator` over TCP, `python -m
gateway.cli run` with a TOML config written here, and a paho subscriber that
collects every message by its record id. Tests compare the three counts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.servers import free_port

PROCESS_STOP_S = 15.0


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


class Collector:
    """Subscribes (before anything is published) and keeps every message by kind and id."""

    def __init__(
        self, port: int, topic_filter: str, *, protocol: MQTTProtocolVersion = mqtt.MQTTv5
    ) -> None:
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.payloads: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.retained: dict[str, bytes] = {}
        self.historical = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, protocol=protocol, client_id=f"collector-{free_port()}"
        )
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda c, u, m, rc, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._subscribed.wait(10), "collector could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        kind = str(data.get("kind", "ack"))
        key = _record_key(kind, data)
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        with self._changed:
            if msg.retain:
                self.retained[msg.topic] = bytes(msg.payload)
            self.by_kind[kind][key] += 1
            self.payloads[kind].append(data)
            if user.get("historical") == "true":
                self.historical += 1
            self._changed.notify_all()

    def ids(self, *kinds: str) -> set[str]:
        with self._lock:
            return {key for kind in kinds for key in self.by_kind[kind]}

    def device_ids(self) -> set[str]:
        """Ids of every device message received: readings, device info and events."""
        return self.ids("reading", "info", "event")

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

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _record_key(kind: str, data: dict[str, Any]) -> str:
    if kind in ("reading", "info", "event"):
        return f"{data.get('pump_id')}:{data.get('boot_id')}:{data.get('seq')}"
    for key in ("transition_id", "quarantine_id", "alert_id"):
        if key in data:
            return str(data[key])
    return json.dumps(data, sort_keys=True)[:200]
