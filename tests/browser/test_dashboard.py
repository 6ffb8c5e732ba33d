"""The ward dashboard in a real browser against a real broker, gateway and simulator.

One stack for the module (tests run in file order, the last one kills the gateway):
Mosquitto with a password file, a WebSocket listener and the ACL from deploy/ (plus the
per-user acknowledgement topic and a read-only user); `pumpgw run`; `pumpsim` serving a
mixed ward (one pump per scenario: low reservoir, motor stall, battery, flow faults, ...)
replayed at full speed; `pumpgw dashboard`; Chromium driven by Playwright.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, expect

from gateway.dashboard.server import DashboardServer, PageConfig
from simulator.scenarios import WARD_CYCLE
from tests.browser.stack import (
    DEPLOY_ACL,
    DESKTOP,
    PHONE,
    DashboardProcess,
    WebSocketMosquitto,
    chromium,
    outside_viewport,
    page_stats,
    publish_retained,
    sign_in,
    start_playwright,
)
from tests.e2e import Collector, GatewayProcess, Ward, gateway_config
from tests.servers import generate_test_pki

PREFIX = "pumpgw"
SITE, STATION = "test", "bed-1"
ROOT = f"{PREFIX}/{SITE}/{STATION}"
STATION_USER = f"{SITE}/{STATION}"
"""The deploy ACL names a station's user after its site and station."""
BIG_STATION = "ward-50"
"""A second station, its state injected through the broker: a ward of BIG_WARD_PUMPS pumps."""
BIG_ROOT = f"{PREFIX}/{SITE}/{BIG_STATION}"
BIG_WARD_PUMPS = 50
BIG_WARD_ALERTS = 20
"""Active alerts in that ward: two in five pumps alarming at once, the list's design load at
1280x800 (docs/dashboard.md); more scroll inside the list, the highest priority on top."""
USERS = {STATION_USER: "gw-secret-1", "dashboard": "dash-secret-2", "viewer": "view-secret-3",
         f"{SITE}/{BIG_STATION}": "ward50-secret-4"}
# The deploy ACL as it is (its patterns give the station its own tree and its ack topics, and
# everyone acknowledgements under their own name only), plus the read rights that the deploy
# roles file (dynamic-security plugin, not loaded here) gives dashboards.
ACL = DEPLOY_ACL.read_text() + (
    "\nuser dashboard\ntopic read pumpgw/#\n"
    "\nuser viewer\ntopic read pumpgw/#\n"
)
KEEPALIVE_S = 5
"""The gateway's keep-alive: the broker publishes its will after 1.5 x this."""
OFFLINE_SLACK_S = 5.0
"""On top of 1.5 x keep-alive: the broker's keep-alive check and the page's next frame."""
ACK_TIMEOUT_S = 4.0
STATUS_INTERVAL_S = 2.0
"""The gateway republishes each pump's status this often: live messages for the page's clock."""
BROWSER_CLOCK_AHEAD_S = 3600
PUMPS = tuple(f"P{i + 1:04d}" for i in range(len(WARD_CYCLE)))
"""One pump per scenario: P0002 low-reservoir, P0004 motor-stall (simulator/scenarios.py)."""
INTERVAL_S = 60
READINGS = 720
"""Half a simulated day at once: every fault of the scenarios plays within a second or two."""
WAIT_MS = 30_000
ARTIFACTS_DIR = os.environ.get("PUMPGW_ARTIFACTS")
"""Keep the screenshots here (default: the module's temporary directory)."""
ARTIFACTS = Path(ARTIFACTS_DIR) if ARTIFACTS_DIR else None


@dataclass
class Stack:
    broker: WebSocketMosquitto
    gateway: GatewayProcess
    ward: Ward
    dashboard: DashboardProcess
    receipts: Collector
    browser: Browser
    playwright: Playwright
    artifacts: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dashboard")
    with contextlib.ExitStack() as cleanup:
        yield _start_stack(workdir, cleanup)


