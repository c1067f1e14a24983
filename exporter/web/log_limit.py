"""One log line per interval for events any client can cause (refused credentials): the log
stays readable and bounded however hard it is hammered, and still says how many there were."""

from __future__ import annotations

import logging
import threading
import time


class LogLimiter:
    """At most one line per `interval` seconds; the next line counts those left out."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._last: float | None = None  # monotonic time of the last line
        self._left_out = 0

    def warning(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last < self._interval:
                self._left_out += 1
                return
            left_out, self._left_out, self._last = self._left_out, 0, now
        if left_out:
            message += f" ({left_out} more since the last such line, not logged: at most one every {self._interval:g}s)"
        self._logger.warning("%s", message)
