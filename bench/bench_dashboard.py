"""The ward dashboard in Chromium: first paint from retained state, then a soak at 1,000/s.

Everything real: Mosquitto with a WebSocket listener, `pumpgw run`, `pumpsim`, `pumpgw
dashboard`, and the page in Debian's Chromium driven by Playwright (tests/browser/stack.py).

  paint   200 pumps publish their retained state (info, status, alerts/active), then a fresh
          page signs in: milliseconds from the MQTT connection to all 200 tiles drawn.
  soak    1,000 pumps at 1 reading/s each through the gateway into one page, for --soak
          seconds after --warmup: messages the page handled per second, reading age on
          arrival per 10 s window, and how far the page is behind a plain `mosquitto_sub` of
          the same readings (sampled; growing = the page's own backlog), main-thread long
          tasks (> 50 ms, PerformanceObserver), the page's drawing time per frame (p95) and
          the interval between frames, and the JS heap after a forced GC at the start and
          the end of the soak (bounded trend buffers keep it flat).

Issue 11's targets: no growing backlog over 60 s, long tasks <= 1 per minute, frame time p95
<= 16 ms, JS heap growth <= 20 MB over 10 minutes, first paint of 200 pumps <= 1 s.
Run: .venv/bin/python -m bench.bench_dashboard [--soak 180] [--pumps 1000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import CDPSession

from bench.common import print_table, write_results
from bench.rig import CpuMeter, Subscriber, backlog, load_avg, rss_mb, server_pid
from tests.browser.stack import (
    DESKTOP,
    DashboardProcess,
    WebSocketMosquitto,
    chromium,
    sign_in,
    start_playwright,
)
from tests.e2e import GatewayProcess, Ward, gateway_config, wait_until

TARGETS = {
    "long_tasks_per_min": 1.0,
    "draw_ms_p95": 16.0,
    "heap_growth_mb_per_10_min": 20.0,
    "first_paint_ms": 1000.0,
}
WINDOW_S = 10.0
PAINT_PUMPS = 200
RETAINED_TIMEOUT_S = 120.0
LONG_TASKS = """
window.longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.longTasks.push(entry.duration);
}).observe({ type: 'longtask', buffered: true });
window.frameGaps = [];
(function tick(last) {
  requestAnimationFrame((now) => {
    if (window.frameGaps.length < 200000) window.frameGaps.push(now - last);
    tick(now);
  });
})(performance.now());
"""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def stack(workdir: Path, name: str, sim_args: list[str], broker: WebSocketMosquitto) -> tuple[
        Ward, GatewayProcess, DashboardProcess]:
    """A simulator, a gateway and `pumpgw dashboard` on `broker` under prefix `name`."""
    here = workdir / name
    here.mkdir()
    ward = Ward.start(here, *sim_args)
    config = gateway_config(
        here, sim_port=ward.port, mqtt_port=broker.port, prefix=name,
        extra={"dashboard": {"broker_url": broker.ws_url}, "gateway": {"status_interval_s": 5.0}},
    )  # fmt: skip
    gateway = GatewayProcess(config, here / "gateway.log").start()
    dashboard = DashboardProcess.start(config, here / "dashboard.log")
    return ward, gateway, dashboard


def _stop_simulator(ward: Ward) -> None:
    """SIGTERM; its exit summary (one JSON line per run, large for 1,000 pumps) is not needed."""
    ward.proc.terminate()
    try:
        ward.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        ward.proc.kill()
        ward.proc.communicate()


def renderer_rss_mb() -> float:
    """Resident memory of Chromium's renderer processes (the page and its worker), MiB."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                # Chromium rewrites its process title: the arguments may be one string.
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"chromium" in cmdline and b"--type=renderer" in cmdline:
                total += rss_mb(int(proc.name))
    return round(total, 1)


def heap_mb(cdp: CDPSession) -> float:
    """The page's JS heap in use after full garbage collections, MiB (DevTools Protocol).
    The worker's heap (MQTT.js, nothing kept) is not in it; renderer_rss_mb covers both."""
    cdp.send("HeapProfiler.collectGarbage")
    cdp.send("HeapProfiler.collectGarbage")
    return round(browser_metrics(cdp)["JSHeapUsedSize"] / 2**20, 2)


