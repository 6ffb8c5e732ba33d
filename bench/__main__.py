"""The whole benchmark suite in one command: `.venv/bin/python -m bench` (or `make bench`).

Runs every benchmark module in turn, each as its own process, against real Mosquitto,
VictoriaMetrics and InfluxDB 1.x processes (bench/rig.py, tests/servers.py), with sizes
chosen so the whole suite takes under 15 minutes on 2 cores. It times each one, collects
the JSON each one writes, prints one table of figures against their targets (issue 12's,
and where it sets none issue 6's and the modules' own) and writes bench/results.json.
Nothing here is a timed assertion: a missed target is a row that says "missed". Only a
benchmark that fails (non-zero exit, no JSON, a timeout) makes the exit status non-zero;
the others still run.

  --only gateway,latency   run these suites only; the others' figures are kept from the
                           previous results file
  --quick                  small sizes, a smoke check: writes bench/results-quick.json
                           ("quick": true) and leaves bench/results/ and results.json alone

Each module runs as `python -m bench.bench_x ARGS` would, except that it writes its JSON
into a fresh directory (bench.common.RESULTS_DIR is pointed there before the module is
imported), so a run reads exactly what it measured. A full run then merges each JSON into
bench/results/<name>.json, as the module itself would have written it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, machine, print_table
from bench.rig import load_avg, machine_cpu

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO / "bench" / "results.json"
QUICK_RESULTS_PATH = REPO / "bench" / "results-quick.json"
STEP_TIMEOUT_S = 600.0
INTERRUPT_GRACE_S = 60.0
"""After SIGINT, a benchmark has this long to stop its servers before SIGKILL."""
RUNNER = (
    "import runpy, sys\n"
    "from pathlib import Path\n"
    "import bench.common\n"
    "bench.common.RESULTS_DIR = Path(sys.argv[1])\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)
"""`python -c RUNNER DIR MODULE ARGS...`: `python -m MODULE ARGS...` writing JSON into DIR."""


# --- what runs, and at which sizes ---------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One benchmark process: its module and its arguments for a full and a quick run."""

    module: str
    full: tuple[str, ...]
    quick: tuple[str, ...]

    def args(self, quick: bool) -> tuple[str, ...]:
        return self.quick if quick else self.full

    def label(self, quick: bool) -> str:
        """The module's short name, and its case where it takes one (bench_gateway)."""
        case = [a for a in self.args(quick)[:1] if not a.startswith("-")]
        return " ".join([self.module.removeprefix("bench."), *case])


@dataclass(frozen=True)
class Suite:
    """A named group of steps that together write bench/results/<result>.json."""

    name: str
    result: str
    steps: tuple[Step, ...]


def _one(name: str, module: str, full: Sequence[str], quick: Sequence[str]) -> Suite:
    """A suite of one step whose JSON is named after the suite."""
    return Suite(name, name, (Step(module, tuple(full), tuple(quick)),))


