"""Configuration: TOML plus PUMPGW_* variables, every problem named by its key, docs kept true."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config_doc
from gateway.cli import main
from gateway.config import ConfigError, load_settings, read_secret_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "pumpgw.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pumpgw.toml"
    path.write_text(text)
    return path


def test_the_annotated_example_is_valid_and_sets_the_keys_operators_rely_on() -> None:
    settings = load_settings(EXAMPLE)
    assert (settings.gateway.site, settings.gateway.station) == ("north", "bed-12")
    assert settings.sources[0].url == "socket://127.0.0.1:7001"
    assert settings.mqtt.url == "mqtt://127.0.0.1:1883"
    assert settings.store.path == Path("/var/lib/pumpgw/outbox.db")
    assert settings.health.listen == "127.0.0.1:9108"


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[gateway]\nsite = "a/b"\nstaton = "x"\n[store]\ndurability = "fast"\n'
        "[[sources]]\nbaudrate = -1\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    keys = [problem.split(":")[0] for problem in caught.value.problems]
    assert keys == [
        "gateway.site",
        "gateway.staton",
        "sources.0.url",
        "sources.0.baudrate",
        "store.durability",
    ]
    assert "unknown key" in caught.value.problems[1]


def test_environment_overrides_the_file_with_double_underscore_nesting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUMPGW_GATEWAY__STATION", "bed-99")
    monkeypatch.setenv("PUMPGW_MQTT__URL", "mqtts://broker.example:8883")
    settings = load_settings(write(tmp_path, '[gateway]\nstation = "bed-1"\n'))
    assert settings.gateway.station == "bed-99"
    assert settings.mqtt.url == "mqtts://broker.example:8883"


def test_a_missing_file_and_broken_toml_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="TOML"):
        load_settings(write(tmp_path, "[gateway\n"))


def test_check_config_exits_2_and_prints_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[mqtt]\nurl = "http://broker"\n[health]\nlisten = "nowhere"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "mqtt.url:" in err
    assert "health.listen:" in err


def test_check_config_never_prints_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUMPGW_MQTT__PASSWORD", "s3cret-do-not-print")
    path = write(tmp_path, '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\nusername = "gw"\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr()
    assert "s3cret-do-not-print" not in out.out + out.err
    assert "PUMPGW_MQTT__PASSWORD" in out.out


def test_a_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("k\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret_file(secret, "gateway.pseudonymize_key_file")
    secret.chmod(0o600)
    assert read_secret_file(secret, "x").get_secret_value() == "k"


def test_docs_configuration_md_matches_the_models() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    assert documented == config_doc.render(), (
        "run: python -m gateway.config_doc > docs/configuration.md"
    )


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_a_tls_file_path_with_a_nul_byte_is_a_problem_named_by_its_key(
    tmp_path: Path, key: str
) -> None:
    cert = 'cert_file = "/etc/pumpgw/client.pem"\n' if key == "key_file" else ""
    tls = f'[mqtt.tls]\n{cert}{key} = "/etc/pumpgw/a\\u0000b"\n'
    text = f'[mqtt]\nurl = "mqtts://broker:8883"\n{tls}'
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    (problem,) = caught.value.problems
    assert problem.startswith(f"mqtt.tls.{key}:")
    assert "NUL byte" in problem
