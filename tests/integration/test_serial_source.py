"""SerialSource over a real socket:// line: a frame cut off by the line dropping is reported."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gateway.adapters.serial_port import SerialSource, SourceSettings
from schemas.codec import Frame, FrameError, encode_frame
from tests.e2e import wait_until
from tests.servers import LOOPBACK

pytestmark = pytest.mark.integration

WAIT_S = 10.0


class Received:
    """What the source delivered, with an event per delivery."""

    def __init__(self) -> None:
        self.items: list[Frame | FrameError] = []
        self.changed = threading.Condition()

    def deliver(
        self, source: SerialSource, received_s: float, items: list[Frame | FrameError]
    ) -> bool:
        with self.changed:
            self.items.extend(items)
            self.changed.notify_all()
        return True

    def wait_count(self, count: int) -> list[Frame | FrameError]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.items) >= count, WAIT_S)
            return list(self.items)


@contextmanager
def line_server() -> Iterator[socket.socket]:
    server = socket.create_server((LOOPBACK, 0))
    try:
        yield server
    finally:
        server.close()


@contextmanager
def reading(source: SerialSource) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), name="test source")
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(WAIT_S)


def test_a_frame_cut_off_when_the_line_drops_is_reported_as_truncated() -> None:
    whole = encode_frame("R", "P1", "b1", 1, b"{}")
    cut = encode_frame("R", "P1", "b1", 2, b'{"x":1}')[:12]
    received = Received()
    with line_server() as server:
        port = server.getsockname()[1]
        source = SerialSource(SourceSettings(url=f"socket://{LOOPBACK}:{port}"), received.deliver)
        with reading(source):
            peer, _ = server.accept()
            # pyserial's open() discards what arrives before it returns: wait for it.
            assert wait_until(lambda: source.connected, WAIT_S)
            peer.sendall(whole + cut)
            assert received.wait_count(1)
            peer.close()  # the line drops in the middle of the second frame
            items = received.wait_count(2)
    assert isinstance(items[0], Frame)
    assert items[0].seq == 1
    assert len(items) == 2, items
    error = items[1]
    assert isinstance(error, FrameError)
    assert error.kind == "truncated"
    assert error.raw == cut