GATEWAY = "bench.bench_gateway"
LATENCY = "bench.bench_latency"
SUITES: tuple[Suite, ...] = (
    _one("codec", "bench.bench_codec", ["--frames", "50000", "--rounds", "5"],
         ["--frames", "2000", "--rounds", "1"]),
    _one("rules", "bench.bench_rules", [], []),
    _one("alarms", "bench.bench_alarms", [], ["--quick"]),
    _one("outbox", "bench.bench_outbox", [], []),
    _one("simulator", "bench.bench_simulator",
         ["--pumps", "1", "10", "100", "--count", "1000", "--rounds", "3"],
         ["--pumps", "100", "--count", "100", "--rounds", "1"]),
    _one("mqtt_sink", "bench.bench_mqtt_sink", ["--count", "20000", "--repeat", "1"],
         ["--count", "2000", "--repeat", "1"]),
    _one("ingest", "bench.bench_ingest", ["--count", "100000", "--workers", "1", "2"],
         ["--count", "20000", "--workers", "1", "2"]),
    _one("drain", "bench.bench_drain", ["--count", "1000000"], ["--count", "20000"]),
    Suite("gateway", "gateway", (
        Step(GATEWAY, ("steady", "--pumps", "100", "--pumps", "1000", "--window", "30"),
             ("steady", "--pumps", "100", "--pumps", "1000", "--window", "5")),
        Step(GATEWAY, ("saturation", "--count", "1000", "--repeat", "1"),
             ("saturation", "--count", "50")),
        Step(GATEWAY, ("baseline", "--count", "1000", "--repeat", "1"),
             ("baseline", "--count", "50")),
    )),
    _one("latency", LATENCY, ["--seconds", "10"], ["--seconds", "1"]),
    Suite("latency_nodelay", "latency_broker_nodelay", (
        Step(LATENCY, ("--seconds", "10", "--broker-nodelay"),
             ("--seconds", "1", "--broker-nodelay")),
    )),
    _one("interop", "bench.bench_interop", ["--count", "100000", "--mqtt-count", "20000"],
         ["--count", "5000", "--mqtt-count", "2000", "--builder-readings", "50"]),
    _one("dashboard", "bench.bench_dashboard", ["--pumps", "1000", "--soak", "180"],
         ["--pumps", "100", "--soak", "20", "--warmup", "5"]),
)  # fmt: skip
"""In run order. Full sizes: the 1,000,000-reading drain and the 100,000-reading interop
drains are their issues'; the rest are cut
from the modules' defaults (gateway steady window 60 -> 30 s, saturation and baseline 200,000
-> 100,000 readings, one run each, latency phases 20 -> 10 s, MQTT sink 50,000 -> 20,000
records once per protocol) to keep the suite under 15 minutes; ingest drains 100,000
readings (40,000 before: a few seconds at issue 12's rate). Quick sizes are smaller."""


# --- the figures and their targets ----------------------------------------------------------

Key = str | dict[str, Any]
"""A dict key, or for a list the fields its wanted element must have ({"pumps": 100})."""


def dig(data: Any, *path: Key) -> Any:
    """The value at `path` in nested dicts and lists, or None where any part is missing."""
    for key in path:
        if isinstance(key, dict) and isinstance(data, list):
            data = next((x for x in data if all(x.get(k) == v for k, v in key.items())), None)
        elif isinstance(key, str) and isinstance(data, dict):
            data = data.get(key)
        else:
            return None
    return data


Check = Callable[[dict[str, Any]], str | None]
"""A suite's JSON -> what makes a figure invalid (lost data), or None."""


@dataclass(frozen=True)
class Figure:
    """One row of the summary: where the value is, its unit and target (None: for information)."""

    suite: str
    label: str
    path: tuple[Key, ...]
    unit: str
    target: float | None = None
    upper_bound: bool = False
    """True: the value must stay below the target; False: reach at least the target."""
    check: Check | None = None
    note: Check | None = None
    """Context printed beside the value that does not change the verdict."""
    source: str = field(default="issue 6")
    derive: Callable[[Any], Any] | None = None
    """Where the figure is computed from the value at `path` rather than being that value."""
    or_equal: bool = False
    """With upper_bound: the value may also equal the target (issue 12's "<=")."""

    def value(self, data: dict[str, Any]) -> Any:
        found = dig(data, *self.path)
        return found if self.derive is None or found is None else self.derive(found)


def _complete(case: str) -> Check:
    return lambda data: None if dig(data, case, "complete") else "not every reading arrived"


def _none_missing(phase: str) -> Check:
    def check(data: dict[str, Any]) -> str | None:
        missing = dig(data, "phases", phase, "missing")
        return None if missing == 0 else f"{missing} never arrived"

    return check


def _all_landed(server: str) -> Check:
    def check(data: dict[str, Any]) -> str | None:
        landed, count = dig(data, server, "landed"), data.get("count")
        return None if landed == count else f"{landed} of {count} points landed"

    return check


ISSUE_12 = "issue 12"


def _at_most(suite: str, label: str, path: tuple[Key, ...], unit: str, target: float,
             check: Check | None = None) -> Figure:
    """A figure with one of issue 12's upper bounds: met at or below `target`."""
    return Figure(suite, label, path, unit, target, upper_bound=True, or_equal=True, check=check,
                  source=ISSUE_12)  # fmt: skip