def _start_stack(workdir: Path, cleanup: contextlib.ExitStack) -> Stack:
    """Start everything; `cleanup` stops each part in reverse order, also after a failure."""
    broker = WebSocketMosquitto(
        workdir / "mosquitto", users=USERS, acl=ACL, wss=generate_test_pki(workdir / "pki")
    )
    broker.start()
    cleanup.callback(broker.stop)
    ward = Ward.start(
        workdir, "--pumps", str(len(PUMPS)), "--scenario", "ward", "--seed", "1",
        "--interval", str(INTERVAL_S), "--count", str(READINGS), "--speed", "max",
    )
    cleanup.callback(ward.stop)
    password_file = workdir / "station.password"
    password_file.write_text(USERS[STATION_USER])
    password_file.chmod(0o600)
    config = gateway_config(
        workdir, sim_port=ward.port, mqtt_port=broker.port, prefix=PREFIX,
        extra={
            "mqtt": {"username": STATION_USER, "password_file": str(password_file),
                     "keepalive_s": KEEPALIVE_S, "reconnect_max_s": 1},
            "gateway": {"ack_allowed": ["dashboard"], "status_interval_s": STATUS_INTERVAL_S},
            "dashboard": {"broker_url": broker.ws_url, "ack_timeout_s": ACK_TIMEOUT_S},
        },
    )
    gateway = GatewayProcess(config, workdir / "gateway.log").start()
    cleanup.callback(lambda: gateway.stop() if gateway.running else None)
    dashboard = DashboardProcess.start(config, workdir / "dashboard.log")
    cleanup.callback(dashboard.stop)
    receipts = Collector(
        broker.port, f"{ROOT}/pumps/+/alerts", user=("dashboard", USERS["dashboard"])
    )
    cleanup.callback(receipts.close)
    playwright = start_playwright()
    cleanup.callback(playwright.stop)
    browser = chromium(playwright)
    cleanup.callback(browser.close)
    artifacts = ARTIFACTS or workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    return Stack(broker, gateway, ward, dashboard, receipts, browser, playwright, artifacts)


@pytest.fixture
def page(stack: Stack) -> Iterator[Page]:
    context = stack.browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def signed_in(page: Page, stack: Stack, user: str = "dashboard") -> Page:
    sign_in(page, stack.dashboard.url, user, USERS[user])
    expect(page.locator("#connection")).to_have_text("connected")
    return page


def alert_row(page: Page, pump: str, text: str) -> Any:
    return page.locator("[data-testid=alert]").filter(has_text=pump).filter(has_text=text)


def test_the_page_lists_every_pump_and_the_expected_alerts_with_their_priority(
    stack: Stack, page: Page
) -> None:
    signed_in(page, stack)
    tiles = page.locator("[data-testid=pump]")
    expect(tiles).to_have_count(len(PUMPS))
    assert sorted(tiles.evaluate_all("ts => ts.map(t => t.dataset.pump)")) == list(PUMPS)
    stall = alert_row(page, "P0004", "Motor stall").first
    expect(stall).to_contain_text("HIGH")
    expect(stall).to_have_attribute("data-priority", "PH")
    low = alert_row(page, "P0002", "Low reservoir").first
    expect(low).to_contain_text("MEDIUM")
    expect(low).to_have_attribute("data-priority", "PM")
    priorities = page.locator("[data-testid=alert]").evaluate_all(
        "rows => rows.map(r => r.dataset.priority)"
    )
    order = {"PH": 0, "PM": 1, "PL": 2, "PN": 3}
    assert priorities == sorted(priorities, key=order.__getitem__), priorities
    expect(page.locator("#intended-use")).to_contain_text("Not a primary alarm system")
    expect(page.locator("[data-pump=P0002]")).to_contain_text("mL est.")


def test_an_acknowledgement_shows_only_when_the_gateways_receipt_comes_back(
    stack: Stack, page: Page
) -> None:
    signed_in(page, stack)
    alert_id = alert_row(page, "P0002", "Low reservoir").first.get_attribute("data-alert-id")
    row = page.locator(f"[data-alert-id='{alert_id}']")  # the list is redrawn as alerts change
    expect(row).to_have_attribute("data-acknowledged", "false")
    assert stack.gateway.proc is not None
    stack.gateway.proc.send_signal(signal.SIGSTOP)  # the gateway cannot answer for now
    try:
        row.get_by_role("button", name="Acknowledge").click()
        expect(row).to_contain_text("waiting for the gateway")
        assert row.get_attribute("data-acknowledged") == "false"
        assert not _receipts(stack, alert_id)
    finally:
        stack.gateway.proc.send_signal(signal.SIGCONT)
    expect(row).to_have_attribute("data-acknowledged", "true")
    expect(row).to_contain_text("acknowledged by dashboard")
    receipts = _receipts(stack, alert_id)
    assert receipts, "the page shows acknowledged without the gateway's transition"
    assert receipts[-1]["acknowledged_by"] == "dashboard"
    assert receipts[-1]["inactivation"] == "alert-acknowledged"


