"""Status sequence numbers across connections, and the counted refusal log."""

from __future__ import annotations

import logging

import pytest

from gateway.quiet import CountedLog
from gateway.service import STATUS_SEQ_BLOCK, StatusSequence


def test_each_birth_outranks_the_previous_will_and_each_will_its_connection() -> None:
    seqs = StatusSequence()
    before = seqs.next()  # a status stored before the first connection
    birth1, will1 = seqs.connection()
    during1 = [seqs.next() for _ in range(3)]
    birth2, will2 = seqs.connection()
    during2 = seqs.next()
    assert before < birth1 < min(during1)
    assert max(during1) < will1 < birth2 < during2 < will2
    assert (birth1, birth2) == (STATUS_SEQ_BLOCK, 2 * STATUS_SEQ_BLOCK)


def test_statuses_of_one_connection_never_reach_its_will() -> None:
    seqs = StatusSequence()
    _, will = seqs.connection()
    seqs._next = will - 2  # skip a million statuses
    assert [seqs.next() for _ in range(3)] == [will - 2, will - 1, will - 1]


def test_repeated_refusals_warn_once_per_interval_and_count_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = CountedLog(logging.getLogger("test.counted"), interval_s=3600.0)
    with caplog.at_level(logging.DEBUG, logger="test.counted"):
        for n in range(5):
            log.warning("kind-a", "refused %d", n)
        log.warning("kind-b", "other")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert warnings == ["refused 0", "other"]
    assert debug == ["refused 1", "refused 2", "refused 3", "refused 4"]


def test_the_next_warning_after_the_interval_says_how_many_were_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = CountedLog(logging.getLogger("test.counted2"), interval_s=0.0)
    with caplog.at_level(logging.WARNING, logger="test.counted2"):
        log.warning("k", "first")
        log._last["k"] = (log._last["k"][0], 3)  # three held meanwhile
        log.warning("k", "again")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "first"
    assert messages[1].startswith("again (and 3 more like it in the last")
