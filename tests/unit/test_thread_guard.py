"""The thread-leak guard of tests/conftest.py counts daemon threads too."""

from __future__ import annotations

import threading

from tests.conftest import _threads_still_running


def test_the_guard_reports_a_daemon_thread_left_running() -> None:
    before = set(threading.enumerate())
    release = threading.Event()
    left = threading.Thread(target=release.wait, name="left behind", daemon=True)
    left.start()
    try:
        assert _threads_still_running(before, grace_s=0.1) == [left]
    finally:
        release.set()
        left.join()


def test_the_guard_waits_for_a_thread_that_is_ending() -> None:
    before = set(threading.enumerate())
    release = threading.Event()
    ending = threading.Thread(target=release.wait, name="ending", daemon=True)
    ending.start()
    threading.Timer(0.05, release.set).start()
    assert _threads_still_running(before, grace_s=5.0) == []