def browser_metrics(cdp: CDPSession) -> dict[str, float]:
    """Chrome's Performance.getMetrics: TaskDuration is the main thread's busy seconds."""
    return {m["name"]: float(m["value"]) for m in cdp.send("Performance.getMetrics")["metrics"]}


def page_delays_ms(samples: list[list[Any]], subscriber: Subscriber) -> list[float]:
    """Per sampled reading: page arrival minus `mosquitto_sub`'s arrival, ms (one clock)."""
    plain = {record_id: at for at, record_id in subscriber.arrivals()}
    return [1000 * (at - plain[rid]) for rid, at in samples if rid in plain]


def first_paint(workdir: Path, broker: WebSocketMosquitto, browser: Any) -> dict[str, Any]:
    """Retained state of 200 pumps, then a fresh page: connection -> every tile drawn."""
    ward, gateway, dashboard = stack(
        workdir, "paint", ["--pumps", str(PAINT_PUMPS), "--interval", "60", "--count", "3",
                           "--speed", "max"], broker)  # fmt: skip
    try:
        retained = wait_until(lambda: _retained_pumps(broker, "paint") >= PAINT_PUMPS,
                              RETAINED_TIMEOUT_S, poll_s=1.0)  # fmt: skip
        assert retained, "the gateway did not publish 200 retained statuses"
        runs = []
        for _ in range(3):
            context = browser.new_context(viewport=DESKTOP)
            page = context.new_page()
            sign_in(page, dashboard.url, "bench", "bench")
            page.wait_for_function(
                f"() => document.querySelectorAll('[data-testid=pump]').length >= {PAINT_PUMPS}"
                " && document.querySelector('#alerts').children.length > 0",
                polling="raf", timeout=30_000,
            )
            runs.append(page.evaluate(
                "() => performance.now() - window.pumpgwDashboard.stats.connectedAt"))
            context.close()
    finally:
        dashboard.stop()
        gateway.stop()
        _stop_simulator(ward)
    return {"pumps": PAINT_PUMPS, "runs_ms": [round(r, 1) for r in runs],
            "first_paint_ms": round(statistics.median(runs), 1)}


def _retained_pumps(broker: WebSocketMosquitto, prefix: str) -> int:
    """Pumps whose retained status the broker holds (mosquitto_sub --retained-only)."""
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t",
         f"{prefix}/+/+/pumps/+/status", "--retained-only", "-W", "2", "-v"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return len({line.split()[0] for line in out.stdout.splitlines() if line})


