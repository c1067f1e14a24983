"""Background work that never dies silently.

A loop step that raises is logged (with its traceback the first time, then at most once a
minute per worker), counted as `errors_total{source=<worker>, reason="exception"}`, and
the loop goes on: a deeply nested answer from one engine must not stop polling for all of
them while their last values stay on show.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from exporter.errors import ErrorCounter

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 60.0
_last_logged: dict[str, float] = {}
_log_lock = threading.Lock()


def run_supervised(name: str, step: Callable[[], object], errors: ErrorCounter) -> bool:
    """step(); False (logged and counted) when it raised."""
    try:
        step()
        return True
    except Exception:
        errors.inc(name, "exception")
        now = time.monotonic()
        with _log_lock:
            first = name not in _last_logged
            due = first or now - _last_logged[name] >= LOG_EVERY_SECONDS
            if due:
                _last_logged[name] = now
        if due:
            log.error("%s failed; it goes on (gpu_residency_errors_total{source=%r})", name, name, exc_info=first)
        return False
