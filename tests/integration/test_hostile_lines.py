"""Hostile serial lines against a real `pumpgw run`: a flood of garbage, a payload that
forges the header, a pump that claims to be the gateway.

Each line is a TCP server of the test's own (`socket://` for the gateway), so the test
writes exactly the bytes an attacker would. docs/reliability.md and docs/security.md
("Hostile input") report the outcomes and the flood's figures.
"""

from __future__ import annotations

import json
import random
import re
import socket
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from gateway.pipeline import pseudonym
from schemas.codec import MAX_RUN_BYTES, RUN_ERRORS_REPORTED, encode_frame, encode_payload
from tests.e2e import (
    Collector,
    GatewayProcess,
    Metrics,
    collecting,
    expected_ids,
    explain,
    gateway_running,
    unique,
    wait_until,
    ward_running,
    write_config,
)
from tests.integration.test_faults import (
    ARRIVE_S,
    METRICS_S,
    accounting_balances,
    figures,
    rss_kib,
)
from tests.mqtt_helpers import Probe, settings_for
from tests.servers import Mosquitto, VictoriaMetrics, free_port

pytestmark = pytest.mark.integration
__all__ = ["figures"]  # the session fixture, shared with test_faults

FLOOD_BYTES = 100 * 1024 * 1024
FLOOD_BLOCK_BYTES = 1024 * 1024
RSS_LIMIT_KIB = 128 * 1024
OUTBOX_GROWTH_PER_10_MB = 1024 * 1024
SETTLE_S = 2.0
QUIET_S = 6.0
FLOOD_WARD = "--pumps 4 --interval 60 --speed 600 --count 500 --wait-for-ack"
"""40 readings a second for 50 s: a quiet phase, the flood (about 10 s), and after."""
READING = {
    "device_time": "2025-03-01T08:00:00Z", "drug": "morphine", "pump_state": "running",
    "reservoir_ml": 12.5, "reservoir_capacity_ml": 20, "low_reservoir_alarm_ml": 2,
    "basal_rate_ml_per_day": 0.5, "delivered_total_ml": 10,
}  # fmt: skip


