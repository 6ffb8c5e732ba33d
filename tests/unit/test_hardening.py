"""The smaller attacks: inline secrets, secrets in URLs, malformed configuration, escape
sequences on the terminal, idle health-server connections, outbox file modes and a damaged
outbox, an unverified InfluxDB certificate. Each test reproduces the attack first."""

from __future__ import annotations

import io
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.cli import main
from gateway.config import ConfigError, load_settings
from gateway.health import HealthServer
from gateway.history import render
from gateway.outbox import Outbox, OutboxError
from gateway.records import OutRecord, StoredRecord
from tests.unit.test_health import observation


def write(tmp_path: Path, text: str, name: str = "pumpgw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- configuration ----------------------------------------------------------------------------

INLINE = {
    "mqtt.password": '[mqtt]\npassword = "s3cret-inline"\n',
    "influx.token": '[influx]\nurl = "http://127.0.0.1:8086"\norg = "o"\ntoken = "s3cret-inline"\n',
    "gateway.pseudonymize_key": '[gateway]\npseudonymize_key = "s3cret-inline-0123456789"\n',
}


@pytest.mark.parametrize("key", sorted(INLINE))
def test_a_secret_written_in_the_file_is_refused_naming_the_key_and_the_fix(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, INLINE[key])
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{key}: a secret written in {path}")
    assert f"PUMPGW_{key.upper().replace('.', '__')}" in problem
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"  {key}: a secret written" in err
    assert "s3cret-inline" not in err


def test_allow_inline_secrets_accepts_them_and_warns_at_every_load_and_in_check_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "allow_inline_secrets = true\n" + INLINE["mqtt.password"])
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        for _ in range(2):
            settings = load_settings(path)
    assert settings.mqtt.password_value() == "s3cret-inline"
    warnings = [r.getMessage() for r in caplog.records if "allow_inline_secrets" in r.getMessage()]
    assert len(warnings) == 2
    assert "mqtt.password" in warnings[0]
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: allow_inline_secrets = true: mqtt.password" in out
    assert "s3cret-inline" not in out


def test_secrets_from_the_environment_need_no_permission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUMPGW_MQTT__PASSWORD", "from-env")
    assert load_settings(write(tmp_path, "[mqtt]\n")).mqtt.password_value() == "from-env"


