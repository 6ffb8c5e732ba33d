"""Faults: the gateway under broker, database, process, line and disk failures.

Each test streams a simulated ward (`pumpsim`) through a gateway process into a private
Mosquitto and the shared VictoriaMetrics, injects one fault mid-stream, and then checks
three counts against the simulator's own summary:

- the readings an MQTT subscriber received, by unique record id (pump:boot:seq);
- the readings in the time-series database, by the same id (`pump_reading_seq` samples);
- the gateway's own accounting (/metrics): frames in = accepted + quarantined + duplicates,
  and duplicates only ever with the same id.

The figures of each run (sent, received, stored, duplicates, recovery times) are written to
bench/results/reliability.json; docs/reliability.md quotes them.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import itertools
import json
import os
import platform
import random
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3

from schemas.models import MODELS_BY_KIND
from tests.e2e import (
    Collector,
    GatewayProcess,
    Metrics,
    Ward,
    collecting,
    expected_ids,
    explain,
    gateway_config,
    gateway_running,
    outbox_record_ids,
    sent_count,
    stop_quietly,
    unique,
    wait_until,
    ward_running,
)
from tests.mqtt_helpers import publisher
from tests.servers import Mosquitto, MosquittoFactory, VictoriaMetrics, free_port
from tests.unit.test_alert_state_rows import canonical

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "reliability.json"
DEVICE_KINDS = ("reading", "info", "event")
ARRIVE_S = 60.0
"""Longest wait for the last frames after a fault ends (a loaded 2-core CI machine)."""
METRICS_S = 20.0
SERIES_S = 30.0
FAST_RECONNECT = {"reconnect_max_s": 2}
"""Back within two seconds of the broker (the default backoff grows to 30 s)."""
FAST_INFLUX_RETRY = {"retry_initial_s": 0.2, "retry_max_s": 2.0}
LONG_OUTAGE_S = 60.0
SHORT_OUTAGE_S = 5.0
RETRY_AFTER_S = 1.0
RSS_GROWTH_MAX_KIB = 16 * 1024
"""Resident memory a gateway may gain while >10,000 records (>10 MB) wait on disk for slow sinks:
the MQTT window (inflight_max records), paho's queue and SQLite's page cache, not the backlog."""
SLOW_WARD = "--pumps 5 --count 2400 --speed max --wait-for-ack"
SLOW_LINK_BYTES_PER_S = 40_000
SLOW_DATABASE_S = 0.5
SLOW_HOLD_S = 6.0
"""How long the sinks stay slow after the ward has sent everything."""


# --- figures for docs/reliability.md -----------------------------------------------------------


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, dict[str, Any]]]:
    """Figures per test, merged into bench/results/reliability.json at the end of the session."""
    collected: dict[str, dict[str, Any]] = {}
    yield collected
    if collected:
        write_figures(collected)


def write_figures(new: dict[str, dict[str, Any]]) -> None:
    old: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(RESULTS.read_text())
    tests = {**old.get("tests", {}), **new}
    document = {
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "tests": dict(sorted(tests.items())),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n")


# --- processes -----------------------------------------------------------------------------------


def station_config(
    workdir: Path,
    *,
    ward: Ward,
    mqtt_port: int,
    prefix: str,
    site: str,
    influx_url: str | None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """gateway_config with its own site (a tag in the time series) and InfluxDB v2 at influx_url."""
    influx = None
    if influx_url is not None:
        influx = {"url": influx_url, "org": "pumpgw", "bucket": "pumps", **FAST_INFLUX_RETRY}
    sections: dict[str, dict[str, Any]] = {"gateway": {"site": site}, "mqtt": FAST_RECONNECT}
    for name, body in (extra or {}).items():
        sections[name] = {**sections.get(name, {}), **body}
    return gateway_config(
        workdir,
        sim_port=ward.port,
        mqtt_port=mqtt_port,
        prefix=prefix,
        influx=influx,
        extra=sections,
    )


def hold(seconds: float) -> None:
    """Keep a fault in place this long: the fault's duration is the point of the test."""
    time.sleep(seconds)


