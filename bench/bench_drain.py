"""InfluxDB sink drain rate: a backlog of readings in the outbox written to private servers.

Fills an outbox with `--count` readings (50 pumps, one reading a minute each), then drains
it with InfluxSink to a private VictoriaMetrics (v2 API) and a private InfluxDB 1.x (v1 API),
both started from tests/servers.py on free loopback ports. Reports points/s for each and
checks that every point landed. Target: >= 100,000 points/s to VictoriaMetrics.

Run: .venv/bin/python -m bench.bench_drain [--count 1000000] [--batch-size 5000] [--no-gzip]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import urllib3

from bench.common import print_table, write_results
from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.outbox import Outbox
from gateway.points import PointTags, line_for
from gateway.records import OutRecord, StoredRecord
from schemas.models import Reading
from tests.servers import Influx1, VictoriaMetrics

PUMPS = 50
APPEND_ROWS = 10_000
TARGET_VM_POINTS_PER_S = 100_000
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DATABASE = "pumps"


def reading(n: int) -> Reading:
    """The n-th reading of the backlog: pump n % PUMPS, one reading a minute per pump."""
    pump, seq = n % PUMPS, n // PUMPS
    device_time = T0 + timedelta(minutes=seq, microseconds=pump * 1000 + seq % 1000)
    return Reading(
        pump_id=f"P{pump:04d}",
        boot_id="1a2b3c4d",
        seq=seq,
        device_time=device_time,
        received_at=device_time + timedelta(milliseconds=35),
        drug=("morphine", "ziconotide", "baclofen")[pump % 3],
        pump_state="running",
        reservoir_ml=20.0 - (seq % 5000) * 0.0035,
        reservoir_capacity_ml=20.0,
        low_reservoir_alarm_ml=2.0,
        basal_rate_ml_per_day=0.5,
        delivered_total_ml=seq * 0.00035,
        bolus_count_24h=seq % 3,
        battery_remaining_pct=95.0 - seq * 0.0001,
    )


def fill(outbox: Outbox, count: int, tags: PointTags) -> dict[str, float]:
    """Append `count` readings; time validation+JSON, line_for and the outbox separately."""
    model_s = line_s = append_s = 0.0
    for start in range(0, count, APPEND_ROWS):
        t0 = time.perf_counter()
        models = [reading(n) for n in range(start, min(count, start + APPEND_ROWS))]
        payloads = [m.model_dump_json().encode() for m in models]
        t1 = time.perf_counter()
        lines = [line_for(m, tags) for m in models]
        t2 = time.perf_counter()
        outbox.append(
            [
                OutRecord("reading", m.record_id, m.pump_id, payload, line)
                for m, payload, line in zip(models, payloads, lines, strict=True)
            ]
        )
        t3 = time.perf_counter()
        model_s, line_s, append_s = model_s + t1 - t0, line_s + t2 - t1, append_s + t3 - t2
    return {
        "models_s": model_s,
        "line_for_us_per_point": 1e6 * line_s / count,
        "append_s": append_s,
    }


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(server: VictoriaMetrics | Influx1) -> int:
    """The server's process id (tests/servers.py keeps the Popen private)."""
    process = server._process
    assert process is not None
    return process.pid


def drain(settings: InfluxSettings, outbox: Outbox, name: str, pid: int) -> dict[str, Any]:
    """Drain the whole backlog with one sink; return rate, CPU per point and the sink's health."""
    poisoned: list[tuple[StoredRecord, str]] = []
    sink = InfluxSink(
        settings, outbox, on_poison=lambda r, why: poisoned.append((r, why)), name=name
    )
    stop = threading.Event()
    server_cpu, gateway_cpu = cpu_s(pid), time.process_time()
    started = time.perf_counter()
    rows = sink.drain(stop)
    elapsed = time.perf_counter() - started
    gateway_cpu, server_cpu = time.process_time() - gateway_cpu, cpu_s(pid) - server_cpu
    health = sink.health()
    sink.close()
    written = max(1, health.delivered)
    return {
        "rows": rows,
        "seconds": elapsed,
        "points_per_s": health.delivered / elapsed,
        "gateway_cpu_us_per_point": 1e6 * gateway_cpu / written,
        "server_cpu_us_per_point": 1e6 * server_cpu / written,
        "written": health.delivered,
        "batches": health.counters["batches"],
        "retries": health.counters["retries"],
        "poisoned": len(poisoned),
    }