class HostileLine:
    """A TCP line the gateway connects to: the test writes bytes, the gateway's acks pile up."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.url = f"socket://127.0.0.1:{self.port}"
        self.received = bytearray()
        self.peers: list[Any] = []
        self._conns: list[socket.socket] = []
        self._conn: socket.socket | None = None
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="hostile line", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self._server.accept()
            except OSError:
                return
            self.peers.append(peer)
            self._conns.append(conn)
            self._conn = conn
            self._connected.set()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.received += data

    def send(self, data: bytes) -> None:
        assert self._connected.wait(30), "the gateway never connected to the line"
        assert self._conn is not None
        self._conn.sendall(data)

    def acked(self, pump_id: str, seq: int) -> bool:
        """Whether the gateway acknowledged this frame (an `A` frame whose range holds seq)."""
        with self._lock:
            text = bytes(self.received)
        pattern = rb"\$PGW1,A," + re.escape(pump_id.encode()) + rb',b1,(\d+),\{(?:"from":(\d+))?\}'
        return any(
            int(m.group(2) or 0) <= seq <= int(m.group(1)) for m in re.finditer(pattern, text)
        )

    def close(self) -> None:
        with suppress(OSError):  # wakes accept(): close() alone leaves it blocked
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for conn in self._conns:
            with suppress(OSError):  # wakes the drain thread's recv()
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(5)


@contextmanager
def hostile_line() -> Iterator[HostileLine]:
    line = HostileLine()
    try:
        yield line
    finally:
        line.close()


def config_for(
    workdir: Path, lines: list[tuple[str, str]], mqtt_port: int, prefix: str, **extra: Any
) -> Path:
    sections: dict[str, Any] = {
        "gateway": {"site": "test", "station": "bed-1", **extra.pop("gateway", {})},
        "sources": [{"url": url, "name": name} for name, url in lines],
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}", "topic_prefix": prefix},
        "store": {"path": str(workdir / "outbox.db"), "durability": "normal"},
        "health": {"listen": f"127.0.0.1:{free_port()}"},
        **extra,
    }
    return write_config(workdir / "pumpgw.toml", sections)


def wait_lines(gateway: GatewayProcess, *names: str) -> None:
    """Wait until the gateway has these lines open (a line then sends to its newest peer)."""

    def connected(m: Metrics) -> bool:
        return all(m.value("pumpgw_source_connected", source=n) == 1 for n in names)

    assert connected(gateway.wait_metrics(connected, 30)), explain(gateway)


def frame(pump_id: str, seq: int, payload: bytes, msg_type: str = "R") -> bytes:
    return encode_frame(msg_type, pump_id, "b1", seq, payload)


# --- 1. a flood of hostile bytes on one line, a ward on the other ------------------------------


def hostile_blocks(total_bytes: int) -> Iterator[bytes]:
    """1 MiB blocks cycling through the attacks that used to amplify or stall."""
    rng = random.Random(13)
    bad_crc = frame("P9", 1, encode_payload(READING))[:-6] + b"0000\r\n"
    patterns = [
        b"$" * FLOOD_BLOCK_BYTES,  # each `$` used to be a quarantine record
        rng.randbytes(FLOOD_BLOCK_BYTES),
        b"$x" * (FLOOD_BLOCK_BYTES // 2),
        (b"$PGW1,R," + b"A" * 4000 + b"\n") * (FLOOD_BLOCK_BYTES // 4009),
        b"\n$" * (FLOOD_BLOCK_BYTES // 2),
        bad_crc * (FLOOD_BLOCK_BYTES // len(bad_crc)),
    ]
    sent = 0
    for i in range(total_bytes // FLOOD_BLOCK_BYTES):
        block = patterns[i % len(patterns)]
        sent += len(block)
        yield block
    if sent < total_bytes:
        yield b"$" * (total_bytes - sent)


class LatencyProbe:
    """Subscribes to telemetry and notes, per reading, gateway receive time to arrival here."""

    def __init__(self, port: int, prefix: str) -> None:
        self._probe = Probe(settings_for(port), [f"{prefix}/+/+/pumps/+/telemetry"]).start()

    @property
    def samples(self) -> list[tuple[float, float]]:
        """(received_at epoch s, latency s)"""
        stamped = [(_epoch(m.json()["received_at"]), m.arrived_s) for m in self._probe.messages()]
        return [(received_s, arrived_s - received_s) for received_s, arrived_s in stamped]

    def percentiles_ms(self, start_s: float, end_s: float) -> dict[str, float]:
        window = sorted(lat for at, lat in self.samples if start_s <= at < end_s)
        if len(window) < 2:
            return {"readings": len(window)}
        cuts = statistics.quantiles(window, n=100)
        return {
            "readings": len(window),
            "p50_ms": round(cuts[49] * 1000, 1),
            "p99_ms": round(cuts[98] * 1000, 1),
        }

    def close(self) -> None:
        self._probe.close()


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def outbox_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def quarantine_bytes(path: Path) -> tuple[int, int]:
    """(rows, payload bytes) of quarantine records in the outbox (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows, size = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records "
            "WHERE kind = 'quarantine'"
        ).fetchone()
    finally:
        db.close()
    return int(rows), int(size)


