"""The pumpgw command line: help, replay of a capture, and history from the local store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser, main
from tests.e2e import Collector, write_config
from tests.servers import Mosquitto

COMMANDS = ("run", "check-config", "demo", "dashboard", "tail", "history", "replay")


def test_every_command_has_help_that_states_the_intended_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "not a primary alarm" in text
    for command in COMMANDS:
        assert command in text
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: pumpgw" in capsys.readouterr().out


def test_history_without_a_store_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["history"])
    assert exited.value.code == 2


@pytest.mark.integration
def test_replay_feeds_a_capture_through_the_pipeline_and_history_shows_it(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = tmp_path / "ward.frames"
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator",
            "--transport",
            "file",
            "--output",
            str(capture),
            "--pumps",
            "3",
            "--scenario",
            "low-reservoir",
            "--count",
            "40",
            "--speed",
            "max",
            "--seed",
            "5",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    )
    summary = json.loads(sim.stdout.splitlines()[-1])
    sent = sum(sum(p["sent"].values()) for p in summary["pumps"])
    config = write_config(
        tmp_path / "gw.toml",
        {
            "gateway": {"site": "s", "station": "replay"},
            "mqtt": {"url": f"mqtt://127.0.0.1:{mosquitto.port}", "topic_prefix": "replaytest"},
            "store": {"path": str(tmp_path / "outbox.db"), "durability": "normal"},
            "health": {"listen": ""},
        },
    )
    collector = Collector(mosquitto.port, "replaytest/#")
    try:
        assert main(["replay", str(capture), "--config", str(config)]) == 0
        counts = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert counts["accepted"] == sent
        assert counts["quarantined"] == 0
        assert collector.wait_for(lambda: len(collector.device_ids()) == sent, 20)
    finally:
        collector.close()
    assert (
        main(
            [
                "history",
                "--pump",
                "P0001",
                "--store",
                str(tmp_path / "outbox.db"),
                "--limit",
                "5",
                "--json",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5
    assert {row["pump_id"] for row in rows} == {"P0001"}
    assert main(["history", "--pump", "NOPE", "--store", str(tmp_path / "outbox.db")]) == 1