def _receipts(stack: Stack, alert_id: str | None) -> list[dict[str, Any]]:
    with stack.receipts._lock:
        return [a for a in stack.receipts.payloads["alert"]
                if a["alert_id"] == alert_id and a["phase"] == "acknowledged"]


def test_screenshots_at_desktop_and_phone_width(stack: Stack, page: Page) -> None:
    signed_in(page, stack)
    expect(page.locator("[data-testid=pump]")).to_have_count(len(PUMPS))
    expect(page.locator("[data-testid=alert]").first).to_be_visible()
    desktop = stack.artifacts / "dashboard-1280x800.png"
    desktop.write_bytes(page.screenshot())
    page.set_viewport_size(PHONE)
    phone = stack.artifacts / "dashboard-390x844.png"
    phone.write_bytes(page.screenshot())
    page.set_viewport_size(DESKTOP)
    page.locator("[data-pump=P0004]").click()
    detail = page.locator("[data-testid=detail]")
    expect(detail).to_contain_text("Programming")
    expect(detail.locator("canvas").first).to_be_visible()
    expect(detail.locator("[data-role=active]")).to_contain_text("Motor stall")
    (stack.artifacts / "dashboard-detail-1280x800.png").write_bytes(page.screenshot())
    assert desktop.stat().st_size > 0
    assert phone.stat().st_size > 0


def test_a_browser_clock_an_hour_fast_does_not_make_fresh_data_look_stale(
    stack: Stack, page: Page
) -> None:
    page.clock.install(time=time.time() + BROWSER_CLOCK_AHEAD_S)
    assert page.evaluate("() => Date.now() / 1000") > time.time() + BROWSER_CLOCK_AHEAD_S - 60
    signed_in(page, stack)
    tile = page.locator("[data-pump=P0001]")
    # The ward has finished sending: only retained state, so the page cannot tell the
    # gateway's clock yet. It shows when the status was written, never "1 h ago"; ages come
    # with the first live message (web/dashboard/test/ward.test.mjs checks the estimate).
    expect(tile).to_contain_text(re.compile(r"status at \d\d:\d\d:\d\d"))
    expect(tile).not_to_contain_text(re.compile(r"\d+ h \d+ min ago"))
    expect(tile).to_have_attribute("data-state", "live")


def test_a_wrong_password_gives_a_clear_login_error(stack: Stack, page: Page) -> None:
    sign_in(page, stack.dashboard.url, "dashboard", "not-the-password")
    error = page.locator("[data-testid=login-error]")
    expect(error).to_contain_text("refused the login")
    expect(error).to_contain_text("Check the user name and password")
    expect(page.locator("#alerts")).not_to_be_visible()


def test_a_user_without_acknowledge_permission_sees_the_refusal(stack: Stack, page: Page) -> None:
    signed_in(page, stack, "viewer")
    alert_id = alert_row(page, "P0004", "Motor stall").first.get_attribute("data-alert-id")
    row = page.locator(f"[data-alert-id='{alert_id}']")
    row.get_by_role("button", name="Acknowledge").click()
    refused = row.locator("[data-testid=ack-refused]")
    expect(refused).to_contain_text("acknowledgement refused")
    # The gateway's own reason (its AckRefusal on gateway/acks/refused), not the timeout.
    expect(refused).to_contain_text("not_allowed")
    expect(refused).to_contain_text("'viewer' is not in gateway.ack_allowed")
    assert row.get_attribute("data-acknowledged") == "false"
    assert not _receipts(stack, alert_id)


