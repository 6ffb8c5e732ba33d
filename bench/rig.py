"""The process-level rig for the gateway benchmarks: servers, subscribers, /proc and py-spy.

Everything is a real process on loopback: Mosquitto and VictoriaMetrics from tests/servers.py,
`python -m gateway.cli run`, `python -m simulator`, and `mosquitto_sub` (C, so counting
arrivals costs the 2-core machine little) writing one line per message with its arrival
time (`%U`, the same wall clock as time.time() here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e import GatewayProcess, gateway_config
from tests.servers import Mosquitto, VictoriaMetrics

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY_S = 1.0
SUBSCRIBE_TIMEOUT_S = 10.0
POLL_S = 0.2
PY_SPY = Path(sys.executable).with_name("py-spy")
SPY = [str(PY_SPY), "record", "--gil", "--nonblocking", "--format", "raw"]
PUB = ["mosquitto_pub", "-h", "127.0.0.1"]
_PUMP = re.compile(rb'"pump_id":"([^"]+)"')
_BOOT = re.compile(rb'"boot_id":"([^"]+)"')
_SEQ = re.compile(rb'"seq":(\d+)')
_RECORD_ID = re.compile(rb"record_id:(\S+)")


# --- /proc ---------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (VmRSS), 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_cpu() -> str:
    """The CPU model line of /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@dataclass
