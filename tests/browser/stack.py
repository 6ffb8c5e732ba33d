"""A ward behind a broker with a WebSocket listener, and Debian's Chromium to look at it.

Shared by the browser tests and the dashboard benchmark: a private Mosquitto with a
password file, the ACL from deploy/ and a `websockets` listener; a real `pumpgw run`;
`pumpsim`; `pumpgw dashboard`; and Playwright driving /usr/bin/chromium (Playwright's own
browser builds are never downloaded).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
from paho.mqtt.client import MQTTv5
from playwright.sync_api import Browser, Page, Playwright, ViewportSize, sync_playwright

from tests.servers import LOOPBACK, Mosquitto, Pki, find_binary, free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY_ACL = REPO / "deploy" / "mosquitto" / "acl"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
STARTUP_TIMEOUT_S = 20.0


class WebSocketMosquitto(Mosquitto):
    """Mosquitto with a `protocol websockets` listener (same users and ACL) on `ws_port`,
    and with `wss=` a TLS one on `wss_port` (the server certificate of that test PKI)."""

    ws_port = 0
    wss_port = 0

    def __init__(self, workdir: Path, *, wss: Pki | None = None, **options: Any) -> None:
        super().__init__(workdir, **options)
        self.wss = wss

    def _choose_ports(self) -> None:
        super()._choose_ports()
        self.ws_port = free_port()
        self.wss_port = free_port() if self.wss is not None else 0

    def _listeners(self) -> list[str]:
        lines = [*super()._listeners()[:-1], f"listener {self.ws_port} {LOOPBACK}",
                 "protocol websockets"]  # fmt: skip
        if self.wss is not None:
            lines += [
                f"listener {self.wss_port} {LOOPBACK}",
                "protocol websockets",
                f"cafile {self.wss.ca_cert}",
                f"certfile {self.wss.server_cert}",
                f"keyfile {self.wss.server_key}",
            ]
        return [*lines, ""]

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.ws_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://localhost:{self.wss_port}"


def chromium(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless; fails naming the package when it is missing."""
    find_binary("chromium", "chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def start_playwright() -> Playwright:
    return sync_playwright().start()


@dataclass
class DashboardProcess:
    """`pumpgw dashboard --config FILE --listen ...` as a child process."""

    proc: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls, config: Path, log_path: Path) -> DashboardProcess:
        listen = f"{LOOPBACK}:{free_port()}"
        argv = [sys.executable, "-m", "gateway.cli", "dashboard", "--config", str(config),
                "--listen", listen]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("dashboard: http://"), f"pumpgw dashboard did not start: {first!r}"
        return cls(proc, first.split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def sign_in(page: Page, url: str, user: str, password: str) -> None:
    """Open the page and submit the login form."""
    page.goto(url)
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("#login button[type=submit]")


def page_stats(page: Page) -> dict[str, Any]:
    """The page's own counters (window.pumpgwDashboard.stats)."""
    stats: dict[str, Any] = page.evaluate(
        "() => ({messages: window.pumpgwDashboard.stats.messages,"
        " pumps: window.pumpgwDashboard.ward.pumps.size})"
    )
    return stats


def publish_retained(
    port: int, user: tuple[str, str], messages: dict[str, bytes], *, retain: bool = True
) -> None:
    """Publish each topic's payload at QoS 1, retained (an empty payload deletes it), and
    wait until the broker took them all."""
    mqtt_publish.multiple(
        [{"topic": topic, "payload": payload, "qos": 1, "retain": retain}
         for topic, payload in messages.items()],
        hostname=LOOPBACK, port=port, protocol=MQTTv5,
        auth={"username": user[0], "password": user[1]},
    )


def outside_viewport(page: Page, selector: str) -> list[str]:
    """What of the elements matching `selector` lies outside the viewport (empty when every
    one is wholly visible without scrolling), and whether the page itself scrolls."""
    problems: list[str] = page.evaluate(
        """(selector) => {
          const out = [];
          const [w, h] = [window.innerWidth, window.innerHeight];
          for (const node of document.querySelectorAll(selector)) {
            const r = node.getBoundingClientRect();
            const name = node.dataset.pump ?? node.dataset.alertId ?? node.id;
            if (r.top < 0 || r.left < 0 || r.bottom > h || r.right > w) {
              out.push(`${name}: y ${r.top}-${r.bottom}, x ${r.left}-${r.right}`);
            }
          }
          const scrolls = (n) => n.scrollHeight > n.clientHeight;
          const root = document.scrollingElement;
          if (scrolls(root)) out.push(`the page scrolls: ${root.scrollHeight} px`);
          for (const pane of document.querySelectorAll('.alerts-pane, .ward-pane')) {
            if (scrolls(pane)) out.push(`${pane.className} scrolls: ${pane.scrollHeight} px`);
          }
          return out;
        }""",
        selector,
    )
    return problems