def _latency(suite: str, broker: str, *, alert_judged: bool) -> list[Figure]:
    """The latency rows of one broker setting: issue 12 judges both settings' readings; the
    alert row keeps issue 6's target for the broker as deploy/ configures it."""
    return [
        *(_at_most(suite, f"Frame -> subscriber p99 at {rate:,} readings/s ({broker})",
                   ("phases", f"readings_{rate}_per_s", "p99_ms"), "ms", target,
                   _none_missing(f"readings_{rate}_per_s"))
          for rate, target in ((100, 2.5), (1000, 5.0))),
        Figure(suite, f"Threshold crossing -> alert p99 ({broker})",
               ("phases", "alert", "p99_ms"), "ms", 50 if alert_judged else None, True,
               _none_missing("alert")),
    ]  # fmt: skip


def _delivered(case: str) -> Check:
    """Says how many readings a plain baseline delivered, when it lost some."""

    def note(data: dict[str, Any]) -> str | None:
        got, sent = dig(data, case, "received"), dig(data, case, "expected_readings")
        return None if got is None or got == sent else f"baseline delivered {got:,} of {sent:,}"

    return note


def _ratio(consumer: str, name: str) -> Figure:
    return Figure("gateway", f"Gateway / plain baseline, readings/s ({consumer})",
                  ("ratios", f"gateway_vs_plain_{name}", "throughput"), "x", 3,
                  note=_delivered(f"baseline_plain_{name}"))  # fmt: skip


def _ingest_rate(case: dict[str, Any]) -> float | None:
    """Points over seconds from starting the workers to every point written."""
    points, seconds = case.get("points"), case.get("seconds_with_start")
    return points / seconds if points and seconds else None


def _ingest(workers: int, target: float | None) -> list[Figure]:
    """Sustained (first message in to last point written) and start-up-included rates."""
    name = f"pumpgw ingest, {workers} worker{'s' if workers > 1 else ''}, to VictoriaMetrics"
    case: Key = {"workers": workers}
    return [
        Figure("ingest", f"{name}, sustained (first message in to last point written)",
               ("results", case, "sustained_points_per_s"), "points/s", target,
               source=ISSUE_12),
        Figure("ingest", f"{name}, start-up included", ("results", case), "points/s",
               derive=_ingest_rate),
    ]  # fmt: skip


def _no_backlog(data: dict[str, Any]) -> str | None:
    return "the page's backlog grew" if dig(data, "soak", "backlog_growing") else None


MODULE = "module's own target"
ISSUE_14 = "issue 14"


def _interop_complete(case: str) -> Check:
    def check(data: dict[str, Any]) -> str | None:
        return None if dig(data, case, "complete") else f"{case}: not every reading arrived"

    return check


INTEROP_FIGURES: tuple[Figure, ...] = (
    Figure("interop", "HL7 PCD-01 ORU^R01 over MLLP, backlog drain (batched per pump and 100 min)",
           ("hl7", "readings_per_s"), "readings/s", 5_000, source=ISSUE_14,
           check=_interop_complete("hl7")),
    Figure("interop", "HL7 test receiver CPU during that drain", ("hl7", "receiver_cpu_s"),
           "CPU s"),
    Figure("interop", "FHIR R4 transaction Bundles, backlog drain (200 records/Bundle)",
           ("fhir", "readings_per_s"), "readings/s", 2_000, source=ISSUE_14,
           check=_interop_complete("fhir")),
    Figure("interop", "FHIR test endpoint CPU during that drain", ("fhir", "receiver_cpu_s"),
           "CPU s"),
    Figure("interop", "MQTT drain throughput lost while HL7 and FHIR drain too",
           ("mqtt_cost", "mqtt_throughput_loss"), "fraction", 0.10, True, source=ISSUE_14),
)  # fmt: skip


