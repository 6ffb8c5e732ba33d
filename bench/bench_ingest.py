"""Central ingest rate: `pumpgw ingest` workers draining a broker backlog into VictoriaMetrics.

Starts a private Mosquitto and VictoriaMetrics (tests/servers.py), starts N workers once so
their shared-subscription sessions exist, stops them, publishes `--count` readings (the
broker queues them in the stopped workers' sessions, split round-robin), then starts the
workers again and times until every worker reports all its points written (/metrics). So
the figure is ingest alone (MQTT in, validation, outbox commit, ack, InfluxDB write), not
the producer. Repeated with 1 and 2 workers (issue 12's target, >= 15,000 points/s, is for
one). Reports, from /metrics sampled every SAMPLE_S:

- sustained points/s: every point over the time from the last sample before any worker
  had taken a message to the first sample with every point written; process start and
  connect are left out, and the sampling can only make the figure lower (by up to one
  SAMPLE_S at each end);
- points/s with start-up: every point over the time from starting the processes;
- the CPU time per point of the workers and of the broker and database over the sustained
  window (a figure that does not depend on what else runs on the machine).

Run: .venv/bin/python -m bench.bench_ingest [--count 100000] [--workers 1 2]
Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import print_table, write_results
from bench.rig import load_avg
from schemas.models import Reading
from tests.e2e import Metrics, wait_until, write_config
from tests.servers import Mosquitto, ServerProcess, VictoriaMetrics, free_port

PUMPS = 60
STATIONS = 6
T0 = datetime(2026, 1, 1, tzinfo=UTC)
QUEUE_MESSAGES = 10_000_000
DRAIN_TIMEOUT_S = 600.0
SAMPLE_S = 0.05
PUBLISH_CHUNK = 30_000
"""Messages in flight per publish round: paho's message ids wrap at 65,535."""


class RoomyMosquitto(Mosquitto):
    """Mosquitto with a queue large enough to hold the whole backlog per session."""

    def _general_config(self) -> list[str]:
        return [*super()._general_config(), f"max_queued_messages {QUEUE_MESSAGES}"]


def backlog(prefix: str, count: int) -> list[tuple[str, bytes]]:
    """`count` readings over PUMPS pumps on STATIONS gateways' telemetry topics."""
    out = []
    for n in range(count):
        pump, seq = n % PUMPS, n // PUMPS
        station = f"bed-{pump % STATIONS}"
        at = T0 + timedelta(minutes=seq)
        r = Reading(
            pump_id=f"P{pump:04d}", boot_id="b1", seq=seq, device_time=at,
            received_at=at + timedelta(milliseconds=40), drug="morphine", pump_state="running",
            reservoir_ml=20.0 - (seq % 4000) * 0.004, reservoir_capacity_ml=20.0,
            low_reservoir_alarm_ml=2.0, basal_rate_ml_per_day=0.5, delivered_total_ml=seq * 0.0004,
        )  # fmt: skip
        topic = f"{prefix}/ward/{station}/pumps/{r.pump_id}/telemetry"
        out.append((topic, r.model_dump_json().encode()))
    return out


