"""`pumpsim`: simulated intrathecal pumps on a serial line, for testing the gateway.

The only module of the simulator that prints, reads the environment or installs
signal handlers. Exit codes: 0 ok, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from simulator.line import RETRANSMIT_MAX_FRAMES, Line
from simulator.link import FileLink, Link, LinkError, PtyLink, SerialLink, TcpLink, parse_listen
from simulator.run import Runner, RunOptions, RunResult
from simulator.scenarios import DEFAULT_INTERVAL_S, SCENARIOS, make_fleet, scenario_setups

log = logging.getLogger("pumpsim")

DEFAULT_HISTORY = timedelta(days=30)
"""Without --count the simulated clock starts this far back, so device times stay in the past."""
TRANSPORTS = ("pty", "tcp", "serial", "file", "stdout")

DESCRIPTION = """\
Simulated implanted intrathecal drug pumps (morphine, ziconotide, baclofen) that send
readings, device info and events over a serial line, in the gateway's wire protocol.
For testing and demonstrating the gateway only: the data are invented.

Examples:
  pumpsim                                  one pump on a new pseudo-terminal (path printed)
  pumpsim --transport tcp --listen 127.0.0.1:7001 --pumps 10 --scenario ward --speed 600
  pumpsim --transport file --output capture.frames --count 1440 --speed max
  pumpsim scenarios                        what each scenario shows
"""
EPILOG = """\
Time: the simulated clock runs at --speed simulated seconds per real second and starts in
the past (by --count x --interval, or 30 days); once it reaches the present it goes on in
real time, so device times never lie in the future (unless --start says otherwise).
Over pty and tcp the clock pauses while no reader is connected; when a reader (re)connects
the frames it has not acknowledged are sent again first.

