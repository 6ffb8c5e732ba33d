"""`pumpgw tail` under a flood: what waits to be printed is bounded, and the rest is counted."""

from __future__ import annotations

import io
import queue
import threading

import paho.mqtt.client as mqtt

from gateway.adapters.mqtt_client import MqttSettings
from gateway.tail import (
    MAX_PAYLOAD_BYTES,
    MAX_QUEUED_MESSAGES,
    _client,
    _Dropped,
    _print_events,
    _Printer,
    _Received,
    _Status,
)


def message(payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=0, topic=b"pumpgw/s/st/pumps/P1/telemetry")
    msg.payload = payload
    return msg


def test_a_flood_is_counted_not_queued_and_a_huge_payload_is_cut() -> None:
    events: queue.Queue[_Received | _Status] = queue.Queue()
    dropped = _Dropped()
    settings = MqttSettings(url="mqtt://x:1883")
    paho = _client(settings, events, dropped, "pumpgw/#", "mqtt://x").paho
    assert paho.on_message is not None
    paho.on_message(paho, None, message(b"x" * (10 * MAX_PAYLOAD_BYTES)))
    for _ in range(MAX_QUEUED_MESSAGES + 500):
        paho.on_message(paho, None, message(b"{}"))
    assert events.qsize() == MAX_QUEUED_MESSAGES
    assert dropped.count == 501
    first = events.get_nowait()
    assert isinstance(first, _Received)
    assert len(first.payload) == MAX_PAYLOAD_BYTES


def test_the_printer_says_how_many_messages_it_did_not_show() -> None:
    events: queue.Queue[_Received | _Status] = queue.Queue()
    events.put(_Status("the end", fatal=True))
    out = io.StringIO()
    code = _print_events(events, _Dropped(count=7), _Printer(out), "pumpgw", threading.Event())
    assert code == 1
    lines = out.getvalue().splitlines()
    assert "-- 7 messages not shown" in lines[0]
    assert "-- the end" in lines[1]