ISSUE_10 = "issue 10"
FIGURES: tuple[Figure, ...] = (
    Figure("gateway", "End to end, QoS 1, durability full, MQTT + VictoriaMetrics",
           ("saturation_influx", "sustained_per_s"), "readings/s", 15_000,
           check=_complete("saturation_influx"), source=ISSUE_12),
    Figure("gateway", "End to end, QoS 1, durability full, MQTT only",
           ("saturation_mqtt_only", "sustained_per_s"), "readings/s",
           check=_complete("saturation_mqtt_only")),
    _ratio("MQTT + per-point InfluxDB writes", "influx_sync"),
    _ratio("MQTT + batching write_api", "influx_batching"),
    _ratio("MQTT only", "mqtt_only"),
    *_latency("latency_nodelay", "Mosquitto as deployed: set_tcp_nodelay true",
              alert_judged=True),
    *_latency("latency", "Mosquitto defaults", alert_judged=False),
    _at_most("gateway", "1,000 pumps at 1 Hz: gateway CPU",
             ("steady_1000", "cpu_pct_of_one_core"), "% of a core", 12),
    _at_most("gateway", "1,000 pumps at 1 Hz: gateway RSS (max)",
             ("steady_1000", "rss_mb_max"), "MB", 64),
    _at_most("gateway", "100 pumps at 1 Hz: gateway CPU",
             ("steady_100", "cpu_pct_of_one_core"), "% of a core", 4),
    _at_most("gateway", "100 pumps at 1 Hz: gateway RSS (max)",
             ("steady_100", "rss_mb_max"), "MB", 64),
    Figure("drain", "Drain backlog to VictoriaMetrics",
           ("victoria_metrics_v2", "points_per_s"), "points/s", 100_000,
           check=_all_landed("victoria_metrics_v2")),
    Figure("drain", "Drain backlog to InfluxDB 1.x", ("influxdb1_v1", "points_per_s"),
           "points/s", check=_all_landed("influxdb1_v1")),
    *_ingest(1, 15_000),
    *_ingest(2, None),
    Figure("mqtt_sink", "MqttSink alone, MQTT 5, CPU per record",
           ("cases", {"protocol": "5"}, "cpu_us_per_record"), "µs"),
    Figure("codec", "Codec decode, one core", ("results", "decode", "cpu_median_per_s"),
           "frames/s", 100_000, source=MODULE),
    Figure("codec", "Codec validate, one core", ("results", "validate", "cpu_median_per_s"),
           "frames/s", 50_000, source=MODULE),
    Figure("rules", "Alert engine, nothing changes, one core",
           ("cases", "quiet_1_pump", "readings_per_s"), "readings/s", 200_000, source=MODULE),
    Figure("alarms", "Alarm burden: normal ward with refills, PH + PM starts",
           ("summary", "ward_ph_pm_starts"), "starts", 1, True, source=ISSUE_10),
    Figure("alarms", "Alarm burden: false PH/PM starts over every fault scenario",
           ("summary", "false_ph_pm_starts"), "starts", 1, True, source=ISSUE_10),
    Figure("alarms", "Alarm burden: missed alerts over every scenario",
           ("summary", "missed_alerts"), "alerts", 1, True, source=ISSUE_10),
    Figure("alarms", "Alarm burden: cases meeting every target (ward and scenarios)",
           ("summary", "met_share"), "share", 1.0, source=ISSUE_10),
    Figure("outbox", "Outbox append, synchronous FULL, 100 rows per commit",
           ("cases", "full/100", "rows_per_s"), "rows/s"),
    Figure("dashboard", "Dashboard: first paint of 200 pumps from retained state",
           ("first_paint_200", "first_paint_ms"), "ms", 1000, True, source="issue 11"),
    Figure("dashboard", "Dashboard, 1,000 pumps at 1 Hz: long tasks > 50 ms",
           ("soak", "long_tasks_per_min"), "per min", 1, True, source="issue 11"),
    Figure("dashboard", "Dashboard, 1,000 pumps at 1 Hz: draw time per frame p95",
           ("soak", "draw_ms_p95"), "ms", 16, True, source="issue 11"),
    Figure("dashboard", "Dashboard, 1,000 pumps at 1 Hz: JS heap growth per 10 min",
           ("soak", "heap_growth_mb_per_10_min"), "MB", 20, True, source="issue 11"),
    Figure("dashboard", "Dashboard, 1,000 pumps at 1 Hz: reading age on arrival, last window",
           ("soak", "age_ms_p50_last_window"), "ms", check=_no_backlog, source="issue 11"),
    Figure("simulator", "Simulator over TCP, 100 pumps, read back",
           ("cases", {"pumps": 100}, "reader_frames_per_s"), "frames/s", 10_000,
           source=MODULE),
    *INTEROP_FIGURES,
)  # fmt: skip


