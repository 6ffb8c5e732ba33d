"""`pumpgw`: the command line. The only module that prints or configures logging.

Exit codes: 0 success, 1 runtime failure, 2 configuration or usage error. Each branch of
the error tree (gateway.errors) maps to one: ConfigError to 2 with every problem on its own
line, any other PumpgwError or an OSError to 1 with one line. Anything else is a bug: Python
prints its traceback and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import (
    ConfigError,
    ProcessSettings,
    Settings,
    environment_keys,
    inline_secrets_warning,
    load_settings,
)
from gateway.errors import PumpgwError
from gateway.history import printable
from gateway.logs import log_formatter
from gateway.store_shell import stop_on_signals

log = logging.getLogger("pumpgw")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

INTENDED_USE_BANNER = (
    "pumpgw is a secondary, informational notification system. It is not a primary alarm "
    "system and does not replace the pump's own alarms or clinical refill procedures."
)

DESCRIPTION = f"""\
pumpgw reads intrathecal pump telemetry from serial lines, validates every frame,
stores it durably, and forwards it to MQTT and InfluxDB with alerts.

{INTENDED_USE_BANNER}

Start with `pumpgw demo` to watch a simulated ward, or `pumpgw check-config FILE`
before `pumpgw run --config FILE` on a station.
"""


def _configure_logging(verbose: bool, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("urllib3", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.service import run_gateway

    settings = load_settings(args.config)
    stop = threading.Event()
    stop_on_signals(stop)
    run_gateway(settings, stop)
    return 0


def _is_ingest_config(path: Path) -> bool:
    """An [ingest] table marks an ingest worker's file (checked with its own model)."""
    try:
        return "ingest" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # load_settings reports it


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        if _is_ingest_config(args.file):
            from gateway.ingest import load_ingest_settings

            settings: ProcessSettings = load_ingest_settings(args.file)
        else:
            settings = load_settings(args.file)
    except ConfigError as exc:
        print(printable(f"{args.file}: {len(exc.problems)} problem(s):"), file=sys.stderr)
        for problem in exc.problems:
            print(f"  {printable(problem)}", file=sys.stderr)
        return 2
    lines = [
        f"{args.file}: OK",
        f"  site/station: {settings.gateway.site}/{settings.gateway.station}",
        f"  mqtt: {settings.mqtt.display_url()}{_tls_note(settings)}",
        f"  influx: {_influx_note(settings)}",
        f"  store: {settings.store.path} (durability {settings.store.durability})",
    ]
    if isinstance(settings, Settings):  # the station's own sections
        lines[2:2] = [f"  sources: {', '.join(s.label for s in settings.sources) or 'none'}"]
        lines[-1:-1] = [
            f"  hl7: {settings.hl7.display_url() if settings.hl7 else 'not configured'}",
            f"  fhir: {settings.fhir.display_url() if settings.fhir else 'not configured'}",
        ]
    keys = environment_keys()
    if keys:
        lines.append(f"  overridden from the environment: {', '.join(keys)}")
    warning = inline_secrets_warning(settings, args.file)
    if warning is not None:
        lines.append(f"  WARNING: {warning}")
    print("\n".join(printable(line) for line in lines))
    if isinstance(settings, Settings):  # alert rules run on the station only
        pseudonymising = settings.gateway.pseudonymize_key is not None or bool(
            settings.gateway.pseudonymize_key_file)
        for override_warning in settings.alerts.override_warnings(pseudonymising):
            print(printable(f"  warning: {override_warning}"), file=sys.stderr)
    return 0


def _influx_note(settings: ProcessSettings) -> str:
    if settings.influx is None:
        return "not configured"
    note = settings.influx.display_url()
    if settings.influx.url.startswith("https:") and not settings.influx.verify_tls:
        note += " (TLS, certificate NOT verified: influx.verify_tls is off)"
    return note


def _tls_note(settings: ProcessSettings) -> str:
    """How the broker's certificate is checked, for check-config (never a secret)."""
    if not settings.mqtt.uses_tls:
        return " (no TLS)"
    tls = settings.mqtt.tls
    if tls.insecure_skip_verify:
        return " (TLS, certificate NOT verified: mqtt.tls.insecure_skip_verify is on)"
    client = ", client certificate" if tls.cert_file else ""
    return f" (TLS verified with {tls.ca_file or 'the system CAs'}{client})"


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    stop = threading.Event()
    stop_on_signals(stop)
    return run_demo(
        pumps=args.pumps,
        speed=args.speed,
        seed=args.seed,
        duration_s=args.duration,
        live_view=not args.no_view,
        workdir=args.workdir,
        stop=stop,
    )


