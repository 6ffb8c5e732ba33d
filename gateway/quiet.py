"""Log a repeated condition once at its level, then at debug, with bounded memory."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

MAX_KEYS = 256


class QuietLog:
    """Warns once per key (e.g. once per quarantine reason), then logs that key at debug."""

    def __init__(self, logger: logging.Logger, max_keys: int = MAX_KEYS) -> None:
        self._log = logger
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._max_keys = max_keys

    def _first(self, key: str) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return True

    def warning(self, key: str, msg: str, *args: Any) -> None:
        level = logging.WARNING if self._first(key) else logging.DEBUG
        self._log.log(level, msg, *args)

    def error(self, key: str, msg: str, *args: Any) -> None:
        level = logging.ERROR if self._first(key) else logging.DEBUG
        self._log.log(level, msg, *args)

    def forget(self, key: str) -> None:
        """The condition ended: warn again next time it happens."""
        self._seen.pop(key, None)


class CountedLog:
    """Logs a key at its level at most once per `interval_s`; the occurrences in between go
    to debug and are counted, and the count is logged with the key's next line."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 60.0, max_keys: int = MAX_KEYS
    ) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        """key -> (monotonic time it was last logged, occurrences not logged since)."""

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self._emit(logging.WARNING, key, msg, *args)

    def _emit(self, level: int, key: str, msg: str, *args: Any) -> None:
        now_m = time.monotonic()
        logged_m, held = self._last.pop(key, (float("-inf"), 0))
        if now_m - logged_m < self._interval_s:
            self._last[key] = (logged_m, held + 1)
            self._log.debug(msg, *args)  # counted for the next line at `level`, and kept here
        else:
            if held:
                msg = f"{msg} (and {held} more like it in the last {now_m - logged_m:.0f} s)"
            self._log.log(level, msg, *args)
            self._last[key] = (now_m, 0)
        if len(self._last) > self._max_keys:
            self._last.popitem(last=False)