def rss_kib(pid: int) -> int:
    """Resident set size of a process from /proc, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def pid_of(gateway: GatewayProcess) -> int:
    assert gateway.proc is not None
    return gateway.proc.pid


# --- the three counts ---------------------------------------------------------------------------


def series_ids(
    vm: VictoriaMetrics, site: str, *, measurement: str = "pump_reading", at_least: int = 0
) -> Counter[str]:
    """Record ids (pump:boot:seq) of one site's points, with how often each is stored.

    Polls until `at_least` distinct ids are searchable (VictoriaMetrics shows new rows about a
    second after the write; replayed duplicates must not count towards the wait).
    """
    selector = f'{{__name__="{measurement}_seq",site="{site}"}}'
    ids: Counter[str] = Counter()

    def enough() -> bool:
        ids.clear()
        for series in vm.export(selector, min_points=0):
            labels = series["metric"]
            for value in series["values"]:
                ids[f"{labels['pump']}:{labels['boot']}:{int(value)}"] += 1
        return len(ids) >= at_least

    wait_until(enough, SERIES_S, poll_s=0.2)
    return ids


def accounting_balances(metrics: Metrics) -> bool:
    """frames in = accepted + quarantined + duplicates (one gateway process's counters)."""
    quarantined = metrics.value("pumpgw_quarantined_total")
    accepted = metrics.value("pumpgw_records_accepted_total")
    duplicates = metrics.value("pumpgw_duplicates_total")
    return metrics.value("pumpgw_frames_in_total") == accepted + quarantined + duplicates


def delivered_everything(metrics: Metrics) -> bool:
    return metrics.value("pumpgw_outbox_pending_records") == 0 and all(
        v == 0 for v in metrics.by_label("pumpgw_sink_backlog_records", "sink").values()
    )


def wait_delivered(gateway: GatewayProcess, timeout_s: float = ARRIVE_S) -> Metrics:
    metrics = gateway.wait_metrics(delivered_everything, timeout_s)
    assert delivered_everything(metrics), f"backlog left: {metrics.samples}" + explain(gateway)
    return metrics


def check_three_counts(
    summaries: list[dict[str, Any]],
    collector: Collector,
    vm: VictoriaMetrics | None,
    site: str,
    gateway: GatewayProcess,
    ward: Ward | None,
    *,
    allow_missing: set[str] | None = None,
) -> dict[str, Any]:
    """Assert the subscriber, the database and the gateway agree with the simulator; figures."""
    expected = set().union(*(expected_ids(s) for s in summaries))
    readings_sent = sum(sent_count(s, "reading") for s in summaries)
    assert expected, "the simulator sent nothing"
    missing = collector.wait_device_ids(expected, ARRIVE_S)
    assert not missing, (
        f"{len(missing)} of {len(expected)} frames never reached the subscriber, "
        f"e.g. {sorted(missing)[:5]}" + explain(gateway, ward)
    )
    assert collector.device_ids() <= expected, "ids the simulator never sent intact"
    assert not collector.conflicting_ids(*DEVICE_KINDS), "one id, two different payloads"
    readings = collector.ids("reading")
    assert len(readings) == readings_sent
    figures: dict[str, Any] = {
        "frames_sent_intact": len(expected),
        "readings_sent": readings_sent,
        "readings_received_mqtt": len(readings),
        "duplicates_mqtt": sum(collector.duplicates(kind) for kind in DEVICE_KINDS),
    }
    metrics = wait_delivered(gateway)  # every sink has acknowledged everything stored
    if vm is not None:
        stored = series_ids(vm, site, at_least=readings_sent - len(allow_missing or ()))
        lost = readings - set(stored) - (allow_missing or set())
        assert not lost, f"{len(lost)} readings not in the time series, e.g. {sorted(lost)[:5]}"
        assert set(stored) <= readings | (allow_missing or set())
        figures["readings_stored_tsdb"] = len(stored)
        figures["duplicates_tsdb"] = sum(stored.values()) - len(stored)
    assert accounting_balances(metrics), f"accounts do not balance: {metrics.samples}"
    figures |= {
        "gateway_frames_in": int(metrics.value("pumpgw_frames_in_total")),
        "gateway_accepted": int(metrics.value("pumpgw_records_accepted_total")),
        "gateway_quarantined": int(metrics.value("pumpgw_quarantined_total")),
        "gateway_duplicates": int(metrics.value("pumpgw_duplicates_total")),
    }
    return figures


# --- fault injectors: a TCP cutter/throttle and an HTTP proxy for the database -----------------


class TcpProxy:
    """A TCP relay from a loopback port to `target_port` that can be cut, or slowed down."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = threading.Event()
        self._closed = threading.Event()
        self.rate_bytes_per_s: float | None = None
        """Limit on client-to-target bytes (None: as fast as the sockets go)."""
        self.reply_rate_bytes_per_s: float | None = None
        """Limit on target-to-client bytes."""
        self.connections = 0
        self._acceptor = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        """Drop every connection and refuse new ones until restore()."""
        self._cut.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        with contextlib.suppress(OSError):  # wakes accept(): close() alone leaves it blocked
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._acceptor.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            for src, dst, limited in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(
                    target=self._pump, args=(src, dst, limited), name="tcp-proxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limited: bool) -> None:
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                rate = self.rate_bytes_per_s if limited else self.reply_rate_bytes_per_s
                if rate:
                    time.sleep(len(data) / rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class FaultyDatabase:
    """An HTTP proxy in front of VictoriaMetrics that answers with injected failures.

    `fail(status, for_s, retry_after_s)` answers every write with that status for a while;
    `poison(*markers)` answers 400 to any write whose body has a line containing all markers;
    `delay_s` slows every write down.
    """

    def __init__(self, target_url: str) -> None:
        self.target_url = target_url
        self.statuses: Counter[int] = Counter()
        self.answered: list[tuple[float, int]] = []
        """(monotonic time, status) of every write answered."""
        self.delay_s = 0.0
        self._fail: tuple[int, float, float | None] | None = None
        self._poison: tuple[bytes, ...] | None = None
        self._pool = urllib3.PoolManager(maxsize=4, retries=False)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="faulty-database", daemon=True
        )
        self._thread.start()

    def fail(self, status: int, for_s: float, retry_after_s: float | None = None) -> None:
        self._fail = (status, time.monotonic() + for_s, retry_after_s)

    def poison(self, *markers: bytes) -> None:
        self._poison = markers

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._pool.clear()

    def _answer(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self.delay_s:
            time.sleep(self.delay_s)
        failing = self._fail
        if failing is not None and time.monotonic() < failing[1]:
            extra = {} if failing[2] is None else {"Retry-After": f"{failing[2]:g}"}
            return failing[0], extra, b'{"error":"injected by the test proxy"}'
        if self._poison is not None and self._poisoned(headers, body):
            reason = b'{"error":"partial write: field type conflict (injected by the test proxy)"}'
            return 400, {}, reason
        forwarded = self._pool.request(
            "POST",
            self.target_url + path,
            body=body,
            headers={k: v for k, v in headers.items() if k.lower() != "host"},
        )
        return forwarded.status, {}, forwarded.data

    def _poisoned(self, headers: dict[str, str], body: bytes) -> bool:
        assert self._poison is not None
        if headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return any(all(m in line for m in self._poison) for line in body.splitlines())

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, extra, data = proxy._answer(self.path, dict(self.headers), body)
                proxy.statuses[status] += 1
                proxy.answered.append((time.monotonic(), status))
                self.send_response(status)
                for key, value in {**extra, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        return Handler


@contextmanager
def faulty_database(vm: VictoriaMetrics) -> Iterator[FaultyDatabase]:
    proxy = FaultyDatabase(vm.url)
    try:
        yield proxy
    finally:
        proxy.close()


@contextmanager
def tcp_proxy(target_port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()


def wait_readings(collector: Collector, count: int, timeout_s: float = ARRIVE_S) -> bool:
    return collector.wait_for(lambda: collector.count("reading") >= count, timeout_s)


def time_until(predicate: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `predicate` held (polling); fails the test if it never does."""
    started = time.monotonic()
    assert wait_until(predicate, timeout_s, poll_s=0.05), "did not recover in time"
    return round(time.monotonic() - started, 2)


def mqtt_connected(gateway: GatewayProcess) -> bool:
    metrics = gateway.metrics()
    return metrics is not None and metrics.value("pumpgw_sink_connected", sink="mqtt") == 1


# --- 1. the broker goes away ------------------------------------------------------------------


def broker_outage(
    tmp_path: Path,
    broker: Mosquitto,
    vm: VictoriaMetrics,
    outage_s: float,
    ward_args: str,
) -> dict[str, Any]:
    prefix, site = unique("faults"), unique("site")
    with (
        collecting(broker.port, prefix, persistent=True) as collector,
        ward_running(tmp_path, ward_args) as ward,
    ):
        config = station_config(
            tmp_path, ward=ward, mqtt_port=broker.port, prefix=prefix, site=site, influx_url=vm.url
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            assert wait_readings(collector, 30), explain(gateway, ward)
            before = collector.count("reading")
            broker.stop()
            hold(outage_s)
            assert ward.proc.poll() is None, "the ward ended during the outage: not mid-stream"
            during = gateway.metrics()
            assert during is not None, "the gateway stopped answering during the outage"
            backlog = during.value("pumpgw_sink_backlog_records", sink="mqtt")
            assert backlog > 0, "nothing waited for the broker: the outage was not mid-stream"
            broker.start()
            reconnect_s = time_until(lambda: mqtt_connected(gateway), ARRIVE_S)
            summary = ward.summary()
            figures = check_three_counts([summary], collector, vm, site, gateway, ward)
    assert summary["all_acked"] is True
    return figures | {
        "outage_s": outage_s,
        "readings_before_outage": before,
        "mqtt_backlog_during_outage": int(backlog),
        "reconnect_after_broker_back_s": reconnect_s,
    }


def test_broker_stopped_for_5_s_mid_stream_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    figures["broker_down_5s"] = broker_outage(
        tmp_path,
        mosquitto,
        victoria_metrics,
        SHORT_OUTAGE_S,
        "--pumps 3 --count 120 --speed 600 --wait-for-ack",
    )


def test_broker_stopped_for_60_s_mid_stream_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    # 15 readings a second for 68 s: the outage starts after 2 s and the ward runs on for
    # another 6 s after it, so the backlog (about 900 readings) meets live data.
    figures["broker_down_60s"] = broker_outage(
        tmp_path,
        mosquitto,
        victoria_metrics,
        LONG_OUTAGE_S,
        "--pumps 3 --count 340 --speed 300 --wait-for-ack",
    )


GW_USER, GW_PASSWORD, NEW_PASSWORD = "gw", "gw-Pa55-first", "gw-Pa55-rotated"
READER = ("reader", "reader-Pa55")


def test_broker_refusing_the_gateway_after_a_password_change_loses_nothing_once_fixed(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    victoria_metrics: VictoriaMetrics,
    figures: dict[str, Any],
) -> None:
    broker = mosquitto_factory(users={GW_USER: GW_PASSWORD, READER[0]: READER[1]})
    prefix, site = unique("faults"), unique("site")
    with (
        collecting(broker.port, prefix, user=READER, persistent=True) as collector,
        ward_running(tmp_path, "--pumps 3 --count 120 --speed 600 --wait-for-ack") as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=broker.port,
            prefix=prefix,
            site=site,
            influx_url=victoria_metrics.url,
            extra={"mqtt": {"username": GW_USER}},
        )
        log_path = tmp_path / "gateway.log"
        with gateway_running(config, log_path, PUMPGW_MQTT__PASSWORD=GW_PASSWORD) as gateway:
            assert wait_readings(collector, 30), explain(gateway, ward)
            broker.add_user(GW_USER, NEW_PASSWORD)  # the broker's admin rotates the password
            broker.restart()  # every client must log in again

            def refused() -> bool:
                health = gateway.health()
                return health is not None and any(
                    "refused the connection" in r for r in health[1]["reasons"]
                )

            assert wait_until(refused, METRICS_S), f"no refusal: {gateway.health()}"
            hold(SHORT_OUTAGE_S)
            assert ward.proc.poll() is None, "the ward ended while refused: not mid-stream"
            refusals = gateway.metrics()
            assert refusals is not None
            assert refusals.value("pumpgw_sink_refused_total", sink="mqtt") >= 1
            broker.add_user(GW_USER, GW_PASSWORD)  # fixed: the old password is valid again
            recover_s = time_until(lambda: mqtt_connected(gateway), ARRIVE_S)
            summary = ward.summary()
            counts = check_three_counts([summary], collector, victoria_metrics, site, gateway, ward)
    assert GW_PASSWORD not in log_path.read_text()
    figures["broker_refuses_gateway"] = counts | {
        "refusals": int(refusals.value("pumpgw_sink_refused_total", sink="mqtt")),
        "reconnect_after_fix_s": recover_s,
    }


# --- 2. the time-series database goes away or misbehaves -------------------------------------


def test_database_stopped_for_60_s_mid_stream_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    vm = victoria_metrics
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, "--pumps 3 --count 340 --speed 300 --wait-for-ack") as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=vm.url,
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            assert wait_readings(collector, 30), explain(gateway, ward)
            vm.stop()
            try:
                hold(LONG_OUTAGE_S)
                during = gateway.metrics()
                assert during is not None
                assert during.value("pumpgw_sink_connected", sink="influx") == 0
                backlog = during.value("pumpgw_sink_backlog_records", sink="influx")
                assert backlog > 0
                assert during.value("pumpgw_sink_backlog_records", sink="mqtt") < backlog
                assert ward.proc.poll() is None, "the ward ended during the outage"
            finally:
                vm.start()
            back_s = time_until(
                lambda: (
                    (gateway.metrics() or Metrics([])).value(
                        "pumpgw_sink_backlog_records", sink="influx"
                    )
                    == 0
                ),
                ARRIVE_S,
            )
            summary = ward.summary()
            counts = check_three_counts([summary], collector, vm, site, gateway, ward)
    figures["database_down_60s"] = counts | {
        "outage_s": LONG_OUTAGE_S,
        "influx_backlog_during_outage": int(backlog),
        "influx_caught_up_after_restart_s": back_s,
        "live_mqtt_unaffected": True,
    }


def test_database_answering_500_then_429_loses_nothing_and_honours_retry_after(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    with (
        faulty_database(victoria_metrics) as db,
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, "--pumps 3 --count 110 --speed 600 --wait-for-ack") as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=db.url,
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            assert wait_readings(collector, 30), explain(gateway, ward)
            db.fail(500, for_s=3.0)
            hold(3.0)
            db.fail(429, for_s=3.0, retry_after_s=RETRY_AFTER_S)
            hold(3.0)
            failures_ended = time.monotonic()
            assert ward.proc.poll() is None, "the ward ended during the failures"
            summary = ward.summary()
            counts = check_three_counts([summary], collector, victoria_metrics, site, gateway, ward)
            metrics = gateway.metrics()
    assert metrics is not None
    assert db.statuses[500] >= 2
    assert db.statuses[429] >= 2
    too_many = [t for t, status in db.answered if status == 429]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(too_many)]
    assert min(gaps) >= 0.9 * RETRY_AFTER_S, f"Retry-After {RETRY_AFTER_S} s not honoured: {gaps}"
    first_ok = min(t for t, status in db.answered if status == 204 and t >= failures_ended)
    assert metrics.value("pumpgw_sink_retries_total", sink="influx") >= 4
    assert metrics.value("pumpgw_sink_poisoned_total", sink="influx") == 0
    figures["database_500_then_429"] = counts | {
        "answers": {str(k): v for k, v in sorted(db.statuses.items())},
        "seconds_between_429_retries": gaps,
        "first_write_after_failures_ended_s": round(first_ok - failures_ended, 2),
        "influx_retries": int(metrics.value("pumpgw_sink_retries_total", sink="influx")),
    }


def test_one_poison_point_is_quarantined_with_the_database_reason_and_the_rest_stored(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    with (
        faulty_database(victoria_metrics) as db,
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, "--pumps 3 --count 200 --speed max --wait-for-ack") as ward,
    ):
        db.poison(b"pump_reading,", b"pump=P0002,", b",seq=57i,")
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=db.url,
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            boot = next(p["boot_id"] for p in summary["pumps"] if p["pump_id"] == "P0002")
            poisoned = f"P0002:{boot}:57"
            counts = check_three_counts(
                [summary],
                collector,
                victoria_metrics,
                site,
                gateway,
                ward,
                allow_missing={poisoned},
            )
            assert collector.wait_for(lambda: collector.count("quarantine") >= 1, METRICS_S)
            metrics = gateway.metrics()
    assert poisoned in collector.ids("reading"), "the poison point is still a valid reading"
    assert poisoned not in series_ids(victoria_metrics, site)
    (dead,) = collector.payloads["quarantine"]
    assert dead["reason_kind"] == "influx_rejected"
    assert dead["reason"].startswith(f"{poisoned}: HTTP 400: partial write: field type conflict")
    assert bytes.fromhex(dead["raw_hex"]).startswith(b"pump_reading,")
    assert metrics is not None
    assert metrics.value("pumpgw_sink_poisoned_total", sink="influx") == 1
    assert metrics.value("pumpgw_quarantined_total", reason="influx_rejected") == 0, "not a frame"
    figures["database_rejects_one_point"] = counts | {
        "points_quarantined": 1,
        "write_requests_answered_400": db.statuses[400],
    }


# --- 3. the gateway is killed ------------------------------------------------------------------

KILLS = 10
KILL_WARD = "--pumps 4 --count 700 --speed 3000 --wait-for-ack"
"""200 readings a second while a gateway reads: 14 s of reading, about half in the ten lives."""
KILL_SEED = 20261125


def test_gateway_killed_at_random_moments_ten_times_stores_each_frame_once_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    rng = random.Random(KILL_SEED)
    prefix, site = unique("faults"), unique("site")
    log_path = tmp_path / "gateway.log"
    lives: list[float] = []
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, KILL_WARD) as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=victoria_metrics.url,
        )
        gateway = GatewayProcess(config, log_path).start()
        try:
            for _ in range(KILLS):
                life_s = rng.uniform(0.3, 2.5)  # from before imports finish to mid-batch
                hold(life_s)
                assert ward.proc.poll() is None, "the ward finished before the kill" + explain(
                    gateway, ward
                )
                gateway.kill()
                lives.append(round(life_s, 2))
                gateway = GatewayProcess(config, log_path).start()
            restarted = time.monotonic()
            summary = ward.summary()
            counts = check_three_counts([summary], collector, victoria_metrics, site, gateway, ward)
            drained_s = round(time.monotonic() - restarted, 1)
        finally:
            stop_quietly(gateway)
    assert summary["all_acked"] is True
    assert summary["totals"]["retransmitted"] > 0, "the kills never interrupted the stream"
    stored = outbox_record_ids(tmp_path / "outbox.db")
    assert set(stored) == expected_ids(summary)
    twice = sorted(rid for rid, n in stored.items() if n > 1)
    assert not twice, f"stored more than once: {twice[:5]}"
    figures["gateway_sigkill_x10"] = counts | {
        "kills": KILLS,
        "kill_after_s": lives,
        "seed": KILL_SEED,
        "retransmitted_by_ward": summary["totals"]["retransmitted"],
        "stored_in_outbox": len(stored),
        "stored_twice_in_outbox": 0,
        "last_restart_to_all_delivered_s": drained_s,
    }


