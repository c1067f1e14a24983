"""Crash forensics: why an engine died, from evidence the node keeps, and what was on its GPUs then.

A framework that sees its engine die knows only an exit code, and -9 means several things: the
kernel OOM killer (host or cgroup memory), SGLang's launcher killing its own tree after a
scheduler child failed, or a kill from outside (an operator, Ray). The exporter watches each
engine's process tree while it lives, by events rather than by looking (exporter/exits/trees.py:
a pidfd per member, the tree's OOM counters read at a death), and reads the kernel log when its
fd polls readable. exporter/exits/causes.py names the cause from what belongs to that death.

Beside the cause, each exit carries, for every GPU the engine held, the peak used memory in the
window before the death and the top holders at that peak (exporter/exits/history.py). Nothing
here holds a command line or an environment: titles, PIDs, cgroup paths.
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.exits.causes import CHILD_WINDOW_SECONDS, Death, Evidence, Member, determine_cause
from exporter.exits.events import ExitEvent
from exporter.exits.history import HISTORY_MAX, GpuHistory
from exporter.exits.trees import Trees, Watch
from exporter.sources.nvml import NvmlReading
from exporter.sources.oom_evidence import KernelLog
from exporter.sources.proctable import ProcView

log = logging.getLogger(__name__)

DEFAULT_WINDOW_SECONDS = 60.0
DEFAULT_TREE_INTERVAL = 30.0
DEATHS_MAX = 64
OWNERS_MAX = 4096
_KMSG = "kmsg"


class Forensics:
    def __init__(
        self,
        node: str,
        errors: ErrorCounter,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        kmsg: str | None = "/dev/kmsg",
        tree_interval: float = DEFAULT_TREE_INTERVAL,
        child_window: float = CHILD_WINDOW_SECONDS,
    ) -> None:
        self._node = node
        self._errors = errors
        self._window = window_seconds
        self._child_window = child_window
        self._selector = selectors.DefaultSelector()
        self._kernel = KernelLog(kmsg)
        if self._kernel.fileno() is not None:
            self._selector.register(self._kernel.fileno(), selectors.EVENT_READ, _KMSG)
        self._trees = Trees(self._selector, self._died, cgroup_root, tree_interval, child_window)
        self._history = GpuHistory(window_seconds)
        self._owners: dict[int, tuple[str, str]] = {}  # GPU pid -> (engine or "", its name)
        self._deaths: deque[Death] = deque(maxlen=DEATHS_MAX)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """Polls readable when a watched process died or the kernel logged: `pending()` says what."""
        return self._selector.fileno()

    # --- inputs ---

    def record(self, reading: NvmlReading, at: float | None = None) -> None:
        """A GPU reading into the history; a new GPU process of a watched tree becomes a member."""
        with self._lock:
            if len(self._owners) > OWNERS_MAX:
                self._owners.clear()
            self._history.record(reading, self._owner, at)

    def confirm(self, used: dict[int, int | None] | None) -> bool:
        """The tick's cheap question: True when these GPUs' used memory is what the last reading
        recorded (it stands until now); False: a whole reading is wanted."""
        with self._lock:
            return used is not None and self._history.confirm(used, time.time())

    def _owner(self, pid: int) -> tuple[str, str]:
        known = self._owners.get(pid)
        if known is None:
            view = ProcView()
            engine = self._trees.owner(pid, view)
            info = view.info(pid)
            known = self._owners[pid] = (engine, view.title(pid) or (info.comm if info else ""))
        return known

    def sync(self, engines: Iterable[Engine]) -> bool:
        """The catalog's engines: a new live root is watched (True then: the reading just taken is
        worth recording again, its GPU processes may be that engine's), one gone from the catalog
        alive is watched no more (one whose root died unheard, with no pidfd, died now)."""
        now = time.time()
        with self._lock:
            live = {e.name: e.root_pid for e in engines if e.up and e.root_pid}
            new = any([self._trees.watch(name, root) for name, root in live.items()])
            if new:
                self._owners.clear()  # a GPU process seen before its engine was watched is that engine's now
            if any(engine not in live for engine in self._trees.watches):
                self._hear()  # the catalog saw a root dead: its death, heard by now, is handled first
            for watch in list(self._trees.watches.values()):
                if watch.engine not in live:
                    self._trees.poll(watch, now)
                    if watch.engine in self._trees.watches:
                        self._trees.forget(watch)
        return new

    def pending(self, timeout: float = 0.0) -> list:
        """What arrived (deaths, kernel log lines; waiting at most `timeout`), not handled yet: a caller
        reads the GPUs first when `deaths_in` it, then `handle`s it."""
        return [key.data for key, _ in self._selector.select(timeout)]

    @staticmethod
    def deaths_in(pending: list) -> bool:
        return any(data != _KMSG for data in pending)

    def handle(self, pending: list) -> bool:
        """Handle what `pending` returned; True if a watched process died (a kernel log line alone
        changes nothing the exporter shows: it is kept for the death it may explain)."""
        with self._lock:
            self._handle(pending)
        return self.deaths_in(pending)

    def _hear(self) -> None:
        """The deaths that arrived while the caller worked, handled before it drops or re-bases a watch:
        else a root dead a moment ago loses its death, or a child's OOM kill its counter's rise."""
        self._handle(self.pending())

    def _handle(self, ready: list) -> None:
        if _KMSG in ready:
            self._kernel.read()  # first: an OOM kill's line comes before its victim's death
        watches = self._trees.watches
        deaths = [data for data in ready if data != _KMSG]
        # Children before roots: a tree killed at once still shows which member went first.
        for engine, member in sorted(deaths, key=lambda d: d[0] in watches and watches[d[0]].root_pid == d[1][0]):
            self._trees.died(engine, member, time.time())
            self._owners.pop(member[0], None)

    def look(self, force: bool = False) -> None:
        """The slow part, when due (exporter/exits/trees.py): new members from the process table."""
        with self._lock:
            if self._trees.look(time.time(), force):
                self._hear()
                self._trees.rebase(time.time())

    def tick(self, engines: Iterable[Engine]) -> None:
        """Everything at once, without waiting: deaths that arrived, the catalog, the trees."""
        self.handle(self.pending())
        self.sync(engines)
        self.look(force=True)
        self.handle(self.pending())

    def _died(self, watch: Watch, root: Member) -> None:
        death = Death(
            engine=watch.engine,
            root_pid=watch.root_pid,
            start_ticks=root.start_ticks,
            at=root.gone_at,
            members=list(watch.members.values()),
            gpus=self._history.peaks(watch.engine, root.gone_at),
            oom_counted=list(watch.oom_counted),
        )
        self._deaths.append(death)
        log.info("engine %s: root %d died; evidence kept for its exit", watch.engine, watch.root_pid)

    # --- outputs ---

    def wanted_gpus(self) -> set[int] | None:
        """The GPUs a tick reads: those the watched engines held at the last reading (None: every
        GPU; empty: no engine is watched, nothing to read)."""
        with self._lock:
            watched = set(self._trees.watches)
            return self._history.engine_gpus(watched) if watched else set()

    def pass_wanted(self) -> bool:
        """A GPU process just joined a watched tree: its siblings are looked for at the next `look`."""
        with self._lock:
            return self._trees.scan_wanted

    def watched(self) -> bool:
        """Whether any engine's tree is watched (the GPU history is worth a tick)."""
        with self._lock:
            return bool(self._trees.watches)

    def watching(self, engine: str) -> bool:
        """Whether a death of this engine may still be seen (its tree is being watched)."""
        with self._lock:
            return engine in self._trees.watches

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

    def families(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "gpu_residency_forensics_evidence_available",
            "1 where the exporter can read this kind of crash evidence: kernel_log (/dev/kmsg, needs "
            "CAP_SYSLOG), memory_cgroup (an engine's memory cgroup OOM counter was readable at least once).",
            labels=["node", "source"],
        )
        family.add_metric([self._node, "kernel_log"], 1 if self._kernel.available else 0)
        family.add_metric([self._node, "memory_cgroup"], 1 if self._trees.counters_seen else 0)
        yield family
        with self._lock:
            kept = len(self._history)
            watched = {
                watch.engine: sum(member.gone_at is None for member in watch.members.values())
                for watch in self._trees.watches.values()
            }
        members = GaugeMetricFamily(
            "gpu_residency_forensics_watched_processes",
            "Live processes of an engine's tree the exporter watches for its death (root, children found by "
            "the tree pass or on a GPU): a process not counted yet cannot be named as a cause.",
            labels=["node", "engine"],
        )
        for engine, count in sorted(watched.items()):
            members.add_metric([self._node, engine], count)
        yield members
        history = GaugeMetricFamily(
            "gpu_residency_forensics_history_collections",
            f"GPU readings kept for the peak before a death (the last --forensics.window, at most {HISTORY_MAX}).",
            labels=["node"],
        )
        history.add_metric([self._node], kept)
        yield history