def cmd_tail(args: argparse.Namespace) -> int:
    from gateway.tail import connection_options, run_tail

    url, topic_filter = args.url, args.topic
    options: dict[str, Any] = {}
    if args.config is not None:
        settings = load_settings(args.config)
        url = url or settings.mqtt.url
        prefix = settings.mqtt.topic_prefix
        topic_filter = topic_filter or (
            f"{prefix}/{settings.gateway.site}/{settings.gateway.station}/#"
        )
        options = connection_options(settings.mqtt)  # the gateway's user, password and TLS
    stop = threading.Event()
    stop_on_signals(stop)
    return run_tail(
        url or "mqtt://127.0.0.1:1883", topic_filter or "pumpgw/#", stop=stop, **options
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    from gateway.dashboard.server import DashboardServer, page_config

    settings = load_settings(args.config)
    listen = args.listen or settings.dashboard.listen
    config = page_config(
        settings.dashboard,
        topic_prefix=settings.mqtt.topic_prefix,
        site=settings.gateway.site,
        station=settings.gateway.station,
    )
    server = DashboardServer(listen, config).start()
    broker = config.broker_url or "ws://<the page's host>:9001"
    print(f"dashboard: {server.url} (browsers connect to the broker at {broker})", flush=True)
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from gateway.history import print_history

    path = args.store
    if path is None:
        path = load_settings(args.config).store.path
    return print_history(path, args.pump, limit=args.limit, as_json=args.json)


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.service import replay_capture

    settings = load_settings(args.config)
    counts = replay_capture(settings, args.capture)
    print(json.dumps(counts))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from gateway.ingest import load_ingest_settings, run_ingest

    settings = load_ingest_settings(args.config)
    stop = threading.Event()
    stop_on_signals(stop)
    retired = run_ingest(settings, stop, retire=args.retire)
    if args.retire and not retired:
        print("stopped before the worker left its group; run --retire again", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pumpgw", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pumpgw {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line for journald/Loki (text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway on a station from a config file")
    run.add_argument("--config", type=Path, required=True, help="the TOML configuration file")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file; list every problem")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_check_config)

    demo = sub.add_parser(
        "demo",
        help="a simulated ward, the gateway, a broker and a live view, all on this machine",
        description="Starts simulated pumps whose scenarios raise alerts, the gateway, an MQTT "
        "broker (a private Mosquitto: install the Debian package 'mosquitto', or start with "
        "scripts/demo) and a local store, and shows a live view. Ctrl-C, SIGTERM or closing "
        "the terminal stops everything.",
    )
    demo.add_argument(
        "--pumps", type=int, default=13, help="simulated pumps; 13 shows every scenario once (13)"
    )
    demo.add_argument(
        "--speed",
        type=float,
        default=3600.0,
        help="simulated seconds per real second (3600: an hour a second)",
    )
    demo.add_argument("--seed", type=int, default=7, help="simulator seed")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    demo.add_argument("--no-view", action="store_true", help="log lines instead of the live view")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the outbox and logs here (default: a temporary directory)",
    )
    demo.set_defaults(func=cmd_demo)

    tail = sub.add_parser("tail", help="subscribe and pretty-print the topic tree")
    tail.add_argument("--url", default=None, help="broker, e.g. mqtt://127.0.0.1:1883")
    tail.add_argument("--topic", default=None, help="topic filter (default: the station's tree)")
    tail.add_argument("--config", type=Path, default=None, help="take broker and tree from here")
    tail.set_defaults(func=cmd_tail)

    dashboard = sub.add_parser(
        "dashboard",
        help="serve the ward dashboard (a web page that reads the broker over WebSockets)",
        description="Serves the ward page on [dashboard] listen (loopback by default). The page "
        "signs in to the broker's WebSocket listener with the user's own broker account and "
        "shows the station's pumps and alerts live (docs/dashboard.md).",
    )
    dashboard.add_argument("--config", type=Path, required=True, help="the gateway's TOML file")
    dashboard.add_argument("--listen", default=None, help="host:port, overrides [dashboard]")
    dashboard.set_defaults(func=cmd_dashboard)

    history = sub.add_parser("history", help="a pump's recent readings and alerts from the store")
    history.add_argument("--pump", required=True, help="pump id as published")
    history.add_argument("--config", type=Path, default=None, help="config naming the store")
    history.add_argument("--store", type=Path, default=None, help="or the outbox file itself")
    history.add_argument("--limit", type=int, default=30, help="how many records (30)")
    history.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    history.set_defaults(func=cmd_history)

    replay = sub.add_parser("replay", help="feed a simulator capture through the pipeline")
    replay.add_argument("capture", type=Path, help="a file written by pumpsim --transport file")
    replay.add_argument("--config", type=Path, required=True, help="the TOML configuration file")
    replay.set_defaults(func=cmd_replay)

    ingest = sub.add_parser(
        "ingest",
        help="central worker: gateways' telemetry from MQTT to InfluxDB (scale-out)",
        description="Takes a share of every gateway's telemetry, events and alerts from the "
        "broker (an MQTT 5 shared subscription), stores each message in its own outbox, "
        "acknowledges it, and writes it to InfluxDB. Run several with the same [ingest] group "
        "and different client ids to split the load (docs/scaling.md).",
    )
    ingest.add_argument(
        "--config", type=Path, required=True, help="TOML with [mqtt], [influx], [store], [ingest]"
    )
    ingest.add_argument(
        "--retire",
        action="store_true",
        help="take this worker out of its group for good: unsubscribe, ingest what its session "
        "still holds, wait until InfluxDB has it all, end the session and exit",
    )
    ingest.set_defaults(func=cmd_ingest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.log_format)
    if args.command == "history" and args.store is None and args.config is None:
        parser.error("history needs --store PATH or --config FILE")
    started = time.monotonic()
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"configuration error: {printable(problem)}", file=sys.stderr)
        return EXIT_CONFIG
    except (PumpgwError, OSError) as exc:  # ours, or the system's (a file, a socket)
        if args.verbose:
            raise
        print(f"pumpgw {args.command} failed: {exc} (run with -v for details)", file=sys.stderr)
        return EXIT_FAILURE
    log.debug("%s finished in %.1f s", args.command, time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