def soak(workdir: Path, broker: WebSocketMosquitto, browser: Any, pumps: int, warmup_s: float,
         soak_s: float) -> dict[str, Any]:
    """`pumps` pumps at 1 reading/s into one page for `soak_s` seconds."""
    duration = warmup_s + soak_s + 30
    ward, gateway, dashboard = stack(
        workdir, "soak", ["--pumps", str(pumps), "--interval", "1", "--speed", "1",
                          "--duration", f"{duration:.0f}"], broker)  # fmt: skip
    subscriber = Subscriber(broker.port, ["soak/+/+/pumps/+/telemetry"],
                            workdir / "arrivals.txt", payload=False)  # fmt: skip
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.add_init_script(LONG_TASKS)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    try:
        sign_in(page, dashboard.url, "bench", "bench")
        page.wait_for_function(f"() => window.pumpgwDashboard.ward.pumps.size >= {pumps}",
                               timeout=60_000)  # fmt: skip
        time.sleep(warmup_s)
        assert gateway.proc is not None
        assert ward.proc is not None
        others = CpuMeter({"gateway": gateway.proc.pid, "simulator": ward.proc.pid,
                           "mosquitto": server_pid(broker)}).start()  # fmt: skip
        load_start = load_avg()
        heap_start = heap_mb(cdp)
        rss_start = renderer_rss_mb()
        page.evaluate("() => { window.longTasks.length = 0; window.frameGaps.length = 0;"
                      " const s = window.pumpgwDashboard.stats; s.lagMs.length = 0;"
                      " s.browserAgeMs.length = 0; s.drawMs.length = 0; s.arrivals.length = 0; }")
        windows = []
        messages_before = page.evaluate("() => window.pumpgwDashboard.stats.messages")
        handle_before = page.evaluate("() => window.pumpgwDashboard.stats.handleMs")
        busy_before = browser_metrics(cdp)["TaskDuration"]
        backlog_before = backlog(gateway, "mqtt")
        started = time.monotonic()
        while time.monotonic() - started < soak_s:
            time.sleep(WINDOW_S)
            windows.append({"at": time.monotonic() - started, **page.evaluate(
                "() => { const s = window.pumpgwDashboard.stats;"
                " const ages = s.browserAgeMs.splice(0); const arrivals = s.arrivals.splice(0);"
                " return {messages: s.messages, ages, arrivals}; }")})
        elapsed = time.monotonic() - started
        busy_s = browser_metrics(cdp)["TaskDuration"] - busy_before
        backlog_after = backlog(gateway, "mqtt")
        page_data = page.evaluate(
            "() => ({long: window.longTasks, gaps: window.frameGaps,"
            " draw: window.pumpgwDashboard.stats.drawMs,"
            " handleMs: window.pumpgwDashboard.stats.handleMs,"
            " messages: window.pumpgwDashboard.stats.messages})")
        heap_end = heap_mb(cdp)  # after the long tasks are read: a forced GC is one
        rss_end = renderer_rss_mb()
        time.sleep(2)  # the plain subscriber writes its last arrivals
        plain_count = len(subscriber.arrivals())
        sampled = 0
        for window in windows:
            sampled += len(window["arrivals"])
            window["delays"] = page_delays_ms(window.pop("arrivals"), subscriber)
        result = _soak_figures(windows, page_data, messages_before, elapsed, pumps)
        result.update(
            soak_s=round(elapsed, 1), warmup_s=warmup_s, heap_mb_start=heap_start,
            heap_mb_end=heap_end, heap_growth_mb=round(heap_end - heap_start, 2),
            heap_growth_mb_per_10_min=round((heap_end - heap_start) * 600 / elapsed, 2),
            others_cpu_pct=others.stop(), load_avg=[load_start, load_avg()],
            page_main_thread_busy_pct=round(100 * busy_s / elapsed, 1),
            page_handler_us_per_message=round(
                1000 * (page_data["handleMs"] - handle_before)
                / max(1, page_data["messages"] - messages_before), 1),
            gateway_mqtt_backlog=[backlog_before, backlog_after],
            plain_subscriber_messages=plain_count, page_samples=sampled,
            renderer_rss_mb=[rss_start, rss_end],
        )
    finally:
        context.close()
        subscriber.stop()
        dashboard.stop()
        gateway.stop()
        _stop_simulator(ward)
    return result


