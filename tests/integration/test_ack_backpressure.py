"""Operator acknowledgements are never lost: the broker's PUBACK waits until the ack is
applied and stored, and a full ack queue holds the subscription back instead of dropping."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway import service
from gateway.config import load_settings
from gateway.service import Gateway
from gateway.topics import ack_topic
from tests.e2e import gateway_config, wait_until
from tests.integration.test_gateway_e2e import unique_prefix
from tests.mqtt_helpers import publisher
from tests.servers import Mosquitto, free_port

pytestmark = pytest.mark.integration

NURSE = "nurse.jones"
ACKS = 12
WAIT_S = 30.0


def test_a_full_ack_queue_holds_acks_back_and_each_is_applied_before_its_puback(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "ACK_QUEUE_ITEMS", 2)
    rights = {"gateway": {"ack_allowed": [NURSE]}}
    config = gateway_config(tmp_path, sim_port=free_port(), mqtt_port=mosquitto.port,
                            prefix=unique_prefix(), extra=rights)  # fmt: skip
    gateway = Gateway(load_settings(config).model_copy(update={"sources": []}))
    entered, release = threading.Event(), threading.Event()
    applied: list[str] = []
    apply = gateway.pipeline.operator_ack

    def held_back(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(WAIT_S)  # the ingest thread is busy: the queue fills behind it
        refusal = apply(*args, **kwargs)
        applied.append(json.loads(args[1])["alert_id"])
        return refusal

    monkeypatch.setattr(gateway.pipeline, "operator_ack", held_back)
    sink = gateway.sinks.mqtt
    assert sink is not None
    applied_at_puback: list[int] = []
    puback = sink._paho.ack

    def counted_puback(mid: int, qos: int) -> Any:
        applied_at_puback.append(len(applied))
        return puback(mid, qos)

    monkeypatch.setattr(sink._paho, "ack", counted_puback)
    gateway.start()
    try:
        assert wait_until(lambda: bool(sink.health().connected), WAIT_S)
        topic = ack_topic(gateway.topics, NURSE)
        sent = [f"A{i}" for i in range(ACKS)]
        with publisher(mosquitto.port) as client:
            for a in sent:  # each PUBACK: the broker has it
                assert client.publish(topic, json.dumps({"alert_id": a})).accepted
        assert entered.wait(WAIT_S), "the first acknowledgement never reached the pipeline"
        assert wait_until(lambda: gateway.ack_queue_full_waits >= 1, WAIT_S), "queue never full"
        assert applied_at_puback == [], "a PUBACK went out before its ack was applied and stored"
        release.set()
        assert wait_until(lambda: len(applied_at_puback) == ACKS, WAIT_S), applied_at_puback
        assert sorted(applied) == sorted(sent)
        # the n-th PUBACK leaves once at least n acknowledgements are applied and stored
        assert all(done >= n for n, done in enumerate(applied_at_puback, start=1))
    finally:
        release.set()
        gateway.stop()
