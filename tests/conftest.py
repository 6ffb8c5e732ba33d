"""Shared fixtures: private servers on free loopback ports, test certificates, a thread guard."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import (
    Influx1,
    Mosquitto,
    MosquittoFactory,
    Pki,
    VictoriaMetrics,
    generate_test_pki,
)

THREAD_GRACE_S = 2.0
THREAD_POLL_S = 0.02


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves new threads running after a short grace period, daemon threads
    included: every gateway thread is one, and a daemon thread left behind is a component
    that was never stopped."""
    before = set(threading.enumerate())
    yield
    leaked = _threads_still_running(before, grace_s=THREAD_GRACE_S)
    if leaked:
        names = ", ".join(sorted(f"{t.name}{' (daemon)' if t.daemon else ''}" for t in leaked))
        pytest.fail(f"test left threads running: {names}", pytrace=False)


def _threads_still_running(before: set[threading.Thread], grace_s: float) -> list[threading.Thread]:
    deadline = time.monotonic() + grace_s
    while True:
        new = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not new or time.monotonic() >= deadline:
            return new
        time.sleep(THREAD_POLL_S)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh test CA with server and client certificates, and a rogue CA."""
    return generate_test_pki(tmp_path / "pki")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private anonymous Mosquitto broker with a plain listener, for one test."""
    with Mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Call it with users=, acl=, tls=, allow_anonymous= for started brokers; all stop after."""
    factory = MosquittoFactory(tmp_path / "brokers")
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def victoria_metrics_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """One VictoriaMetrics for the whole run; tests keep apart by unique measurement names."""
    with VictoriaMetrics(tmp_path_factory.mktemp("victoria-metrics")) as server:
        yield server


@pytest.fixture
def victoria_metrics(victoria_metrics_session: VictoriaMetrics) -> VictoriaMetrics:
    """The shared VictoriaMetrics, started again if an outage test left it stopped."""
    victoria_metrics_session.ensure_running()
    return victoria_metrics_session


@pytest.fixture(scope="session")
def influx1_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influx1]:
    """One InfluxDB 1.x for the whole run; tests keep apart by unique database names."""
    with Influx1(tmp_path_factory.mktemp("influx1")) as server:
        yield server


@pytest.fixture
def influx1(influx1_session: Influx1) -> Influx1:
    """The shared InfluxDB 1.x, started again if an outage test left it stopped."""
    influx1_session.ensure_running()
    return influx1_session
