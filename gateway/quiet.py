"""Log a repeated condition once at its level, then at debug, with bounded memory."""

from __future__ import annotations

import logging
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
