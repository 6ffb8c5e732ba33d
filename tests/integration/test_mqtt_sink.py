"""MqttSink against a private Mosquitto: delivery on PUBACK only, outages, birth/will, denials."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest

from gateway.adapters.mqtt import KICKED_WITHIN_S, MqttSink, ReceivedAck
from gateway.adapters.mqtt_client import MqttSettings, MqttTls, SelectableEvent
from gateway.outbox import Outbox
from gateway.records import OutRecord, StoredRecord
from gateway.topics import TopicBase, ack_topic, status_topic, subscription_filter
from schemas.models import GatewayStatus
from tests.mqtt_helpers import Probe, Received, subscribed
from tests.servers import LOOPBACK, Mosquitto, MosquittoFactory, MosquittoTls, Pki

pytestmark = pytest.mark.integration

WAIT_S = 15.0
SITE, STATION = "site", "st"


# --- helpers ------------------------------------------------------------------------------


class WatchedOutbox(Outbox):
    """An Outbox whose cursor moves can be waited on, that records every ack, and that
    shows the rows in `aged` as stored an hour ago (a backlog left by an outage)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, ["mqtt"], durability="normal")
        self.acks: list[int] = []
        self.aged: set[str] = set()
        self._moved = threading.Condition()

    def read(self, sink: str, after_seq: int, limit: int) -> list[StoredRecord]:
        rows = super().read(sink, after_seq, limit)
        return [
            replace(r, stored_at_s=r.stored_at_s - 3600) if r.record_id in self.aged else r
            for r in rows
        ]

    def ack(self, sink: str, up_to_seq: int) -> None:
        super().ack(sink, up_to_seq)
        with self._moved:
            self.acks.append(up_to_seq)
            self._moved.notify_all()

    def wait_cursor(self, seq: int, timeout_s: float = WAIT_S) -> bool:
        with self._moved:
            return self._moved.wait_for(lambda: self.cursor("mqtt") >= seq, timeout_s)


def readings(n: int, pump_id: str = "P1", tag: str = "r") -> list[OutRecord]:
    """n reading records whose JSON payload carries their record_id."""
    ids = [f"{pump_id}:{tag}:{i}" for i in range(n)]
    return [
        OutRecord("reading", rid, pump_id, json.dumps({"record_id": rid}).encode()) for rid in ids
    ]


def status_payload(state: Literal["online", "offline"]) -> bytes:
    status = GatewayStatus(
        site=SITE,
        station=STATION,
        session_id="s1",
        seq=1,
        state=state,
        at=datetime.now(UTC),
        version="test",
    )
    return status.model_dump_json().encode()


