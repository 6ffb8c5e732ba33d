"""Serves the ward page and its `config.json` over HTTP (standard library only).

The page itself talks to the broker over MQTT WebSockets with the user's own credentials;
this server never sees them. It serves a fixed set of files from the package's `static`
folder (built by `npm run build` in web/dashboard/), nothing else, with a Content Security
Policy that allows scripts, styles and fonts from itself only and connections to itself
and the broker.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from gateway.dashboard.settings import DEFAULT_BROKER_WS_PORT, DashboardSettings
from schemas.models import INTENDED_USE

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
REQUIRED = ("index.html", "app.js", "app.css", "worker.js")
"""The build's output (web/dashboard/build.mjs); the static folder's files are all that is
served, read once at start."""


class DashboardError(Exception):
    """The dashboard cannot be served (address in use, assets missing)."""


@dataclass(frozen=True)
class PageConfig:
    """What the page is told about the ward it shows."""

    topic_prefix: str
    site: str
    station: str
    """The station's name, or '' for every station of the site."""
    broker_url: str | None
    ack_timeout_s: float

    def as_json(self, host_header: str | None, https: bool) -> dict[str, object]:
        return {
            "topic_prefix": self.topic_prefix,
            "site": self.site,
            "station": self.station,
            "broker_url": self.broker_url or default_broker_url(host_header, https),
            "ack_timeout_s": self.ack_timeout_s,
            "intended_use": INTENDED_USE,
        }


def default_broker_url(host_header: str | None, https: bool) -> str:
    """The broker on the page's own host at the WebSocket port (wss when the page is https)."""
    host = urlsplit(f"//{host_header or '127.0.0.1'}").hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if https else 'ws'}://{host}:{DEFAULT_BROKER_WS_PORT}"


def page_config(
    settings: DashboardSettings, *, topic_prefix: str, site: str, station: str
) -> PageConfig:
    return PageConfig(
        topic_prefix=topic_prefix,
        site=site,
        station=station if settings.scope == "station" else "",
        broker_url=settings.broker_url,
        ack_timeout_s=settings.ack_timeout_s,
    )


def load_assets() -> dict[str, bytes]:
    """The built page from the package; raise DashboardError naming the build command."""
    folder = resources.files("gateway.dashboard") / "static"
    assets = {
        path.name: path.read_bytes()
        for path in folder.iterdir()
        if path.is_file() and content_type(path.name) is not None
    }
    missing = [name for name in REQUIRED if name not in assets]
    if missing:
        raise DashboardError(
            f"the dashboard's {', '.join(missing)} missing from the package: run "
            "`npm ci && npm run build` in web/dashboard/"
        )
    return assets


def content_type(name: str) -> str | None:
    return CONTENT_TYPES.get(name[name.rfind(".") :]) if "." in name else None


def content_security_policy(broker_url: str) -> str:
    broker = urlsplit(broker_url)
    return (
        "default-src 'none'; script-src 'self'; worker-src 'self'; style-src 'self'; "
        f"img-src 'self' data:; font-src 'self'; connect-src 'self' "
        f"{broker.scheme}://{broker.netloc}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class DashboardServer:
    """The HTTP server in a background thread: start(), url, stop()."""

    def __init__(self, listen: str, config: PageConfig) -> None:
        self._assets = load_assets()
        self._config = config
        host, _, port = listen.rpartition(":")
        handler = _handler_class(self._assets, config)
        try:
            self._httpd = ThreadingHTTPServer((host, int(port)), handler)
        except OSError as exc:
            raise DashboardError(
                f"cannot serve the dashboard on {listen}: {exc.strerror or exc}; "
                "choose another dashboard.listen"
            ) from exc
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start(self) -> DashboardServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def _handler_class(assets: dict[str, bytes], config: PageConfig) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pumpgw-dashboard"
        sys_version = ""

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def do_POST(self) -> None:
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

        def _answer(self, *, with_body: bool) -> None:
            path = urlsplit(self.path).path.lstrip("/") or "index.html"
            page = config.as_json(self.headers.get("Host"), https=False)
            if path == "config.json":
                body, kind = json.dumps(page).encode(), "application/json"
            elif path in assets:
                body, kind = assets[path], str(content_type(path))
            else:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Content-Security-Policy", content_security_policy(
                str(page["broker_url"])))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
