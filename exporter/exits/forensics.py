"""Crash forensics: why an engine died, from evidence the node keeps, and what was on its GPUs then.

A framework that sees its engine die knows only an exit code, and -9 means several things: the
kernel OOM killer (host or cgroup memory), SGLang's launcher killing its own tree after a
scheduler child failed, or a kill from outside (an operator, Ray). The exporter watches each
engine's process tree while it lives: which processes die and when, a dead child's exit status
while it is a zombie (before its parent reaps it), the OOM counters of the tree's own memory
cgroups and the kernel log. exporter/exits/causes.py names the cause from what belongs to that death.
A dead process leaves the watched tree once it is older than the child window: it can no longer
be a cause, and the tree of a long-lived engine does not grow with every helper it ran.

Beside the cause, each exit carries, for every GPU the engine held, the peak used memory in the
window before the death and the top holders at that peak, from a short bounded history of
collections. Nothing here holds a command line or an environment: titles, PIDs, cgroup paths.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.exits.causes import (
    CHILD_WINDOW_SECONDS,
    OOM_MARGIN_SECONDS,
    Death,
    Evidence,
    GpuPeak,
    HolderAt,
    Member,
    determine_cause,
    zombie_exitcode,
)
from exporter.exits.events import ExitEvent
from exporter.snapshot.attribution import Snapshot
from exporter.sources.oom_evidence import KernelLog, memory_counter_files, read_oom_kills
from exporter.sources.proctable import ProcView, read_proc, scan_pids

log = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 60.0
HISTORY_MAX = 240  # collections kept, whatever the rate: the history's memory is bounded
DEATHS_MAX = 64
TOP_HOLDERS = 5


# ---------- the history of collections ----------


@dataclass(frozen=True)
class _GpuState:
    index: int
    uuid: str
    used: int | None
    total: int | None
    holders: tuple[HolderAt, ...]


@dataclass(frozen=True)
class _Collection:
    at: float
    gpus: tuple[_GpuState, ...]
    engines: dict[str, frozenset[str]]  # engine -> uuids it held memory on


def _summarise(snapshot: Snapshot) -> _Collection:
    holders: dict[str, list[HolderAt]] = {}
    engines: dict[str, set[str]] = {}
    for usage in snapshot.engine_usage:
        if usage.used_bytes:
            holders.setdefault(usage.gpu.uuid, []).append(HolderAt("engine", usage.engine, usage.used_bytes))
            engines.setdefault(usage.engine, set()).add(usage.gpu.uuid)
    for proc in snapshot.processes:
        if proc.used_bytes and not proc.engine:
            holder = HolderAt("process", proc.holder.name, proc.used_bytes, proc.pid)
            holders.setdefault(proc.gpu.uuid, []).append(holder)
    for gpu, rest in snapshot.unattributed:
        if rest:
            holders.setdefault(gpu.uuid, []).append(HolderAt("unattributed", "", rest))
    return _Collection(
        at=snapshot.taken_at or time.time(),
        gpus=tuple(
            _GpuState(
                gpu.index,
                gpu.uuid,
                gpu.used_bytes,
                gpu.total_bytes,
                tuple(sorted(holders.get(gpu.uuid, []), key=lambda h: -h.used_bytes)[:TOP_HOLDERS]),
            )
            for gpu in snapshot.nvml.gpus
        ),
        engines={name: frozenset(uuids) for name, uuids in engines.items()},
    )


# ---------- the watcher ----------


@dataclass
class _Watch:
    engine: str
    root_pid: int
    members: dict[tuple[int, int], Member] = field(default_factory=dict)
    counters: dict[Path, int | None] = field(default_factory=dict)
    oom_counted: list[tuple[float, str]] = field(default_factory=list)


class Forensics:
    def __init__(
        self,
        node: str,
        errors: ErrorCounter,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        kmsg: str | None = "/dev/kmsg",
        tree_interval: float = 5.0,
        child_window: float = CHILD_WINDOW_SECONDS,
    ) -> None:
        self._node = node
        self._errors = errors
        self._window = window_seconds
        self._child_window = child_window
        self._cgroup_root = cgroup_root
        self._kernel = KernelLog(kmsg)
        self._tree_interval = tree_interval
        self._cgroup_counters_seen = False  # an engine's OOM counter file was readable at least once
        self._last_tree_scan = 0.0
        self._history: deque[_Collection] = deque(maxlen=HISTORY_MAX)
        self._watches: dict[str, _Watch] = {}
        self._deaths: deque[Death] = deque(maxlen=DEATHS_MAX)
        self._lock = threading.Lock()

    # --- inputs ---

    def record(self, snapshot: Snapshot) -> None:
        """A new collection: into the history, and the engines' GPU processes into their trees."""
        summary = _summarise(snapshot)
        with self._lock:
            self._history.append(summary)
            while self._history and summary.at - self._history[0].at > self._window:
                self._history.popleft()
            for proc in snapshot.processes:
                watch = self._watches.get(proc.engine)
                if watch is not None:
                    self._add_member(watch, proc.pid, proc.comm)

    def tick(self, engines: Iterable[Engine]) -> None:
        """One look: liveness of every watched process, OOM counters, the kernel log, new engines."""
        now = time.time()
        self._kernel.read()
        with self._lock:
            live = {e.name: e for e in engines if e.up and e.root_pid}
            for name, engine in live.items():
                watch = self._watches.get(name)
                if watch is None or watch.root_pid != engine.root_pid:
                    self._watches[name] = _Watch(name, engine.root_pid)
                    self._add_member(self._watches[name], engine.root_pid, "")
            if time.monotonic() - self._last_tree_scan >= self._tree_interval:
                self._last_tree_scan = time.monotonic()
                self._scan_trees()
            for watch in list(self._watches.values()):
                self._look(watch, now)
                if watch.engine not in live:
                    root = next((m for m in watch.members.values() if m.pid == watch.root_pid), None)
                    if root is not None and root.gone_at is not None:
                        self._died(watch, root)
                    del self._watches[watch.engine]  # dead, or gone from the catalog alive: watched no more

    def _add_member(self, watch: _Watch, pid: int, title: str) -> None:
        info = read_proc(pid)
        if info is None or not info.alive:
            return
        key = (pid, info.start_ticks)
        if key not in watch.members:
            view = ProcView()
            watch.members[key] = Member(pid, info.start_ticks, title or view.title(pid) or info.comm)
            for counter in self._counter_files(pid):
                count = watch.counters.setdefault(counter, read_oom_kills(counter))
                self._cgroup_counters_seen |= count is not None

    def _counter_files(self, pid: int) -> list[Path]:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return []
        return memory_counter_files(text, self._cgroup_root)

    def _scan_trees(self) -> None:
        """Every watched engine's whole tree: one pass over the process table for parent links."""
        if not self._watches:
            return
        children: dict[int, list[int]] = {}
        for pid in scan_pids():
            info = read_proc(pid)
            if info is not None and info.alive:
                children.setdefault(info.ppid, []).append(pid)
        for watch in self._watches.values():
            stack = list(children.get(watch.root_pid, ()))
            seen = 0
            while stack and seen < 4096:
                pid = stack.pop()
                seen += 1
                self._add_member(watch, pid, "")
                stack.extend(children.get(pid, ()))

    def _look(self, watch: _Watch, now: float) -> None:
        """Who died since the last look (with a zombie's exit status, while its parent has not reaped
        it), what the OOM counters counted; members and counts too old to be a cause are let go."""
        for (pid, start), member in list(watch.members.items()):
            if member.gone_at is None:
                info = read_proc(pid)
                if info is None or not info.alive or info.start_ticks != start:
                    member.gone_at = now
                    same = info is not None and info.start_ticks == start
                    member.exitcode = zombie_exitcode(info.exit_status) if same else None
            elif pid != watch.root_pid and now - member.gone_at > self._child_window:
                del watch.members[(pid, start)]
        for path, before in list(watch.counters.items()):
            count = read_oom_kills(path)
            if count is not None and before is not None and count > before:
                watch.oom_counted.append((now, str(path)))
            if count is not None:
                watch.counters[path] = count
        keep = now - self._child_window - OOM_MARGIN_SECONDS
        watch.oom_counted = [(when, path) for when, path in watch.oom_counted if when >= keep]

    def _died(self, watch: _Watch, root: Member) -> None:
        death = Death(
            engine=watch.engine,
            root_pid=watch.root_pid,
            start_ticks=root.start_ticks,
            at=root.gone_at,
            members=list(watch.members.values()),
            gpus=self._peaks(watch.engine, root.gone_at),
            oom_counted=list(watch.oom_counted),
        )
        self._deaths.append(death)
        log.info("engine %s: root %d died; evidence kept for its exit", watch.engine, watch.root_pid)

    def _peaks(self, engine: str, at: float) -> list[GpuPeak]:
        recent = [c for c in self._history if at - self._window <= c.at <= at + 1.0]
        held = set().union(*(c.engines.get(engine, frozenset()) for c in recent)) if recent else set()
        peaks = []
        for uuid in sorted(held):
            states = [(c.at, gpu) for c in recent for gpu in c.gpus if gpu.uuid == uuid and gpu.used is not None]
            if states:
                when, top = max(states, key=lambda item: item[1].used)
                peaks.append(GpuPeak(top.index, uuid, top.used, top.total, when, top.holders))
        return peaks

    # --- outputs ---

    def watching(self, engine: str) -> bool:
        """Whether a death of this engine may still be seen (its tree is being watched)."""
        with self._lock:
            return engine in self._watches

    def death_for(self, event: ExitEvent) -> Death | None:
        """The observed death an exit event reports: same root, else the same engine close in time."""
        with self._lock:
            for death in reversed(self._deaths):
                if event.root_pid is not None and death.root_pid == event.root_pid and death.engine == event.engine:
                    return death
            for death in reversed(self._deaths):
                if death.engine == event.engine and abs(death.at - event.time) <= self._window:
                    return death
        return None

    def explain(self, event: ExitEvent, death: Death | None) -> Evidence:
        with self._lock:
            kills = list(self._kernel.kills)
        return determine_cause(event.exitcode, death, kills, self._child_window)

    def families(self, snapshot: Snapshot) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gpu_residency_forensics_evidence_available",
            "1 where the exporter can read this kind of crash evidence: kernel_log (/dev/kmsg, needs "
            "CAP_SYSLOG), memory_cgroup (an engine's memory cgroup OOM counter was readable at least once).",
            labels=["node", "source"],
        )
        family.add_metric([self._node, "kernel_log"], 1 if self._kernel.available else 0)
        family.add_metric([self._node, "memory_cgroup"], 1 if self._cgroup_counters_seen else 0)
        yield family
        with self._lock:
            kept = len(self._history)
        history = GaugeMetricFamily(
            "gpu_residency_forensics_history_collections",
            f"Collections kept for the GPU peak before a death (the last --forensics.window, at most {HISTORY_MAX}).",
            labels=["node"],
        )
        history.add_metric([self._node], kept)
        yield history