class CpuMeter:
    """CPU seconds used by named processes between start() and stop()."""

    pids: dict[str, int]
    start_s: dict[str, float] = field(default_factory=dict)
    used_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    _t0: float = 0.0

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self.start_s = {name: cpu_s(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float | None]:
        """Share of one core each process used, in percent; None for one that has exited."""
        self.wall_s = time.monotonic() - self._t0
        now_s = {n: cpu_s(p) for n, p in self.pids.items()}
        self.used_s = {n: now_s[n] - self.start_s[n] for n in self.pids}
        return {
            n: round(100 * used / self.wall_s, 1) if now_s[n] else None
            for n, used in self.used_s.items()
        }


class Sampler:
    """Samples a process's RSS every second in a thread; CPU comes from the window's ends."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._cpu = CpuMeter({"p": pid})

    def start(self) -> Sampler:
        self._cpu.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.rss.append(rss_mb(self.pid))

    def stop(self) -> dict[str, float | None]:
        self._stop.set()
        self._thread.join()
        cpu_pct = self._cpu.stop()["p"]
        rss = self.rss or [rss_mb(self.pid)]
        return {
            "cpu_pct_of_one_core": cpu_pct,
            "rss_mb_max": round(max(rss), 1),
            "rss_mb_mean": round(sum(rss) / len(rss), 1),
            "seconds": round(self._cpu.wall_s, 1),
        }


# --- servers and the gateway ---------------------------------------------------------------


class BenchMosquitto(Mosquitto):
    """Mosquitto that never drops a subscriber's messages (the counter must see them all).

    max_queued_messages 0: a subscriber that falls behind is queued without limit instead of
    losing QoS 1 messages past the default 1,000. max_inflight_messages is the receive
    maximum the broker grants each client (default 20), which paces a QoS 1 publisher.
    """

    def __init__(self, workdir: Path, inflight: int | None = None, nodelay: bool = False) -> None:
        super().__init__(workdir)
        self.inflight = inflight
        self.nodelay = nodelay

    def _general_config(self) -> list[str]:
        lines = [*super()._general_config(), "max_queued_messages 0"]
        if self.inflight is not None:
            lines.append(f"max_inflight_messages {self.inflight}")
        if self.nodelay:
            lines.append("set_tcp_nodelay true")
        return lines


@contextlib.contextmanager
def servers(
    workdir: Path, *, influx: bool, inflight: int | None = None, nodelay: bool = False
) -> Iterator[tuple[Mosquitto, VictoriaMetrics | None]]:
    """A private Mosquitto (nodelay: set_tcp_nodelay) and, if asked, a VictoriaMetrics."""
    with BenchMosquitto(workdir / "mosquitto", inflight, nodelay) as broker:
        if not influx:
            yield broker, None
            return
        with VictoriaMetrics(workdir / "vm") as vm:
            yield broker, vm


def server_pid(server: Mosquitto | VictoriaMetrics) -> int:
    process = server._process  # tests/servers.py keeps the Popen private
    assert process is not None
    return process.pid


def start_gateway(
    workdir: Path,
    *,
    source_port: int,
    broker: Mosquitto,
    vm: VictoriaMetrics | None,
    prefix: str,
    mqtt: dict[str, Any] | None = None,
    durability: str = "full",
) -> GatewayProcess:
    """`pumpgw run` (durability full by default), MQTT and optionally VictoriaMetrics."""
    influx = None if vm is None else {"url": vm.url, "org": "bench", "bucket": "pumps"}
    config = gateway_config(
        workdir,
        sim_port=source_port,
        mqtt_port=broker.port,
        prefix=prefix,
        influx=influx,
        extra={"store": {"durability": durability}, "mqtt": mqtt or {}},
    )
    return GatewayProcess(config, workdir / "gateway.log").start()


def backlog(gateway: GatewayProcess, sink: str) -> float | None:
    """A sink's backlog from /metrics, None while the gateway does not answer."""
    metrics = gateway.metrics()
    return None if metrics is None else metrics.value("pumpgw_sink_backlog_records", sink=sink)


# --- the subscriber ------------------------------------------------------------------------


class Subscriber:
    """`mosquitto_sub` writing `arrival-time payload-or-properties` lines to a file."""

    def __init__(self, port: int, topics: list[str], path: Path, *, payload: bool) -> None:
        """payload=False prints MQTT 5 user properties (record_id) instead of the payload."""
        self.path = path
        self.port = port
        self.probe_topic = f"bench-probe/{path.stem}"
        fmt = "%U %p" if payload else "%U %P"
        argv = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1"]
        for topic in [*topics, self.probe_topic]:
            argv += ["-t", topic]
        self._out = path.open("wb")
        self.proc = subprocess.Popen(
            [*argv, "-F", fmt], stdout=self._out, stderr=subprocess.DEVNULL
        )
        self._offset = 0
        self._lines = 0
        self._wait_subscribed()

    def _wait_subscribed(self) -> None:
        """Publish probes until one is printed (mosquitto_sub says nothing when subscribed)."""
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
        while time.monotonic() < deadline:
            subprocess.run(
                [*PUB, "-p", str(self.port), "-t", self.probe_topic, "-m", "probe"], check=True
            )
            time.sleep(POLL_S)
            if self.path.stat().st_size > 0:
                return
        raise RuntimeError(f"mosquitto_sub did not subscribe on port {self.port}")

    def messages(self) -> int:
        """Messages printed so far, probes not counted (reads only what is new)."""
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        self._lines += sum(1 for line in data[:end].split(b"\n") if _is_record(line))
        return self._lines

    def wait_messages(self, count: int, timeout_s: float, *, idle_s: float = 30.0) -> bool:
        """Wait for `count` messages; give up after timeout_s, or idle_s without any."""
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_lines = self.messages()
            if now_lines >= count:
                return True
            if now_lines != last:
                last, last_change = now_lines, time.monotonic()
            elif time.monotonic() - last_change > idle_s:
                return False
            time.sleep(POLL_S)
        return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self._out.close()

    def arrivals(self) -> list[tuple[float, str]]:
        """(arrival time, record id) per message, in file order; probes skipped."""
        out: list[tuple[float, str]] = []
        with self.path.open("rb") as f:
            for line in f:
                stamp, _, rest = line.partition(b" ")
                record_id = _record_id(rest)
                if record_id is not None:
                    out.append((float(stamp), record_id))
        return out


def _is_record(line: bytes) -> bool:
    return bool(line) and not line.endswith((b" ", b" probe"))


def _record_id(rest: bytes) -> str | None:
    found = _RECORD_ID.search(rest)
    if found is not None:
        return found.group(1).decode()
    pump, boot, seq = _PUMP.search(rest), _BOOT.search(rest), _SEQ.search(rest)
    if pump is None or boot is None or seq is None:
        return None
    return f"{pump.group(1).decode()}:{boot.group(1).decode()}:{seq.group(1).decode()}"


def throughput(arrivals: list[tuple[float, str]]) -> dict[str, Any]:
    """Distinct records, duplicates, and rates: overall and sustained (10th-90th percentile)."""
    times = sorted(t for t, _ in arrivals)
    counts = Counter(r for _, r in arrivals)
    result: dict[str, Any] = {
        "received": len(counts),
        "duplicates": sum(n - 1 for n in counts.values()),
    }
    if len(times) < 10:
        return result
    lo, hi = times[len(times) // 10], times[(9 * len(times)) // 10]
    result["first_to_last_s"] = round(times[-1] - times[0], 2)
    result["overall_per_s"] = round(len(times) / max(1e-9, times[-1] - times[0]))
    result["sustained_per_s"] = round((0.8 * len(times)) / max(1e-9, hi - lo))
    return result


def percentiles_ms(values_s: list[float]) -> dict[str, float]:
    """p50, p95, p99 and max of durations in seconds, as milliseconds."""
    ordered = sorted(values_s)
    if not ordered:
        return {}

    def pick(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "n": len(ordered),
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "max_ms": round(1000 * ordered[-1], 2),
    }


# --- py-spy --------------------------------------------------------------------------------

STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("outbox write (SQLite commit)", ("Outbox.append",)),
    ("outbox read (sinks)", ("Outbox.read",)),
    ("outbox cursors", ("Outbox.ack",)),
    ("line protocol (points.line_for)", ("line_for",)),
    ("influx body + HTTP", ("InfluxSink",)),
    ("validate (message_from_frame)", ("message_from_frame",)),
    ("decode (FrameDecoder.feed)", ("FrameDecoder.feed",)),
    ("rules (AlertEngine)", ("AlertEngine.",)),
    ("JSON payload (model_dump_json)", ("model_dump_json",)),
    ("MQTT: paho network thread", ("Client._thread_main",)),
    ("MQTT: sink thread (publish)", ("MqttSink.",)),
    ("source read (pyserial)", ("SerialSource.",)),
    ("ingest glue (pipeline, status, acks)", ("Gateway._ingest_loop",)),
    ("start-up (imports)", ("_find_and_load", "<module>")),
]


class Profiler:
    """py-spy sampling the GIL holder only (--gil), without pausing the process."""

    def __init__(self, pid: int, path: Path, rate_hz: int = 100) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [*SPY, "--pid", str(pid), "--rate", str(rate_hz), "-o", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=(path.parent / "py-spy.log").open("wb"),
        )

    def stop(self) -> dict[str, int]:
        """Stop sampling; samples per stage."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        return classify(self.path)


def classify(path: Path) -> dict[str, int]:
    """Samples per stage of collapsed stacks: the first STAGES entry found in a stack wins."""
    totals: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        names = [frame.split(" (")[0] for frame in stack.split(";")]
        totals[_stage(names)] += int(count)
    return dict(totals.most_common())


def _stage(names: list[str]) -> str:
    for stage, markers in STAGES:
        if any(marker in name for marker in markers for name in names):
            return stage
    return "other"


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