def _retained_state(stack: Stack, root: str = ROOT) -> dict[str, dict[str, Any]]:
    """Every retained message under `root` now, decoded: a marker published after the
    subscription arrives after the retained messages the broker sends at subscribe."""
    collector = Collector(stack.broker.port, f"{root}/#", user=("dashboard", USERS["dashboard"]))
    try:
        marker = {"kind": "marker", "at": time.time()}
        publish_retained(stack.broker.port, (STATION_USER, USERS[STATION_USER]),
                         {f"{root}/gateway/marker": json.dumps(marker).encode()}, retain=False)
        assert collector.wait_for(lambda: marker in collector.payloads["marker"], 10)
        with collector._lock:
            return {topic: json.loads(raw) for topic, raw in collector.retained.items()}
    finally:
        collector.close()


def _active_set(session: str, seq: int, pump: str, text: str, template: dict[str, Any]) -> bytes:
    alert = {**template, "pump_id": pump, "alert_id": f"{pump}:seq_test:{seq}",
             "transition_id": f"{pump}:seq_test:{seq}:start", "text": text}
    return json.dumps({"kind": "active_alerts", "schema_version": 1, "pump_id": pump,
                       "at": template["at"], "alerts": [alert], "session_id": session,
                       "seq": seq}).encode()


def test_the_page_keeps_the_newer_retained_alert_set_and_ignores_a_foreign_one(
    stack: Stack, page: Page
) -> None:
    state = _retained_state(stack)
    session = state[f"{ROOT}/gateway/status"]["session_id"]
    template = state[f"{ROOT}/pumps/P0004/alerts/active"]["alerts"][0]
    pump = "P0099"  # not served: its retained copy is deleted at the end
    topic = f"{ROOT}/pumps/{pump}/alerts/active"
    station = (STATION_USER, USERS[STATION_USER])
    signed_in(page, stack)
    try:
        publish_retained(stack.broker.port, station,
                         {topic: _active_set(session, 900_002, pump, "Newer set", template)})
        expect(alert_row(page, pump, "Newer set")).to_have_count(1)
        publish_retained(stack.broker.port, station,
                         {topic: _active_set(session, 900_001, pump, "Older set", template)})
        foreign = _active_set("foreign-session", 999_999, pump, "Foreign", template)
        publish_retained(stack.broker.port, station, {topic: foreign})
        # The page has taken both (the next message on the topic is the deletion below).
        page.wait_for_function(
            f"() => window.pumpgwDashboard.ward.stations.get('{ROOT}').parked.has('{topic}')"
        )
        expect(alert_row(page, pump, "Newer set")).to_have_count(1)
        expect(alert_row(page, pump, "Older set")).to_have_count(0)
        expect(alert_row(page, pump, "Foreign")).to_have_count(0)
    finally:
        publish_retained(stack.broker.port, station, {topic: b""})


def _big_ward(state: dict[str, dict[str, Any]], session: str) -> dict[str, bytes]:
    """BIG_WARD_PUMPS pumps for BIG_STATION: pump i takes the retained info, status and
    active alerts of the mixed ward's pump i mod 13, under its own id and a new session,
    until BIG_WARD_ALERTS alerts are active (the other pumps then have none)."""
    seq = itertools.count(1)
    budget = BIG_WARD_ALERTS
    birth = {**state[f"{ROOT}/gateway/status"], "station": BIG_STATION, "session_id": session,
             "seq": 0, "state": "online"}
    messages = {f"{BIG_ROOT}/gateway/status": json.dumps(birth).encode()}
    for index in range(BIG_WARD_PUMPS):
        pump, template = f"P{index + 1:04d}", PUMPS[index % len(PUMPS)]
        for leaf in ("info", "status", "alerts/active"):
            data = state.get(f"{ROOT}/pumps/{template}/{leaf}")
            if data is None:
                continue
            copy = json.loads(json.dumps(data).replace(template, pump))
            if leaf == "alerts/active":
                copy["alerts"] = copy["alerts"][:budget]
                budget -= len(copy["alerts"])
                if not copy["alerts"]:
                    continue
            if leaf != "info":
                copy.update(session_id=session, seq=next(seq))
            messages[f"{BIG_ROOT}/pumps/{pump}/{leaf}"] = json.dumps(copy).encode()
    return messages


