"""The simulator as a real process on a pty and on TCP, read back with pyserial."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import tty
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
import serial

from schemas.codec import Frame, FrameDecoder, FrameError, encode_ack, message_from_frame

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
RUN_TIMEOUT_S = 60.0
TYPE_NAMES = {"I": "info", "R": "reading", "E": "event"}


class Simulator:
    """A `python -m simulator` child process; its first stdout line is the line to open."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self._stderr = open(workdir / "pumpsim.log", "wb")  # noqa: SIM115
        self.log_path = workdir / "pumpsim.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdout is not None
        self._stdout: IO[bytes] = self.proc.stdout

    def first_line(self) -> str:
        ready, _, _ = select.select([self._stdout], [], [], START_TIMEOUT_S)
        assert ready, f"no address printed; see {self.log_path.read_text()}"
        return self._stdout.readline().decode().strip()

    def summary(self) -> dict[str, Any]:
        """Wait for exit; the last stdout line is the JSON summary."""
        out, _ = self.proc.communicate(timeout=RUN_TIMEOUT_S)
        lines = out.decode().splitlines()
        assert lines, f"no summary; log: {self.log_path.read_text()}"
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._stdout.close()
        self._stderr.close()


@contextmanager
def simulator(args: list[str], workdir: Path) -> Iterator[Simulator]:
    sim = Simulator(args, workdir)
    try:
        yield sim
    finally:
        sim.close()


class Reader:
    """Reads a line with pyserial, decodes it, and acknowledges what it stored."""

    def __init__(self, url: str) -> None:
        self.port = serial.serial_for_url(url, timeout=0.1)
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.errors: list[FrameError] = []
        self.last_seq: dict[tuple[str, str], int] = {}

    def read(self) -> int:
        """Read what is there (waiting up to the port timeout); return frames decoded."""
        try:
            data = self.port.read(65_536)
        except serial.SerialException:
            return -1  # the simulator closed the line
        items = self.decoder.feed(data)
        new = [i for i in items if isinstance(i, Frame)]
        self.errors.extend(i for i in items if isinstance(i, FrameError))
        self.frames.extend(new)
        for frame in new:
            self.last_seq[(frame.pump_id, frame.boot_id)] = frame.seq
        return len(new)

    def ack(self, upto: dict[tuple[str, str], int] | None = None) -> None:
        for (pump_id, boot_id), seq in (upto or self.last_seq).items():
            self.port.write(encode_ack(pump_id, boot_id, seq))

    def read_until_exit(self, sim: Simulator, ack: bool = True) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            got = self.read()
            if got > 0 and ack:
                self.ack()
            if got < 0 or (got == 0 and sim.proc.poll() is not None):
                break
        self.errors.extend(self.decoder.flush())

    def close(self) -> None:
        self.port.close()


def assert_counts_match(
    frames: list[Frame], errors: list[FrameError], summary: dict[str, Any]
) -> None:
    """What arrived equals what the simulator says it sent, pump by pump."""
    by_pump: dict[str, Counter[str]] = defaultdict(Counter)
    seqs: dict[str, set[int]] = defaultdict(set)
    for frame in frames:
        by_pump[frame.pump_id][TYPE_NAMES[frame.msg_type]] += 1
        seqs[frame.pump_id].add(frame.seq)
    for pump in summary["pumps"]:
        assert dict(by_pump[pump["pump_id"]]) == {k: v for k, v in pump["sent"].items() if v}
        every = set(range(pump["first_seq"], pump["last_seq"] + 1))
        sent_or_lost = seqs[pump["pump_id"]] | set(pump["damaged_seqs"])
        assert sent_or_lost | set(pump["unsent_seqs"]) == every  # unsent: during a dropout
        assert seqs[pump["pump_id"]].isdisjoint(pump["damaged_seqs"])
    totals = summary["totals"]
    assert len(errors) == totals["frames_damaged"] + totals["garbage_runs"]
    received_at = datetime.now(UTC)
    for frame in frames:
        message_from_frame(frame, received_at)  # every intact frame is a valid message


