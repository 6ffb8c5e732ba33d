"""`pumpgw demo` serves the ward dashboard, pointed at its broker's WebSocket listener."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from gateway.demo import demo_broker, demo_settings, start_dashboard
from tests.servers import accepts_tcp


@pytest.mark.integration
def test_the_demo_serves_the_dashboard_pointed_at_its_websocket_listener(tmp_path: Path) -> None:
    with demo_broker(tmp_path) as broker:
        assert broker.ws_port is not None, "the demo's Mosquitto has no WebSocket listener"
        assert accepts_tcp(broker.ws_port)
        settings = demo_settings(tmp_path, broker.port, sim_port=1)
        server = start_dashboard(settings, broker.ws_port)
        assert server is not None
        try:
            with urllib.request.urlopen(f"{server.url}config.json", timeout=5) as response:  # noqa: S310
                config = json.loads(response.read())
        finally:
            server.stop()
    assert config["broker_url"] == f"ws://127.0.0.1:{broker.ws_port}"
    assert (config["site"], config["station"]) == (settings.gateway.site, settings.gateway.station)


def test_without_a_websocket_listener_the_demo_has_no_dashboard(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path, 1883, sim_port=1)
    assert start_dashboard(settings, None) is None
