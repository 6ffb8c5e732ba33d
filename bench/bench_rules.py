"""Alert engine throughput on one core: readings/s evaluated, and the cost of its saved state:
every row (what a restart reads), and the rows one pump's alert change leaves to save.

Messages are built before timing (validation is the codec's cost, not the engine's).
Target: >= 200,000 readings/s when nothing changes.

Run: .venv/bin/python -m bench.bench_rules
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench.common import print_table, write_results
from gateway.rules import AlertEngine, RulesConfig
from schemas.models import Drug, PumpState, Reading

T0 = datetime(2024, 3, 1, tzinfo=UTC)
READINGS = 200_000
REPEATS = 5
READING_INTERVAL_S = 60.0
BASAL_ML_PER_DAY = 0.5
TARGET_READINGS_PER_S = 200_000
SAVE_REPEATS = 9


def _readings(n: int, pumps: int, reservoir_ml: Callable[[int], float]) -> list[Reading]:
    """n readings spread round-robin over `pumps` pumps, one per minute of pump time each."""
    out = []
    for i in range(n):
        k, pump = divmod(i, pumps)
        t = T0 + timedelta(seconds=k * READING_INTERVAL_S)
        out.append(Reading(
            pump_id=f"P{pump:04d}", boot_id="b1", seq=k + 1, device_time=t, received_at=t,
            drug=Drug.MORPHINE, pump_state=PumpState.RUNNING, reservoir_ml=reservoir_ml(i),
            reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=2.0,
            basal_rate_ml_per_day=BASAL_ML_PER_DAY,
            delivered_total_ml=100.0 + k * BASAL_ML_PER_DAY * READING_INTERVAL_S / 86400.0,
        ))
    return out


def _run(readings: list[Reading]) -> tuple[float, float, int, AlertEngine]:
    """Best readings/s (CPU time, wall time) over REPEATS fresh engines, transitions, engine.

    CPU time is what one core spends; wall time also counts time other processes took.
    """
    best_cpu_s = best_wall_s = float("inf")
    transitions = 0
    engine = AlertEngine(RulesConfig())
    for _ in range(REPEATS):
        engine = AlertEngine(RulesConfig())
        on_message = engine.on_message
        cpu0, wall0 = time.process_time(), time.perf_counter()
        transitions = sum(len(on_message(r, r.received_at)) for r in readings)
        best_cpu_s = min(best_cpu_s, time.process_time() - cpu0)
        best_wall_s = min(best_wall_s, time.perf_counter() - wall0)
    return len(readings) / best_cpu_s, len(readings) / best_wall_s, transitions, engine


def _rows_ms(engine: AlertEngine) -> tuple[float, int]:
    """ms and bytes to serialise every row of the state."""
    started = time.perf_counter()
    rows = engine.state_rows()
    rows_ms = 1000 * (time.perf_counter() - started)
    return rows_ms, sum(len(row) for row in rows.values())


def _one_change_ms(engine: AlertEngine, last: Reading) -> tuple[float, int, int]:
    """Median ms and bytes of changed_state() after a reading that moves one pump's alert
    (the reservoir crosses the alarm volume each time), and the transitions it made."""
    engine.changed_state()  # everything saved: only what follows is new
    times_ms, sizes, transitions = [], [], 0
    for k in range(1, SAVE_REPEATS + 1):
        t = last.device_time + timedelta(seconds=k * READING_INTERVAL_S)
        reservoir_ml = 15.0 if (last.reservoir_ml < 2.0) == (k % 2 == 1) else 1.5
        reading = last.model_copy(update={
            "seq": last.seq + k, "device_time": t, "received_at": t, "reservoir_ml": reservoir_ml,
        })  # fmt: skip
        transitions += len(engine.on_message(reading, t))
        started = time.perf_counter()
        rows = engine.changed_state()
        times_ms.append(1000 * (time.perf_counter() - started))
        sizes.append(sum(len(row or b"") for row in rows.values()))
    return statistics.median(times_ms), int(statistics.median(sizes)), transitions


def main() -> None:
    cases: dict[str, dict[str, float]] = {}
    table = []
    scenarios: list[tuple[str, str, int, Callable[[int], float]]] = [
        ("quiet_1_pump", "1 pump, nothing changes", 1, lambda i: 15.0),
        ("quiet_1000_pumps", "1000 pumps, nothing changes", 1000, lambda i: 15.0),
        ("alert_on_1_pump", "1 pump, low reservoir on", 1, lambda i: 1.5),
        ("churn_1_pump", "1 pump, start/latch every reading", 1,
         lambda i: 1.5 if i % 2 else 15.0),
    ]
    for name, label, pumps, reservoir_ml in scenarios:
        readings = _readings(READINGS if name != "churn_1_pump" else 20_000, pumps, reservoir_ml)
        per_s, wall_per_s, transitions, engine = _run(readings)
        rows_ms, rows_bytes = _rows_ms(engine)
        save_ms, save_bytes, save_transitions = _one_change_ms(engine, readings[-1])
        cases[name] = {"readings_per_s": per_s, "wall_readings_per_s": wall_per_s,
                       "transitions": transitions, "readings": len(readings),
                       "state_rows_ms": rows_ms, "state_rows_bytes": rows_bytes,
                       "one_change_save_ms": save_ms, "one_change_save_bytes": save_bytes,
                       "one_change_transitions": save_transitions}
        table.append([label, f"{per_s:,.0f}", f"{1e6 / per_s:.2f}", f"{wall_per_s:,.0f}",
                      transitions, f"{rows_ms:.1f}", f"{rows_bytes:,}", f"{save_ms:.3f}",
                      f"{save_bytes:,}"])
    print_table(f"Alert engine, one core (best of {REPEATS}; one change: median of "
                f"{SAVE_REPEATS})",
                ["scenario", "readings/s (CPU)", "us/reading", "readings/s (wall)",
                 "transitions", "all rows ms", "all rows bytes", "one change ms",
                 "one change bytes"], table)
    quiet = cases["quiet_1_pump"]["readings_per_s"]
    verdict = "meets" if quiet >= TARGET_READINGS_PER_S else "MISSES"
    print(f"\nquiet path {quiet:,.0f} readings/s {verdict} the target of "
          f"{TARGET_READINGS_PER_S:,} readings/s")
    results = {"target_readings_per_s": TARGET_READINGS_PER_S, "cases": cases}
    print(f"wrote {write_results('rules', results)}")


if __name__ == "__main__":
    main()
