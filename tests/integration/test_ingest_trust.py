"""`pumpgw ingest` against hostile publishers, with a real Mosquitto and VictoriaMetrics.

- Two stations whose pumps share pump id, boot id and sequence numbers are both fully stored.
- 40,000 messages from invented sites create no series (allow-list), and are counted.
- A QoS 0 flood leaves the worker's memory bounded while QoS 1 readings are stored; the peak
  RSS and the readings' delay are printed (docs/reliability.md has the figures). The flood is
  FLOOD_MESSAGES here; PUMPGW_FLOOD_MESSAGES=1000000 runs the full measurement.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.ingest import IngestSettings, IngestWorker, load_ingest_settings
from schemas.models import Reading
from tests.e2e import wait_until, write_config
from tests.mqtt_helpers import Probe, settings_for
from tests.servers import Mosquitto, VictoriaMetrics, find_binary, free_port

pytestmark = pytest.mark.integration

WAIT_S = 60.0
STOP_S = 15.0
INVENTED_SITES = 40_000
FLOOD_MESSAGES = int(os.environ.get("PUMPGW_FLOOD_MESSAGES", "100000"))
LEGIT_DURING_FLOOD = 50
MAX_WORKER_RSS_KB = 128 * 1024


class FloodBroker(Mosquitto):
    """The test broker with deploy/mosquitto's queue limit, so a flood is really queued."""

    def _general_config(self) -> list[str]:
        return [*super()._general_config(), "max_queued_messages 1000000"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with FloodBroker(tmp_path / "mosquitto") as server:
        yield server


def fresh_prefix() -> str:
    return f"tr{uuid.uuid4().hex[:8]}"


def reading(pump_id: str, seq: int, at: datetime) -> Reading:
    return Reading(
        pump_id=pump_id, boot_id="b1", seq=seq, device_time=at, received_at=at,
        drug="baclofen", pump_state="running", reservoir_ml=15.0 - seq * 0.01,
        reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=4.0, basal_rate_ml_per_day=0.5,
        delivered_total_ml=10.0 + seq * 0.01,
    )  # fmt: skip


def config(tmp_path: Path, prefix: str, broker: Mosquitto, vm: VictoriaMetrics,
           **ingest: object) -> Path:  # fmt: skip
    return write_config(
        tmp_path / "ingest.toml",
        {
            "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}", "topic_prefix": prefix},
            "influx": {"url": vm.url, "api": "v2", "org": "test", "bucket": "pumps"},
            "store": {"path": str(tmp_path / "outbox.db"), "durability": "normal"},
            "health": {"listen": ""},
            "ingest": {"group": prefix, "client_id": f"w-{prefix}",
                       "measurement_prefix": f"{prefix}_", **ingest},
        },
    )  # fmt: skip


class Publisher:
    """Publishes many messages at once (up to 1,000 in flight) and waits for every PUBACK."""

    def __init__(self, port: int) -> None:
        self.client = Probe(settings_for(port)).start()

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        pubacks = self.client.publish_all(messages, timeout_s=WAIT_S)
        assert all(puback.accepted for puback in pubacks)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    client = Publisher(broker.port)
    yield client
    client.close()


def run_worker(settings: IngestSettings) -> tuple[IngestWorker, threading.Event, threading.Thread]:
    worker = IngestWorker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="ingest worker")
    thread.start()
    assert wait_until(lambda: worker.subscription.subscribed, 20), worker.observe()
    return worker, stop, thread