def wait_for(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Poll state that has no event of its own (sink health), every 10 ms until timeout."""
    tick = threading.Event()
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        tick.wait(0.01)
    return True


def collect(sub: Probe, want: set[str], timeout_s: float = WAIT_S) -> dict[str, list[Received]]:
    """Messages by record_id, taken until every id in `want` was seen (or the timeout)."""
    seen: dict[str, list[Received]] = {}
    deadline = time.monotonic() + timeout_s
    while not want <= seen.keys():
        message = sub.poll(max(0.0, deadline - time.monotonic()))
        if message is None:
            break
        seen.setdefault(record_id(message), []).append(message)
    return seen


def record_id(message: Received) -> str:
    """The record_id in the payload; status messages (which have none) are keyed by topic."""
    rid = json.loads(message.payload).get("record_id", message.topic)
    assert isinstance(rid, str)
    return rid


@pytest.fixture
def base() -> TopicBase:
    """A topic prefix no other test uses."""
    return TopicBase(site=SITE, station=STATION, prefix=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[WatchedOutbox]:
    box = WatchedOutbox(tmp_path / "outbox.db")
    yield box
    box.close()


def make_sink(
    outbox: Outbox,
    base: TopicBase,
    port: int,
    *,
    on_ack: Callable[[ReceivedAck], None] | None = None,
    **settings: Any,
) -> MqttSink:
    settings.setdefault("url", f"mqtt://{LOOPBACK}:{port}")
    config = MqttSettings(topic_prefix=base.prefix, reconnect_max_s=2, **settings)
    return MqttSink(
        config,
        outbox,
        base,
        status=lambda: (status_payload("online"), status_payload("offline")),
        on_ack=on_ack or (lambda ack: None),
    )


@contextlib.contextmanager
def running(sink: MqttSink) -> Iterator[threading.Event]:
    """Run the sink on its own thread; yields the `wake` event; stops it cleanly after."""
    stop, wake = threading.Event(), SelectableEvent()
    thread = threading.Thread(target=sink.run, args=(stop, wake), name="mqtt sink", daemon=True)
    thread.start()
    try:
        yield wake
    finally:
        stop.set()
        wake.set()
        thread.join(WAIT_S)
        sink.close()
        assert not thread.is_alive(), "the sink did not stop"


def append(outbox: Outbox, records: Sequence[OutRecord], wake: threading.Event | None) -> int:
    last = outbox.append(records)
    if wake is not None:
        wake.set()
    return last


@contextlib.contextmanager
def paused(broker: Mosquitto) -> Iterator[None]:
    """Freeze the broker process: TCP stays up, nothing is answered (no PUBACK)."""
    process = broker._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


# --- delivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_every_record_arrives_and_the_cursor_moves_only_on_puback(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase, protocol: str
) -> None:
    records = readings(500)
    sink = make_sink(outbox, base, mosquitto.port, protocol=protocol)
    with subscribed(mosquitto.port, subscription_filter(base)) as sub, running(sink) as wake:
        assert wait_for(lambda: sink.health().connected)
        with paused(mosquitto):
            last = append(outbox, records, wake)
            # publish() succeeds into the socket, but no PUBACK can come back
            assert not outbox.wait_cursor(1, 1.0), "the cursor moved without a PUBACK"
            assert sink.health().inflight > 0
            assert outbox.backlog("mqtt")[0] == len(records)
        assert outbox.wait_cursor(last)
        seen = collect(sub, {r.record_id for r in records})
    assert seen.keys() >= {r.record_id for r in records}
    assert outbox.backlog("mqtt") == (0, None)
    assert sink.health().delivered == len(records)
    assert outbox.acks == sorted(outbox.acks)
    topics = {m.topic for ms in seen.values() for m in ms if m.topic != status_topic(base)}
    assert topics == {f"{base.root}/pumps/P1/telemetry"}


def test_v5_messages_carry_the_record_id_and_json_content_type(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase
) -> None:
    sink = make_sink(outbox, base, mosquitto.port)
    with subscribed(mosquitto.port, f"{base.root}/pumps/#") as sub, running(sink) as wake:
        append(outbox, readings(1), wake)
        message = sub.next()
    assert message.user_properties == {"record_id": "P1:r:0"}
    assert message.properties.ContentType == "application/json"  # type: ignore[union-attr]
    assert message.qos == 1


def test_retained_kinds_are_retained_for_late_subscribers(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase
) -> None:
    status = OutRecord(
        "pump_status", "P1:status:1", "P1", b'{"record_id": "P1:status:1"}', retain=True
    )
    sink = make_sink(outbox, base, mosquitto.port)
    with running(sink) as wake:
        last = append(outbox, [*readings(1), status], wake)
        assert outbox.wait_cursor(last)
    with subscribed(mosquitto.port, f"{base.root}/pumps/#") as late:
        message = late.next()
        assert late.messages() == [message]
    assert (message.topic, message.retain) == (f"{base.root}/pumps/P1/status", True)


def test_broker_outage_loses_nothing_and_the_cursor_never_passes_unacknowledged_rows(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase
) -> None:
    before, during, after = readings(300, tag="a"), readings(600, tag="b"), readings(300, tag="c")
    everything = {r.record_id for r in [*before, *during, *after]}
    sink = make_sink(outbox, base, mosquitto.port)
    with (
        subscribed(mosquitto.port, subscription_filter(base), persistent=True) as sub,
        running(sink) as wake,
    ):
        assert outbox.wait_cursor(append(outbox, before, wake))
        append(outbox, during, wake)
        mosquitto.stop()  # mid-stream: some of `during` are in flight
        last = append(outbox, after, wake)
        assert wait_for(lambda: "cannot reach" in (sink.health().last_error or ""))
        # every PUBACK that arrived before the loss is processed by now
        cursor_at_stop = outbox.cursor("mqtt")
        assert cursor_at_stop < last
        assert not outbox.wait_cursor(cursor_at_stop + 1, 1.0), "moved with the broker down"
        mosquitto.start()
        assert outbox.wait_cursor(last, 30.0)
        seen = collect(sub, everything, 30.0)
    assert everything - seen.keys() == set()
    assert outbox.backlog("mqtt") == (0, None)
    assert outbox.acks == sorted(outbox.acks)
    assert sink.health().counters["reconnects"] >= 1


def test_backlog_is_replayed_at_the_limited_rate_flagged_historical_without_starving_live(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase
) -> None:
    rate_per_s = 100.0
    backlog = readings(200, tag="old")
    live = readings(1, pump_id="P2", tag="live")
    outbox.aged = {r.record_id for r in backlog}
    sink = make_sink(outbox, base, mosquitto.port, replay_rate_per_s=rate_per_s)
    append(outbox, backlog, None)
    with subscribed(mosquitto.port, f"{base.root}/pumps/#") as sub, running(sink) as wake:
        first = sub.next()
        started = time.monotonic()
        last = append(outbox, live, wake)
        got = collect(sub, {live[0].record_id}, 5.0)
        live_after_s = time.monotonic() - started
        assert outbox.wait_cursor(last, 30.0)
        replayed = collect(sub, {r.record_id for r in backlog} - got.keys() - {record_id(first)})
        elapsed_s = time.monotonic() - started
    assert live[0].record_id in got
    old_before_live = sum(1 for rid in got if rid != live[0].record_id) + 1
    assert old_before_live < len(backlog) / 2, "live data waited for the backlog"
    assert live_after_s < 1.0
    assert "historical" not in got[live[0].record_id][0].user_properties
    assert first.user_properties["historical"] == "true"
    assert all(ms[0].user_properties["historical"] == "true" for ms in replayed.values())
    burst = rate_per_s * 0.1
    assert elapsed_s >= (len(backlog) - burst) / rate_per_s * 0.9
    assert sink.health().counters["historical"] >= len(backlog)


# --- birth, last will, acknowledgements -------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_birth_is_retained_and_a_lost_connection_publishes_the_last_will(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase, protocol: str
) -> None:
    sink = make_sink(outbox, base, mosquitto.port, protocol=protocol)
    states: list[str] = []
    with subscribed(mosquitto.port, status_topic(base)) as sub, running(sink):
        states.append(json.loads(sub.next().payload)["state"])
        sock = sink._paho.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the network dies: no DISCONNECT packet
        states.append(json.loads(sub.next().payload)["state"])
        states.append(json.loads(sub.next().payload)["state"])  # the birth after reconnect
    assert states == ["online", "offline", "online"]
    with subscribed(mosquitto.port, status_topic(base)) as late:
        retained = late.next()
    assert retained.retain
    assert json.loads(retained.payload)["state"] == "offline", "a clean stop says offline too"


def test_operator_acknowledgement_is_handed_over_with_topic_and_user_properties(
    mosquitto: Mosquitto, outbox: WatchedOutbox, base: TopicBase
) -> None:
    received: queue.Queue[ReceivedAck] = queue.Queue()
    sink = make_sink(outbox, base, mosquitto.port, on_ack=received.put)
    ack = json.dumps({"alert_id": "P1:low_reservoir:1", "by": "nurse-7"}).encode()
    with subscribed(mosquitto.port, status_topic(base)) as sub, running(sink):
        assert json.loads(sub.next().payload)["state"] == "online"  # subscribed before the birth
        console = [("console", "ward-3")]
        assert sub.publish(ack_topic(base, "nurse-7"), ack, user_properties=console).accepted
        got = received.get(timeout=WAIT_S)
    assert got == ReceivedAck(ack_topic(base, "nurse-7"), ack, (("console", "ward-3"),))
    assert sink.health().counters["acks_received"] == 1


# --- refusals ----------------------------------------------------------------------------------


def acl_for(base: TopicBase, *, telemetry: bool) -> str:
    lines = ["user reader", f"topic read {base.prefix}/#", "user gw"]
    if telemetry:
        return "\n".join([*lines, f"topic readwrite {base.prefix}/#", ""])
    allowed = ("gateway/#", "ack", "pumps/+/status", "pumps/+/info")
    return "\n".join([*lines, *(f"topic readwrite {base.root}/{leaf}" for leaf in allowed), ""])


def settles(sink: MqttSink, steady_s: float = KICKED_WITHIN_S + 0.5) -> bool:
    """Whether the sink, within WAIT_S, stays connected without a reconnect for steady_s (then
    losing the connection is not taken for a kick after a denial)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        seen = sink.health().counters["reconnects"]
        if not wait_for(
            lambda: not sink.health().connected or sink.health().counters["reconnects"] != seen,  # noqa: B023
            steady_s,
        ):
            return True
    return False


def test_denied_publish_is_counted_logged_once_kept_and_delivered_once_the_acl_allows_it(
    mosquitto_factory: MosquittoFactory,
    outbox: WatchedOutbox,
    base: TopicBase,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    users = {"gw": "gw-pass", "reader": "reader-pass"}
    broker = mosquitto_factory(users=users, acl=acl_for(base, telemetry=False))
    denied = readings(30)
    status = OutRecord(
        "pump_status", "P1:status:1", "P1", b'{"record_id": "P1:status:1"}', retain=True
    )
    sink = make_sink(outbox, base, broker.port, username="gw", password="gw-pass")
    want = {r.record_id for r in [*denied, status]}
    with (
        subscribed(
            broker.port, subscription_filter(base), user=("reader", "reader-pass"), persistent=True
        ) as sub,
        running(sink) as wake,
    ):
        last = append(outbox, [*denied, status], wake)
        assert collect(sub, {status.record_id}).keys() >= {status.record_id}
        # One denial holds back the rest of its kind. Mosquitto 2.0 also drops the connection
        # after it; the sink comes back with the kind still held, and stays connected.
        assert wait_for(lambda: sink.health().counters["denied"] >= 1)
        assert settles(sink), "the sink keeps reconnecting"
        health = sink.health()
        assert "Not authorized (0x87)" in (health.last_error or "")
        assert outbox.cursor("mqtt") == 0, "a denied record must hold the cursor"
        assert outbox.backlog("mqtt")[0] == len(denied) + 1
        assert broker.acl_file is not None
        broker.acl_file.write_text(acl_for(base, telemetry=True))
        broker.restart()
        assert outbox.wait_cursor(last, 30.0)
        seen = collect(sub, want - {status.record_id}, 30.0)
    assert seen.keys() >= want - {status.record_id}
    assert outbox.backlog("mqtt") == (0, None)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "denied" in r.message]
    assert len(errors) == 1, "one ERROR per topic and reason, then debug"
    assert f"{base.root}/pumps/P1/telemetry" in errors[0].message


def test_wrong_password_is_a_clear_error_nothing_is_acked_and_records_arrive_once_fixed(
    mosquitto_factory: MosquittoFactory,
    outbox: WatchedOutbox,
    base: TopicBase,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Wr0ng-s3cret-Pa55"
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(secret + "\n")
    password_file.chmod(0o600)
    broker = mosquitto_factory(users={"gw": "the-right-one", "reader": "reader-pass"})
    records = readings(50)
    sink = make_sink(outbox, base, broker.port, username="gw", password_file=password_file)
    with (
        subscribed(
            broker.port, subscription_filter(base), user=("reader", "reader-pass"), persistent=True
        ) as sub,
        running(sink) as wake,
    ):
        last = append(outbox, records, wake)
        assert wait_for(lambda: sink.health().counters["refused"] >= 1)
        health = sink.health()
        assert health.connected is False
        assert "refused the connection" in (health.last_error or "")
        assert "check mqtt.username" in (health.last_error or "")
        assert outbox.cursor("mqtt") == 0
        broker.add_user("gw", secret)  # the operator fixes the broker side
        assert outbox.wait_cursor(last, 30.0)
        seen = collect(sub, {r.record_id for r in records})
    assert seen.keys() >= {r.record_id for r in records}
    assert sink.health().last_error is None
    assert secret not in caplog.text
    assert secret not in repr(sink.health())
    assert secret not in repr(sink.settings)


def test_tls_broker_verified_by_the_configured_ca(
    mosquitto_factory: MosquittoFactory, outbox: WatchedOutbox, base: TopicBase, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    sink = make_sink(
        outbox,
        base,
        broker.port,
        url=f"mqtts://localhost:{broker.tls_port}",
        tls=MqttTls(ca_file=pki.ca_cert),
    )
    with subscribed(broker.port, f"{base.root}/pumps/#") as sub, running(sink) as wake:
        append(outbox, readings(3), wake)
        seen = collect(sub, {"P1:r:0", "P1:r:1", "P1:r:2"})
    assert set(seen) == {"P1:r:0", "P1:r:1", "P1:r:2"}


# paho 2.2 does not close the socket when the TLS handshake fails (client.py _ssl_wrap_socket)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_tls_broker_with_an_unknown_ca_is_refused(
    mosquitto_factory: MosquittoFactory, outbox: WatchedOutbox, base: TopicBase, pki: Pki
) -> None:
    broker = mosquitto_factory(tls=MosquittoTls(pki))
    sink = make_sink(
        outbox,
        base,
        broker.port,
        url=f"mqtts://localhost:{broker.tls_port}",
        tls=MqttTls(ca_file=pki.rogue_ca_cert),
    )
    with running(sink) as wake:
        append(outbox, readings(1), wake)
        assert wait_for(lambda: "cannot reach" in (sink.health().last_error or ""))
        assert not sink.health().connected
    assert outbox.cursor("mqtt") == 0
