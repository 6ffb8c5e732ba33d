"""gateway.adapters.influx without a server: settings, error mapping, backoff, batching logic.

The sink tests use a real Outbox and a scripted Transport (the seam the adapter exposes),
so the bisection and acknowledgement rules are checked exactly; tests/integration checks
the same against real servers.
"""

from __future__ import annotations

import gzip
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from gateway.adapters.delivery import backoff_s
from gateway.adapters.influx import (
    RETRY_AFTER_MAX_S,
    InfluxConfigError,
    InfluxRefusedError,
    InfluxRejectedError,
    InfluxSettings,
    InfluxSink,
    InfluxUnavailableError,
    encode_body,
    error_for_status,
    make_transport,
    read_secret,
    retry_after_s,
    server_reason,
)
from gateway.outbox import Outbox
from gateway.records import OutRecord, StoredRecord

NOW_S = 1_800_000_000.0


def settings(**changes: Any) -> InfluxSettings:
    values: dict[str, Any] = {"url": "http://127.0.0.1:9", "org": "clinic", "bucket": "pumps"}
    values.update(changes)
    return InfluxSettings.model_validate(values)


# --- settings ---------------------------------------------------------------------------


def test_settings_defaults_match_the_documented_section() -> None:
    s = settings()
    assert (s.api, s.batch_size, s.gzip, s.verify_tls) == ("v2", 5000, True, True)


def test_v2_settings_need_an_org() -> None:
    with pytest.raises(ValidationError, match="org is required"):
        InfluxSettings(url="http://127.0.0.1:8086")


def test_v1_settings_need_no_org() -> None:
    assert InfluxSettings(url="http://127.0.0.1:8086", api="v1", bucket="pumps").org is None


def test_password_without_username_is_refused() -> None:
    with pytest.raises(ValidationError, match="password needs username"):
        settings(api="v1", password="secret")


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="token_fil"):
        settings(token_fil="/etc/x")


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(ValidationError, match="not in the URL"):
        settings(url="http://user:pw@127.0.0.1:8086")


def test_group_readable_token_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    token = tmp_path / "influx.token"
    token.write_text("s3cret\n")
    token.chmod(0o640)
    with pytest.raises(ValidationError, match=r"influx\.token is readable by group or others"):
        settings(token_file=token)


def test_missing_token_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        settings(token_file=tmp_path / "absent")


def test_owner_only_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    token = tmp_path / "influx.token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    s = settings(token_file=token)
    assert read_secret(s.token, s.token_file, "token_file") == "s3cret"


def test_secret_from_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    token = tmp_path / "influx.token"
    token.write_text("from-file")
    token.chmod(0o600)
    assert read_secret(SecretStr("from-env"), token, "token_file") == "from-env"


def test_token_file_made_unreadable_after_validation_fails_at_start(tmp_path: Path) -> None:
    token = tmp_path / "influx.token"
    token.write_text("s3cret")
    token.chmod(0o600)
    s = settings(token_file=token)
    token.chmod(0o644)
    with pytest.raises(InfluxConfigError, match=r"influx\.token_file"):
        make_transport(s)


def test_secrets_never_show_in_repr_or_display_url() -> None:
    s = settings(token="very-secret-token")
    assert "very-secret-token" not in repr(s)
    assert "very-secret-token" not in s.display_url()
    assert s.display_url() == "http://127.0.0.1:9 (v2, org clinic, bucket pumps)"


# --- answers and errors -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 204])
def test_2xx_is_success(status: int) -> None:
    assert error_for_status(status, b"", {}, NOW_S) is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_retryable(status: int) -> None:
    assert isinstance(error_for_status(status, b"busy", {}, NOW_S), InfluxUnavailableError)


@pytest.mark.parametrize("status", [400, 413, 422])
def test_bad_points_are_rejections(status: int) -> None:
    assert isinstance(error_for_status(status, b"bad", {}, NOW_S), InfluxRejectedError)


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_auth_and_missing_bucket_need_a_person(status: int) -> None:
    assert isinstance(error_for_status(status, b"no", {}, NOW_S), InfluxRefusedError)


