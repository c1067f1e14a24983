"""Engine exits as counters: every exit counted once, with its cause, across rotations and restarts.

Exits come from the registry's events files (written by the frameworks that launched the
engines, `exporter.exits.report_exit`) and from the exporter itself: a registered engine
whose root vanished with no report is recorded once, as exit_code="unknown", after a grace
period that lets the parent's own report arrive first.

The counts live in the exporter's state directory (`--state.dir`), with how far each events
file has been read: a rotated-away file, or a restart, loses no count and counts nothing
twice. Without a writable state directory the counts start again from the files on restart.

Each line is checked on its own (exporter/exits/events.py): a malformed or oversized one costs
itself and an error count, never the lines after it. Each exit waits (up to EVIDENCE_WAIT_SECONDS)
for the exporter's crash forensics to have seen the death, then is counted with the cause the
evidence supports (exporter/exits/causes.py) and kept, with that evidence, among the recent exits
served at /api/v1/exits. Counters are published as exporter/exits/counts.py says; series of
engines that left the catalog more than `--exits.retention` ago are dropped, so churn does not
grow the output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

from exporter.errors import ErrorCounter
from exporter.exits.causes import Death, Evidence, determine_cause, evidence_dict
from exporter.exits.counts import MAX_SERIES, ExitCounts
from exporter.exits.describe import exit_labels
from exporter.exits.event_tail import EventTail, Position
from exporter.exits.events import EventTooLarge, ExitEvent, event_files
from exporter.exits.forensics import Forensics
from exporter.exits.state import SavedState, StateTooLarge, load_state, save_state
from exporter.snapshot.attribution import Snapshot

log = logging.getLogger(__name__)

MAX_READ_BYTES = 4 * 1024 * 1024  # per collection: a huge backlog is caught up over several
RECENT_IDS = 20_000  # ids remembered against a file read twice (replaced in place, restored)
RECENT_EVENTS = 256
SETTLE_SECONDS = 0.3  # after a death is heard, how long late evidence (a kernel log line) may still come
EVIDENCE_WAIT_SECONDS = 3.0  # how long a reported exit waits for its death to be seen before it is counted


class ExitLog:
    def __init__(
        self,
        node: str,
        directory: Path | None,
        errors: ErrorCounter,
        grace_seconds: float = 30.0,
        state_dir: Path | None = None,
        first_zero_seconds: float = 60.0,
        retention_seconds: float = 3600.0,
        forensics: Forensics | None = None,
    ) -> None:
        self._node = node
        self._forensics = forensics
        self._pending: dict[str, tuple[ExitEvent, float]] = {}  # id -> (event, monotonic time received)
        self._errors = errors
        self._grace = grace_seconds
        self._state_dir = state_dir
        self._retention = retention_seconds
        self._started = time.time()
        self._counts = ExitCounts(first_zero_seconds)
        self._ids: deque[str] = deque()
        self._id_set: set[str] = set()
        self._recent: deque[dict] = deque(maxlen=RECENT_EVENTS)  # exits with their cause and evidence
        self._reported: dict[tuple[str, int | None, int | None], float] = {}  # root identity -> event time
        self._unknown: dict[tuple[str, int | None, int | None], str] = {}  # root identity -> unreported event id
        self._reported_names: dict[str, float] = {}  # engine -> latest event time
        self._dead_since: dict[tuple[str, int | None, int | None], float] = {}
        self._absent_since: dict[str, float] = {}
        self._dirty = False
        self._lock = threading.Lock()  # concurrent scrapes must not read the same bytes twice
        positions = self._load_state()
        self._tail = EventTail(lambda: event_files(directory) if directory else [], positions)

    # --- state ---

    def _load_state(self) -> list[Position]:
        state = load_state(self._state_dir, self._errors) if self._state_dir else None
        if state is None:
            return []
        self._counts.restore(state.counts)
        self._recent.extend(state.recent)
        self._pending = {event.id: (event, time.monotonic()) for event in state.pending}
        for event_id in state.ids:
            self._remember(event_id)
        return state.positions

    def _save_state(self) -> None:
        if self._state_dir is None or not self._dirty:
            return
        state = SavedState(
            counts=self._counts.saved(),
            positions=self._tail.positions,
            pending=[event for event, _ in self._pending.values()],
            ids=list(self._ids),
            recent=list(self._recent),
        )
        try:
            save_state(self._state_dir, state)
            self._dirty = False
        except StateTooLarge as exc:
            self._errors.inc("exits_state", "too_large")
            log.warning("exit state not saved (%s): the previous state stands", exc)
        except OSError as exc:
            self._errors.inc("exits_state", "unwritable")
            log.warning("cannot save exit state in %s: %s (counts survive no restart)", self._state_dir, exc)
            self._state_dir = None  # said once; counting goes on in memory

    def _remember(self, event_id: str) -> None:
        self._ids.append(event_id)
        self._id_set.add(event_id)
        while len(self._ids) > RECENT_IDS:
            self._id_set.discard(self._ids.popleft())

    # --- reading ---

    def ingest(self) -> None:
        """Read whatever was appended (or rotated) since the last call."""
        lines, problems = self._tail.read_new(MAX_READ_BYTES)
        for reason in problems:
            self._errors.inc("events", reason)
        for line in lines:
            if line.strip():
                self._add_line(line)
        if lines:
            self._dirty = True

    def _add_line(self, line: bytes) -> None:
        """One line, on its own: a bad one costs itself and a count, never the lines after it."""
        try:
            event = ExitEvent.from_json(line)
        except EventTooLarge:
            self._errors.inc("events", "too_large")
            return
        except ValueError:
            self._errors.inc("events", "malformed")
            return
        self._add(event)

    def _add(self, event: ExitEvent) -> None:
        """An exit learnt of: held until its evidence is in (or cannot come), then counted."""
        if event.id in self._id_set:
            return
        self._remember(event.id)
        identity = (event.engine, event.root_pid, event.start_ticks)
        if event.exitcode is not None and identity in self._unknown:
            self._late_report(self._unknown.pop(identity), event)
            return
        if event.exitcode is None:
            self._unknown[identity] = event.id
        self._pending[event.id] = (event, time.monotonic())
        self._reported[identity] = event.time
        self._reported_names[event.engine] = max(event.time, self._reported_names.get(event.engine, 0.0))
        self._dirty = True

    def _late_report(self, unknown_id: str, report: ExitEvent) -> None:
        """A parent's report of a death already recorded as unreported: the same exit, not a second.
        Still pending, it takes the reported code; already counted, its record notes the code."""
        if unknown_id in self._pending:
            event, received = self._pending[unknown_id]
            self._pending[unknown_id] = (dataclasses.replace(event, exitcode=report.exitcode), received)
        else:
            for record in self._recent:
                if record.get("id") == unknown_id:
                    record["reported_exitcode"] = report.exitcode
        log.info("engine %s: exit reported after it was recorded as unreported; counted once", report.engine)
        self._dirty = True

    def _finalize(self) -> None:
        for event_id, (event, received) in list(self._pending.items()):
            death = self._forensics.death_for(event) if self._forensics else None
            waited = time.monotonic() - received
            if not (
                self._forensics is None
                or event.time < self._started  # from before this exporter: no evidence is coming
                or (death is None and not self._forensics.watching(event.engine))  # nor for an unwatched engine
                or (death is not None and time.time() >= death.at + SETTLE_SECONDS)
                or waited >= EVIDENCE_WAIT_SECONDS
            ):
                continue
            del self._pending[event_id]
            if self._forensics is not None:
                evidence = self._forensics.explain(event, death)
            else:
                evidence = determine_cause(event.exitcode, None)
            self._count(event, evidence, death)

    def _count(self, event: ExitEvent, evidence: Evidence, death: Death | None) -> None:
        key = (event.engine, *exit_labels(event.exitcode), evidence.cause)
        if not self._counts.add(key, event.time, new_at_zero=event.time >= self._started):
            self._errors.inc("events", "too_many_series")
            log.warning("engine %s: exit not counted, %d exit series already", event.engine, MAX_SERIES)
            return
        self._recent.append({**asdict(event), **evidence_dict(evidence, death)})
        if evidence.cause != "exit_code" or event.exitcode != 0:
            log.warning("engine %s exited (exitcode=%s): %s", event.engine, event.exitcode, evidence.detail)
        self._dirty = True

    # --- deaths nobody reported ---

    def record_unreported(self, snapshot: Snapshot) -> None:
        """Count, once, registered engines whose root is gone and that nobody reported."""
        now = time.monotonic()
        dead_now = set()
        for engine in snapshot.engines:
            if engine.up or engine.source != "registry" or engine.root_pid is None:
                continue  # (no root PID: an entry whose root was never proven; not a death)
            key = (engine.name, engine.root_pid, engine.start_ticks)
            dead_now.add(key)
            if key in self._reported or self._reported_names.get(engine.name, -1.0) >= engine.registered_at:
                continue
            first_seen = self._dead_since.setdefault(key, now)
            if now - first_seen < self._grace:
                continue
            log.warning("engine %s: root process %s vanished with no exit report", engine.name, engine.root_pid)
            root = {"url": engine.url, "root_pid": engine.root_pid, "start_ticks": engine.start_ticks}
            self._add(ExitEvent(os.urandom(16).hex(), engine.name, None, time.time(), **root))
        for key in set(self._dead_since) - dead_now:
            del self._dead_since[key]

    def _forget_departed(self, snapshot: Snapshot) -> None:
        """Drop the counts of engines gone from the catalog for longer than the retention."""
        now = time.time()
        known = {engine.name for engine in snapshot.engines}
        counted = self._counts.engines()
        for name in counted - known:
            self._absent_since.setdefault(name, now)
        for name in set(self._absent_since):
            if name in known or name not in counted:
                del self._absent_since[name]
        gone = {
            name
            for name, since in self._absent_since.items()
            if now - max(since, self._reported_names.get(name, 0.0)) > self._retention
        }
        if not gone:
            return
        self._counts.drop(gone)
        self._reported = {key: t for key, t in self._reported.items() if key[0] not in gone}
        self._unknown = {key: i for key, i in self._unknown.items() if key[0] not in gone}
        for name in gone:
            self._reported_names.pop(name, None)
            self._absent_since.pop(name, None)
        self._dirty = True

    # --- output ---

    def recent(self, engine: str | None = None) -> list[dict]:
        """The latest exits with their cause and evidence, newest first."""
        with self._lock:
            records = [dict(r) for r in self._recent if engine is None or r.get("engine") == engine]
        return sorted(records, key=lambda r: -float(r.get("time", 0)))

    def busy(self) -> bool:
        """Exits wait for their evidence, or a root is gone with no report yet: worth looking again soon."""
        with self._lock:
            return bool(self._pending) or any(key not in self._reported for key in self._dead_since)

    def update(self, snapshot: Snapshot) -> None:
        """Read new events, record unreported deaths, count what has its evidence, save."""
        with self._lock:
            self.ingest()
            self.record_unreported(snapshot)
            self._finalize()
            self._forget_departed(snapshot)
            self._save_state()

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        self.update(snapshot)
        with self._lock:
            shown = self._counts.published()
        family = CounterMetricFamily(
            "gpu_residency_engine_exits",
            "Engine exits by exit code, signal and cause (signal='' for a plain exit code; exit_code='unknown' when "
            "the root vanished with no report; cause: oom_kill, child_failure, exit_code or unknown, from evidence "
            "only: a signal alone is unknown). A new series starts at 0.",
            labels=["node", "engine", "exit_code", "signal", "cause"],
        )
        for (engine, code, signal_label, cause), value in shown:
            family.add_metric([self._node, engine, code, signal_label, cause], value)
        yield family
        if self._forensics is not None:
            yield from self._forensics.families()
