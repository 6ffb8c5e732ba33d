"""`pumpgw ingest` against a real Mosquitto and VictoriaMetrics (standing in for InfluxDB 2).

Two workers share the load through `$share/<group>/...`; killing one with SIGKILL mid-stream
and starting it again loses nothing: VictoriaMetrics ends up with exactly one point per
reading published, whichever worker stored it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.adapters.mqtt_client import session_properties
from gateway.ingest import IngestSettings, IngestWorker, load_ingest_settings
from gateway.points import point_time_ns
from schemas.models import Reading
from tests.e2e import outbox_record_ids, wait_until, write_config
from tests.mqtt_helpers import Probe, settings_for
from tests.servers import Mosquitto, VictoriaMetrics, log_tail

pytestmark = pytest.mark.integration

STATIONS = ("bed-1", "bed-2", "bed-3")
PUMPS_PER_STATION = 4
READINGS = 2400
"""Readings published in all: 200 per pump over 12 pumps on 3 gateways' topics."""
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
"""Recent: the worker stores only times within ingest.max_record_age_days of its clock."""
ARRIVE_S = 60.0
PUBLISH_S = 30.0
STOP_S = 15.0
QUEUE_MESSAGES = 100_000
"""Broker queue per client: a worker that is away keeps its whole share queued."""


