"""Outbox cost of each durability setting: rows/s committed with SQLite synchronous FULL vs NORMAL.

Run: .venv/bin/python -m bench.bench_outbox
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Literal

from bench.common import print_table, write_results
from gateway.outbox import Outbox
from gateway.records import OutRecord

PAYLOAD_BYTES = 420  # a typical reading's JSON
SECONDS_PER_CASE = 2.0


def _records(n: int, start: int) -> list[OutRecord]:
    payload = b"x" * PAYLOAD_BYTES
    line = b"pump_reading,site=s,station=t,pump=P0001 reservoir_ml=12.5 1"
    return [OutRecord("reading", f"P0001:b:{start + i}", "P0001", payload, line) for i in range(n)]


def measure(
    durability: Literal["full", "normal"], batch_rows: int, workdir: Path
) -> dict[str, float]:
    outbox = Outbox(
        workdir / f"{durability}-{batch_rows}.db", ["mqtt", "influx"], durability=durability
    )
    rows = commits = 0
    started = time.perf_counter()
    while time.perf_counter() - started < SECONDS_PER_CASE:
        outbox.append(_records(batch_rows, rows))
        rows += batch_rows
        commits += 1
    elapsed = time.perf_counter() - started
    outbox.close()
    return {"rows_per_s": rows / elapsed, "commit_ms": 1000 * elapsed / commits}


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    table = []
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        for durability in ("full", "normal"):  # type: Literal["full", "normal"]
            for batch_rows in (1, 10, 100, 1000):
                r = measure(durability, batch_rows, Path(tmp))
                results[f"{durability}/{batch_rows}"] = r
                table.append(
                    [durability, batch_rows, f"{r['rows_per_s']:,.0f}", f"{r['commit_ms']:.3f}"]
                )
    print_table(
        "Outbox append (one transaction per batch)",
        ["synchronous", "rows/commit", "rows/s", "ms/commit"],
        table,
    )
    print(f"\nwrote {write_results('outbox', {'cases': results})}")


if __name__ == "__main__":
    main()
