"""Error counts by (source, reason): what `gpu_residency_errors_total` publishes.

Sources report what failed instead of raising, so one broken GPU or one unreadable
/proc entry never costs the rest of a scrape; the count makes the gap visible.
"""

from __future__ import annotations

import threading
from collections import Counter


class ErrorCounter:
    """Thread-safe monotonically increasing counts; labels come from a small fixed set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def inc(self, source: str, reason: str) -> None:
        with self._lock:
            self._counts[(source, reason)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)
