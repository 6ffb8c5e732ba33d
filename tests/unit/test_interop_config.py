"""[hl7] and [fhir]: validated at load and by check-config, reported by /healthz and /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_settings
from gateway.health import health_report, render_metrics
from gateway.service import Gateway

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "pumpgw.example.toml"
COMPOSE = ROOT / "config" / "pumpgw.compose.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pumpgw.toml"
    path.write_text(f'[store]\npath = "{tmp_path / "outbox.db"}"\n[health]\nlisten = ""\n{text}')
    return path


def uncommented(text: str, section: str) -> str:
    """The commented-out example of one section, without its *_file lines (paths elsewhere)."""
    block = re.search(rf"^# \[{section}\]\n((?:# .*\n?)+)", text, re.MULTILINE)
    assert block is not None, f"no commented [{section}] example"
    lines = [line.removeprefix("# ") for line in block.group(1).splitlines()]
    return f"[{section}]\n" + "\n".join(line for line in lines if "_file" not in line) + "\n"


def test_the_commented_hl7_and_fhir_examples_are_valid(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    settings = load_settings(write(tmp_path, uncommented(text, "hl7") + uncommented(text, "fhir")))
    assert settings.hl7 is not None
    assert settings.hl7.url == "mllp://engine.clinic.example:2575"
    assert settings.hl7.reading_interval_s == 60.0
    assert settings.fhir is not None
    assert settings.fhir.base_url == "https://fhir.clinic.example/r4"


def test_the_compose_config_sends_to_neither_until_pointed_at_an_engine() -> None:
    settings = load_settings(COMPOSE)
    assert settings.hl7 is None
    assert settings.fhir is None
    assert "[hl7]" in COMPOSE.read_text()
    assert "[fhir]" in COMPOSE.read_text()


@pytest.mark.parametrize(
    ("section", "key", "fragment"),
    [
        ('[hl7]\nurl = "http://engine:2575"\n', "hl7.url", "mllp://"),
        ('[hl7]\nurl = "mllp://engine:2575"\nca_file = "/etc/hosts"\n', "hl7", "mllps://"),
        ('[hl7]\nurl = "mllp://engine:2575"\nreading_interval_s = -1\n', "hl7.reading_interval_s",
         "greater than or equal"),
        ('[fhir]\nbase_url = "ftp://fhir"\n', "fhir.base_url", "https://"),
        ('[fhir]\nbase_url = "https://u:p@fhir/r4"\n', "fhir.base_url", "token"),
        ('[fhir]\nbase_url = "https://fhir/r4"\nretry_max_s = 0.1\n', "fhir", "retry_max_s"),
    ],
)  # fmt: skip
def test_each_problem_names_its_key(tmp_path: Path, section: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, section))
    problems = [p for p in caught.value.problems if p.startswith(f"{key}:")]
    assert problems, caught.value.problems
    assert fragment in problems[0]


def test_a_device_map_with_a_bad_eui64_or_a_token_file_open_to_others_is_refused(
    tmp_path: Path,
) -> None:
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps({"P0001": {"patient_id": "MRN1", "eui64": "not-hex"}}))
    hl7 = write(tmp_path, f'[hl7]\nurl = "mllp://e:1"\ndevice_map_file = "{device_map}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(hl7)
    assert "eui64 must be 16 upper-case hex digits" in str(caught.value)
    token = tmp_path / "fhir.token"
    token.write_text("secret")
    token.chmod(0o644)
    fhir = write(tmp_path, f'[fhir]\nbase_url = "https://f/r4"\ntoken_file = "{token}"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(fhir)
    assert "chmod 600" in str(caught.value)


def test_check_config_reports_both_sinks_and_exits_2_on_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, '[hl7]\nurl = "mllps://e:2575"\n[fhir]\nbase_url = "https://f/r4"\n')
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "hl7: mllps://e:2575" in out
    assert "fhir: https://f/r4 (transaction Bundles, no token)" in out
    bad = write(tmp_path, '[hl7]\nurl = "e:2575"\nsend_alert = true\n')
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "hl7.url: " in err
    assert "hl7.send_alert: unknown key" in err


def test_healthz_and_metrics_report_both_sinks(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[hl7]\nurl = "mllp://127.0.0.1:9"\n[fhir]\nbase_url = "http://127.0.0.1:9/r4"\n'
    )
    gateway = Gateway(load_settings(path))
    try:
        observation = gateway.observe()
    finally:
        gateway.outbox.close()
    assert [s.name for s in observation.sinks] == ["mqtt", "hl7", "fhir"]
    ready, body = health_report(observation)
    assert not ready
    assert {s["name"] for s in body["sinks"]} == {"mqtt", "hl7", "fhir"}
    assert any(r.startswith("hl7 not connected") for r in body["reasons"])
    metrics = render_metrics(observation)
    for sink in ("hl7", "fhir"):
        assert f'pumpgw_sink_backlog_records{{sink="{sink}"}} 0' in metrics
        assert f'pumpgw_sink_poisoned_total{{sink="{sink}"}} 0' in metrics
        assert f'pumpgw_sink_messages_total{{sink="{sink}"}} 0' in metrics