def test_retry_after_seconds_is_carried_on_the_error() -> None:
    error = error_for_status(429, b"", {"Retry-After": "7"}, NOW_S)
    assert isinstance(error, InfluxUnavailableError)
    assert error.retry_after_s == 7.0


def test_retry_after_as_http_date_is_seconds_from_now() -> None:
    later = datetime.fromtimestamp(NOW_S, UTC) + timedelta(seconds=90)
    assert retry_after_s(format_datetime(later, usegmt=True), NOW_S) == pytest.approx(90.0)


@pytest.mark.parametrize(("header", "expected"), [(None, None), ("soon", None), ("-5", 0.0)])
def test_retry_after_garbage_is_ignored_and_negative_is_now(
    header: str | None, expected: float | None
) -> None:
    assert retry_after_s(header, NOW_S) == expected


def test_retry_after_is_capped() -> None:
    assert retry_after_s("86400", NOW_S) == RETRY_AFTER_MAX_S


def test_server_reason_reads_influxdb_json_errors() -> None:
    assert server_reason(b'{"error":"partial write: field type conflict"}') == (
        "partial write: field type conflict"
    )
    assert server_reason('{"code":"invalid","message":"unable to parse"}') == "unable to parse"
    assert server_reason(b"plain text\n") == "plain text"
    assert server_reason(b"") == "empty response body"


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    waits = [backoff_s(n, 0.5, 30.0, rng) for n in range(12)]
    for n, wait in enumerate(waits):
        ceiling = min(30.0, 0.5 * 2**n)
        assert ceiling / 2 <= wait <= ceiling
    assert max(waits) <= 30.0
    assert backoff_s(10_000, 0.5, 30.0, rng) <= 30.0


def test_encoded_body_is_gzip_of_the_joined_lines() -> None:
    rows = [stored(1, b"m f=1"), stored(2, None), stored(3, b"m f=2")]
    assert encode_body(rows, gzip=False) == b"m f=1\nm f=2"
    assert gzip.decompress(encode_body(rows, gzip=True)) == b"m f=1\nm f=2"


# --- the sink with a scripted transport -------------------------------------------------


def stored(seq: int, line: bytes | None) -> StoredRecord:
    return StoredRecord(seq, "reading", f"P1:b:{seq}", "P1", b"{}", line, False, 0.0)


class ScriptedTransport:
    """Answers each post from a rule; records every body it was given (uncompressed)."""

    def __init__(self, reject: set[bytes] | None = None, failures: list[Exception] | None = None):
        self.reject = reject or set()
        self.failures = list(failures or [])
        self.bodies: list[list[bytes]] = []
        self.written: list[bytes] = []
        self.closed = False

    def post(self, body: bytes) -> None:
        lines = body.split(b"\n")
        self.bodies.append(lines)
        if self.failures:
            raise self.failures.pop(0)
        bad = [line for line in lines if line in self.reject]
        self.written += [line for line in lines if line not in self.reject]  # partial write
        if bad:
            raise InfluxRejectedError(f"unable to parse '{bad[0].decode()}'", 400)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", ["influx"], durability="normal")
    yield box
    box.close()


def fill(outbox: Outbox, lines: list[bytes | None]) -> None:
    outbox.append(
        [OutRecord("reading", f"P1:b:{n}", "P1", b"{}", line) for n, line in enumerate(lines)]
    )


def make_sink(
    outbox: Outbox, transport: ScriptedTransport, poisoned: list[tuple[str, str]], **changes: Any
) -> InfluxSink:
    s = settings(gzip=False, retry_initial_s=0.001, retry_max_s=0.002, **changes)
    return InfluxSink(
        s,
        outbox,
        on_poison=lambda record, reason: poisoned.append((record.record_id, reason)),
        transport=transport,
        rng=random.Random(0),
    )