def verdict(figure: Figure, value: Any, problem: str | None) -> str:
    """met / missed against the target; "-" without one; "no data" without a value."""
    if not isinstance(value, int | float):
        return "no data"
    if problem is not None:
        return "missed"
    if figure.target is None:
        return "-"
    if figure.upper_bound:
        met = value <= figure.target if figure.or_equal else value < figure.target
    else:
        met = value >= figure.target
    return "met" if met else "missed"


def summary_row(figure: Figure, suites: dict[str, Any]) -> dict[str, Any]:
    """One summary row, its value taken from the suite's JSON."""
    data = suites.get(figure.suite) or {}
    value = figure.value(data)
    problem = figure.check(data) if figure.check and data else None
    return {
        "suite": figure.suite,
        "figure": figure.label,
        "unit": figure.unit,
        "target": None if figure.target is None else _comparison(figure),
        "target_value": figure.target,
        "target_source": None if figure.target is None else figure.source,
        "measured": value,
        "verdict": verdict(figure, value, problem),
        "problem": problem,
        "note": figure.note(data) if figure.note and data else None,
        "from": _source_path(figure),
    }


def _comparison(figure: Figure) -> str:
    if not figure.upper_bound:
        return ">="
    return "<=" if figure.or_equal else "<"


def _source_path(figure: Figure) -> str:
    """Where the value came from, e.g. `gateway: steady_100.rss_mb_max`."""
    parts = [k if isinstance(k, str) else json.dumps(k) for k in figure.path]
    return f"{figure.suite}: {'.'.join(parts)}"


# --- running -------------------------------------------------------------------------------


def step_command(step: Step, quick: bool) -> str:
    """The equivalent command to type by hand (it writes bench/results/ itself)."""
    return shlex.join([".venv/bin/python", "-m", step.module, *step.args(quick)])


