"""The exit counters as published: a new series first at 0, a bounded number of series.

A counter that first appears already at 1 is invisible to `increase()`: a new series is
published at 0 first (for `--exits.first-zero-seconds`, at least one scrape), then at its count,
so an alert on the first exit of an engine fires. Engine names come from events files any
framework writes, so the number of series is capped (MAX_SERIES): past it an exit is refused and
counted as an error, and neither the output nor the state file grows without bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from exporter.exits.state import CountKey

MAX_SERIES = 10_000  # (engine, exit_code, signal, cause) series


@dataclass
class _Count:
    value: int
    last_time: float  # wall-clock time of the latest event
    zero_until: float | None = None  # monotonic: published as 0 until then (None: released)


class ExitCounts:
    def __init__(self, first_zero_seconds: float) -> None:
        self._first_zero = first_zero_seconds
        self._counts: dict[CountKey, _Count] = {}

    def add(self, key: CountKey, when: float, new_at_zero: bool) -> bool:
        """One more exit; False (not counted) for a new series past MAX_SERIES. A new series with
        `new_at_zero` is shown at 0 first; one from before this exporter started is history."""
        count = self._counts.get(key)
        if count is None:
            if len(self._counts) >= MAX_SERIES:
                return False
            count = self._counts[key] = _Count(0, when, zero_until=0.0 if new_at_zero else None)
        count.value += 1
        count.last_time = max(count.last_time, when)
        return True

    def restore(self, saved: dict[CountKey, tuple[int, float]]) -> None:
        self._counts = {key: _Count(value, last) for key, (value, last) in saved.items()}

    def saved(self) -> dict[CountKey, tuple[int, float]]:
        return {key: (count.value, count.last_time) for key, count in self._counts.items()}

    def engines(self) -> set[str]:
        return {key[0] for key in self._counts}

    def drop(self, engines: set[str]) -> None:
        self._counts = {key: count for key, count in self._counts.items() if key[0] not in engines}

    def published(self) -> list[tuple[CountKey, int]]:
        """Every series with the value to show now (0 while a new series is held at 0)."""
        now = time.monotonic()
        shown = []
        for key, count in sorted(self._counts.items()):
            if count.zero_until == 0.0:
                count.zero_until = now + self._first_zero  # first time on show: hold 0 from now
            if count.zero_until is not None and now >= count.zero_until:
                count.zero_until = None
            shown.append((key, 0 if count.zero_until is not None else count.value))
        return shown
