"""The one snapshot of a tick or scrape, built once and read by every consumer.

The collectors, the JSON API, the exit watcher and the sleep/wake transitions all ask here
instead of reading NVML and /proc themselves: a request within `max_age` of the last
collection (or one that waited while a concurrent one ran) reuses it, so many scrapers (HA
Prometheus pairs, dashboards, gates) and the background loops cost one NVML and /proc pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from exporter.engines.catalog import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.snapshot.attribution import Attributor, Snapshot
from exporter.sources.nvml import NvmlSource
from exporter.sources.proctable import ProcView
from exporter.supervisor import run_supervised


class SharedSnapshot:
    def __init__(
        self,
        nvml: NvmlSource,
        catalog: EngineCatalog,
        errors: ErrorCounter,
        min_interval: float = 0.0,
        observers: Iterable[Callable[[Snapshot], None]] = (),
    ) -> None:
        """`min_interval`: the default age a reused collection may have; `observers` see every new
        collection (the crash forensics' history)."""
        self._nvml = nvml
        self._catalog = catalog
        self._errors = errors
        self._min_interval = min_interval
        self._observers = list(observers)
        self.collections = 0  # how many real collections ran (for tests and benchmarks)
        self._attributor = Attributor(errors)
        self._lock = threading.Lock()
        self._last: tuple[float, Snapshot, float] | None = None  # (finished, snapshot, duration)

    def age(self) -> float | None:
        """Seconds since the last collection finished (None before the first)."""
        last = self._last
        return None if last is None else time.monotonic() - last[0]

    def snapshot(self, max_age: float | None = None) -> tuple[Snapshot, float]:
        """A collection no older than `max_age` (default: the min interval), or one that
        finished while this call waited for a concurrent one: never a second pass at once."""
        asked = time.monotonic()
        oldest = asked - (self._min_interval if max_age is None else max_age)
        with self._lock:
            if self._last is not None and self._last[0] >= oldest:
                return self._last[1], self._last[2]
            started = time.perf_counter()
            reading = self._nvml.read()
            view = ProcView(self._errors)
            engines = self._catalog.resolve(view)
            snapshot = self._attributor.attribute(reading, engines, view)
            duration = time.perf_counter() - started
            self.collections += 1
            self._last = (time.monotonic(), snapshot, duration)
        for observer in self._observers:
            run_supervised("history", lambda observer=observer: observer(snapshot), self._errors)
        return snapshot, duration
