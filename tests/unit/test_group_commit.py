"""Natural group commit: which reads the ingest thread takes into one commit (Gateway._take_batch).

Default (`store.gather_ms = 0`): everything already queued, and nothing waits for later reads.
With `gather_ms`, a read arriving soon after a commit waits up to that long for others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gateway.config import load_settings
from gateway.service import BATCH_MAX_ITEMS, Gateway


def gateway_with(tmp_path: Path, gather_ms: float) -> Gateway:
    """A gateway (not started) with no sources and the given gather window."""
    config = tmp_path / "pumpgw.toml"
    config.write_text(
        f'[store]\npath = "{tmp_path / "outbox.db"}"\ngather_ms = {gather_ms}\n'
        '[health]\nlisten = ""\n'
    )
    return Gateway(load_settings(config))


@contextmanager
def put_later(gateway: Gateway, item: tuple[str, ...], delay_s: float) -> Iterator[None]:
    """Queue `item` for the ingest thread `delay_s` from now, from another thread."""
    timer = threading.Timer(delay_s, gateway._queue.put, args=(item,))
    timer.start()
    try:
        yield
    finally:
        timer.join()


def test_everything_already_queued_goes_into_one_commit(tmp_path: Path) -> None:
    gateway = gateway_with(tmp_path, 0)
    try:
        for n in range(3):
            gateway._queue.put(("read", str(n)))
        assert [item[1] for item in gateway._take_batch(0.1)] == ["0", "1", "2"]
        assert gateway._queue.empty()
    finally:
        gateway.outbox.close()


def test_a_batch_is_bounded(tmp_path: Path) -> None:
    gateway = gateway_with(tmp_path, 0)
    try:
        for n in range(BATCH_MAX_ITEMS + 5):
            gateway._queue.put(("read", str(n)))
        assert len(gateway._take_batch(0.1)) == BATCH_MAX_ITEMS
        assert len(gateway._take_batch(0.1)) == 5
    finally:
        gateway.outbox.close()


def test_by_default_no_read_waits_for_later_ones_even_right_after_a_commit(
    tmp_path: Path,
) -> None:
    gateway = gateway_with(tmp_path, 0)
    try:
        gateway._queue.put(("read", "first"))
        gateway._committed_m = time.monotonic()
        with put_later(gateway, ("read", "later"), 0.03):
            taken = gateway._take_batch(0.1)
        assert [item[1] for item in taken] == ["first"]
    finally:
        gateway.outbox.close()


def test_with_a_gather_window_a_read_right_after_a_commit_waits_for_others(
    tmp_path: Path,
) -> None:
    gateway = gateway_with(tmp_path, 50)
    try:
        gateway._queue.put(("read", "first"))
        gateway._committed_m = time.monotonic()
        with put_later(gateway, ("read", "later"), 0.01):
            taken = gateway._take_batch(0.1)
        assert [item[1] for item in taken] == ["first", "later"]
    finally:
        gateway.outbox.close()


def test_with_a_gather_window_a_read_at_a_quiet_moment_goes_at_once(tmp_path: Path) -> None:
    gateway = gateway_with(tmp_path, 50)
    try:
        gateway._queue.put(("read", "alone"))
        gateway._committed_m = time.monotonic() - 1.0  # the last commit was long ago
        with put_later(gateway, ("read", "later"), 0.03):
            taken = gateway._take_batch(0.1)
        assert [item[1] for item in taken] == ["alone"]
    finally:
        gateway.outbox.close()