def test_bisection_isolates_the_bad_point_and_writes_the_rest(outbox: Outbox) -> None:
    lines: list[bytes | None] = [f"m f={n}".encode() for n in range(100)]
    lines[37] = b"garbage"
    fill(outbox, lines)
    transport = ScriptedTransport(reject={b"garbage"})
    poisoned: list[tuple[str, str]] = []
    sink = make_sink(outbox, transport, poisoned)
    assert sink.drain(threading.Event()) == 100
    assert poisoned == [("P1:b:37", "HTTP 400: unable to parse 'garbage'")]
    assert set(transport.written) == {f"m f={n}".encode() for n in range(100) if n != 37}
    assert outbox.cursor("influx") == 100
    assert sink.health().counters["poisoned"] == 1
    assert len(transport.bodies) <= 2 * 7 + 1  # one path down a tree of depth log2(100)


def test_every_bad_point_in_a_batch_is_poisoned_once(outbox: Outbox) -> None:
    lines: list[bytes | None] = [f"m f={n}".encode() for n in range(20)]
    for n in (0, 9, 19):
        lines[n] = f"bad {n}".encode()
    fill(outbox, lines)
    transport = ScriptedTransport(reject={b"bad 0", b"bad 9", b"bad 19"})
    poisoned: list[tuple[str, str]] = []
    make_sink(outbox, transport, poisoned).drain(threading.Event())
    assert [record_id for record_id, _ in poisoned] == ["P1:b:0", "P1:b:9", "P1:b:19"]
    assert outbox.cursor("influx") == 20


def test_rows_without_a_line_are_acknowledged_without_a_request(outbox: Outbox) -> None:
    fill(outbox, [None, None, None])
    transport = ScriptedTransport()
    sink = make_sink(outbox, transport, [])
    assert sink.drain(threading.Event()) == 3
    assert transport.bodies == []
    assert outbox.cursor("influx") == 3


def test_rows_without_a_line_between_points_are_skipped(outbox: Outbox) -> None:
    fill(outbox, [b"m f=1", None, b"m f=2", None])
    transport = ScriptedTransport()
    make_sink(outbox, transport, []).drain(threading.Event())
    assert transport.bodies == [[b"m f=1", b"m f=2"]]
    assert outbox.cursor("influx") == 4


def test_batches_hold_at_most_batch_size_rows(outbox: Outbox) -> None:
    fill(outbox, [f"m f={n}".encode() for n in range(25)])
    transport = ScriptedTransport()
    sink = make_sink(outbox, transport, [], batch_size=10)
    sink.drain(threading.Event())
    sink.close()
    assert [len(body) for body in transport.bodies] == [10, 10, 5]
    assert outbox.cursor("influx") == 25


def test_unavailable_server_is_retried_until_it_answers(outbox: Outbox) -> None:
    fill(outbox, [b"m f=1"])
    failures: list[Exception] = [
        InfluxUnavailableError("connection refused"),
        InfluxUnavailableError("busy", 503, retry_after_s=0.001),
        InfluxRefusedError("unauthorized", 401),
    ]
    transport = ScriptedTransport(failures=failures)
    sink = make_sink(outbox, transport, [])
    sink.drain(threading.Event())
    health = sink.health()
    assert (health.counters["retries"], health.delivered, health.connected) == (3, 1, True)
    assert health.last_error is None
    assert outbox.cursor("influx") == 1


def test_stop_during_retries_leaves_the_batch_unacknowledged(outbox: Outbox) -> None:
    fill(outbox, [b"m f=1", b"m f=2"])
    transport = ScriptedTransport(failures=[InfluxUnavailableError("down")] * 1000)
    sink = make_sink(outbox, transport, [])
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop, threading.Event()))
    thread.start()
    assert sink.wait_for(lambda h: h.counters["retries"] >= 3, timeout_s=10)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert outbox.cursor("influx") == 0
    assert sink.health().last_error == "down"
    assert transport.closed


def test_a_new_sink_resumes_from_the_cursor(outbox: Outbox) -> None:
    fill(outbox, [b"m f=1", b"m f=2"])
    make_sink(outbox, ScriptedTransport(), []).drain(threading.Event())
    fill(outbox, [b"m f=3"])
    transport = ScriptedTransport()
    make_sink(outbox, transport, []).drain(threading.Event())
    assert transport.bodies == [[b"m f=3"]]