class Watch:
    """Samples the gateway's RSS and readiness on a thread while the flood runs."""

    def __init__(self, gateway: GatewayProcess) -> None:
        assert gateway.proc is not None
        self._gateway, self._pid = gateway, gateway.proc.pid
        self.max_rss_kib = 0
        self.not_ready: list[Any] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.max_rss_kib = max(self.max_rss_kib, rss_kib(self._pid))
            health = self._gateway.health()
            self.polls += 1
            if health is None or health[0] != 200:
                self.not_ready.append(health)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_a_100_mb_flood_on_one_line_costs_the_other_line_nothing(
    tmp_path: Path, mosquitto: Mosquitto, figures: dict[str, Any]
) -> None:
    prefix = unique("flood")
    outbox = tmp_path / "outbox.db"
    with (
        hostile_line() as attacker,
        collecting(mosquitto.port, prefix) as collector,
        ward_running(tmp_path, FLOOD_WARD) as ward,
    ):
        probe = LatencyProbe(mosquitto.port, prefix)
        lines = [("ward", f"socket://127.0.0.1:{ward.port}"), ("hostile", attacker.url)]
        config = config_for(tmp_path, lines, mosquitto.port, prefix)
        try:
            with gateway_running(config, tmp_path / "gateway.log") as gateway:
                wait_lines(gateway, "ward", "hostile")
                time.sleep(SETTLE_S)  # the ward's first burst (frames it held) goes by
                quiet_start_s = time.time()
                time.sleep(QUIET_S)  # the quiet phase: the ward alone
                before_bytes = outbox_bytes(outbox)
                watch = Watch(gateway)
                flood_start_s = time.time()
                for block in hostile_blocks(FLOOD_BYTES):
                    attacker.send(block)
                attacker.send(frame("P9", 2, encode_payload(READING)))  # the run ends
                assert wait_until(lambda: attacker.acked("P9", 2), ARRIVE_S), explain(gateway)
                flood_end_s = time.time()
                watch.stop()
                summary = ward.summary()
                missing = collector.wait_device_ids(expected_ids(summary), ARRIVE_S)
                metrics = gateway.wait_metrics(accounting_balances, METRICS_S)
                rows, q_bytes = quarantine_bytes(outbox)
                growth = outbox_bytes(outbox) - before_bytes
        finally:
            probe.close()
    flood_mb = FLOOD_BYTES / 1e6
    assert missing == set(), f"{len(missing)} readings of the healthy line lost" + explain(None)
    assert watch.max_rss_kib < RSS_LIMIT_KIB, f"RSS {watch.max_rss_kib} KiB"
    # What the garbage added; the outbox's whole growth (the ward's readings too) is reported.
    assert q_bytes < OUTBOX_GROWTH_PER_10_MB * FLOOD_BYTES / (10 * 1024 * 1024), q_bytes
    assert watch.polls > 0
    assert watch.not_ready == [], watch.not_ready[:3]
    assert accounting_balances(metrics)
    flood_reports = metrics.value("pumpgw_quarantined_total", reason="flood")
    assert flood_reports >= FLOOD_BYTES // MAX_RUN_BYTES - 1
    assert rows <= RUN_ERRORS_REPORTED + flood_reports + 1
    quiet = probe.percentiles_ms(quiet_start_s, flood_start_s)
    flooded = probe.percentiles_ms(flood_start_s, flood_end_s)
    result = {
        "flood_mb": round(flood_mb),
        "flood_s": round(flood_end_s - flood_start_s, 1),
        "flood_mb_per_s": round(flood_mb / (flood_end_s - flood_start_s), 1),
        "healthy_readings_lost": 0,
        "latency_quiet": quiet,
        "latency_during_flood": flooded,
        "max_rss_mib": round(watch.max_rss_kib / 1024, 1),
        "quarantine_rows": rows,
        "quarantine_kib": round(q_bytes / 1024, 1),
        "outbox_growth_kib": round(growth / 1024, 1),
        "healthz_polls_all_ready": watch.polls,
    }
    figures["hostile_flood"] = result
    print(f"\nflood figures: {json.dumps(result)}")


# --- 2. a payload that forges the header, with pseudonymous ids -------------------------------


def everything_written(gateway: GatewayProcess, collector: Collector, outbox: Path) -> bytes:
    with collector._lock:
        published = json.dumps(collector.payloads) + json.dumps(
            sorted((k, sorted(v)) for k, v in collector.topics.items())
        )
    stored = b"".join(
        Path(f"{outbox}{s}").read_bytes() for s in ("", "-wal") if Path(f"{outbox}{s}").exists()
    )
    return published.encode() + gateway.log_path.read_bytes() + stored


