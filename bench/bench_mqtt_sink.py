"""The MQTT sink alone: a backlog of readings drained from the outbox to a private Mosquitto.

Isolates MqttSink (window, PUBACK matching, cursor, paho) from the ingest path: the outbox
is filled first, then one MqttSink publishes it all at QoS 1 while `mosquitto_sub` counts
arrivals. Reports records/s and the sink process's CPU per record (paho's network thread
included). --profile prints the functions that cost most (cProfile, so slower).

Run: .venv/bin/python -m bench.bench_mqtt_sink [--count 50000] [--protocol 5|3.1.1] [--repeat 3]
Each case runs --repeat times; the median run is reported (all runs are in the JSON).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.bench_drain import reading
from bench.common import print_table, write_results
from bench.rig import BenchMosquitto, Subscriber, load_avg
from gateway.adapters.mqtt import MqttSink
from gateway.adapters.mqtt_client import MqttSettings, SelectableEvent
from gateway.outbox import Outbox
from gateway.records import OutRecord
from gateway.topics import TopicBase

APPEND_ROWS = 5000
HEADER = ["protocol", "broker inflight", "records/s", "CPU µs/record", "complete", "load start",
          "load end"]  # fmt: skip
TIMEOUT_S = 300.0


def fill(outbox: Outbox, count: int) -> None:
    for start in range(0, count, APPEND_ROWS):
        models = [reading(n) for n in range(start, min(count, start + APPEND_ROWS))]
        outbox.append(
            [
                OutRecord("reading", m.record_id, m.pump_id, m.model_dump_json().encode())
                for m in models
            ]
        )


def drain(
    workdir: Path, count: int, protocol: str, profile: bool, inflight: int | None
) -> dict[str, Any]:
    """Publish `count` stored readings; rate from the first to the last arrival."""
    outbox = Outbox(workdir / "outbox.db", ["mqtt"], durability="full", max_pending=count + 10)
    fill(outbox, count)
    with BenchMosquitto(workdir / "mosquitto", inflight) as broker:
        subscriber = Subscriber(
            broker.port, ["bench/+/+/pumps/+/telemetry"], workdir / "arrivals.txt", payload=True
        )
        settings = MqttSettings(
            url=f"mqtt://127.0.0.1:{broker.port}",
            protocol=protocol,
            topic_prefix="bench",
            historical_after_s=3600.0,
        )
        sink = MqttSink(
            settings,
            outbox,
            TopicBase(site="site", station="station", prefix="bench"),
            status=lambda: (b"{}", b"{}"),
            on_ack=lambda ack: None,
        )
        stop, wake = threading.Event(), SelectableEvent()
        profiler = cProfile.Profile() if profile else None
        cpu0, load0 = time.process_time(), load_avg()
        thread = threading.Thread(target=_run, args=(sink, stop, wake, profiler), daemon=True)
        thread.start()
        complete = subscriber.wait_messages(count, TIMEOUT_S)
        cpu_s = time.process_time() - cpu0
        stop.set()
        wake.set()
        thread.join(10)
        subscriber.stop()
    outbox.close()
    times = sorted(t for t, _ in subscriber.arrivals()) or [0.0]
    span_s = max(1e-9, times[-1] - times[0])
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return {
        "protocol": protocol,
        "broker_max_inflight": inflight or 20,
        "count": count,
        "complete": complete,
        "records_per_s": round(len(times) / span_s),
        "cpu_us_per_record": round(1e6 * cpu_s / count, 1),
        "load_avg": [load0, load_avg()],
    }


def _run(
    sink: MqttSink,
    stop: threading.Event,
    wake: threading.Event,
    profiler: cProfile.Profile | None,
) -> None:
    if profiler is None:
        sink.run(stop, wake)
        return
    profiler.runcall(sink.run, stop, wake)


def _row(case: dict[str, Any]) -> list[Any]:
    load = case["load_avg"]
    rate, cpu = f"{case['records_per_s']:,}", case["cpu_us_per_record"]
    inflight = case["broker_max_inflight"]
    return [case["protocol"], inflight, rate, cpu, case["complete"], load[0][0], load[1][0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--protocol", choices=["5", "3.1.1"], action="append")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is kept")
    parser.add_argument("--profile", action="store_true", help="cProfile the sink thread")
    parser.add_argument(
        "--broker-inflight", type=int, action="append", help="broker max_inflight_messages"
    )
    args = parser.parse_args()
    cases = []
    for inflight in args.broker_inflight or [None]:
        for protocol in args.protocol or ["5", "3.1.1"]:
            runs = []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
                    runs.append(drain(Path(tmp), args.count, protocol, args.profile, inflight))
            runs.sort(key=lambda r: r["records_per_s"])
            median = runs[len(runs) // 2]
            median["runs_records_per_s"] = [r["records_per_s"] for r in runs]
            median["runs_cpu_us_per_record"] = [r["cpu_us_per_record"] for r in runs]
            cases.append(median)
    print_table(
        f"MQTT sink draining {args.count:,} stored readings at QoS 1",
        HEADER,
        [_row(c) for c in cases],
    )
    if not args.profile:
        print(f"wrote {write_results('mqtt_sink', {'cases': cases})}")


if __name__ == "__main__":
    main()