def _soak_figures(windows: list[dict[str, Any]], data: dict[str, Any], messages_before: int,
                  elapsed_s: float, pumps: int) -> dict[str, Any]:
    per_window = []
    previous, previous_at = messages_before, 0.0
    for window in windows:
        per_window.append({
            "messages_per_s": round(
                (window["messages"] - previous) / (window["at"] - previous_at), 1),
            "age_ms_p50": percentile(window["ages"], 0.5),
            "age_ms_p95": percentile(window["ages"], 0.95),
            "page_delay_ms_p50": percentile(window["delays"], 0.5),
            "page_delay_ms_p95": percentile(window["delays"], 0.95),
            "page_delay_samples": len(window["delays"]),
        })  # fmt: skip
        previous, previous_at = window["messages"], window["at"]
    first, last = per_window[0], per_window[-1]
    long_tasks = [d for d in data["long"] if d > 50]
    return {
        "pumps": pumps,
        "readings_expected_per_s": pumps,
        "messages_per_s": round((data["messages"] - messages_before) / elapsed_s, 1),
        "windows": per_window,
        "age_ms_p50_first_window": first["age_ms_p50"],
        "age_ms_p50_last_window": last["age_ms_p50"],
        "page_delay_ms_p50_first_window": first["page_delay_ms_p50"],
        "page_delay_ms_p50_last_window": last["page_delay_ms_p50"],
        "page_delay_ms_p95_last_window": last["page_delay_ms_p95"],
        # the page's own backlog: behind a plain subscriber of the same broker, growing
        "backlog_growing": (last["page_delay_ms_p50"] or 0)
        > 2 * (first["page_delay_ms_p50"] or 0) + 250,
        "long_tasks": len(long_tasks),
        "long_tasks_per_min": round(len(long_tasks) * 60 / elapsed_s, 2),
        "long_task_ms_max": round(max(long_tasks), 1) if long_tasks else 0,
        "draw_ms_p50": percentile(data["draw"], 0.5),
        "draw_ms_p95": percentile(data["draw"], 0.95),
        "frame_gap_ms_p50": percentile(data["gaps"], 0.5),
        "frame_gap_ms_p95": percentile(data["gaps"], 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pumps", type=int, default=1000, help="soak: pumps at 1 reading/s")
    parser.add_argument("--soak", type=float, default=180.0, help="soak: seconds measured")
    parser.add_argument("--warmup", type=float, default=20.0, help="soak: seconds before")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        workdir = Path(tmp)
        broker = WebSocketMosquitto(workdir / "mosquitto")
        broker.start()
        playwright = start_playwright()
        browser = chromium(playwright)
        try:
            print(f"first paint of {PAINT_PUMPS} pumps from retained state ...", flush=True)
            paint = first_paint(workdir, broker, browser)
            print(f"soak: {args.pumps} pumps at 1 reading/s for {args.soak:.0f} s ...",
                  flush=True)
            soaked = soak(workdir, broker, browser, args.pumps, args.warmup, args.soak)
        finally:
            browser.close()
            playwright.stop()
            broker.stop()
    results = {
        "first_paint_200": paint,
        "soak": soaked,
        "targets": TARGETS,
        "command": f".venv/bin/python -m bench.bench_dashboard --pumps {args.pumps} "
                   f"--soak {args.soak:g} --warmup {args.warmup:g}",
        "browser": "Debian chromium, headless, Playwright",
    }
    write_results("dashboard", results)
    print_table("dashboard", ["figure", "value", "target"], [
        ["first paint, 200 pumps from retained state (ms)", paint["first_paint_ms"], "<= 1000"],
        ["page messages/s (expected)", f"{soaked['messages_per_s']} ({args.pumps})", ""],
        ["page behind a plain subscriber p50, first -> last window (ms)",
         f"{soaked['page_delay_ms_p50_first_window']} -> "
         f"{soaked['page_delay_ms_p50_last_window']}", "not growing"],
        ["reading age on arrival p50 (gateway included), first -> last window (ms)",
         f"{soaked['age_ms_p50_first_window']} -> {soaked['age_ms_p50_last_window']}", ""],
        ["long tasks > 50 ms per minute", soaked["long_tasks_per_min"], "<= 1"],
        ["draw time per frame p95 (ms)", soaked["draw_ms_p95"], "<= 16"],
        ["frame interval p95 (ms)", soaked["frame_gap_ms_p95"], ""],
        ["JS heap growth per 10 min (MB)", soaked["heap_growth_mb_per_10_min"], "<= 20"],
        ["renderer RSS, start -> end (MB)", soaked["renderer_rss_mb"], ""],
        ["page main thread busy (%)", soaked["page_main_thread_busy_pct"], ""],
        ["page handler per message (µs)", soaked["page_handler_us_per_message"], ""],
        ["gateway MQTT backlog, start -> end", soaked["gateway_mqtt_backlog"], ""],
        ["CPU of gateway, simulator, broker (%)", soaked["others_cpu_pct"], ""],
        ["load average, start -> end", soaked["load_avg"], ""],
    ])  # fmt: skip


if __name__ == "__main__":
    main()
