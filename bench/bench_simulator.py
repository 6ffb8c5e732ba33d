"""Simulator throughput over TCP at --speed max, read back as the gateway would read it.

Run: .venv/bin/python -m bench.bench_simulator [--pumps 1 10 100] [--count N] [--rounds R]
Target: well over 10,000 frames/s for 100 pumps (a pyserial socket:// reader decoding every
frame with FrameDecoder). Writes bench/results/simulator.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import serial

from bench.common import print_table, write_results
from schemas.codec import Frame, FrameDecoder
from simulator.link import READER_SETTLE_S

TARGET_FRAMES_PER_S = 10_000
REPO = Path(__file__).resolve().parents[1]
READ_BYTES = 1 << 20


def one_run(pumps: int, count: int) -> dict[str, Any]:
    """Start a ward of `pumps`, read it all with pyserial; rates from both ends."""
    argv = [sys.executable, "-m", "simulator", "--transport", "tcp", "--pumps", str(pumps),
            "--scenario", "ward", "--count", str(count), "--speed", "max", "--seed", "1"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        port = serial.serial_for_url(proc.stdout.readline().decode().strip(), timeout=0.1)
        sending_from = time.perf_counter() + READER_SETTLE_S  # the simulator waits this long
        frames, last_byte_at = 0, 0.0
        decoder = FrameDecoder()
        while True:
            try:
                data = port.read(READ_BYTES)
            except serial.SerialException:
                break  # the simulator closed the line
            if data:
                last_byte_at = time.perf_counter()
                frames += sum(1 for item in decoder.feed(data) if isinstance(item, Frame))
            elif proc.poll() is not None:
                break
        port.close()
        summary = json.loads(proc.communicate(timeout=60)[0].decode().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert frames == summary["totals"]["frames_intact"], (frames, summary["totals"])
    return {
        "frames": frames,
        "reader_frames_per_s": frames / max(1e-3, last_byte_at - sending_from),
        "simulator_frames_per_s": summary["frames_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pumps", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--count", type=int, default=1000, help="readings per pump")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cases, rows = [], []
    for pumps in args.pumps:
        runs = [one_run(pumps, args.count) for _ in range(args.rounds)]
        reader = statistics.median(r["reader_frames_per_s"] for r in runs)
        sim = statistics.median(r["simulator_frames_per_s"] for r in runs)
        ok = pumps < 100 or reader > TARGET_FRAMES_PER_S
        cases.append({"pumps": pumps, "readings_per_pump": args.count, "frames": runs[0]["frames"],
                      "reader_frames_per_s": round(reader), "simulator_frames_per_s": round(sim),
                      "meets_target": ok})
        rows.append([pumps, runs[0]["frames"], f"{reader:,.0f}", f"{sim:,.0f}",
                     "ok" if ok else "BELOW TARGET"])
    print_table(f"Simulator over TCP at --speed max (median of {args.rounds}; target > "
                f"{TARGET_FRAMES_PER_S:,} frames/s at 100 pumps)",
                ["pumps", "frames", "reader frames/s", "simulator frames/s", "target"], rows)
    path = write_results("simulator", {"target_frames_per_s": TARGET_FRAMES_PER_S,
                                       "cases": cases})
    print(f"\nwrote {path}")
    return 0 if all(c["meets_target"] for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