def test_a_payload_cannot_override_the_header_and_reasons_keep_real_ids_private(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    prefix, site = unique("forge"), unique("site")
    key = "k" * 32
    real_id, serial = "P0002", "SER-REAL-0002"
    forged = encode_payload(READING)[:-1] + (
        b',"pump\\u005fid":"VICTIM","s\\u0065q":4294967295,'
        b'"received\\u005fat":"2099-01-01T00:00:00Z"}'
    )
    info = {
        "device_time": "2025-03-01T08:00:00Z", "model": "m", "firmware": "f",
        "serial": serial + "-" * 70, "drug": "morphine",
    }  # fmt: skip
    near_body = f"PGW1,R,{real_id}!,b1,9,{{}}".encode()
    from schemas.codec import crc32_hex

    near_real = b"$" + near_body + b"*" + crc32_hex(near_body) + b"\r\n"
    with hostile_line() as line, collecting(mosquitto.port, prefix) as collector:
        config = config_for(
            tmp_path,
            [("line-1", line.url)],
            mosquitto.port,
            prefix,
            gateway={"site": site},
            influx={"url": victoria_metrics.url, "org": "o", "bucket": "b"},
        )
        with gateway_running(
            config, tmp_path / "gateway.log", PUMPGW_GATEWAY__PSEUDONYMIZE_KEY=key
        ) as gateway:
            wait_lines(gateway, "line-1")
            line.send(frame(real_id, 7, forged))
            line.send(frame(real_id, 8, encode_payload(info), "I"))
            line.send(near_real)
            line.send(frame(real_id, 10, encode_payload(READING)))
            assert wait_until(lambda: line.acked(real_id, 10), 10), (
                bytes(line.received),
                line.peers,
            )
            assert collector.wait_for(lambda: collector.count("quarantine") >= 3, ARRIVE_S)
            assert collector.wait_for(lambda: collector.count("reading") >= 1, ARRIVE_S)
            metrics = gateway.wait_metrics(
                lambda m: m.value("pumpgw_sink_backlog_records") == 0, METRICS_S
            )
            written = everything_written(gateway, collector, tmp_path / "outbox.db")
    series = json.dumps(victoria_metrics.export(f'{{site="{site}"}}', min_points=1)).encode()
    hashed = pseudonym(key.encode(), real_id)
    (reading,) = collector.payloads["reading"]
    assert (reading["pump_id"], reading["seq"]) == (hashed, 10), "the header's identity"
    assert line.acked(real_id, 7), "the forged frame is stored (in quarantine) and acknowledged"
    reasons = [q["reason"] for q in collector.payloads["quarantine"]]
    assert any("payload repeats header fields" in r for r in reasons), reasons
    assert any(r.startswith("serial: String should match") for r in reasons), reasons
    assert metrics.value("pumpgw_records_accepted_total") == 1
    for place, data in (("MQTT, log and outbox", written), ("the time series", series)):
        for secret in (real_id, serial, "VICTIM", "4294967295", "2099-01-01"):
            assert secret.encode() not in data, f"{secret} in {place}"
    assert hashed.encode() in series


# --- 3. a pump that calls itself the gateway --------------------------------------------------


def test_a_wire_pump_id_of_the_gateway_or_a_path_segment_is_refused(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique("impersonate")
    low = encode_payload({**READING, "reservoir_ml": 0.1})  # would raise alerts
    with hostile_line() as line, collecting(mosquitto.port, prefix) as collector:
        config = config_for(tmp_path, [("line-1", line.url)], mosquitto.port, prefix)
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            wait_lines(gateway, "line-1")
            for seq, pump_id in enumerate(["_gateway", "_x", ".", ".."], start=1):
                line.send(frame(pump_id, seq, low))
            line.send(frame("P0003", 5, low))
            assert collector.wait_for(lambda: collector.count("quarantine") >= 4, ARRIVE_S)
            assert collector.wait_for(lambda: collector.count("reading") >= 1, ARRIVE_S)
            metrics = gateway.wait_metrics(
                lambda m: m.value("pumpgw_sink_backlog_records") == 0, METRICS_S
            )
    reasons = [q["reason"] for q in collector.payloads["quarantine"]]
    assert len(reasons) == 4
    assert all("reserved" in r for r in reasons), reasons
    assert {p["pump_id"] for p in collector.payloads["reading"]} == {"P0003"}
    gateway_topics = [t for ts in collector.topics.values() for t in ts if "/gateway/" in t]
    assert all(t.endswith("/gateway/status") for t in gateway_topics), gateway_topics
    assert not any(a["pump_id"] == "_gateway" for a in collector.payloads["alert"])
    assert metrics.value("pumpgw_quarantined_total", reason="malformed") == 4


# --- 4. a batch larger than the outbox's whole limit ------------------------------------------


def test_a_batch_larger_than_the_outbox_limit_is_stored_in_parts_not_retried_for_ever(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    prefix = unique("wedge")
    frames = b"".join(frame("P0004", seq, encode_payload(READING)) for seq in range(1, 61))
    with hostile_line() as line, collecting(mosquitto.port, prefix) as collector:
        config = config_for(
            tmp_path,
            [("line-1", line.url)],
            mosquitto.port,
            prefix,
            store={
                "path": str(tmp_path / "outbox.db"),
                "durability": "normal",
                "max_pending_records": 10,
            },
        )
        with gateway_running(config, tmp_path / "gateway.log") as gateway:
            wait_lines(gateway, "line-1")
            line.send(frames)  # one read, one batch of 60 readings: six times the limit
            assert wait_until(lambda: line.acked("P0004", 60), ARRIVE_S), explain(gateway)
            assert collector.wait_for(lambda: collector.count("reading") >= 60, ARRIVE_S)
            metrics = gateway.wait_metrics(
                lambda m: (
                    m.value("pumpgw_outbox_full") == 0
                    and m.value("pumpgw_outbox_pending_records") == 0
                ),
                METRICS_S,
            )
            health = gateway.health()
    assert collector.ids("reading") == {f"P0004:b1:{seq}" for seq in range(1, 61)}
    assert metrics.value("pumpgw_outbox_full") == 0
    assert health is not None
    assert health[0] == 200, health
