"""Latency through the gateway: a frame's last byte on the line to its MQTT message, and a
threshold-crossing reading to the alert it raises.

This process is the line: a TCP server that `pumpgw run` connects to as `socket://`. It writes
each frame itself at a fixed rate and notes time.time() the moment sendall() returns (the
last byte is with the kernel), keyed by record id. `mosquitto_sub` prints every arrival with
its wall-clock time (%U), on the same machine and clock. Phases: 10, 100 and 1,000
readings/s from 100 pumps (issue 12's targets: p99 <= 2.5 ms at 100/s and <= 5 ms at
1,000/s, with Mosquitto's defaults and with --broker-nodelay, deploy/'s setting), then 100
readings/s in which every tenth reading takes a fresh pump below its low-reservoir alarm
volume (2 mL, DOMAIN.md 2.1 [S13]); its `low_reservoir` start on the alerts topic is timed
back to that reading (target p99 < 50 ms). The gateway runs as configured for a ward:
durability full, MQTT and VictoriaMetrics (--no-influx: MQTT only); the subscriber is
`mosquitto_sub -q 1`.

Run: .venv/bin/python -m bench.bench_latency [--no-influx] [--seconds 20]
Writes bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import print_table, write_results
from bench.rig import (
    CpuMeter,
    Subscriber,
    load_avg,
    machine_cpu,
    percentiles_ms,
    servers,
    start_gateway,
)
from schemas.codec import encode_message
from schemas.models import Drug, PumpState, Reading

PREFIX = "bench"
PUMPS = 100
ALERT_PUMPS = 300
ALERT_EVERY = 10
"""In the alert phase every tenth reading is a threshold crossing (10 crossings a second)."""
BOOT_ID = "1a7e0c"
CAPACITY_ML = 20.0
ALARM_ML = 2.0
"""The manufacturer-recommended low-reservoir alarm volume (DOMAIN.md 2.1 [S13])."""
NORMAL_ML = 15.0
BELOW_ALARM_ML = 1.5
"""Below the 2 mL alarm, above the 1 mL empty threshold (so only low_reservoir starts)."""
BASAL_ML_PER_DAY = 0.5
"""[D] A 20 mL pump refilled about monthly (DOMAIN.md 1.5 [S19])."""
CONNECT_TIMEOUT_S = 30.0
ARRIVE_TIMEOUT_S = 120.0
TARGET_P99_MS = {"readings_100_per_s": 2.5, "readings_1000_per_s": 5.0, "alert": 50.0}
"""At most these (issue 12 for readings, issue 6 for the alert); bench/__main__.py judges."""
_RECORD = re.compile(
    rb'"pump_id":"([^"]+)","boot_id":"([^"]+)","seq":(\d+),"device_time":"[^"]+",'
    rb'"received_at":"([^"]+)"'
)


class Line:
    """The TCP end the gateway reads from: frames out with their send times, acks drained."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._conn: socket.socket | None = None
        self._reader = threading.Thread(target=self._drain_acks, name="acks", daemon=True)

    def accept(self) -> None:
        self._server.settimeout(CONNECT_TIMEOUT_S)
        self._conn, _ = self._server.accept()
        self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader.start()

    def _drain_acks(self) -> None:
        assert self._conn is not None
        while self._conn.recv(65536):
            pass

    def send(self, frame: bytes) -> float:
        """Write one frame; the wall-clock time its last byte was handed to the kernel."""
        assert self._conn is not None
        self._conn.sendall(frame)
        return time.time()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._server.close()


@dataclass
class Pumps:
    """Sequence numbers and delivered volumes of the simulated pumps, frames on demand."""

    seqs: dict[str, int] = field(default_factory=dict)

    def frame(self, pump_id: str, reservoir_ml: float = NORMAL_ML) -> tuple[str, bytes]:
        seq = self.seqs[pump_id] = self.seqs.get(pump_id, 0) + 1
        now = datetime.now(UTC)
        reading = Reading(
            pump_id=pump_id,
            boot_id=BOOT_ID,
            seq=seq,
            device_time=now,
            received_at=now,
            drug=Drug.MORPHINE,
            pump_state=PumpState.RUNNING,
            reservoir_ml=reservoir_ml,
            reservoir_capacity_ml=CAPACITY_ML,
            low_reservoir_alarm_ml=ALARM_ML,
            basal_rate_ml_per_day=BASAL_ML_PER_DAY,
            delivered_total_ml=100.0 + seq * BASAL_ML_PER_DAY / 86_400,
        )
        return reading.record_id, encode_message(reading)


