"""The dashboard's HTTP server: the fixed set of files, config.json, the security headers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import load_settings
from gateway.dashboard.server import DashboardServer, PageConfig, default_broker_url, page_config
from gateway.dashboard.settings import DashboardSettings
from schemas.models import INTENDED_USE

CONFIG = PageConfig("pumpgw", "north", "ward-3", "wss://broker.example:9443", 10.0)


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    running = DashboardServer("127.0.0.1:0", CONFIG).start()
    yield running
    running.stop()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status), dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read()


def test_the_page_and_its_assets_are_served_with_a_strict_policy(server: DashboardServer) -> None:
    status, headers, body = get(server.url)
    assert status == 200
    assert b"pumpgw ward" in body
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self' wss://broker.example:9443" in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    for name, kind in (
        ("app.js", "text/javascript"), ("worker.js", "text/javascript"), ("app.css", "text/css")
    ):
        status, headers, body = get(server.url + name)
        assert status == 200
        assert headers["Content-Type"].startswith(kind)
        assert body


def test_config_json_tells_the_page_its_ward_and_broker(server: DashboardServer) -> None:
    status, _, body = get(server.url + "config.json")
    assert status == 200
    assert json.loads(body) == {
        "topic_prefix": "pumpgw", "site": "north", "station": "ward-3",
        "broker_url": "wss://broker.example:9443", "ack_timeout_s": 10.0,
        "intended_use": INTENDED_USE,
    }


def test_nothing_else_is_served(server: DashboardServer) -> None:
    for path in ("../pyproject.toml", "static/app.js", "server.py", "%2e%2e/settings.py"):
        assert get(server.url + path)[0] == 404, path
    request = urllib.request.Request(  # noqa: S310 - loopback
        server.url, data=b"user=a&password=b", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310 - loopback
    assert refused.value.code == 405
    refused.value.close()


def test_without_a_broker_url_the_page_uses_its_own_host() -> None:
    assert default_broker_url("ward3.example:8090", https=False) == "ws://ward3.example:9001"
    assert default_broker_url("ward3.example", https=True) == "wss://ward3.example:9001"
    assert default_broker_url(None, https=False) == "ws://127.0.0.1:9001"


def test_site_scope_shows_every_station() -> None:
    settings = DashboardSettings(scope="site")
    config = page_config(settings, topic_prefix="pumpgw", site="north", station="ward-3")
    assert config.station == ""


@pytest.mark.parametrize(
    "url", ["http://broker:9001", "ws://user:pw@broker:9001", "ws://broker:9001/?password=x"]
)
def test_a_broker_url_with_credentials_or_another_scheme_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="ws://host:port"):
        DashboardSettings(broker_url=url)


def test_the_dashboard_section_is_part_of_the_gateway_config(tmp_path: Path) -> None:
    path = tmp_path / "pumpgw.toml"
    path.write_text('[dashboard]\nlisten = "0.0.0.0:8443"\nbroker_url = "wss://b:9443"\n')
    settings = load_settings(path)
    assert settings.dashboard.listen == "0.0.0.0:8443"
    assert settings.dashboard.broker_url == "wss://b:9443"
