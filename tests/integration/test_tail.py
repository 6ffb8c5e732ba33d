"""`run_tail` against real Mosquitto brokers."""

from __future__ import annotations

import io
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.tail import run_tail
from schemas.models import AlarmState, AlertTransition, AlertType, GatewayStatus, Phase, Priority
from tests.mqtt_helpers import publisher
from tests.servers import Mosquitto, MosquittoFactory

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0
AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Lines(io.StringIO):
    """A non-terminal output whose complete lines can be awaited from another thread."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: queue.Queue[str] = queue.Queue()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.put(line)
        return len(text)

    def next_containing(self, part: str) -> str:
        while part not in (line := self.lines.get(timeout=TIMEOUT_S)):
            pass
        return line


class Tail:
    """run_tail on a thread; `stop()` ends it and returns its exit code."""

    def __init__(self, url: str, topic_filter: str, **options: Any) -> None:
        self.out, self.stop_event, self.code = Lines(), threading.Event(), -1

        def main() -> None:
            self.code = run_tail(url, topic_filter, stop=self.stop_event, out=self.out, **options)

        self.thread = threading.Thread(target=main, name="tail")
        self.thread.start()

    def stop(self) -> int:
        self.stop_event.set()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive()
        return self.code


@pytest.fixture
def tails() -> Iterator[Callable[..., Tail]]:
    started: list[Tail] = []

    def start(url: str, topic_filter: str, **options: object) -> Tail:
        started.append(Tail(url, topic_filter, **options))
        return started[-1]

    yield start
    for tail in started:
        tail.stop()


def publish(
    port: int, topic: str, payload: str, *, retain: bool = False, historical: bool = False
) -> None:
    """Publish one QoS 1 message with MQTT 5 and wait for its PUBACK."""
    props = [("historical", "true")] if historical else []
    with publisher(port) as client:
        assert client.publish(topic, payload, retain=retain, user_properties=props).accepted


def alert_json(pump_id: str) -> str:
    return AlertTransition(
        alert_id=f"{pump_id}:empty_reservoir:1",
        transition_id=f"{pump_id}:empty_reservoir:1:start",
        pump_id=pump_id,
        alert_kind="empty_reservoir",
        priority=Priority.HIGH,
        alert_type=AlertType.TECHNICAL,
        state=AlarmState.ACTIVE,
        phase=Phase.START,
        latching=True,
        text="reservoir empty (pump estimate)",
        at=AT,
    ).model_dump_json()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_tail_prints_one_line_per_message_from_mosquitto(
    mosquitto: Mosquitto, tails: Callable[..., Tail], protocol: str
) -> None:
    root = f"pumpgw/site-{uuid.uuid4().hex[:6]}/st1"
    tail = tails(f"mqtt://127.0.0.1:{mosquitto.port}", f"{root}/#", protocol=protocol)
    tail.out.next_containing("-- subscribed")

    publish(mosquitto.port, f"{root}/pumps/P0001/alerts", alert_json("P0001"), historical=True)
    publish(mosquitto.port, f"{root}/pumps/P0001/telemetry", "not json")

    alert_line = tail.out.next_containing("pumps/P0001/alerts")
    raw_line = tail.out.next_containing("pumps/P0001/telemetry")
    historical = "[historical] " if protocol == "5" else ""  # user properties are MQTT 5 only
    assert alert_line.endswith(
        f"pumps/P0001/alerts  {historical}P0001 ALERT PH start empty_reservoir: "
        "reservoir empty (pump estimate)"
    )
    assert raw_line.endswith("pumps/P0001/telemetry  not JSON (8 B): not json")
    assert tail.stop() == 0


def test_tail_shows_retained_state_from_the_broker(
    tails: Callable[..., Tail], mosquitto: Mosquitto
) -> None:
    status = GatewayStatus(
        site="site1",
        station="st1",
        session_id="s1",
        seq=0,
        state="online",
        at=AT,
        version="0.1",
    )
    publish(
        mosquitto.port, "pumpgw/site1/st1/gateway/status", status.model_dump_json(), retain=True
    )
    tail = tails(f"mqtt://127.0.0.1:{mosquitto.port}", "pumpgw/#")

    line = tail.out.next_containing("gateway/status")

    assert line.endswith(
        "site1/st1/gateway/status  [retained] gateway site1/st1 online "
        "session s1 seq 0 version 0.1 sources 0/0 connected"
    )
    assert tail.stop() == 0


def test_tail_stops_with_exit_code_1_when_credentials_are_refused(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory(users={"operator": "right"})
    out = Lines()

    code = run_tail(
        f"mqtt://127.0.0.1:{broker.port}",
        "pumpgw/#",
        stop=threading.Event(),
        username="operator",
        password="wrong",
        out=out,
    )

    assert code == 1
    assert "refused the connection" in out.next_containing("--")