def test_pty_frames_read_with_pyserial_match_the_summary(tmp_path: Path) -> None:
    args = [
        "--transport",
        "pty",
        "--pumps",
        "3",
        "--scenario",
        "noisy-line",
        "--seed",
        "3",
        "--count",
        "400",
        "--speed",
        "max",
        "--wait-for-ack",
        "--ack-timeout",
        "20",
    ]
    with simulator(args, tmp_path) as sim:
        path = sim.first_line()
        assert path.startswith("/dev/")
        reader = Reader(path)
        try:
            reader.read_until_exit(sim)
        finally:
            reader.close()
        summary = sim.summary()
    assert sim.proc.returncode == 0
    assert summary["all_acked"] is True
    assert summary["totals"]["frames_damaged"] > 0
    assert_counts_match(reader.frames, reader.errors, summary)


def test_tcp_frames_read_with_pyserial_match_the_summary(tmp_path: Path) -> None:
    args = [
        "--transport",
        "tcp",
        "--listen",
        "127.0.0.1:0",
        "--pumps",
        "2",
        "--scenario",
        "noisy-line",
        "--seed",
        "4",
        "--count",
        "600",
        "--speed",
        "max",
        "--wait-for-ack",
    ]
    with simulator(args, tmp_path) as sim:
        url = sim.first_line()
        assert url.startswith("socket://127.0.0.1:")
        reader = Reader(url)
        try:
            reader.read_until_exit(sim)
        finally:
            reader.close()
        summary = sim.summary()
    assert sim.proc.returncode == 0
    assert summary["all_acked"] is True
    assert_counts_match(reader.frames, reader.errors, summary)


def test_ten_pump_ward_over_tcp(tmp_path: Path) -> None:
    args = [
        "--transport",
        "tcp",
        "--pumps",
        "10",
        "--scenario",
        "ward",
        "--seed",
        "5",
        "--count",
        "300",
        "--speed",
        "max",
        "--wait-for-ack",
    ]
    with simulator(args, tmp_path) as sim:
        reader = Reader(sim.first_line())
        try:
            reader.read_until_exit(sim)
        finally:
            reader.close()
        summary = sim.summary()
    assert sim.proc.returncode == 0
    assert len(summary["pumps"]) == 10
    assert {f.pump_id for f in reader.frames} == {f"P{i:04d}" for i in range(1, 11)}
    assert all(p["sent"]["reading"] > 0 for p in summary["pumps"])
    assert_counts_match(reader.frames, reader.errors, summary)


def test_reconnect_during_a_run_resends_unacknowledged_frames_first(tmp_path: Path) -> None:
    args = [
        "--transport",
        "tcp",
        "--pumps",
        "3",
        "--scenario",
        "normal",
        "--seed",
        "6",
        "--count",
        "300",
        "--speed",
        "6000",
        "--wait-for-ack",
    ]
    with simulator(args, tmp_path) as sim:
        url = sim.first_line()
        first = Reader(url)
        try:
            while len({f.pump_id for f in first.frames}) < 3 or len(first.frames) < 60:
                assert first.read() >= 0
            acked = {key: seq - 10 for key, seq in first.last_seq.items()}
            first.ack(acked)
        finally:
            first.close()
        assert sim.proc.poll() is None, "the run should still be going"
        second = Reader(url)
        try:
            second.read_until_exit(sim)
        finally:
            second.close()
        summary = sim.summary()
    assert sim.proc.returncode == 0
    assert summary["all_acked"] is True
    resent = summary["totals"]["retransmitted"]
    assert resent >= 30  # at least the ten unacknowledged frames of each pump
    head = second.frames[:resent]
    for pump_id in ("P0001", "P0002", "P0003"):
        block = [f.seq for f in head if f.pump_id == pump_id]
        assert block == list(range(block[0], block[0] + len(block)))  # in order, no gaps
        boot_id = next(f.boot_id for f in head if f.pump_id == pump_id)
        assert block[0] in (acked[(pump_id, boot_id)] + 1, 1)  # 1 if the ack was lost
        assert block[-1] >= first.last_seq[(pump_id, boot_id)]
    assert [f.pump_id for f in head] == sorted(f.pump_id for f in head)  # pump by pump
    unique = {(f.pump_id, f.seq): f for f in first.frames + second.frames}
    assert_counts_match(list(unique.values()), [], summary)


