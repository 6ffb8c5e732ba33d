"""Codec throughput on one core for a typical reading frame: decode, validate, and both.

Run: .venv/bin/python -m bench.bench_codec [--frames N] [--rounds R]
Targets: >= 100,000 frames/s decoded (FrameDecoder.feed over a large buffer in 4 KiB chunks)
and >= 50,000 frames/s validated (message_from_frame). Writes bench/results/codec.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

from bench.common import print_table, write_results
from schemas.codec import Frame, FrameDecoder, encode_message, message_from_frame
from schemas.models import BatteryState, DeviceAlarm, Drug, Priority, PumpState, Reading

CHUNK_BYTES = 4096
DECODE_TARGET_PER_S = 100_000
VALIDATE_TARGET_PER_S = 50_000
RECEIVED_AT = datetime(2025, 3, 1, 8, 0, 5, tzinfo=UTC)


def typical_reading(seq: int) -> Reading:
    """A reading as a pump sends it every minute: one alarm, every optional field set."""
    return Reading(
        pump_id="P0001", boot_id="3fa2c1d0", seq=seq,
        device_time=datetime(2025, 3, 1, 8, 0, 1, tzinfo=UTC), received_at=RECEIVED_AT,
        drug=Drug.MORPHINE, pump_state=PumpState.RUNNING, reservoir_ml=12.25,
        reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=2.0, basal_rate_ml_per_day=0.5,
        delivered_total_ml=1234.5, bolus_count_24h=2, battery_state=BatteryState.ERI,
        battery_remaining_pct=8.0, alarms=(DeviceAlarm(code="eri", priority=Priority.MEDIUM),),
    )  # fmt: skip


def decode_all(stream: bytes) -> list[Frame]:
    """Feed the stream in 4 KiB chunks; return the frames (all of them must be good)."""
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(stream), CHUNK_BYTES):
        for result in decoder.feed(stream[start : start + CHUNK_BYTES]):
            assert isinstance(result, Frame), result
            frames.append(result)
    return frames


def validate_all(frames: list[Frame]) -> None:
    for frame in frames:
        message_from_frame(frame, RECEIVED_AT)


def rate(work: Callable[[], object], count: int, rounds: int) -> dict[str, float]:
    """Frames per second over several rounds, by CPU time of this process and by wall clock.

    CPU time is the one-core figure: it does not count time the process waited for a CPU
    on a shared machine. Wall time is shown beside it.
    """
    cpu_rates, wall_rates = [], []
    for _ in range(rounds):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        work()
        cpu_rates.append(count / (time.process_time() - cpu_start))
        wall_rates.append(count / (time.perf_counter() - wall_start))
    return {
        "cpu_median_per_s": statistics.median(cpu_rates),
        "cpu_best_per_s": max(cpu_rates),
        "wall_median_per_s": statistics.median(wall_rates),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--frames", type=int, default=50_000, help="frames per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    raw_frames = [encode_message(typical_reading(seq)) for seq in range(args.frames)]
    stream = b"".join(raw_frames)
    frames = decode_all(stream)
    assert len(frames) == args.frames

    results = {
        "decode": rate(lambda: decode_all(stream), args.frames, args.rounds),
        "validate": rate(lambda: validate_all(frames), args.frames, args.rounds),
        "decode_and_validate": rate(
            lambda: validate_all(decode_all(stream)), args.frames, args.rounds
        ),
    }
    targets = {"decode": DECODE_TARGET_PER_S, "validate": VALIDATE_TARGET_PER_S}
    rows = [
        [name, f"{r['cpu_median_per_s']:,.0f}", f"{r['cpu_best_per_s']:,.0f}",
         f"{r['wall_median_per_s']:,.0f}", f"{targets[name]:,}" if name in targets else "-",
         ("ok" if r["cpu_median_per_s"] >= targets[name] else "BELOW") if name in targets else "-"]
        for name, r in results.items()
    ]  # fmt: skip
    frame_bytes = len(raw_frames[0])
    print_table(
        f"Codec, one core, typical reading frame of {frame_bytes} bytes, "
        f"{args.frames:,} frames x {args.rounds} rounds (frames/s)",
        ["stage", "cpu median", "cpu best", "wall median", "target", "status"],
        rows,
    )
    path = write_results(
        "codec",
        {
            "frame_bytes": frame_bytes,
            "frames_per_round": args.frames,
            "rounds": args.rounds,
            "chunk_bytes": CHUNK_BYTES,
            "targets_per_s": targets,
            "results": results,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