def paced(line: Line, frames: list[tuple[str, bytes]], rate_per_s: float) -> dict[str, float]:
    """Send frames at a fixed rate; return each record id's send time."""
    sent: dict[str, float] = {}
    start = time.perf_counter()
    for k, (record_id, frame) in enumerate(frames):
        delay = start + k / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[record_id] = line.send(frame)
    return sent


def normal_frames(pumps: Pumps, count: int) -> list[tuple[str, bytes]]:
    return [pumps.frame(f"L{k % PUMPS:03d}") for k in range(count)]


def alert_frames(pumps: Pumps, count: int) -> tuple[list[tuple[str, bytes]], set[str]]:
    """Background readings with every ALERT_EVERY-th one a crossing on a fresh alert pump."""
    frames: list[tuple[str, bytes]] = []
    crossings: set[str] = set()
    for k in range(count):
        if k % ALERT_EVERY == 0 and len(crossings) < ALERT_PUMPS:
            record_id, frame = pumps.frame(f"A{len(crossings):03d}", BELOW_ALARM_ML)
            crossings.add(record_id)
        else:
            record_id, frame = pumps.frame(f"L{k % PUMPS:03d}")
        frames.append((record_id, frame))
    return frames, crossings


def alert_arrivals(path: Path) -> dict[str, float]:
    """Arrival time of each low_reservoir start, keyed by the reading that caused it."""
    out: dict[str, float] = {}
    for line in path.read_bytes().splitlines():
        stamp, _, payload = line.partition(b" ")
        try:
            alert = json.loads(payload)
        except ValueError:
            continue
        if alert.get("alert_kind") == "low_reservoir" and alert.get("phase") == "start":
            out.setdefault(str(alert.get("cause_record_id")), float(stamp))
    return out


def run(
    workdir: Path, seconds: float, influx: bool, durability: str, nodelay: bool
) -> dict[str, Any]:
    pumps, line = Pumps(), Line()
    phases: dict[str, Any] = {}
    with servers(workdir, influx=influx, nodelay=nodelay) as (broker, vm):
        telemetry = Subscriber(
            broker.port, [f"{PREFIX}/+/+/pumps/+/telemetry"], workdir / "telemetry.txt",
            payload=True,
        )  # fmt: skip
        alerts = Subscriber(
            broker.port, [f"{PREFIX}/+/+/pumps/+/alerts"], workdir / "alerts.txt", payload=True
        )
        gateway = start_gateway(
            workdir, source_port=line.port, broker=broker, vm=vm, prefix=PREFIX,
            durability=durability,
        )  # fmt: skip
        assert gateway.proc is not None
        try:
            line.accept()
            sent_total = 0
            warm = normal_frames(pumps, PUMPS) + [
                pumps.frame(f"A{k:03d}") for k in range(ALERT_PUMPS)
            ]
            paced(line, warm, 200.0)
            sent_total += len(warm)
            assert telemetry.wait_messages(sent_total, ARRIVE_TIMEOUT_S), "warm-up lost"
            for rate in (10, 100, 1000):
                name = f"readings_{rate}_per_s"
                count = int(rate * max(seconds, 300 / rate))  # at least 300 samples
                frames = normal_frames(pumps, count)
                meter = CpuMeter({"gateway": gateway.proc.pid}).start()
                load = load_avg()
                sent = paced(line, frames, rate)
                sent_total += len(frames)
                telemetry.wait_messages(sent_total, ARRIVE_TIMEOUT_S)
                phases[name] = {"sent": sent, "cpu": meter.stop(), "load_avg": load}
            frames, crossings = alert_frames(pumps, ALERT_PUMPS * ALERT_EVERY)
            load = load_avg()
            sent = paced(line, frames, 100.0)
            sent_total += len(frames)
            telemetry.wait_messages(sent_total, ARRIVE_TIMEOUT_S)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(
                set(alert_arrivals(alerts.path)) & crossings
            ) < len(crossings):
                time.sleep(0.2)
            phases["alert"] = {
                "sent": {r: t for r, t in sent.items() if r in crossings},
                "load_avg": load,
            }
        finally:
            gateway.stop()
            line.close()
            telemetry.stop()
            alerts.stop()
    return summarize(phases, telemetry_arrivals(telemetry.path), alert_arrivals(alerts.path))


