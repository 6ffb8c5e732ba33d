"""The store shell's process lifecycle: every stop signal stops cleanly."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from gateway.store_shell import STOP_SIGNALS, stop_on_signals


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_each_stop_signal_sets_the_stop_event(signum: signal.Signals) -> None:
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop = threading.Event()
    try:
        stop_on_signals(stop)
        os.kill(os.getpid(), signum)
        assert stop.wait(5.0)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_a_closed_terminal_is_one_of_the_stop_signals() -> None:
    assert signal.SIGHUP in STOP_SIGNALS