def test_fifty_pumps_and_the_whole_alert_list_fit_one_desktop_screen(stack: Stack) -> None:
    state = _retained_state(stack)
    ward = _big_ward(state, "ward50-session")
    publish_retained(stack.broker.port, (f"{SITE}/{BIG_STATION}", USERS[f"{SITE}/{BIG_STATION}"]),
                     ward)
    alerts = sum(len(json.loads(payload)["alerts"]) for topic, payload in ward.items()
                 if topic.endswith("/alerts/active"))
    assert alerts == BIG_WARD_ALERTS
    config = PageConfig(PREFIX, SITE, BIG_STATION, stack.broker.ws_url, ACK_TIMEOUT_S)
    server = DashboardServer("127.0.0.1:0", config).start()
    context = stack.browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        sign_in(page, server.url, "dashboard", USERS["dashboard"])
        expect(page.locator("[data-testid=pump]")).to_have_count(BIG_WARD_PUMPS)
        expect(page.locator("[data-testid=alert]")).to_have_count(alerts)
        expect(page.locator("#alert-count")).to_have_text(str(alerts))
        (stack.artifacts / "dashboard-50-1280x800.png").write_bytes(page.screenshot())
        selector = "[data-testid=pump], [data-testid=alert], #alerts, #intended-use"
        assert outside_viewport(page, selector) == [], f"{alerts} alerts"
    finally:
        context.close()
        server.stop()


def test_the_page_works_over_wss_with_the_tls_listener(stack: Stack) -> None:
    config = PageConfig(PREFIX, SITE, STATION, stack.broker.wss_url, ACK_TIMEOUT_S)
    server = DashboardServer("127.0.0.1:0", config).start()
    # The test CA is not in Chromium's trust store; a hospital's CA would be.
    context = stack.browser.new_context(viewport=DESKTOP, ignore_https_errors=True)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        sign_in(page, server.url, "dashboard", USERS["dashboard"])
        expect(page.locator("#connection")).to_have_text("connected")
        expect(page.locator("[data-testid=pump]")).to_have_count(len(PUMPS))
        assert page.evaluate("() => window.pumpgwDashboard.app.config.broker_url").startswith(
            "wss://"
        )
    finally:
        context.close()
        server.stop()


def test_a_broker_restart_shows_a_banner_then_recovers_without_reload_or_duplicates(
    stack: Stack, page: Page
) -> None:
    signed_in(page, stack)
    expect(page.locator("[data-testid=pump]")).to_have_count(len(PUMPS))
    page.evaluate("() => { window.notReloaded = true; }")
    before = page_stats(page)["messages"]
    stack.broker.stop()
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner")).to_contain_text("lost since")
    expect(page.locator("[data-pump=P0001]")).to_have_attribute("data-state", "stale")
    stack.broker.start()
    expect(page.locator("#banner")).to_be_hidden()
    page.wait_for_function(f"() => window.pumpgwDashboard.stats.messages > {before}")
    expect(page.locator("[data-pump=P0001]")).to_have_attribute("data-state", "live")
    expect(page.locator("[data-testid=pump]")).to_have_count(len(PUMPS))
    assert page.evaluate("() => window.notReloaded") is True
    ids = page.locator("[data-testid=alert]").evaluate_all("rs => rs.map(r => r.dataset.alertId)")
    assert len(ids) == len(set(ids)), ids


def test_a_killed_gateway_shows_gateway_offline_within_one_and_a_half_keepalives(
    stack: Stack, page: Page
) -> None:
    signed_in(page, stack)
    tile = page.locator("[data-pump=P0001]")
    expect(tile).to_have_attribute("data-state", "live")
    killed = time.monotonic()
    stack.gateway.kill()
    expect(tile).to_have_attribute(
        "data-state", "gateway-offline", timeout=(KEEPALIVE_S * 1.5 + OFFLINE_SLACK_S) * 1000
    )
    seen_after_s = time.monotonic() - killed
    expect(tile).to_contain_text("gateway offline since")
    expect(page.locator("[data-testid=gateways]")).to_contain_text("offline")
    (stack.artifacts / "gateway-offline.json").write_text(
        json.dumps({"keepalive_s": KEEPALIVE_S, "seen_after_s": round(seen_after_s, 2)})
    )
    (stack.artifacts / "dashboard-gateway-offline.png").write_bytes(page.screenshot())
