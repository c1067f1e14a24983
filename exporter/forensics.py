"""Crash forensics: why an engine died, from evidence the node keeps, and what was on its GPUs then.

A framework that sees its engine die knows only an exit code, and -9 means several things: the
kernel OOM killer (host or cgroup memory), SGLang's launcher killing its own tree after a
scheduler child failed, or a kill from outside (an operator, Ray). The exporter watches each
engine's process tree while it lives and decides from evidence only:

- oom_kill: the kernel log names a process of the tree as killed for lack of memory (/dev/kmsg,
  readable with CAP_SYSLOG), or a memory cgroup of the tree counted an OOM kill
  (cgroup v1 memory.oom_control, v2 memory.events `oom_kill`) while a process of the tree died;
- child_failure: a process of the tree died at least one look before the root did;
- signal / exit_code: the exit status the parent reported, with no other evidence;
- unknown: no report and no evidence. Never a guess.

Beside the cause, each exit carries, for every GPU the engine held, the peak used memory in the
window before the death and the top holders at that peak, from a short bounded history of
collections. Nothing here holds a command line or an environment: titles, PIDs, cgroup paths.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.attribution import Snapshot
from exporter.engines import Engine
from exporter.errors import ErrorCounter
from exporter.exits import ExitEvent, signal_name
from exporter.proctable import ProcView, read_proc, scan_pids

log = logging.getLogger(__name__)

CAUSES = ("oom_kill", "child_failure", "signal", "exit_code", "unknown")
DEFAULT_WINDOW_SECONDS = 60.0
HISTORY_MAX = 240  # collections kept, whatever the rate: the history's memory is bounded
DEATHS_MAX = 64
TOP_HOLDERS = 5
OOM_MARGIN_SECONDS = 5.0  # an OOM kill counted this close before a death (or after: logs lag) is its evidence
_KMSG_KILL = re.compile(r"(?:Killed process|oom-kill:.*?\bpid=)\s*(\d+)(?:\s+\(([^)]{0,64})\))?")


# ---------- what a death looks like ----------


@dataclass
class Member:
    """A process of an engine's tree, as last seen."""

    pid: int
    start_ticks: int
    title: str
    gone_at: float | None = None  # wall-clock time of the first look that found it gone


@dataclass(frozen=True)
class HolderAt:
    kind: str  # engine | process | unattributed
    name: str
    used_bytes: int
    pid: int | None = None


@dataclass(frozen=True)
class GpuPeak:
    gpu: int
    uuid: str
    used_bytes: int
    total_bytes: int | None
    at: float  # when the peak was seen
    top_holders: tuple[HolderAt, ...]


@dataclass
class Death:
    """An engine root the exporter saw die, with what it saw around it."""

    engine: str
    root_pid: int
    start_ticks: int | None
    at: float
    members: list[Member]
    gpus: list[GpuPeak]
    oom_counted: list[tuple[float, str]] = field(default_factory=list)  # (when, cgroup counter file)


@dataclass(frozen=True)
class Evidence:
    cause: str  # one of CAUSES
    detail: str  # one line for a human
    victim_pid: int | None = None
    victim_title: str = ""
    facts: tuple[str, ...] = ()  # what was observed, each a short sentence


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
    for usage in snapshot.engine_usage:
        if usage.used_bytes:
            holders.setdefault(usage.gpu.uuid, []).append(HolderAt("engine", usage.engine, usage.used_bytes))
    for proc in snapshot.processes:
        if proc.used_bytes and not proc.engine:
            holder = HolderAt("process", proc.holder.name, proc.used_bytes, proc.pid)
            holders.setdefault(proc.gpu.uuid, []).append(holder)
    for gpu, rest in snapshot.unattributed:
        if rest:
            holders.setdefault(gpu.uuid, []).append(HolderAt("unattributed", "", rest))
    engines: dict[str, set[str]] = {}
    for usage in snapshot.engine_usage:
        if usage.used_bytes:
            engines.setdefault(usage.engine, set()).add(usage.gpu.uuid)
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


# ---------- kernel and cgroup evidence ----------


class KernelLog:
    """OOM-kill lines from /dev/kmsg, read as they come (needs CAP_SYSLOG where dmesg_restrict=1)."""

    def __init__(self, path: str | None) -> None:
        self.available = False
        self._fd: int | None = None
        self.kills: deque[tuple[float, int, str]] = deque(maxlen=256)  # (when read, pid, comm)
        if path:
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.lseek(self._fd, 0, os.SEEK_END)  # only what happens from now on
                self.available = True
            except OSError as exc:
                log.info("kernel log %s not readable (%s): OOM kills are told by memory cgroups only", path, exc)

    def read(self) -> None:
        if self._fd is None:
            return
        for _ in range(4096):  # bounded: a flood of kernel messages waits for the next look
            try:
                record = os.read(self._fd, 8192)
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten before we read them: go on
                    continue
                return  # EAGAIN: nothing more now
            if not record:
                return
            message = record.decode("utf-8", "replace").split(";", 1)[-1]
            match = _KMSG_KILL.search(message)
            if match and ("Killed process" in message or "oom-kill" in message):
                self.kills.append((time.time(), int(match.group(1)), (match.group(2) or "")[:64]))


