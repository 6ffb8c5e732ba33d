"""`pumpsim` options, exit codes and the exit summary, run in-process on a capture file."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.codec import Frame, FrameDecoder, FrameError
from simulator.cli import main
from simulator.run import SimClock


def run_to_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> dict[str, object]:
    capture = tmp_path / "capture.frames"
    code = main(["--transport", "file", "--output", str(capture), "--speed", "max", *extra])
    assert code == 0
    summary: dict[str, object] = json.loads(capsys.readouterr().out.splitlines()[-1])
    return summary


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--speed", "fast"], "--speed"),
        (["--speed", "0"], "--speed"),
        (["--pumps", "0"], "--pumps"),
        (["--count", "0"], "--count"),
        (["--interval", "-1"], "--interval"),
        (["--transport", "file"], "--output"),
        (["--transport", "serial"], "--device"),
        (["--transport", "tcp", "--listen", "localhost"], "--listen"),
        (["--scenario", "no-such-scenario"], "--scenario"),
        (["--noise-rate", "2"], "--noise-rate"),
        (["--start", "yesterday"], "--start"),
        (["--wait-for-ack", "--no-ack-wait"], "--no-ack-wait"),
    ],
)
def test_usage_errors_exit_with_2_and_name_the_option(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pumpsim run")
    assert named in err


def test_help_is_written_for_a_clinic_engineer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    text = capsys.readouterr().out
    for words in ("pseudo-terminal", "--scenario", "--wait-for-ack", "invented", "summar"):
        assert words in text


def test_file_run_summary_matches_the_capture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run_to_file(tmp_path, capsys, "--pumps", "3", "--scenario", "noisy-line",
                          "--count", "300", "--seed", "9", "--summary-file",
                          str(tmp_path / "summary.json"))
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    decoder = FrameDecoder()
    items = decoder.feed((tmp_path / "capture.frames").read_bytes()) + decoder.flush()
    frames = Counter((i.pump_id, i.msg_type) for i in items if isinstance(i, Frame))
    errors = [i for i in items if isinstance(i, FrameError)]
    pumps = summary["pumps"]
    assert isinstance(pumps, list)
    for pump in pumps:
        assert frames[(pump["pump_id"], "R")] == pump["sent"]["reading"]
        assert frames[(pump["pump_id"], "I")] == pump["sent"]["info"]
        assert pump["sent"]["reading"] + len(pump["damaged_seqs"]) >= 300
        assert len(pump["boot_id"]) == 8
    totals = summary["totals"]
    assert isinstance(totals, dict)
    assert len(errors) == totals["frames_damaged"] + totals["garbage_runs"] > 0
    assert summary["stopped_by"] == "count"
    assert summary["all_acked"] is None  # nobody can acknowledge a file


def test_same_seed_same_damage_but_fresh_boot_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--scenario", "noisy-line", "--count", "200", "--seed", "4")
    first = run_to_file(tmp_path, capsys, *args)
    second = run_to_file(tmp_path, capsys, *args)
    assert first["pumps"][0]["damaged_seqs"] == second["pumps"][0]["damaged_seqs"]  # type: ignore[index]
    assert first["pumps"][0]["boot_id"] != second["pumps"][0]["boot_id"]  # type: ignore[index]


def test_count_run_ends_just_before_the_present(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run_to_file(tmp_path, capsys, "--count", "100", "--interval", "3600")
    start = datetime.fromisoformat(str(summary["sim_start"]))
    end = datetime.fromisoformat(str(summary["sim_end"]))
    now = datetime.now(UTC)
    assert timedelta(hours=99) <= end - start < timedelta(hours=100)
    assert timedelta(0) < now - end < timedelta(hours=1, minutes=1)


def test_explicit_start_is_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_to_file(tmp_path, capsys, "--count", "5", "--start", "2024-03-01T08:00:00")
    assert summary["sim_start"] == "2024-03-01T08:00:00+00:00"


def test_scenarios_default_duration_is_used_for_the_plan_of_an_unbounded_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run_to_file(tmp_path, capsys, "--scenario", "motor-stall", "--duration", "1",
                          "--start", "2024-03-01T00:00:00")
    assert summary["stopped_by"] == "duration"
    assert summary["totals"]["sent"]["event"] >= 2  # type: ignore[index]


def test_sim_clock_pauses_and_scales_wall_time() -> None:
    wall = [100.0]
    start = datetime(2024, 3, 1, tzinfo=UTC)
    clock = SimClock(start, speed=60.0, wall=lambda: wall[0])
    assert clock.now() == start  # not running yet
    clock.resume()
    wall[0] = 101.0
    assert clock.now() == start + timedelta(minutes=1)
    clock.pause()
    wall[0] = 200.0
    assert clock.now() == start + timedelta(minutes=1)
    clock.resume()
    wall[0] = 202.0
    assert clock.now() == start + timedelta(minutes=3)
