"""Engine exits as counters, derived from the durable events file.

`gpu_residency_engine_exits_total` is the number of events in the file, by engine,
exit code and signal: re-reading the file after a restart gives the same value plus
whatever was written meanwhile, so nothing is lost and nothing is counted twice.
Events are deduplicated by id; a torn last line waits until it is complete; a file
that shrank (truncated, rotated) is read again from the start.

An engine whose root vanished with no report is recorded here once, as an event with
exitcode null, after a grace period that lets the parent's own report arrive first.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

from exporter.attribution import Snapshot
from exporter.errors import ErrorCounter
from exporter.exits import EVENTS_FILE, ExitEvent, append_event, exit_labels

log = logging.getLogger(__name__)

MAX_READ_BYTES = 4 * 1024 * 1024  # per collection: a huge file is caught up over several


class ExitLog:
    def __init__(self, node: str, directory: Path | None, errors: ErrorCounter, grace_seconds: float = 30.0) -> None:
        self._node = node
        self._dir = directory
        self._errors = errors
        self._grace = grace_seconds
        self._offset = 0
        self._inode: int | None = None
        self._pending = b""
        self._ids: set[str] = set()
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._reported: set[tuple[str, int | None, int | None]] = set()
        self._reported_names: dict[str, float] = {}  # engine -> latest event time (reports without a root)
        self._dead_since: dict[tuple[str, int | None, int | None], float] = {}
        self._lock = threading.Lock()  # concurrent scrapes must not read the same bytes twice

    @property
    def path(self) -> Path | None:
        return self._dir / EVENTS_FILE if self._dir else None

    def _reset(self) -> None:
        self._offset, self._pending = 0, b""
        self._ids.clear()
        self._counts.clear()
        self._reported.clear()
        self._reported_names.clear()

    def ingest(self) -> None:
        """Read whatever was appended since the last call."""
        path = self.path
        if path is None:
            return
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        except OSError:
            self._errors.inc("events", "unreadable")
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            if self._inode is not None:
                log.warning("events file %s was replaced or truncated; re-reading it from the start", path)
            self._inode = stat.st_ino
            self._reset()
        if stat.st_size == self._offset:
            return
        try:
            with path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read(MAX_READ_BYTES)
        except OSError:
            self._errors.inc("events", "unreadable")
            return
        self._offset += len(chunk)
        data = self._pending + chunk
        *lines, self._pending = data.split(b"\n")
        for line in lines:
            if line.strip():
                self._add(line)

    def _add(self, line: bytes) -> None:
        try:
            event = ExitEvent.from_json(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            self._errors.inc("events", "malformed")
            return
        if event.id in self._ids:
            return
        self._ids.add(event.id)
        self._counts[(event.engine, *exit_labels(event.exitcode))] += 1
        self._reported.add((event.engine, event.root_pid, event.start_ticks))
        self._reported_names[event.engine] = max(event.time, self._reported_names.get(event.engine, 0.0))

    def record_unreported(self, snapshot: Snapshot) -> None:
        """Count, once, registered engines whose root is gone and that nobody reported."""
        if self._dir is None:
            return
        now = time.monotonic()
        dead_now = set()
        for engine in snapshot.engines:
            if engine.up or engine.source != "registry" or engine.root_pid is None:
                continue  # (no root PID: an entry from a PID namespace we cannot see; not a death)
            key = (engine.name, engine.root_pid, engine.start_ticks)
            dead_now.add(key)
            if key in self._reported or self._reported_names.get(engine.name, -1.0) >= engine.registered_at:
                continue
            first_seen = self._dead_since.setdefault(key, now)
            if now - first_seen < self._grace:
                continue
            event = ExitEvent(
                id=os.urandom(16).hex(),
                engine=engine.name,
                exitcode=None,
                time=time.time(),
                url=engine.url,
                root_pid=engine.root_pid,
                start_ticks=engine.start_ticks,
            )
            try:
                append_event(event, self._dir)
            except OSError:
                self._errors.inc("events", "unwritable")
                continue
            log.warning("engine %s: root process %s vanished with no exit report", engine.name, engine.root_pid)
            self.ingest()
        for key in set(self._dead_since) - dead_now:
            del self._dead_since[key]

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        with self._lock:
            self.ingest()
            self.record_unreported(snapshot)
            counts = sorted(self._counts.items())
        family = CounterMetricFamily(
            "gpu_residency_engine_exits",
            "Engine exits by exit code and signal (signal='' for a plain exit code; exit_code='unknown' when the "
            "root vanished with no report).",
            labels=["node", "engine", "exit_code", "signal"],
        )
        for (engine, code, signal_label), count in counts:
            family.add_metric([self._node, engine, code, signal_label], count)
        yield family