def memory_counter_files(cgroup_text: str, root: Path) -> list[Path]:
    """The OOM-kill counter files of a process's memory cgroup and its ancestors: cgroup v1
    memory.oom_control under <root>/memory, v2 memory.events under the unified root. Paths shown
    relative to another cgroup namespace (../..) are found by their longest existing tail."""
    files: list[Path] = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            base, name = root / "memory", "memory.oom_control"
        elif parts[0] == "0":
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            name = "memory.events"
        else:
            continue
        directory = _resolve(base, parts[2])
        while directory is not None and base in (directory, *directory.parents):
            if (directory / name).exists():
                files.append(directory / name)
            if directory == base:
                break
            directory = directory.parent
    return files


def _resolve(base: Path, path: str) -> Path | None:
    components = [c for c in path.split("/") if c and c != ".."]
    for start in range(len(components) + 1):
        candidate = base.joinpath(*components[start:])
        if candidate.is_dir():
            return candidate
    return None


def read_oom_kills(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


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
    ) -> None:
        self._node = node
        self._errors = errors
        self._window = window_seconds
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
        for (pid, start), member in watch.members.items():
            if member.gone_at is None:
                info = read_proc(pid)
                if info is None or not info.alive or info.start_ticks != start:
                    member.gone_at = now
        for path, before in list(watch.counters.items()):
            count = read_oom_kills(path)
            if count is not None and before is not None and count > before:
                watch.oom_counted.append((now, str(path)))
            if count is not None:
                watch.counters[path] = count

    def _died(self, watch: _Watch, root: Member) -> None:
        at = root.gone_at
        death = Death(
            engine=watch.engine,
            root_pid=watch.root_pid,
            start_ticks=root.start_ticks,
            at=at,
            members=list(watch.members.values()),
            gpus=self._peaks(watch.engine, at),
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
        return determine_cause(event.exitcode, death, kills)

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


def determine_cause(exitcode: int | None, death: Death | None, kills: list[tuple[float, int, str]] = ()) -> Evidence:
    """The cause of an exit from its reported code and what was observed; never a guess."""
    facts: list[str] = []
    if death is not None:
        tree = {m.pid: m for m in death.members}
        first_gone = min((m.gone_at for m in death.members if m.gone_at is not None), default=death.at)
        since = first_gone - OOM_MARGIN_SECONDS
        named = [(when, pid, comm) for when, pid, comm in kills if pid in tree and when >= since]
        if named:
            _, pid, comm = named[0]
            title = tree[pid].title or comm
            facts.append(f"the kernel log says pid {pid} ({comm}) was killed for lack of memory")
            return Evidence("oom_kill", f"kernel OOM killer killed pid {pid} ({title})", pid, title, tuple(facts))
        counted = [(when, path) for when, path in death.oom_counted if first_gone - OOM_MARGIN_SECONDS <= when]
        if counted:
            # The counter does not name its victim: it is one of the processes gone first. Named
            # only when that is one process (the kernel log names it, where readable).
            first = [m for m in death.members if m.gone_at == first_gone]
            victim = first[0] if len(first) == 1 else None
            facts.append(f"memory cgroup counter {counted[0][1]} counted an OOM kill as the tree died")
            who = ", ".join(f"pid {m.pid} ({m.title})" for m in first)
            return Evidence(
                "oom_kill",
                f"an OOM kill in the engine's memory cgroup; gone first: {who}",
                victim.pid if victim else None,
                victim.title if victim else "",
                tuple(facts),
            )
        early = sorted(
            (m for m in death.members if m.gone_at is not None and m.gone_at < death.at and m.pid != death.root_pid),
            key=lambda m: m.gone_at,
        )
        if early:
            child = early[0]
            facts.append(f"pid {child.pid} ({child.title}) died {death.at - child.gone_at:.1f}s before the root")
            return Evidence(
                "child_failure",
                f"a process of its tree died first: pid {child.pid} ({child.title})",
                child.pid,
                child.title,
                tuple(facts),
            )
    if exitcode is None:
        return Evidence("unknown", "no exit status was reported and no evidence was found", facts=tuple(facts))
    signum = -exitcode if exitcode < 0 else exitcode - 128 if 128 < exitcode < 128 + 65 else None
    if signum is not None:
        return Evidence(
            "signal",
            f"killed by {signal_name(signum)}; no OOM kill and no earlier death in its tree were seen, so the signal "
            "came from elsewhere (an operator, Ray, Kubernetes, or the process itself)",
            facts=tuple(facts),
        )
    return Evidence("exit_code", f"exited with status {exitcode}", facts=tuple(facts))


def evidence_dict(evidence: Evidence, death: Death | None) -> dict:
    """The evidence as JSON-able data (no command line, no environment: titles, PIDs, cgroup paths)."""
    body = asdict(evidence)
    body["facts"] = list(evidence.facts)
    body["gpus"] = [asdict(peak) for peak in (death.gpus if death else [])]
    body["observed_death"] = death.at if death else None
    return body
