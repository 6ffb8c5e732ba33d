"""The influx sink's pace: at a ward's rate one request per WRITE_EVERY_S, not one per commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.adapters import influx as influx_module
from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.outbox import Outbox
from gateway.records import OutRecord

WAIT_S = 10.0


class CountingTransport:
    """Accepts every request and remembers how many points each one carried."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    def post(self, body: bytes) -> None:
        self.requests.append(body.count(b"\n") + 1)

    def close(self) -> None:
        pass


def rec(i: int) -> OutRecord:
    return OutRecord("reading", f"P0001:b:{i}", "P0001", b"{}", b"m f=1 %d" % i)


@contextmanager
def running(sink: InfluxSink) -> Iterator[threading.Event]:
    stop, wake = threading.Event(), threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop, wake), name="influx sink")
    thread.start()
    try:
        yield wake
    finally:
        stop.set()
        thread.join(WAIT_S)


def make_sink(tmp_path: Path, transport: CountingTransport, batch_size: int) -> InfluxSink:
    outbox = Outbox(tmp_path / "o.db", ["influx"])
    settings = InfluxSettings(
        url="http://127.0.0.1:9", org="clinic", bucket="pumps", gzip=False, batch_size=batch_size
    )
    return InfluxSink(settings, outbox, on_poison=lambda r, why: None, transport=transport)


def test_rows_committed_one_by_one_after_a_write_go_out_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(influx_module, "WRITE_EVERY_S", 0.5)
    transport = CountingTransport()
    sink = make_sink(tmp_path, transport, batch_size=100)
    outbox = sink._outbox
    with running(sink) as wake:
        outbox.append([rec(0)])
        wake.set()
        assert sink.wait_for(lambda h: h.delivered == 1, WAIT_S)
        for i in range(1, 11):  # ten commits, each waking the sink, well inside 0.5 s
            outbox.append([rec(i)])
            wake.set()
        assert sink.wait_for(lambda h: h.delivered == 11, WAIT_S)
    assert transport.requests == [1, 10]


def test_full_batches_are_written_back_to_back_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(influx_module, "WRITE_EVERY_S", 3600.0)
    transport = CountingTransport()
    sink = make_sink(tmp_path, transport, batch_size=4)
    sink._outbox.append([rec(i) for i in range(10)])
    with running(sink) as wake:
        wake.set()
        assert sink.wait_for(lambda h: h.delivered == 10, WAIT_S)
    assert transport.requests == [4, 4, 2]