def vm_count(server: VictoriaMetrics, count: int) -> int:
    """Points of pump_reading_seq that VictoriaMetrics holds (polls until all are searchable)."""
    span_s = 60 * (count // PUMPS + 2) + 86_400  # the window (end - span, end] covers T0
    end_s = int((T0 + timedelta(seconds=span_s - 3600)).timestamp())
    query = urllib.parse.urlencode(
        {"query": f"sum(count_over_time(pump_reading_seq[{span_s}s]))", "time": end_s}
    )
    deadline = time.monotonic() + 60
    landed = 0
    while time.monotonic() < deadline:
        urllib3.request("GET", f"{server.url}/internal/force_flush", retries=False)
        answer = urllib3.request("GET", f"{server.url}/api/v1/query?{query}", retries=False)
        result = json.loads(answer.data)["data"]["result"]
        landed = int(float(result[0]["value"][1])) if result else 0
        if landed >= count:
            break
        time.sleep(0.5)
    return landed


def influx1_count(server: Influx1) -> int:
    """Points of pump_reading that InfluxDB 1.x holds."""
    answer = server.query('SELECT count("seq") FROM "pump_reading"', DATABASE)
    return int(answer["results"][0]["series"][0]["values"][0][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="readings in the backlog")
    parser.add_argument("--batch-size", type=int, default=5000, help="rows per write request")
    parser.add_argument("--no-gzip", action="store_true", help="send uncompressed bodies")
    parser.add_argument("--only", choices=["vm", "influx1"], help="drain to one server only")
    args = parser.parse_args()

    common: dict[str, Any] = {"batch_size": args.batch_size, "gzip": not args.no_gzip}
    results: dict[str, Any] = {"count": args.count, **common, "load_avg_at_start": os.getloadavg()}
    table: list[tuple[str, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        workdir = Path(tmp)
        outbox = Outbox(
            workdir / "outbox.db",
            ["vm", "influx1"],
            durability="normal",
            max_pending=args.count + 1,
        )
        print(f"filling the outbox with {args.count:,} readings ...", flush=True)
        results["fill"] = fill(outbox, args.count, PointTags("bench", "station-1"))
        print(f"  {json.dumps(results['fill'])}", flush=True)
        if args.only in (None, "vm"):
            with VictoriaMetrics(workdir / "vm") as vm:
                settings = InfluxSettings(url=vm.url, org="bench", bucket="pumps", **common)
                run = drain(settings, outbox, "vm", server_pid(vm))
                run["landed"] = vm_count(vm, args.count)
            results["victoria_metrics_v2"] = run
            table.append(("VictoriaMetrics 1.79", "v2 (influxdb-client)", run))
        if args.only in (None, "influx1"):
            with Influx1(workdir / "influx1") as influx:
                influx.create_database(DATABASE)
                settings = InfluxSettings(url=influx.url, api="v1", bucket=DATABASE, **common)
                run = drain(settings, outbox, "influx1", server_pid(influx))
                run["landed"] = influx1_count(influx)
            results["influxdb1_v1"] = run
            table.append(("InfluxDB 1.6", "v1 (urllib3)", run))
        outbox.close()
    print_table(
        f"Drain of {args.count:,} readings, batch {args.batch_size}, gzip {common['gzip']}",
        [
            "server",
            "api",
            "points/s",
            "s",
            "gw CPU µs/pt",
            "db CPU µs/pt",
            "retries",
            "poisoned",
            "landed",
        ],
        [
            [
                server,
                api,
                f"{r['points_per_s']:,.0f}",
                f"{r['seconds']:.1f}",
                f"{r['gateway_cpu_us_per_point']:.1f}",
                f"{r['server_cpu_us_per_point']:.1f}",
                r["retries"],
                r["poisoned"],
                f"{r['landed']:,}",
            ]
            for server, api, r in table
        ],
    )
    vm_run = results.get("victoria_metrics_v2")
    if vm_run is not None:
        verdict = "meets" if vm_run["points_per_s"] >= TARGET_VM_POINTS_PER_S else "MISSES"
        print(f"\nVictoriaMetrics {verdict} the {TARGET_VM_POINTS_PER_S:,} points/s target")
        results["target_vm_points_per_s"] = TARGET_VM_POINTS_PER_S
    results["load_avg_at_end"] = os.getloadavg()
    print(f"wrote {write_results('drain', results)}")


if __name__ == "__main__":
    main()
