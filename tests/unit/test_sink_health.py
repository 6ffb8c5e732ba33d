"""Every sink's SinkHealth as /metrics exports it: the names dashboards and docs rely on."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.adapters.delivery import MessageSink
from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.adapters.mqtt import MqttSink
from gateway.adapters.mqtt_client import MqttSettings
from gateway.health import SinkObservation, render_metrics
from gateway.outbox import Outbox
from gateway.sink_health import SinkHealth
from gateway.store_shell import sink_observation
from gateway.topics import TopicBase
from tests.unit.test_health import observation
from tests.unit.test_message_sink import PACING, PerRecord, Scripted, outbox_with

OPERATIONS_DOC = Path(__file__).parents[2] / "docs" / "operations.md"
MQTT_COUNTERS = {
    "denied", "reconnects", "refused", "unreachable", "historical", "unroutable",
    "acks_received", "acks_dropped", "ack_refusals_sent", "session_takeovers", "sessions_lost",
}  # fmt: skip


def exported(sink: SinkObservation) -> dict[str, tuple[str, float]]:
    """pumpgw_sink_* family -> (type, value) for one sink, as a scraper parses /metrics."""
    text = render_metrics(observation(sinks=(sink,)))
    return {
        f.name: (f.type, f.samples[0].value)
        for f in text_string_to_metric_families(text)
        if f.name.startswith("pumpgw_sink_") and f.samples
    }


COMMON = {"backlog_records", "oldest_unsent_age_seconds", "delivered", "connected"}


def names(families: dict[str, tuple[str, float]]) -> set[str]:
    return {name.removeprefix("pumpgw_sink_") for name in families} - COMMON


def test_mqtt_sink_exports_inflight_as_a_gauge_and_its_counters(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", ["mqtt"])
    sink = MqttSink(MqttSettings(), outbox, TopicBase("s", "st"), status=lambda: (b"", b""),
                    on_ack=lambda ack: None)  # fmt: skip
    sink.published, sink.denied = 7, 2
    families = exported(sink_observation("mqtt", sink.health(), (0, None), 0.0))
    outbox.close()
    assert names(families) == MQTT_COUNTERS | {"inflight"}
    assert families["pumpgw_sink_inflight"] == ("gauge", 0.0)
    assert families["pumpgw_sink_delivered"] == ("counter", 7.0)
    assert families["pumpgw_sink_denied"] == ("counter", 2.0)


def test_influx_sink_exports_its_position_as_a_gauge(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", ["influx"])
    settings = InfluxSettings(url="http://127.0.0.1:1", org="o")
    sink = InfluxSink(settings, outbox, on_poison=lambda r, w: None, rng=random.Random(1))
    health = sink.health()
    sink.close()
    outbox.close()
    families = exported(sink_observation("influx", health, (0, None), 0.0, {"mqtt_acked": 3}))
    assert names(families) == {"batches", "retries", "poisoned", "sent_up_to", "mqtt_acked"}
    assert families["pumpgw_sink_sent_up_to"] == ("gauge", 0.0)
    assert families["pumpgw_sink_mqtt_acked"] == ("counter", 3.0)


def test_message_sink_counts_records_messages_retries_and_quarantine(tmp_path: Path) -> None:
    outbox = outbox_with(tmp_path, ["a", "busy", "bad"])
    sink = MessageSink("hl7", outbox, PerRecord(False), Scripted(), PACING,
                       on_poison=lambda *args: None)  # fmt: skip
    sink.drain(threading.Event())
    health = sink.health()
    outbox.close()
    counters = {"messages": 2, "retries": 2, "poisoned": 1}
    assert health == SinkHealth(True, "refused: bad", 2, counters)
    families = exported(sink_observation("hl7", health, (1, 10.0), 25.0))
    assert names(families) == {"messages", "retries", "poisoned"}
    assert families["pumpgw_sink_delivered"] == ("counter", 2.0)
    assert families["pumpgw_sink_oldest_unsent_age_seconds"] == ("gauge", 15.0)


def test_the_health_record_is_frozen() -> None:
    health = SinkHealth(True, None, 0)
    with pytest.raises(AttributeError):
        health.connected = False  # type: ignore[misc]


def test_operations_doc_names_every_sink_counter() -> None:
    row = next(line for line in OPERATIONS_DOC.read_text().splitlines()
               if line.startswith("| `pumpgw_sink_<counter>_total`"))  # fmt: skip
    documented = set(re.findall(r"`([a-z_]+)`", row)) - {"sink"}
    assert MQTT_COUNTERS | {"batches", "retries", "poisoned", "messages"} <= documented