def run_step(step: Step, quick: bool, out_dir: Path) -> str | None:
    """Run one benchmark process; None if it succeeded, else what went wrong."""
    argv = [sys.executable, "-c", RUNNER, str(out_dir), step.module, *step.args(quick)]
    sys.stdout.flush()
    proc = subprocess.Popen(argv, cwd=REPO, start_new_session=True)
    try:
        code = proc.wait(STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _interrupt(proc)
        return f"timed out after {STEP_TIMEOUT_S:.0f} s"
    except KeyboardInterrupt:
        _interrupt(proc)
        raise
    return None if code == 0 else f"exit status {code}"


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the benchmark's process group (it stops its servers), then SIGKILL it."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(INTERRUPT_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_suite(
    suite: Suite, quick: bool, out_dir: Path
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run a suite's steps (all of them, even after a failure); its JSON and how it went."""
    started, load_start = time.monotonic(), load_avg()
    problems: list[str] = []
    for step in suite.steps:
        print(f"\n==> {suite.name}: {step_command(step, quick)}", flush=True)
        problem = run_step(step, quick, out_dir)
        if problem is not None:
            problems.append(f"{step.label(quick)}: {problem}")
    path = out_dir / f"{suite.result}.json"
    data: dict[str, Any] | None = json.loads(path.read_text()) if path.exists() else None
    if data is None:
        problems.append(f"wrote no {path.name}")
    run = {
        "commands": [step_command(s, quick) for s in suite.steps],
        "elapsed_s": round(time.monotonic() - started, 1),
        "load_avg": [load_start, load_avg()],
        "ok": not problems,
        "problems": problems,
    }
    print(f"==> {suite.name}: {'ok' if run['ok'] else 'FAILED'} in {run['elapsed_s']} s",
          flush=True)  # fmt: skip
    return data, run


def keep_in_results_dir(name: str, data: dict[str, Any]) -> None:
    """Merge a suite's JSON into bench/results/<name>.json (new keys win, others are kept)."""
    path = RESULTS_DIR / f"{name}.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}  # absent, or unreadable: this run's JSON replaces it
    path.write_text(json.dumps({**old, **data}, indent=2) + "\n")


# --- the command line ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    names = [s.name for s in SUITES]
    parser.add_argument("--only", help=f"comma-separated suites: {','.join(names)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke check")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    return args


def previous(path: Path, quick: bool) -> dict[str, Any]:
    """The results file an --only run merges into (empty if absent or of the other kind)."""
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data if bool(data.get("quick")) == quick else {}


def print_summary(runs: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print_table(
        "Suites",
        ["suite", "status", "elapsed s", "load start", "load end", "problem"],
        [[n, "ok" if r["ok"] else "FAILED", r["elapsed_s"], r["load_avg"][0][0],
          r["load_avg"][1][0], "; ".join(r["problems"]) or "-"] for n, r in runs.items()],
    )  # fmt: skip
    print_table(
        "Figures",
        ["figure", "target", "from", "measured", "verdict"],
        [[r["figure"], _target_text(r), r["target_source"] or "-", _measured_text(r),
          r["verdict"]] for r in rows],
    )  # fmt: skip


def _target_text(row: dict[str, Any]) -> str:
    if row["target"] is None:
        return "-"
    return f"{row['target']} {row['target_value']:,g} {row['unit']}"


def _measured_text(row: dict[str, Any]) -> str:
    if row["measured"] is None:
        return "-"
    text = f"{_number(row['measured'])} {row['unit']}"
    remarks = [r for r in (row["problem"], row.get("note")) if r]
    return text + (f" ({'; '.join(remarks)})" if remarks else "")


def _number(value: float) -> str:
    """Thousands separated; two decimals below 10, one below 1,000, none above."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def run_all(chosen: list[Suite], quick: bool, suites: dict[str, Any], runs: dict[str, Any]) -> None:
    """Run the chosen suites in order, filling `suites` (their JSON) and `runs` (how it went)."""
    with tempfile.TemporaryDirectory(prefix="pumpgw-bench-") as tmp:
        for suite in chosen:
            data, runs[suite.name] = run_suite(suite, quick, Path(tmp))
            suites.pop(suite.name, None)
            if data is not None:
                suites[suite.name] = data
                if not quick:
                    keep_in_results_dir(suite.result, data)


def machine_now(load_start: list[float]) -> dict[str, Any]:
    """The machine: Python, platform, CPU model, nproc, load averages at start and end."""
    return {**machine(), "cpu_model": machine_cpu(), "nproc": os.cpu_count(),
            "load_avg": {"start": load_start, "end": load_avg()}}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_path = QUICK_RESULTS_PATH if args.quick else RESULTS_PATH
    chosen = [s for s in SUITES if args.only is None or s.name in args.only]
    started_at, started, load_start = datetime.now(UTC), time.monotonic(), load_avg()
    old = previous(out_path, args.quick) if args.only else {}
    suites: dict[str, Any] = dict(old.get("suites", {}))
    runs: dict[str, Any] = dict(old.get("runs", {}))
    run_all(chosen, args.quick, suites, runs)
    rows = [summary_row(f, suites) for f in FIGURES]
    results = {
        "command": shlex.join([".venv/bin/python", "-m", "bench", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "started": started_at.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine_now(load_start),
        "suites": suites,
        "runs": runs,
        "kept_from_previous_run": sorted(set(suites) - {s.name for s in chosen}),
        "summary": rows,
    }
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(runs, rows)
    load = results["machine"]["load_avg"]
    print(f"\n{len(chosen)} suite(s) in {results['elapsed_s'] / 60:.1f} min, load average "
          f"{load['start']} -> {load['end']}; wrote {out_path}")  # fmt: skip
    failed = [s.name for s in chosen if not runs[s.name]["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