# --- 4. the serial line drops, and line noise --------------------------------------------------


def source_connected(gateway: GatewayProcess) -> bool:
    metrics = gateway.metrics()
    return metrics is not None and metrics.value("pumpgw_source_connected", source="line-1") == 1


def test_serial_line_dropped_twice_and_the_source_restarted_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    ward_port = free_port()
    recoveries: list[float] = []
    with (
        collecting(mosquitto.port, prefix) as collector,
        tcp_proxy(ward_port) as line,
        ward_running(tmp_path, "--pumps 3 --count 600 --speed 1800", port=ward_port) as first,
    ):
        config = station_config(
            tmp_path,
            ward=first,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=victoria_metrics.url,
        )
        text = config.read_text().replace(f"127.0.0.1:{ward_port}", f"127.0.0.1:{line.port}")
        config.write_text(text)
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            for want in (100, 400):
                assert wait_readings(collector, want), explain(gateway, first)
                # A slow moment first, so frames are on the wire when the cable is pulled:
                # the pump must send them again after the reconnect.
                line.reply_rate_bytes_per_s = 4000
                hold(0.5)
                line.cut()  # the cable is pulled: both ends see the line drop
                line.reply_rate_bytes_per_s = None
                assert wait_until(lambda: not source_connected(gateway), METRICS_S)
                hold(1.0)
                line.restore()
                recoveries.append(time_until(lambda: source_connected(gateway), METRICS_S))
            assert first.proc.poll() is None, "the first ward ended before it was restarted"
            first_summary = first.stop()  # the device restarts: a new boot
            with ward_running(
                tmp_path,
                "--pumps 3 --count 100 --speed max --wait-for-ack",
                port=ward_port,
            ) as second:
                second_summary = second.summary()
            counts = check_three_counts(
                [first_summary, second_summary],
                collector,
                victoria_metrics,
                site,
                gateway,
                second,
            )
            metrics = gateway.metrics()
    assert metrics is not None
    assert metrics.value("pumpgw_source_reconnects_total", source="line-1") >= 3
    assert first_summary["totals"]["retransmitted"] > 0, "no frame was on the wire at a cut"
    figures["serial_line_dropped"] = counts | {
        "line_cuts": 2,
        "source_restarts": 1,
        "reconnect_after_line_back_s": recoveries,
        "retransmitted_by_ward": first_summary["totals"]["retransmitted"],
    }