def stop_worker(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(STOP_S)
    assert not thread.is_alive()


def points_by_station(vm: VictoriaMetrics, metric: str, min_points: int) -> dict[str, int]:
    series = vm.export(f'{{__name__="{metric}"}}', min_points=min_points, timeout_s=WAIT_S)
    counts: dict[str, int] = {}
    for s in series:
        station = s["metric"]["station"]
        counts[station] = counts.get(station, 0) + len(s["timestamps"])
    return counts


# --- identity scoped by origin ------------------------------------------------------------


def test_two_stations_with_identical_pump_boot_and_seq_are_both_fully_stored(
    tmp_path: Path, broker: Mosquitto, publisher: Publisher, victoria_metrics: VictoriaMetrics
) -> None:
    prefix = fresh_prefix()
    settings = load_ingest_settings(config(tmp_path, prefix, broker, victoria_metrics))
    worker, stop, thread = run_worker(settings)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    per_station = 150
    try:
        # bed-7 publishes bed-12's next ids first, as a rogue reading bed-12's last_record_id.
        for station in ("bed-7", "bed-12"):
            publisher.publish([
                (f"{prefix}/north/{station}/pumps/P0001/telemetry",
                 reading("P0001", seq, start + timedelta(seconds=seq)).model_dump_json().encode())
                for seq in range(per_station)
            ])  # fmt: skip
        stored = points_by_station(victoria_metrics, f"{prefix}_pump_reading_reservoir_ml",
                                   2 * per_station)  # fmt: skip
        assert stored == {"bed-7": per_station, "bed-12": per_station}
        assert worker.counts.duplicates == 0
        assert worker.counts.accepted_by_kind["reading"] == 2 * per_station
    finally:
        stop_worker(stop, thread)


# --- cardinality ----------------------------------------------------------------------------


def test_forty_thousand_invented_sites_create_no_series(
    tmp_path: Path, broker: Mosquitto, publisher: Publisher, victoria_metrics: VictoriaMetrics
) -> None:
    prefix = fresh_prefix()
    path = config(tmp_path, prefix, broker, victoria_metrics, sites=["north"])
    worker, stop, thread = run_worker(load_ingest_settings(path))
    now = datetime.now(UTC).replace(microsecond=0)
    payload = reading("P0001", 1, now).model_dump_json().encode()
    invented = [(f"{prefix}/site-{n}/bed-1/pumps/P0001/telemetry", payload)
                for n in range(INVENTED_SITES)]  # fmt: skip
    long_name = [(f"{prefix}/{'s' * 20_000}/bed-1/pumps/P0001/telemetry", payload)]
    legit = [(f"{prefix}/north/bed-1/pumps/P0001/telemetry", payload)]
    try:
        publisher.publish([*invented, *long_name, *legit])
        assert wait_until(lambda: worker.counts.acked == INVENTED_SITES + 2, WAIT_S, 0.2), (
            worker.counts
        )
        metric = f"{prefix}_pump_reading_reservoir_ml"
        assert points_by_station(victoria_metrics, metric, 1) == {"bed-1": 1}
        series = victoria_metrics.export(f'{{__name__=~"{prefix}_.*"}}', min_points=0)
        assert {s["metric"]["site"] for s in series} == {"north"}
        assert dict(worker.counts.quarantined) == {
            "not_allowed": INVENTED_SITES,
            "name_too_long": 1,
        }
        assert worker.origin.refused == INVENTED_SITES + 1
    finally:
        stop_worker(stop, thread)


# --- back-pressure for every QoS ----------------------------------------------------------


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def stored_at(store: Path) -> dict[str, float]:
    """record id -> time the worker committed it (its outbox's stored_at)."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT record_id, stored_at FROM records WHERE kind = 'reading'")
        return dict(rows.fetchall())
    finally:
        db.close()


def metric_value(port: int, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(name):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def qos0_sent_to(broker: Mosquitto, client_id: str) -> int:
    """QoS 0 PUBLISHes the broker sent to one client, from its debug log."""
    mark = f"Sending PUBLISH to {client_id} (d0, q0,".encode()
    with broker.broker_log.open("rb") as log:
        return sum(1 for line in log if mark in line)


def test_a_qos0_flood_leaves_the_worker_bounded_and_qos1_readings_stored(
    tmp_path: Path, broker: Mosquitto, publisher: Publisher, victoria_metrics: VictoriaMetrics
) -> None:
    prefix = fresh_prefix()
    health_port = free_port()
    path = config(tmp_path, prefix, broker, victoria_metrics)
    env = {**os.environ, "PUMPGW_HEALTH__LISTEN": f"127.0.0.1:{health_port}"}
    log_path = tmp_path / "ingest.log"
    argv = [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(path)]
    with log_path.open("ab") as log:
        worker = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    topic = f"{prefix}/north/bed-1/pumps/P0001/telemetry"
    flood_payload = reading("P0001", 0, datetime.now(UTC)).model_dump_json().encode()
    sent_at: dict[str, float] = {}
    try:
        assert wait_until(lambda: "MQTT connected" in log_path.read_text(), 20)
        # Subscribed (the source counts as connected once the broker granted every filter).
        assert wait_until(lambda: metric_value(health_port, "pumpgw_source_connected") == 1, 20)
        flood = subprocess.Popen(
            [find_binary("mosquitto_pub", "mosquitto-clients"), "-p", str(broker.port),
             "-t", topic, "-q", "0", "-l"],
            stdin=subprocess.PIPE,
        )  # fmt: skip
        assert flood.stdin is not None
        lines = flood_payload + b"\n"
        chunk = FLOOD_MESSAGES // LEGIT_DURING_FLOOD
        for n in range(LEGIT_DURING_FLOOD):
            flood.stdin.write(lines * chunk)
            at = datetime.now(UTC)
            legit = reading("P0001", n + 1, at)
            sent_at[f"north/bed-1/{legit.record_id}"] = time.time()
            publisher.publish([(topic, legit.model_dump_json().encode())])
        flood.stdin.close()
        assert flood.wait(300) == 0
        flood_done_s = time.time()
        store = tmp_path / "outbox.db"
        budget_s = max(300.0, FLOOD_MESSAGES / 2000)
        assert wait_until(lambda: set(sent_at) <= set(stored_at(store)), budget_s, 0.5), (
            log_path.read_text()[-2000:]
        )
        stored_s = time.time() - flood_done_s
        # Wait until the worker has read what the broker still had queued for it.
        dropped = 'pumpgw_sink_mqtt_qos0_dropped_total{sink="influx"}'
        counts = [-1]

        def settled() -> bool:
            counts.append(metric_value(health_port, dropped))
            return counts[-1] == counts[-2]

        assert wait_until(settled, budget_s, 2.0)
        rss_kb = peak_rss_kb(worker.pid)
    finally:
        worker.terminate()
        worker.wait(STOP_S)
    delays = sorted(stored_at(store)[rid] - at for rid, at in sent_at.items())
    sent = qos0_sent_to(broker, f"w-{prefix}")
    worker_log = log_path.read_text()
    print(
        f"\nQoS 0 flood of {FLOOD_MESSAGES} messages: worker peak RSS {rss_kb / 1024:.1f} MB; "
        f"the broker sent it {sent} of them and it dropped and counted {counts[-1]} (the rest "
        f"went with {worker_log.count('connection to')} lost connection(s)); {len(delays)} QoS 1 "
        f"readings stored, the last {stored_s:.1f} s after the flood ended; delay p50 "
        f"{delays[len(delays) // 2]:.3f} s, max {delays[-1]:.3f} s"
    )
    assert rss_kb < MAX_WORKER_RSS_KB
    assert 0 < counts[-1] <= sent
    assert len(stored_at(store)) == LEGIT_DURING_FLOOD, "a QoS 0 message was stored"
    assert "Traceback" not in worker_log