def publish(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Publish at QoS 1 and wait for every PUBACK; return the seconds it took."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    for first in range(0, len(messages), PUBLISH_CHUNK):
        chunk = messages[first : first + PUBLISH_CHUNK]
        infos = [client.publish(topic, payload, qos=1) for topic, payload in chunk]
        for info in infos:
            info.wait_for_publish(60)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


class Worker:
    """One `pumpgw ingest` process with its own client id, outbox and /metrics port."""

    def __init__(self, config: Path, workdir: Path, name: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        self.env = {
            **os.environ,
            "PUMPGW_INGEST__CLIENT_ID": name,
            "PUMPGW_STORE__PATH": str(workdir / "outbox.db"),
            "PUMPGW_HEALTH__LISTEN": self.metrics_url.split("/")[2],
        }
        self.config, self.log = config, workdir / "ingest.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(self.config)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def metrics(self) -> Metrics | None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as answer:  # noqa: S310
                return Metrics.parse(answer.read().decode())
        except OSError:
            return None

    def subscribed(self) -> bool:
        m = self.metrics()
        return m is not None and m.value("pumpgw_source_connected") == 1

    def written(self) -> float:
        m = self.metrics()
        return 0.0 if m is None else m.value("pumpgw_sink_delivered_total", sink="influx")

    def counts(self) -> tuple[float, float]:
        """(messages taken from the broker, points written to the database); 0 before start."""
        m = self.metrics()
        if m is None:
            return 0.0, 0.0
        return m.value("pumpgw_frames_in_total"), m.value(
            "pumpgw_sink_delivered_total", sink="influx"
        )


@dataclass(frozen=True)
class Sample:
    """One look at the workers: wall time, counters summed over them, CPU seconds."""

    at_s: float
    taken: float
    written: float
    workers_cpu_s: float
    servers_cpu_s: float


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(procs: list[Worker], servers: list[int], count: int) -> list[Sample]:
    """A Sample every SAMPLE_S until all `count` points are written."""
    samples: list[Sample] = []
    deadline = time.perf_counter() + DRAIN_TIMEOUT_S
    while time.perf_counter() < deadline:
        counts = [w.counts() for w in procs]
        samples.append(Sample(
            time.perf_counter(), sum(c[0] for c in counts), sum(c[1] for c in counts),
            sum(cpu_s(w.pid) for w in procs), sum(map(cpu_s, servers)),
        ))  # fmt: skip
        if samples[-1].written >= count:
            return samples
        time.sleep(SAMPLE_S)
    raise RuntimeError(f"only {samples[-1].written:.0f} of {count} written")


def sustained(samples: list[Sample], count: int, started_s: float) -> dict[str, float]:
    """Rates from the last sample before any message was taken to every point written."""
    first_in = next(i for i, s in enumerate(samples) if s.taken > 0)
    before = Sample(started_s, 0, 0, 0.0, samples[0].servers_cpu_s)
    start = samples[first_in - 1] if first_in else before
    end = samples[-1]
    seconds = end.at_s - start.at_s
    return {
        "sustained_points_per_s": count / seconds,
        "sustained_s": seconds,
        "start_up_s": start.at_s - started_s,
        "worker_cpu_us_per_point": 1e6 * (end.workers_cpu_s - start.workers_cpu_s) / count,
        "servers_cpu_us_per_point": 1e6 * (end.servers_cpu_s - start.servers_cpu_s) / count,
    }


def server_pid(server: ServerProcess) -> int:
    """A server's process id (tests/servers.py keeps the Popen private)."""
    process = server._process
    assert process is not None
    return process.pid


def run_case(root: Path, workers: int, count: int) -> dict[str, Any]:
    """One measurement: a fresh broker, `workers` workers, `count` readings queued for them."""
    with RoomyMosquitto(root / "mosquitto") as broker, VictoriaMetrics(root / "vm") as vm:
        tag = uuid.uuid4().hex[:8]
        config = write_config(root / "ingest.toml", {
            "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}", "topic_prefix": f"b{tag}"},
            "influx": {"url": vm.url, "api": "v2", "org": "bench", "bucket": "pumps"},
            "store": {"path": str(root / "unused.db"), "durability": "full"},
            "ingest": {"group": f"g{tag}"},
        })  # fmt: skip
        procs = [Worker(config, root / f"w{i}", f"bench-w{i}") for i in range(workers)]
        for w in procs:
            w.start()
        assert wait_until(lambda: all(w.subscribed() for w in procs), 30), "not subscribed"
        for w in procs:
            w.stop()
        publish_s = publish(broker.port, backlog(f"b{tag}", count))
        load = load_avg()
        started = time.perf_counter()
        for w in procs:
            w.start()
        samples = watch(procs, [server_pid(broker), server_pid(vm)], count)
        elapsed = samples[-1].at_s - started
        shares = [int(w.written()) for w in procs]
        for w in procs:
            w.stop()
    assert sum(shares) >= count, f"only {sum(shares)} of {count} written"
    return {
        "workers": workers,
        "points": count,
        "seconds_with_start": elapsed,
        "points_per_s_with_start": count / elapsed,
        **sustained(samples, count, started),
        "shares": shares,
        "publish_per_s": count / publish_s,
        "load_avg": [load, load_avg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    results = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            results.append(run_case(Path(tmp), workers, args.count))
    print_table(
        f"pumpgw ingest: {args.count} queued readings to VictoriaMetrics "
        f"(durability full, {os.cpu_count()} CPUs shared by broker, database and workers)",
        ["workers", "points/s sustained", "points/s with start-up", "start-up s",
         "worker CPU µs/point", "broker+VM CPU µs/point", "per worker", "load"],
        [
            [r["workers"], f"{r['sustained_points_per_s']:,.0f}",
             f"{r['points_per_s_with_start']:,.0f}", f"{r['start_up_s']:.2f}",
             f"{r['worker_cpu_us_per_point']:.0f}", f"{r['servers_cpu_us_per_point']:.0f}",
             " / ".join(str(s) for s in r["shares"]), r["load_avg"][0][0]]
            for r in results
        ],
    )  # fmt: skip
    path = write_results("ingest", {"count": args.count, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