def test_line_noise_on_1_percent_of_bytes_never_crashes_and_passes_only_valid_frames(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, "--pumps 3 --count 300 --speed max --noise-rate 0.01") as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=victoria_metrics.url,
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            metrics = gateway.wait_metrics(
                lambda m: (
                    delivered_everything(m)
                    and m.value("pumpgw_source_connected", source="line-1") == 0
                ),
                ARRIVE_S,
            )
            rss = rss_kib(pid_of(gateway))
            alive = gateway.running
            health = gateway.health()
    assert alive, "the gateway died on a noisy line" + explain(gateway, ward)
    assert health is not None
    assert health[1]["live"] is True
    assert accounting_balances(metrics), metrics.samples
    sent_ids = {
        f"{p['pump_id']}:{p['boot_id']}:{seq}"
        for p in summary["pumps"]
        if p["first_seq"] is not None
        for seq in range(p["first_seq"], p["last_seq"] + 1)
    }
    received = collector.device_ids()
    assert received <= sent_ids, "a frame the simulator never sent was accepted"
    assert not collector.conflicting_ids(*DEVICE_KINDS)
    for kind, payloads in collector.payloads.items():
        model = MODELS_BY_KIND.get(kind)
        assert model is not None, f"unexpected kind {kind!r} on MQTT"
        for payload in payloads:
            model.model_validate(payload)
    stored = series_ids(victoria_metrics, site, at_least=len(collector.ids("reading")))
    assert set(stored) == collector.ids("reading")
    quarantined = int(metrics.value("pumpgw_quarantined_total"))
    assert quarantined > 0, "1 % noise damaged nothing?"
    figures["line_noise_1pct"] = {
        "frames_sent": len(sent_ids),
        "gateway_frames_in": int(metrics.value("pumpgw_frames_in_total")),
        "gateway_accepted": int(metrics.value("pumpgw_records_accepted_total")),
        "gateway_quarantined": quarantined,
        "gateway_duplicates": int(metrics.value("pumpgw_duplicates_total")),
        "readings_received_mqtt": len(collector.ids("reading")),
        "readings_stored_tsdb": len(stored),
        "quarantined_by_reason": {
            k: int(v) for k, v in metrics.by_label("pumpgw_quarantined_total", "reason").items()
        },
        "gateway_rss_kib_after": rss,
    }