On exit (end of run, Ctrl-C or SIGTERM) one JSON line on stdout summarises, per pump,
the sequence numbers used, frames sent intact by type, frames damaged on purpose by kind,
garbage runs, retransmissions and unacknowledged frames.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pumpsim", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run simulated pumps (the default command)",
                         description=DESCRIPTION, epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_options(run)
    run.set_defaults(usage_error=run.error)  # option problems are shown with run's usage
    sub.add_parser("scenarios", help="list the scenarios and what each one shows")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    line = p.add_argument_group("where the frames go")
    line.add_argument("--transport", choices=TRANSPORTS, default="pty",
                      help="pty: a new pseudo-terminal, its path printed first (default); "
                      "tcp: a server for one reader at --listen, its socket:// URL printed "
                      "first; serial: a real device; file/stdout: a capture for pumpgw replay")
    line.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                      help="tcp address; port 0 picks a free one (default 127.0.0.1:0)")
    line.add_argument("--device", metavar="PATH_OR_URL", help="serial device, e.g. /dev/ttyUSB0")
    line.add_argument("--baud", type=int, default=115_200, metavar="BPS",
                      help="serial speed (default 115200)")
    line.add_argument("--output", type=Path, metavar="PATH",
                      help="capture file for --transport file")
    pumps = p.add_argument_group("the pumps")
    pumps.add_argument("--pumps", type=int, default=1, metavar="N",
                       help="number of pumps (default 1)")
    pumps.add_argument("--scenario", choices=sorted(SCENARIOS), default="normal", metavar="NAME",
                       help="what happens to them (see: pumpsim scenarios); default normal")
    pumps.add_argument("--seed", type=int, default=1, metavar="S",
                       help="same seed, same physics and same line damage (default 1)")
    pumps.add_argument("--info-every", type=int, default=60, metavar="N",
                       help="device info first and then every N readings (default 60)")
    time_ = p.add_argument_group("time")
    time_.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                       help="simulated seconds between a pump's readings (default 60)")
    time_.add_argument("--speed", default="1", metavar="F|max",
                       help="simulated seconds per real second, or max (default 1)")
    time_.add_argument("--count", type=int, metavar="K", help="stop after K readings per pump")
    time_.add_argument("--duration", type=float, metavar="SECONDS",
                       help="stop after this much real time")
    time_.add_argument("--start", metavar="ISO-8601",
                       help="simulated start time (default: in the past, see below)")
    acks = p.add_argument_group("acknowledgements and faults")
    wait = acks.add_mutually_exclusive_group()
    wait.add_argument("--wait-for-ack", action="store_true",
                      help="at the end, wait until the reader acknowledged every frame")
    wait.add_argument("--no-ack-wait", dest="wait_for_ack", action="store_false",
                      help="exit at the end even if frames are unacknowledged (default)")
    acks.add_argument("--ack-timeout", type=float, default=30.0, metavar="S",
                      help="longest wait for acknowledgements (default 30)")
    acks.add_argument("--retransmit-frames", type=int, default=RETRANSMIT_MAX_FRAMES, metavar="N",
                      help="unacknowledged frames kept per pump for re-sending (default 100000)")
    acks.add_argument("--noise-rate", type=float, default=0.0, metavar="R",
                      help="raw line noise: flip a bit in this share of bytes (0.01 = 1 %%); "
                      "not counted in the summary")
    out = p.add_argument_group("output")
    out.add_argument("--summary-file", type=Path, metavar="PATH",
                     help="also write the exit summary (JSON) here")
    out.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `pumpsim`; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in ("run", "scenarios", "-h", "--help"):
        args_list.insert(0, "run")
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
        if args.command == "scenarios":
            return _list_scenarios(sys.stdout)
        speed = _check(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(stream=sys.stderr, format="pumpsim: %(levelname)s %(message)s",
                        level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        return _run(args, speed)
    except LinkError as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:
        log.error("simulator failed: %s", exc, exc_info=args.verbose)
        return 1


def _list_scenarios(out: TextIO) -> int:
    width = max(len(name) for name in SCENARIOS)
    for scenario in SCENARIOS.values():
        print(f"{scenario.name:<{width}}  {scenario.shows}", file=out)
    return 0


def _check(args: argparse.Namespace) -> float | None:
    """Reject impossible options with a message naming the option; return the speed."""
    error = args.usage_error
    speed = None if args.speed == "max" else _positive_float(args.speed)
    problems = {
        "--speed must be a positive number or 'max'": args.speed != "max" and speed is None,
        "--pumps must be from 1 to 10000": not 1 <= args.pumps <= 10_000,
        "--interval must be positive": not args.interval > 0,
        "--count must be at least 1": args.count is not None and args.count < 1,
        "--duration must be positive": args.duration is not None and not args.duration > 0,
        "--info-every must be at least 1": args.info_every < 1,
        "--noise-rate must be from 0 to 1": not 0.0 <= args.noise_rate <= 1.0,
        "--retransmit-frames must not be negative": args.retransmit_frames < 0,
        "--transport file needs --output PATH": args.transport == "file" and not args.output,
        "--transport serial needs --device": args.transport == "serial" and not args.device,
    }
    for message, failed in problems.items():
        if failed:
            error(message)
    if args.transport == "tcp":
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            error(f"--listen: {exc}")
    if args.start is not None:
        try:
            start = datetime.fromisoformat(args.start)
        except ValueError:
            error(f"--start: not an ISO-8601 time: {args.start!r}")
        args.start = start if start.tzinfo else start.replace(tzinfo=UTC)
    return speed


def _positive_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value > 0 and value != float("inf") else None


def _run(args: argparse.Namespace, speed: float | None) -> int:
    start = _start_time(args)
    plan_s = _plan_seconds(args, speed)
    setups = scenario_setups(args.scenario, args.pumps, args.seed, plan_s)
    link = _open_link(args)
    keep = args.retransmit_frames if link.acks else 0
    boot_ids = [os.urandom(4).hex() for _ in setups]
    fleet = make_fleet(setups, seed=args.seed, start=start, boot_ids=boot_ids,
                       info_every=args.info_every, retransmit_max_frames=keep)
    line = Line((pump_line for _, pump_line in fleet), args.noise_rate, args.seed)
    options = RunOptions(args.interval, speed, args.count, args.duration,
                         args.wait_for_ack, args.ack_timeout,
                         present=None if args.start else lambda: datetime.now(UTC))
    if link.announcement:
        print(link.announcement, flush=True)
    log.info("%d pump(s), scenario %s, seed %d, simulated start %s, speed %s",
             args.pumps, args.scenario, args.seed, start.isoformat(), args.speed)
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            result = Runner(fleet, line, link, options, start, stop).run()
    finally:
        link.close()
    _report(args, line, result)
    return 1 if args.wait_for_ack and result.all_acked is False else 0


def _start_time(args: argparse.Namespace) -> datetime:
    if args.start is not None:
        start: datetime = args.start
        return start
    now = datetime.now(UTC).replace(microsecond=0)
    if args.count is not None:
        return now - timedelta(seconds=args.count * args.interval)
    return now - DEFAULT_HISTORY


def _plan_seconds(args: argparse.Namespace, speed: float | None) -> float:
    """The simulated span over which a scenario places its faults."""
    if args.count is not None:
        return float(args.count * args.interval)
    if args.duration is not None and speed is not None:
        return float(args.duration * speed)
    return float(SCENARIOS[args.scenario].default_count * args.interval)


def _open_link(args: argparse.Namespace) -> Link:
    if args.transport == "tcp":
        return TcpLink(*parse_listen(args.listen))
    if args.transport == "serial":
        return SerialLink(args.device, args.baud)
    if args.transport in ("file", "stdout"):
        return FileLink(args.output if args.transport == "file" else None)
    return PtyLink()


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _report(args: argparse.Namespace, line: Line, result: RunResult) -> None:
    summary = _summary(args, line, result)
    text = json.dumps(summary, separators=(",", ":"))
    out = sys.stderr if args.transport == "stdout" else sys.stdout
    print(text, file=out, flush=True)
    if args.summary_file is not None:
        args.summary_file.write_text(text + "\n")
    totals = summary["totals"]
    log.info("sent %d intact and %d damaged frames in %.1f s (%.0f frames/s), stopped by %s",
             totals["frames_intact"], totals["frames_damaged"], result.wall_s,
             summary["frames_per_s"], result.stopped_by)


def _summary(args: argparse.Namespace, line: Line, result: RunResult) -> dict[str, Any]:
    busy_s = result.wall_s - result.waiting_s
    summary: dict[str, Any] = {
        "scenario": args.scenario,
        "seed": args.seed,
        "transport": args.transport,
        "interval_s": args.interval,
        "sim_start": result.sim_start.isoformat(),
        "sim_end": result.sim_end.isoformat(),
        "wall_s": round(result.wall_s, 3),
        "waiting_for_reader_s": round(result.waiting_s, 3),
        "frames_per_s": round(result.frames / busy_s, 1) if busy_s > 0 else 0.0,
        "stopped_by": result.stopped_by,
        "all_acked": result.all_acked,
    }
    summary.update(line.summary())
    return summary