def telemetry_arrivals(path: Path) -> dict[str, tuple[float, float]]:
    """First arrival time and the gateway's received_at of each reading, by record id."""
    out: dict[str, tuple[float, float]] = {}
    for line in path.read_bytes().splitlines():
        stamp, _, payload = line.partition(b" ")
        found = _RECORD.search(payload)
        if found is None:
            continue
        pump, boot, seq, received = (g.decode() for g in found.groups())
        received_s = datetime.fromisoformat(received).timestamp()
        out.setdefault(f"{pump}:{boot}:{seq}", (float(stamp), received_s))
    return out


def summarize(
    phases: dict[str, Any], telemetry: dict[str, tuple[float, float]], alerts: dict[str, float]
) -> dict[str, Any]:
    """Latency percentiles per phase; a record that never arrived is counted as missing.

    Readings are also split at the gateway's received_at: line to gateway (the source read),
    and gateway to subscriber (queue, validation, outbox commit, MQTT, broker).
    """
    out: dict[str, Any] = {}
    readings = {r: t for r, (t, _) in telemetry.items()}
    for name, phase in phases.items():
        sent: dict[str, float] = phase["sent"]
        arrived = alerts if name == "alert" else readings
        latencies = [arrived[r] - t for r, t in sent.items() if r in arrived]
        out[name] = {
            **percentiles_ms(latencies),
            "sent": len(sent),
            "missing": sum(1 for r in sent if r not in arrived),
            "load_avg": phase["load_avg"],
        }
        if name != "alert":
            seen = [(t, *telemetry[r]) for r, t in sent.items() if r in telemetry]
            out[name]["line_to_gateway"] = percentiles_ms([rx - t for t, _, rx in seen])
            out[name]["gateway_to_subscriber"] = percentiles_ms([a - rx for _, a, rx in seen])
        if "cpu" in phase:
            out[name]["gateway_cpu_pct"] = phase["cpu"]["gateway"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each rate phase")
    parser.add_argument("--no-influx", dest="influx", action="store_false")
    parser.add_argument("--durability", choices=["full", "normal"], default="full")
    parser.add_argument(
        "--broker-nodelay", action="store_true", help="Mosquitto set_tcp_nodelay true"
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        results = run(
            args.keep or Path(tmp), args.seconds, args.influx, args.durability,
            args.broker_nodelay,
        )  # fmt: skip
    rows = [
        [name, r.get("n", 0), r["missing"], r.get("p50_ms"), r.get("p95_ms"), r.get("p99_ms"),
         r.get("max_ms"), r.get("gateway_cpu_pct", "-"), r["load_avg"][0]]
        for name, r in results.items()
    ]  # fmt: skip
    print_table(
        "Latency: last byte on the line -> MQTT subscriber (alert: crossing reading -> alert)",
        ["phase", "n", "missing", "p50 ms", "p95 ms", "p99 ms", "max ms", "gw CPU %", "load"],
        rows,
    )
    split = [
        [name, part, r[part].get("p50_ms"), r[part].get("p99_ms"), r[part].get("max_ms")]
        for name, r in results.items()
        for part in ("line_to_gateway", "gateway_to_subscriber")
        if part in r
    ]
    print_table("Split at the gateway's received_at", ["phase", "part", "p50", "p99", "max"], split)
    flags = ("" if args.influx else " --no-influx") + (
        "" if args.durability == "full" else f" --durability {args.durability}"
    )
    flags += " --broker-nodelay" if args.broker_nodelay else ""
    path = write_results(
        "latency" + flags.replace(" --", "_").replace(" ", "_").replace("-", "_"),
        {
            "command": f".venv/bin/python -m bench.bench_latency --seconds {args.seconds:g}{flags}",
            "influx": args.influx,
            "durability": args.durability,
            "broker_tcp_nodelay": args.broker_nodelay,
            "cpu_model": machine_cpu(),
            "targets_p99_ms": TARGET_P99_MS,
            "phases": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