def test_serial_transport_writes_to_a_device_and_reads_acks(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    device = os.ttyname(slave)
    args = [
        "--transport",
        "serial",
        "--device",
        device,
        "--pumps",
        "2",
        "--scenario",
        "noisy-line",
        "--count",
        "200",
        "--speed",
        "max",
        "--wait-for-ack",
    ]
    decoder = FrameDecoder()
    frames: list[Frame] = []
    errors: list[FrameError] = []
    try:
        with simulator(args, tmp_path) as sim:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while sim.proc.poll() is None and time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.1)
                if not ready:
                    continue
                new = decoder.feed(os.read(master, 65_536))
                frames.extend(i for i in new if isinstance(i, Frame))
                errors.extend(i for i in new if isinstance(i, FrameError))
                last = {(f.pump_id, f.boot_id): f.seq for f in frames}
                os.write(master, b"".join(encode_ack(p, b, s) for (p, b), s in last.items()))
            summary = sim.summary()
    finally:
        os.close(master)
        os.close(slave)
    errors.extend(decoder.flush())
    assert sim.proc.returncode == 0
    assert summary["all_acked"] is True
    assert_counts_match(frames, errors, summary)


def test_wait_for_ack_gives_up_after_the_timeout_when_nobody_acks(tmp_path: Path) -> None:
    args = [
        "--transport",
        "tcp",
        "--count",
        "20",
        "--speed",
        "max",
        "--wait-for-ack",
        "--ack-timeout",
        "1",
    ]
    with simulator(args, tmp_path) as sim:
        reader = Reader(sim.first_line())
        try:
            reader.read_until_exit(sim, ack=False)
        finally:
            reader.close()
        summary = sim.summary()
    assert sim.proc.returncode == 1
    assert summary["all_acked"] is False
    assert summary["totals"]["unacked"] == len(reader.frames) > 20


def test_sigterm_stops_an_unbounded_run_with_a_summary(tmp_path: Path) -> None:
    args = ["--transport", "tcp", "--pumps", "2", "--speed", "600"]
    with simulator(args, tmp_path) as sim:
        reader = Reader(sim.first_line())
        try:
            while len(reader.frames) < 10:
                assert reader.read() >= 0
            os.kill(sim.proc.pid, signal.SIGTERM)
            reader.read_until_exit(sim, ack=False)
        finally:
            reader.close()
        summary = sim.summary()
    assert sim.proc.returncode == 0
    assert summary["stopped_by"] == "signal"
    assert_counts_match(reader.frames, reader.errors, summary)


def test_file_capture_decodes_to_the_summary(tmp_path: Path) -> None:
    capture = tmp_path / "capture.frames"
    args = [
        "--transport",
        "file",
        "--output",
        str(capture),
        "--pumps",
        "4",
        "--scenario",
        "ward",
        "--count",
        "500",
        "--speed",
        "max",
        "--summary-file",
        str(tmp_path / "summary.json"),
    ]
    with simulator(args, tmp_path) as sim:
        summary = sim.summary()
    assert sim.proc.returncode == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    decoder = FrameDecoder()
    items = decoder.feed(capture.read_bytes()) + decoder.flush()
    frames = [i for i in items if isinstance(i, Frame)]
    assert_counts_match(frames, [i for i in items if isinstance(i, FrameError)], summary)
