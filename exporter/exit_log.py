"""Engine exits as counters: every exit counted once, with its cause, across rotations and restarts.

Exits come from the registry's events files (written by the frameworks that launched the
engines, `exporter.exits.report_exit`) and from the exporter itself: a registered engine
whose root vanished with no report is recorded once, as exit_code="unknown", after a grace
period that lets the parent's own report arrive first.

The counts live in the exporter's state directory (`--state.dir`), with how far each events
file has been read: a rotated-away file, or a restart, loses no count and counts nothing
twice. Without a writable state directory the counts start again from the files on restart.

Each exit waits (up to EVIDENCE_WAIT_SECONDS) for the exporter's crash forensics to have seen
the death, then is counted with the cause the evidence supports (exporter/forensics.py) and kept,
with that evidence, among the recent exits served at /api/v1/exits.

A counter that first appears already at 1 is invisible to `increase()`: a new series is
published at 0 first (for `--exits.first-zero-seconds`, at least one scrape), then at its
count, so an alert on the first exit of an engine fires. Series of engines that left the
catalog more than `--exits.retention` ago are dropped, so churn does not grow the output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, Metric

from exporter.attribution import Snapshot
from exporter.causes import Death, Evidence, determine_cause, evidence_dict
from exporter.errors import ErrorCounter
from exporter.event_tail import EventTail, Position
from exporter.exits import EVENTS_FILE, ROTATED_SUFFIX, ExitEvent, exit_labels
from exporter.forensics import Forensics
from gpu_residency_common.files import UntrustedFileError, ensure_dir, read_json, write_atomic

log = logging.getLogger(__name__)

MAX_READ_BYTES = 4 * 1024 * 1024  # per collection: a huge backlog is caught up over several
STATE_FILE = "exits.json"
MAX_STATE_BYTES = 16 * 1024 * 1024
RECENT_IDS = 20_000  # ids remembered against a file read twice (replaced in place, restored)
RECENT_EVENTS = 256

CountKey = tuple[str, str, str, str]  # engine, exit_code, signal, cause
SETTLE_SECONDS = 1.0  # after a death is seen, how long late evidence (a kernel log line) may still come
EVIDENCE_WAIT_SECONDS = 3.0  # how long a reported exit waits for its death to be seen before it is counted


@dataclass
class _Count:
    value: int
    last_time: float  # wall-clock time of the latest event
    zero_until: float | None = None  # monotonic: published as 0 until then (None: released)


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
        self._dir = directory
        self._errors = errors
        self._grace = grace_seconds
        self._state_dir = state_dir
        self._first_zero = first_zero_seconds
        self._retention = retention_seconds
        self._started = time.time()
        self._counts: dict[CountKey, _Count] = {}
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
        self._tail = EventTail(self._event_paths, positions)

    def _event_paths(self) -> list[Path]:
        """events.jsonl and any per-user events.<uid>.jsonl, each after its rotated .1."""
        if self._dir is None:
            return []
        try:
            names = os.listdir(self._dir)
        except OSError:
            return []
        bases = sorted(n for n in names if n.startswith("events") and n.endswith(".jsonl"))
        if EVENTS_FILE not in bases:
            bases.insert(0, EVENTS_FILE)  # a rotated .1 alone is still read
        return [self._dir / name for base in bases for name in (base + ROTATED_SUFFIX, base)]

    # --- state ---

    def _load_state(self) -> list[Position]:
        if self._state_dir is None:
            return []
        try:
            data = read_json(self._state_dir / STATE_FILE, MAX_STATE_BYTES, max_depth=8)
        except UntrustedFileError as exc:
            if exc.reason != "missing":
                self._errors.inc("exits_state", exc.reason)
                log.warning("exit state %s ignored (%s): counting again from the events files", self._state_dir, exc)
            return []
        try:
            for row in data["counts"]:
                engine, code, signal_label, *cause, value, last = row  # version 1 had no cause
                key = (str(engine), str(code), str(signal_label), str(cause[0]) if cause else "unknown")
                self._counts[key] = _Count(int(value), float(last))
            self._recent.extend(record for record in data.get("recent", []) if isinstance(record, dict))
            for event in data.get("pending", []):
                self._pending[event["id"]] = (ExitEvent(**event), time.monotonic())
            for event_id in data.get("ids", []):
                self._remember(str(event_id))
            return [Position(int(i), int(o), bytes.fromhex(h)) for i, o, h in data["positions"]]
        except (KeyError, TypeError, ValueError) as exc:
            self._counts.clear()
            self._errors.inc("exits_state", "malformed")
            log.warning("exit state %s ignored (%s): counting again from the events files", self._state_dir, exc)
            return []

    def _save_state(self) -> None:
        if self._state_dir is None or not self._dirty:
            return
        body = {
            "version": 2,
            "counts": [[*key, c.value, c.last_time] for key, c in sorted(self._counts.items())],
            "positions": [[p.inode, p.offset, p.head.hex()] for p in self._tail.positions],
            "ids": list(self._ids),
            "recent": list(self._recent),
            "pending": [asdict(event) for event, _ in self._pending.values()],
        }
        try:
            write_atomic(ensure_dir(self._state_dir) / STATE_FILE, json.dumps(body, separators=(",", ":")))
            self._dirty = False
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
        try:
            event = ExitEvent.from_json(line)
        except (ValueError, TypeError):
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
        count = self._counts.get(key)
        if count is None:
            # Published at 0 first, so that increase() sees this first exit; exits from before
            # this exporter started were published by an earlier one (or are history).
            recent = event.time >= self._started
            count = self._counts[key] = _Count(0, event.time, zero_until=0.0 if recent else None)
        count.value += 1
        count.last_time = max(count.last_time, event.time)
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
            self._add(
                ExitEvent(
                    id=os.urandom(16).hex(),
                    engine=engine.name,
                    exitcode=None,
                    time=time.time(),
                    url=engine.url,
                    root_pid=engine.root_pid,
                    start_ticks=engine.start_ticks,
                )
            )
        for key in set(self._dead_since) - dead_now:
            del self._dead_since[key]

    def _forget_departed(self, snapshot: Snapshot) -> None:
        """Drop the counts of engines gone from the catalog for longer than the retention."""
        now = time.time()
        known = {engine.name for engine in snapshot.engines}
        counted = {key[0] for key in self._counts}
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
        self._counts = {key: c for key, c in self._counts.items() if key[0] not in gone}
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
            shown = self._published_values()
        family = CounterMetricFamily(
            "gpu_residency_engine_exits",
            "Engine exits by exit code, signal and cause (signal='' for a plain exit code; exit_code='unknown' when "
            "the root vanished with no report; cause: oom_kill, child_failure, signal, exit_code, unknown, from "
            "evidence only). A new series starts at 0.",
            labels=["node", "engine", "exit_code", "signal", "cause"],
        )
        for (engine, code, signal_label, cause), value in shown:
            family.add_metric([self._node, engine, code, signal_label, cause], value)
        yield family
        if self._forensics is not None:
            yield from self._forensics.families(snapshot)

    def _published_values(self) -> list[tuple[CountKey, int]]:
        now = time.monotonic()
        shown = []
        for key, count in sorted(self._counts.items()):
            if count.zero_until == 0.0:
                count.zero_until = now + self._first_zero  # first time on show: hold 0 from now
            if count.zero_until is not None and now >= count.zero_until:
                count.zero_until = None
            shown.append((key, 0 if count.zero_until is not None else count.value))
        return shown