@pytest.mark.parametrize(
    "url", ["http://db:8086/?token=s3cret", "http://db:8086?u=a&p=s3cret", "http://db:8086/#s3cret"]
)
def test_an_influx_url_carrying_a_query_or_fragment_is_refused_and_never_printed(
    tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f'[influx]\nurl = "{url}"\norg = "o"\n')
    assert main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert "influx.url: no query string or fragment" in captured.err
    assert "s3cret" not in captured.out + captured.err


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("[gateway]\nsite = " + "[" * 400 + "]" * 400 + "\n", "gateway.site:"),
        ('[gateway]\nsite = "\\u001b[31m"\n', "gateway.site:"),
        ("sources = 5\n", "sources:"),
        ("[[sources]]\nurl = 5\n", "sources.0.url:"),
        ("\x00\x01\x02", "cannot read it as TOML"),
        ('[health]\nlisten = "127.0.0.1:99999"\n', "health.listen:"),
        ('[mqtt]\npassword_file = "/tmp/a\\u0000b"\n', "mqtt.password_file:"),
    ],
)
def test_check_config_exits_2_with_a_key_path_for_malformed_input(
    tmp_path: Path, text: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert where in err
    assert "\x1b" not in err
    assert "Traceback" not in err


def test_a_malformed_environment_variable_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PUMPGW_MQTT", "{not json")
    assert main(["check-config", str(write(tmp_path, "[gateway]\n"))]) == 2
    assert "mqtt: PUMPGW_MQTT... cannot be read" in capsys.readouterr().err


# --- terminal output --------------------------------------------------------------------------


def stored(kind: str, payload: str) -> StoredRecord:
    return StoredRecord(1, kind, "id", "P1", payload.encode(), None, False, 0.0)


def test_history_shows_control_characters_escaped_so_no_line_can_be_forged() -> None:
    forged = "ok\n2026-01-01T00:00:00  alert    high end flow_fault: forged\x1b]0;owned\x07"
    records = [
        stored(
            "alert",
            '{"priority":"high","phase":"end","alert_kind":"low_reservoir","at":"2026-01-01",'
            f'"text":{__import__("json").dumps(forged)}}}',
        ),
        stored("info", '{"model":"\\u001b[2J","firmware":"1\\r2","drug":"x","device_time":"t"}'),
    ]
    out = io.StringIO()
    render(records, out, as_json=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert not any(c in out.getvalue() for c in "\x1b\x07\r")
    assert "\\x1b]0;owned\\x07" in lines[1]
    json_out = io.StringIO()
    render(records, json_out, as_json=True)
    assert len(json_out.getvalue().splitlines()) == 2
    assert "\x1b" not in json_out.getvalue()


# --- the health server ------------------------------------------------------------------------


@pytest.fixture
def health() -> Iterator[HealthServer]:
    server = HealthServer(
        "127.0.0.1:0", lambda: observation(), request_timeout_s=0.5, max_connections=4
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed_by_server(conn: socket.socket) -> bool:
    """Whether the server ends the connection without an answer (a reset counts too)."""
    try:
        return conn.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_idle_half_requests_are_bounded_and_timed_out_and_the_server_keeps_answering(
    health: HealthServer,
) -> None:
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", health.port), timeout=10) for _ in range(40)]
    try:
        for conn in idle:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the blank line
        deadline = time.monotonic() + 10
        while health.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.refused >= 1, "connections past the bound are closed unserved"
        assert threading.active_count() - threads_before <= 4
        for conn in idle:  # refused at once, or served and closed after the timeout
            assert closed_by_server(conn)
    finally:
        for conn in idle:
            conn.close()
    assert get(health.port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_a_half_request_is_closed_by_the_server_after_its_timeout(health: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", health.port), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(conn), "the server closed the idle connection"


def test_request_lines_are_logged_with_control_characters_escaped(
    health: HealthServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway.health"):
        answer = get(health.port, b"GET /\x1b[31mred\rforged HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + 5
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
    assert answer.startswith(b"HTTP/1.0 400")  # http.server refuses it, and logs it
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "red" in logged
    assert "\x1b" not in logged
    assert "\r" not in logged


# --- the outbox file --------------------------------------------------------------------------


def test_outbox_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        outbox = Outbox(tmp_path / "outbox.db", ["mqtt"])
        outbox.append([OutRecord("reading", "P:b:1", "P", b"{}")])
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        outbox.close()
    finally:
        os.umask(old)
    assert modes == {"outbox.db": 0o600, "outbox.db-wal": 0o600, "outbox.db-shm": 0o600}


def test_an_outbox_left_open_to_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path, ["mqtt"]).close()
    path.chmod(0o644)
    Outbox(path, ["mqtt"]).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_damaged_outbox_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, ["mqtt"])
    outbox.append([OutRecord("reading", f"P:b:{i}", "P", b"x" * 500) for i in range(2000)])
    outbox.close()
    db = sqlite3.connect(path)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = bytearray(path.read_bytes())
    middle = len(data) // page_size // 2 * page_size
    data[middle : middle + page_size] = b"\x5a" * page_size
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError) as caught:
        Outbox(path, ["mqtt"])
    message = str(caught.value)
    assert f"the outbox at {path} is damaged" in message
    assert ".recover" in message
    assert "move it aside" in message


# --- InfluxDB without certificate checks ------------------------------------------------------


def test_influx_verify_tls_off_warns_at_start_like_mqtt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = InfluxSettings(url="https://db.example:8086", org="o", verify_tls=False)
    outbox = Outbox(tmp_path / "outbox.db", ["influx"])
    sink = InfluxSink(settings, outbox, on_poison=lambda record, reason: None)
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.WARNING, logger="gateway.adapters.influx"):
        sink.run(stop, threading.Event())
    outbox.close()
    (warning,) = [r.getMessage() for r in caplog.records if "verify_tls" in r.getMessage()]
    assert "NOT verified" in warning
    assert "https://db.example:8086" in warning