# --- 5. the outbox fills up --------------------------------------------------------------------

FULL_LIMIT = 120
FILL_WARD = "--pumps 2 --count 110 --speed 600 --wait-for-ack"
"""About 25 records a second: the near-full mark (96) is passed seconds before the limit."""


def gateway_alerts(collector: Collector) -> list[dict[str, Any]]:
    """The gateway's own technical alerts received so far."""
    with collector._lock:
        return [p for p in collector.payloads["alert"] if p["pump_id"] == "_gateway"]


def outbox_alerts(path: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT payload FROM records WHERE kind = 'alert' ORDER BY seq"
        ).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def integrity(path: Path) -> str:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def phases(alerts: list[dict[str, Any]], kind: str) -> list[str]:
    return [a["phase"] for a in alerts if a["alert_kind"] == kind]


def outbox_fill(
    tmp_path: Path,
    broker: Mosquitto,
    vm: VictoriaMetrics,
    store: dict[str, Any],
    *,
    ward_args: str = FILL_WARD,
    recover_s: float = ARRIVE_S,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Fill the outbox with the broker down, check back-pressure, bring the broker back.

    Returns the figures, the gateway alerts published on MQTT and those stored while full.
    """
    prefix, site = unique("faults"), unique("site")
    root = f"{prefix}/{site}/bed-1"
    outbox = Path(store["path"])
    with (
        collecting(broker.port, prefix, persistent=True) as collector,
        ward_running(tmp_path, ward_args) as ward,
    ):
        broker.stop()
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=broker.port,
            prefix=prefix,
            site=site,
            influx_url=vm.url,
            extra={"store": store},
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            full = gateway.wait_metrics(lambda m: m.value("pumpgw_outbox_full") == 1, ARRIVE_S)
            assert full.value("pumpgw_outbox_full") == 1, "never full" + explain(gateway, ward)
            frames_at_full = full.value("pumpgw_frames_in_total")
            hold(2.0)
            paused = gateway.metrics()
            assert paused is not None
            assert ward.proc.poll() is None, "the ward finished: reading was not paused"
            health = gateway.health()
            assert health is not None
            assert health[0] == 503
            assert "outbox full: reading is paused" in health[1]["reasons"]
            assert integrity(outbox) == "ok"
            stored_alerts = outbox_alerts(outbox)
            broker.start()
            assert collector.wait_for(
                lambda: "start" in phases(gateway_alerts(collector), "outbox_full"), recover_s
            ), "the outbox_full alert never reached MQTT" + explain(gateway, ward)
            resumed_s = time_until(
                lambda: (gateway.metrics() or Metrics([])).value("pumpgw_outbox_full") == 0,
                recover_s,
            )
            summary = ward.summary()
            counts = check_three_counts([summary], collector, vm, site, gateway, ward)
            assert collector.wait_for(
                lambda: "end" in phases(gateway_alerts(collector), "outbox_full"), METRICS_S
            ), explain(gateway, ward)
            published = gateway_alerts(collector)
            assert f"{root}/gateway/alerts" in collector.topics["alert"]
    assert integrity(outbox) == "ok"
    figures = counts | {
        "max_pending_records": store.get("max_pending_records"),
        "frames_in_when_full": int(frames_at_full),
        "frames_in_2s_later": int(paused.value("pumpgw_frames_in_total")),
        "reading_resumed_after_broker_back_s": resumed_s,
        "integrity_check": "ok",
    }
    assert paused.value("pumpgw_frames_in_total") == frames_at_full, "reading went on when full"
    return figures, published, stored_alerts


def test_outbox_limit_with_the_broker_down_raises_alerts_pauses_reading_and_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    store = {"path": str(tmp_path / "outbox.db"), "max_pending_records": FULL_LIMIT}
    counts, published, stored = outbox_fill(tmp_path, mosquitto, victoria_metrics, store)
    for alerts in (stored, published):
        assert phases(alerts, "outbox_near_full")[:1] == ["start"], alerts
        assert phases(alerts, "outbox_full")[:1] == ["start"], alerts
    assert phases(published, "outbox_full")[-1] == "end"
    assert phases(published, "outbox_near_full")[-1] == "end"
    full = next(a for a in published if a["alert_kind"] == "outbox_full")
    assert (full["priority"], full["alert_type"]) == ("PH", "ST")
    near = next(a for a in published if a["alert_kind"] == "outbox_near_full")
    assert (near["priority"], near["alert_type"]) == ("PM", "ST")
    figures["outbox_full_limit"] = counts


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a {size} tmpfs to fill a real disk (needs root or CAP_SYS_ADMIN): "
            f"{done.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


REAL_DISK_RECOVER_S = 10.0
MIN_FREE_KB = 256
"""An eighth of the small disk: readings wait below it, resume once 512 KiB are free."""
FAST_FILL_WARD = "--pumps 4 --count 1500 --speed 6000 --wait-for-ack"
"""6,000 readings: more than a 2 MB disk holds, filled in a few seconds."""
"""After the broker returns, a gateway that recovers does so within seconds (see above)."""


def test_a_real_full_disk_with_the_broker_down_raises_the_alert_and_recovers_when_it_returns(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        store = {"path": str(disk / "outbox.db"), "min_free_disk_kb": MIN_FREE_KB}
        counts, published, _stored = outbox_fill(
            tmp_path,
            mosquitto,
            victoria_metrics,
            store,
            ward_args=FAST_FILL_WARD,
            recover_s=REAL_DISK_RECOVER_S,
        )
    assert "end" in phases(published, "outbox_full")
    starts = phases(published, "outbox_full").count("start")
    figures["outbox_full_disk"] = counts | {"disk_bytes": 2 << 20, "outbox_full_starts": starts}


# --- 6. slow consumers: memory stays bounded, the backlog goes to disk -----------------------


def disk_bytes(path: Path) -> int:
    """Size of a SQLite database with its write-ahead log."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def test_slow_broker_link_stalled_subscriber_and_slow_database_keep_memory_bounded(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    samples: list[tuple[int, float, int]] = []
    """(RSS KiB, largest sink backlog, outbox bytes on disk)"""
    with (
        faulty_database(victoria_metrics) as db,
        tcp_proxy(mosquitto.port) as broker_link,
        collecting(mosquitto.port, prefix) as collector,
        collecting(mosquitto.port, prefix) as stalled,
        ward_running(tmp_path, SLOW_WARD) as ward,
    ):
        stalled.stall()  # subscribed, and never reads again: the broker's problem
        broker_link.rate_bytes_per_s = SLOW_LINK_BYTES_PER_S
        db.delay_s = SLOW_DATABASE_S
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=broker_link.port,
            prefix=prefix,
            site=site,
            influx_url=db.url,
            extra={"influx": {"batch_size": 100}},
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            pid = pid_of(gateway)
            slow_until = [float("inf")]

            def sample() -> bool:
                metrics = gateway.metrics() or Metrics([])
                backlogs = metrics.by_label("pumpgw_sink_backlog_records", "sink").values()
                samples.append(
                    (rss_kib(pid), max(backlogs, default=0), disk_bytes(tmp_path / "outbox.db"))
                )
                if ward.proc.poll() is not None and slow_until[0] == float("inf"):
                    slow_until[0] = time.monotonic() + SLOW_HOLD_S
                return time.monotonic() >= slow_until[0]

            assert wait_until(sample, ARRIVE_S, poll_s=0.25), "the ward never finished"
            broker_link.rate_bytes_per_s = None
            db.delay_s = 0.0
            summary = ward.summary()
            counts = check_three_counts([summary], collector, victoria_metrics, site, gateway, ward)
    baseline = next(rss for rss, backlog, _ in samples if backlog >= 1000)
    peak = max(rss for rss, _, _ in samples)
    peak_backlog = max(backlog for _, backlog, _ in samples)
    peak_disk = max(size for _, _, size in samples)
    assert peak_backlog >= 10_000, f"the sinks kept up (backlog {peak_backlog}): not slow enough"
    assert peak - baseline < RSS_GROWTH_MAX_KIB, (
        f"RSS grew {peak - baseline} KiB while {peak_backlog:.0f} records waited"
    )
    figures["slow_sinks_memory"] = counts | {
        "broker_link_bytes_per_s": SLOW_LINK_BYTES_PER_S,
        "database_delay_s_per_write": SLOW_DATABASE_S,
        "peak_backlog_records": int(peak_backlog),
        "outbox_bytes_on_disk_at_peak": peak_disk,
        "rss_kib_at_backlog_1000": baseline,
        "rss_kib_peak": peak,
        "rss_growth_kib": peak - baseline,
        "samples": len(samples),
    }


# --- 7. device clock jumps -----------------------------------------------------------------------


def test_device_clock_jumps_are_kept_as_sent_never_reordered_or_lost(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    ward_args = "--pumps 3 --count 300 --scenario clock-faults --speed max --wait-for-ack"
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, ward_args) as ward,
    ):
        config = station_config(
            tmp_path,
            ward=ward,
            mqtt_port=mosquitto.port,
            prefix=prefix,
            site=site,
            influx_url=victoria_metrics.url,
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            summary = ward.summary()
            counts = check_three_counts([summary], collector, victoria_metrics, site, gateway, ward)
    steps_back = 0
    for pump in summary["pumps"]:
        readings = [r for r in collector.payloads["reading"] if r["pump_id"] == pump["pump_id"]]
        seqs = [r["seq"] for r in readings]
        assert seqs == sorted(seqs), f"{pump['pump_id']}: readings published out of order"
        times = [datetime.fromisoformat(r["device_time"]) for r in readings]
        back = [b - a for a, b in itertools.pairwise(times) if b < a]
        assert back, f"{pump['pump_id']}: the clock never stepped back: not the fault"
        assert max(abs(d.total_seconds()) for d in back) > 1800, "the -1 h jump is missing"
        steps_back += len(back)
    stored = series_ids(victoria_metrics, site)
    assert len(stored) == counts["readings_sent"], "a reading overwrote another in the database"
    figures["device_clock_jumps"] = counts | {"backward_steps_seen": steps_back}


# --- 8. acknowledgements across a broker outage and a restart with latched alerts -------------

ALERT_WARD = "--pumps 2 --count 200 --scenario low-reservoir --speed max --wait-for-ack"
OPERATOR = "nurse.jones"


def active_alert_ids(collector: Collector) -> dict[str, str]:
    """alert_id -> phase of the latest transition seen, for alerts that have not ended."""
    latest: dict[str, str] = {}
    for transition in collector.payloads["alert"]:
        latest[transition["alert_id"]] = transition["phase"]
    return {a: p for a, p in latest.items() if p != "end"}


def engine_rows(path: Path) -> dict[str, bytes]:
    """The alert engine's rows in the outbox: alert_engine/engine and one per pump."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT key, value FROM state WHERE substr(key, 1, 13) = 'alert_engine/'")
        found = {str(key): bytes(value) for key, value in rows.fetchall()}
    finally:
        db.close()
    assert "alert_engine/engine" in found, "no alert engine state in the outbox"
    return found


def mqtt_publish(
    port: int, topic: str, payload: bytes, *, user: tuple[str, str] | None = None
) -> int:
    """Publish once with QoS 1 over MQTT 5; return the broker's PUBACK reason code."""
    with publisher(port, user=user) as client:
        return client.publish(topic, payload).code


def publish_ack(
    port: int,
    root: str,
    alert_id: str,
    by: str = OPERATOR,
    user: tuple[str, str] | None = None,
) -> int:
    """An operator's acknowledgement on its own ack topic (`ack/{MQTT user}`, or `ack/{by}`
    without a login), QoS 1; the broker's PUBACK reason code."""
    payload = json.dumps({"alert_id": alert_id, "by": by}).encode()
    return mqtt_publish(port, f"{root}/ack/{user[0] if user else by}", payload, user=user)


def acknowledged(collector: Collector, alert_id: str) -> list[dict[str, Any]]:
    with collector._lock:
        return [
            t for t in collector.payloads["alert"]
            if t["alert_id"] == alert_id and t["phase"] == "acknowledged"
        ]  # fmt: skip


def test_restart_with_active_latching_alerts_brings_their_states_back_exactly(
    tmp_path: Path, mosquitto: Mosquitto, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    root = f"{prefix}/{site}/bed-1"
    outbox = tmp_path / "outbox.db"
    with (
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, ALERT_WARD) as ward,
    ):
        config = station_config(
            tmp_path, ward=ward, mqtt_port=mosquitto.port, prefix=prefix, site=site, influx_url=None
        )
        gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
        try:
            check_three_counts([ward.summary()], collector, None, site, gateway, ward)
            active = active_alert_ids(collector)
            latching = {t["alert_id"] for t in collector.payloads["alert"] if t["latching"]} & set(
                active
            )
            assert latching, f"the scenario raised no latching alert: {active}"
            before = engine_rows(outbox)
            gateway.kill()
            gateway = GatewayProcess(config, tmp_path / "gateway.log").start()
            assert wait_until(lambda: mqtt_connected(gateway), METRICS_S), explain(gateway)
            # The rows of pumps whose state changed are saved every ENGINE_SNAPSHOT_EVERY_S
            # (5 s): wait for a save by the new process. Nothing happened to the pumps
            # meanwhile, so whatever it rewrote must hold the same state.
            hold(6.0)
            after = engine_rows(outbox)
            # Redelivery after a kill repeats a transition with its own id (at least once);
            # a second start of one alert would have a new transition id.
            starts = Counter(
                t["alert_id"]
                for t in {
                    t["transition_id"]: t
                    for t in collector.payloads["alert"]
                    if t["phase"] == "start"
                }.values()
            )
            with collecting(mosquitto.port, f"{root}/pumps/+/alerts/active", raw=True) as late:
                assert late.wait_for(lambda: len(late.retained) == 2, METRICS_S)
                retained = {
                    a["alert_id"]: a["phase"]
                    for payload in late.retained.values()
                    for a in json.loads(payload)["alerts"]
                }
            for alert_id in sorted(latching):
                assert publish_ack(mosquitto.port, root, alert_id) == 0
            assert collector.wait_for(
                lambda: all(acknowledged(collector, a) for a in latching), METRICS_S
            ), explain(gateway)
        finally:
            stop_quietly(gateway)
    assert canonical(after) == canonical(before), "the alert state changed across the restart"
    assert all(n == 1 for n in starts.values()), f"an alert started twice: {starts}"
    assert retained == active, "the retained active sets differ from the alerts before the kill"
    for alert_id in latching:
        (ack,) = acknowledged(collector, alert_id)
        assert ack["acknowledged_by"] == OPERATOR
    stored = [a for a in outbox_alerts(outbox) if a["phase"] == "acknowledged"]
    assert {a["alert_id"] for a in stored} == latching
    figures["restart_with_latched_alerts"] = {
        "active_alerts_before_restart": len(active),
        "latching_alerts": len(latching),
        "retained_active_alerts_after_restart": len(retained),
        "engine_state_bytes": sum(len(row) for row in before.values()),
        "engine_state_rows": len(before),
        "engine_state_identical_after_restart": True,
        "acknowledged_after_restart": len(latching),
    }


def test_acknowledgement_published_while_the_gateway_is_cut_off_from_the_broker_is_applied(
    tmp_path: Path, mosquitto: Mosquitto, figures: dict[str, Any]
) -> None:
    prefix, site = unique("faults"), unique("site")
    root = f"{prefix}/{site}/bed-1"
    with (
        tcp_proxy(mosquitto.port) as link,
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, ALERT_WARD) as ward,
    ):
        config = station_config(
            tmp_path, ward=ward, mqtt_port=link.port, prefix=prefix, site=site, influx_url=None
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            check_three_counts([ward.summary()], collector, None, site, gateway, ward)
            latching = {t["alert_id"] for t in collector.payloads["alert"] if t["latching"]} & set(
                active_alert_ids(collector)
            )
            assert latching
            alert_id = sorted(latching)[0]
            link.cut()  # the gateway's side of the network is down; the broker is up
            assert wait_until(lambda: not mqtt_connected(gateway), METRICS_S)
            assert publish_ack(mosquitto.port, root, alert_id) == 0
            hold(1.0)
            link.restore()
            assert wait_until(lambda: mqtt_connected(gateway), ARRIVE_S), explain(gateway)
            applied = collector.wait_for(lambda: bool(acknowledged(collector, alert_id)), 8.0)
    assert applied, "the acknowledgement sent during the outage was lost"
    figures["ack_during_broker_outage"] = {"acknowledged": True}