class RoomyMosquitto(Mosquitto):
    """The test broker with the queue limit that deploy/mosquitto/mosquitto.conf sets."""

    def _general_config(self) -> list[str]:
        return [*super()._general_config(), f"max_queued_messages {QUEUE_MESSAGES}"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with RoomyMosquitto(tmp_path / "mosquitto") as server:
        yield server


@dataclass(frozen=True)
class Names:
    """Unique names for one test: topic prefix, share group, measurement prefix."""

    prefix: str
    group: str
    measurement_prefix: str

    @classmethod
    def fresh(cls) -> Names:
        tag = uuid.uuid4().hex[:8]
        return cls(f"ing-{tag}", f"g{tag}", f"ing{tag}_")

    @property
    def reading_metric(self) -> str:
        return f"{self.measurement_prefix}pump_reading_reservoir_ml"


def ingest_config(path: Path, names: Names, broker: Mosquitto, vm: VictoriaMetrics) -> Path:
    return write_config(
        path,
        {
            "mqtt": {"url": f"mqtt://127.0.0.1:{broker.port}", "topic_prefix": names.prefix},
            "influx": {"url": vm.url, "api": "v2", "org": "test", "bucket": "pumps"},
            "store": {"path": str(path.parent / "outbox.db"), "durability": "normal"},
            "health": {"listen": ""},
            "ingest": {"group": names.group, "measurement_prefix": names.measurement_prefix},
        },
    )


def reading(pump_id: str, seq: int) -> Reading:
    at = T0 + timedelta(minutes=seq)
    return Reading(
        pump_id=pump_id, boot_id="b1", seq=seq, device_time=at,
        received_at=at + timedelta(seconds=1), drug="baclofen", pump_state="running",
        reservoir_ml=15.0 - seq * 0.01, reservoir_capacity_ml=20.0, low_reservoir_alarm_ml=4.0,
        basal_rate_ml_per_day=0.5, delivered_total_ml=10.0 + seq * 0.01,
    )  # fmt: skip


def messages(prefix: str) -> list[tuple[str, bytes, Reading]]:
    """Every reading of the test on its gateway's telemetry topic, interleaved across pumps."""
    out = []
    per_pump = READINGS // (len(STATIONS) * PUMPS_PER_STATION)
    for seq in range(per_pump):
        for station in STATIONS:
            for n in range(PUMPS_PER_STATION):
                pump_id = f"{station}-P{n}"
                r = reading(pump_id, seq)
                topic = f"{prefix}/ward/{station}/pumps/{pump_id}/telemetry"
                out.append((topic, r.model_dump_json().encode(), r))
    return out


class Producer:
    """A client standing in for the gateways: QoS 1 publishes, every PUBACK waited for."""

    def __init__(self, port: int) -> None:
        self.client = Probe(settings_for(port)).start()

    def publish(self, batch: list[tuple[str, bytes, Reading]]) -> None:
        pubacks = self.client.publish_all([(t, p) for t, p, _ in batch], timeout_s=PUBLISH_S)
        assert all(puback.accepted for puback in pubacks)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def producer(broker: Mosquitto) -> Iterator[Producer]:
    client = Producer(broker.port)
    yield client
    client.close()


class WorkerProcess:
    """`pumpgw ingest` as a child process with its own client id and outbox."""

    def __init__(self, config: Path, workdir: Path, client_id: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.store = workdir / "outbox.db"
        self.log_path = workdir / "ingest.log"
        self.env = {
            **os.environ,
            "PUMPGW_INGEST__CLIENT_ID": client_id,
            "PUMPGW_STORE__PATH": str(self.store),
        }
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        argv = [sys.executable, "-m", "gateway.cli", "ingest", "--config", str(self.config)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(STOP_S)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_S)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def subscribed(self) -> bool:
        return "MQTT connected" in self.log() and "refused" not in self.log()

    def stored(self) -> int:
        if not self.store.exists():
            return 0
        return sum(outbox_record_ids(self.store, ("reading",)).values())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def distinct_points(vm: VictoriaMetrics, metric: str) -> set[tuple[str, int]]:
    """(pump, timestamp in ms) of every stored value of a metric, duplicates folded."""
    series = vm.export(f'{{__name__="{metric}"}}', min_points=0)
    return {(s["metric"]["pump"], int(ts)) for s in series for ts in s["timestamps"]}


def expected_points(batch: list[tuple[str, bytes, Reading]]) -> set[tuple[str, int]]:
    return {(r.pump_id, point_time_ns(r.device_time, r.seq) // 1_000_000) for _, _, r in batch}


def test_two_workers_share_the_load_and_a_killed_worker_loses_nothing(
    tmp_path: Path, broker: Mosquitto, producer: Producer, victoria_metrics: VictoriaMetrics
) -> None:
    names = Names.fresh()
    config = ingest_config(tmp_path / "ingest.toml", names, broker, victoria_metrics)
    a = WorkerProcess(config, tmp_path / "a", "worker-a").start()
    b = WorkerProcess(config, tmp_path / "b", "worker-b").start()
    try:
        assert wait_until(lambda: a.subscribed() and b.subscribed(), 20), a.log() + b.log()
        batch = messages(names.prefix)
        publishing = threading.Thread(target=producer.publish, args=(batch,), name="producer")
        publishing.start()
        try:
            # Mid-stream: part of its share stored, part in flight unacknowledged, part queued.
            assert wait_until(lambda: a.stored() >= READINGS // 10, ARRIVE_S, 0.01), a.log()
            a.kill()
            stored_at_kill = a.stored()
        finally:
            publishing.join(PUBLISH_S)
        assert not publishing.is_alive()
        a.start()
        want = expected_points(batch)
        assert wait_until(
            lambda: distinct_points(victoria_metrics, names.reading_metric) >= want, ARRIVE_S, 0.5
        ), f"missing {len(want - distinct_points(victoria_metrics, names.reading_metric))}"
        assert distinct_points(victoria_metrics, names.reading_metric) == want
        assert len(want) == READINGS
        ids = set(outbox_record_ids(a.store, ("reading",))) | set(
            outbox_record_ids(b.store, ("reading",))
        )
        assert len(ids) == READINGS
        assert b.stored() > 0
        assert a.stored() > stored_at_kill, "the restarted worker did not resume its share"
        assert "(resumed session)" in a.log()
    finally:
        for worker in (a, b):
            if worker.proc is not None and worker.proc.poll() is None:
                worker.stop()
    assert "Traceback" not in a.log() + b.log()


# --- one worker in this process: quarantine and acknowledgement -----------------------------


def start_worker(
    settings: IngestSettings,
) -> tuple[IngestWorker, threading.Event, threading.Thread]:
    worker = IngestWorker(settings)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="ingest worker")
    thread.start()
    return worker, stop, thread


def stop_worker(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(STOP_S)
    assert not thread.is_alive()


def test_invalid_messages_are_quarantined_and_acknowledged(
    tmp_path: Path, broker: Mosquitto, producer: Producer, victoria_metrics: VictoriaMetrics
) -> None:
    names = Names.fresh()
    config = ingest_config(tmp_path / "ingest.toml", names, broker, victoria_metrics)
    settings = load_ingest_settings(
        config,
        ingest={
            "group": names.group,
            "client_id": "w1",
            "measurement_prefix": names.measurement_prefix,
        },
    )
    good = messages(names.prefix)[:2]
    topic = good[0][0]
    bad = [
        (topic, b"{not json", good[0][2]),
        (topic, reading("other", 1).model_dump_json().encode(), good[0][2]),
    ]
    worker, stop, thread = start_worker(settings)
    try:
        assert wait_until(lambda: worker.subscription.subscribed, 20)
        producer.publish([*bad, *good])
        assert wait_until(lambda: worker.counts.acked == 4, ARRIVE_S), worker.counts
        assert dict(worker.counts.quarantined) == {"invalid": 1, "pump_mismatch": 1}
        assert dict(worker.counts.accepted_by_kind) == {"reading": 2}
        assert wait_until(
            lambda: len(distinct_points(victoria_metrics, names.reading_metric)) == 2, ARRIVE_S
        )
    finally:
        stop_worker(stop, thread)
    kept = outbox_record_ids(settings.store.path, ("quarantine",))
    assert len(kept) == 2

    # The same client id again: acknowledged messages are not delivered a second time.
    worker, stop, thread = start_worker(settings)
    try:
        sentinel = messages(names.prefix)[2]
        producer.publish([sentinel])
        assert wait_until(lambda: worker.counts.received >= 1, ARRIVE_S)
        assert worker.counts.received == 1
        assert worker.counts.duplicates == 0
    finally:
        stop_worker(stop, thread)


def test_worker_health_reports_the_subscription_and_the_sink(
    tmp_path: Path, broker: Mosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    names = Names.fresh()
    config = ingest_config(tmp_path / "ingest.toml", names, broker, victoria_metrics)
    worker, stop, thread = start_worker(load_ingest_settings(config))
    try:
        assert wait_until(lambda: worker.subscription.subscribed, 20)
        observed = worker.observe()
        assert observed.sources[0].connected
        assert observed.sinks[0].name == "influx"
    finally:
        stop_worker(stop, thread)
    broker_log = log_tail(broker.broker_log)
    assert f"$share/{names.group}/{names.prefix}/+/+/pumps/+/telemetry" in broker_log


def test_a_retiring_worker_hands_over_its_share_and_leaves_the_group(
    tmp_path: Path, broker: Mosquitto, producer: Producer, victoria_metrics: VictoriaMetrics
) -> None:
    names = Names.fresh()
    config = ingest_config(tmp_path / "ingest.toml", names, broker, victoria_metrics)

    def settings(worker: str) -> IngestSettings:
        return load_ingest_settings(
            config,
            ingest={"group": names.group, "client_id": worker,
                    "measurement_prefix": names.measurement_prefix},
            store={"path": tmp_path / worker / "outbox.db", "durability": "normal"},
        )  # fmt: skip

    batch = messages(names.prefix)[:300]
    a, a_stop, a_thread = start_worker(settings("a"))
    b, b_stop, b_thread = start_worker(settings("b"))
    try:
        assert wait_until(lambda: a.subscription.subscribed and b.subscription.subscribed, 20)
        stop_worker(a_stop, a_thread)  # a clean stop: its session keeps its share coming
        producer.publish(batch[:200])
        leaving = IngestWorker(settings("a"), retire=True)
        result: list[bool] = []
        thread = threading.Thread(target=lambda: result.append(leaving.run(threading.Event())))
        thread.start()
        thread.join(ARRIVE_S)
        assert result == [True], "the retiring worker did not finish"
        taken_over = leaving.counts.accepted_by_kind["reading"]
        assert taken_over > 0
        producer.publish(batch[200:])  # nothing more may go to the retired worker
        want = expected_points(batch)
        assert wait_until(
            lambda: distinct_points(victoria_metrics, names.reading_metric) == want, ARRIVE_S, 0.5
        )
        assert b.counts.accepted_by_kind["reading"] == len(batch) - taken_over
        stored_a = outbox_record_ids(tmp_path / "a" / "outbox.db", ("reading",))
        assert len(stored_a) == taken_over
    finally:
        stop_worker(b_stop, b_thread)
    assert not session_present(broker.port, "a")


def session_present(port: int, client_id: str) -> bool:
    """Whether the broker still holds a session for this client id (connects once to see)."""
    probe = Probe(settings_for(port), client_id=client_id)
    try:
        return probe.start(clean_start=False, properties=session_properties(0)).session_present
    finally:
        probe.close()


# --- a poison message never stops ingest ----------------------------------------------------


def poison_payload(pump_id: str) -> bytes:
    """A reading that once overflowed date arithmetic in validation and killed the worker."""
    data = reading(pump_id, 0).model_dump(mode="json")
    data["received_at"] = "9999-12-31T23:59:59Z"
    return json.dumps(data).encode()


def test_a_retained_poison_message_is_quarantined_and_the_worker_keeps_storing(
    tmp_path: Path, broker: Mosquitto, producer: Producer, victoria_metrics: VictoriaMetrics
) -> None:
    names = Names.fresh()
    config = ingest_config(tmp_path / "ingest.toml", names, broker, victoria_metrics)
    batch = messages(names.prefix)[:24]
    poison_topic = batch[0][0]
    poison = poison_payload(batch[0][2].pump_id)
    assert producer.client.publish(poison_topic, poison, retain=True).accepted
    worker = WorkerProcess(config, tmp_path / "w", "worker-poison").start()
    try:
        assert wait_until(worker.subscribed, 20), worker.log()
        producer.publish(batch[:12])
        want = expected_points(batch[:12])
        assert wait_until(
            lambda: distinct_points(victoria_metrics, names.reading_metric) >= want, ARRIVE_S, 0.5
        ), worker.log()
        assert worker.running(), worker.log()
        assert worker.stop() == 0
        # Restarted with the poison still retained on the broker: it starts and stores again.
        worker.start()
        assert wait_until(worker.subscribed, 20), worker.log()
        producer.publish(batch[12:])
        want = expected_points(batch)
        assert wait_until(
            lambda: distinct_points(victoria_metrics, names.reading_metric) >= want, ARRIVE_S, 0.5
        ), worker.log()
        assert worker.running(), worker.log()
    finally:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.stop()
    quarantined = outbox_record_ids(worker.store, ("quarantine",))
    assert len(quarantined) == 1, "the poison message is kept once, with its reason"
    assert "is not before 2100-01-01" in worker.log()
    assert "Traceback" not in worker.log()
