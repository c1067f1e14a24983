"""Which processes are engines: the registry, a static config file (exporter/engines/static.py)
and auto-discovery (exporter/engines/discovery.py).

Every source yields `EngineEntry`s; `EngineCatalog.resolve` turns them into `Engine`s whose
root is a host PID (through NSpid for entries written in another PID namespace) and says
whether that root is still the same live process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.engines.discovery import Discovered, discover_engines, net_identity
from exporter.engines.registry import ENTRY_SUFFIX, EngineEntry, RegistryError, read_entry
from exporter.engines.static import StaticEngine, pid_from_file
from exporter.engines.urls import reachable_url
from exporter.errors import ErrorCounter
from exporter.sources.proctable import ProcView, own_namespace, scan_pids, translate_nspids
from exporter.supervisor import run_supervised

log = logging.getLogger(__name__)

MIN_SCAN_SPACING_SECONDS = 1.0  # wake-ups for namespace lookups never scan /proc more often


@dataclass(frozen=True)
class Engine:
    name: str
    kind: str
    url: str | None
    source: str  # registry | static | discovered
    root_pid: int | None  # host PID; None when it cannot be resolved
    start_ticks: int | None
    up: bool
    registered_at: float = 0.0  # wall-clock time of the registry entry (0 for other sources)
    state: str | None = None  # the framework's word: starting | active | asleep | stopped
    state_since: float | None = None
    url_problem: str | None = None  # why `url` cannot be polled from here (another pod's loopback)


@dataclass
class _CachedEntry:
    key: tuple[int, int, int]  # (inode, mtime_ns, size) as lstat saw it
    entry: EngineEntry | None
    registered_at: float


class EngineCatalog:
    """Reads every engine source and resolves each engine's host root PID.

    Registry entries from another PID namespace are found by NSpid (the PID as the
    writer saw it) and the root's start time, both world-readable in /proc: the
    exporter as deployed cannot read another process's namespace links. That lookup
    scans the process table, so it runs on the background thread (woken at once when
    an entry needs it); a miss is retried on every scan, never cached for good.
    """

    def __init__(
        self,
        errors: ErrorCounter,
        registry_dir: Path | None,
        static: list[StaticEngine] = (),
        discover: bool = True,
        discovery_interval: float = 10.0,
    ) -> None:
        self._errors = errors
        self._registry_dir = registry_dir
        self._static = list(static)
        self._discover = discover
        self._discovery_interval = discovery_interval
        self._own_ns = own_namespace("pid")
        self._own_net_ns = own_namespace("net")
        self._entry_cache: dict[str, _CachedEntry] = {}
        self._translated: dict[tuple[int, int, int], int] = {}  # (pid_ns, inner pid, start) -> host pid
        self._wanted: set[tuple[int, int, int]] = set()
        self._refused: set[tuple[str, float]] = set()  # (entry name, registered_at) already counted
        self._discovered: list[Discovered] = []
        self._lock = threading.Lock()
        self._resolve_lock = threading.Lock()  # scrapes and background work both resolve
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_change: Callable[[], None] | None = None  # told when a scan found engines or roots anew
        self.listeners: list[Callable[[list[Engine]], None]] = []  # told the engines of every resolution

    # --- background: discovery and namespace lookups read the whole process table ---

    def start(self) -> None:
        if self._thread is None:
            self.scan()
            self._thread = threading.Thread(target=self._loop, name="engine-scan", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Without discovery the table is read only when a namespace lookup asks (a wake-up).
            self._wake.wait(self._discovery_interval if self._discover else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            run_supervised("engine-scan", self.scan, self._errors)
            self._stop.wait(MIN_SCAN_SPACING_SECONDS)

    def scan(self) -> None:
        """One pass over the process table: engine discovery and the wanted NSpid translations;
        `on_change` is told when either found something new."""
        pids = scan_pids()
        changed = False
        if self._discover:
            found = discover_engines(pids, net_identity("self"))
            with self._lock:
                changed, self._discovered = found != self._discovered, found
        with self._lock:
            wanted = set(self._wanted)
        if wanted:
            found = translate_nspids(wanted, pids)
            with self._lock:
                self._translated.update(found)
                self._wanted -= set(found)
            changed |= bool(found)
        if changed and self.on_change is not None:
            self.on_change()

    # --- registry ---

    def registry_mtime(self) -> int | None:
        """The registry directory's mtime: it changes whenever an entry is written or removed."""
        try:
            return os.stat(self._registry_dir).st_mtime_ns if self._registry_dir else None
        except OSError:
            return None

    def _registry_entries(self) -> list[tuple[EngineEntry, float]]:
        if self._registry_dir is None:
            return []
        try:
            with os.scandir(self._registry_dir) as listing:
                found = sorted((item for item in listing if item.name.endswith(ENTRY_SUFFIX)), key=lambda i: i.name)
        except FileNotFoundError:
            return []
        except OSError:
            self._errors.inc("registry", "unreadable")
            return []
        entries = []
        for item in found:
            cached = self._registry_entry(item)
            if cached is not None and cached.entry is not None:
                entries.append((cached.entry, cached.registered_at))
        for stale in set(self._entry_cache) - {item.name for item in found}:
            del self._entry_cache[stale]
        return entries

    def _registry_entry(self, item: os.DirEntry) -> _CachedEntry | None:
        """Parse one entry, re-reading only when the file changed; bad files are refused and counted once."""
        try:
            info = item.stat(follow_symlinks=False)  # a link is refused by read_entry: never followed here
        except OSError:
            return None
        key = (info.st_ino, info.st_mtime_ns, info.st_size)
        cached = self._entry_cache.get(item.name)
        if cached is not None and cached.key == key:
            return cached
        entry = None
        path = Path(item.path)
        try:
            entry = read_entry(path)
        except FileNotFoundError:
            return None
        except RegistryError as exc:
            self._errors.inc("registry", exc.reason)
            log.warning("registry entry %s ignored: %s", path, exc)
        cached = _CachedEntry(key, entry, info.st_mtime_ns / 1e9)
        self._entry_cache[path.name] = cached
        return cached

    # --- PID namespaces ---

    def _host_pid(self, entry: EngineEntry, view: ProcView, registered_at: float) -> int | None:
        """The root's PID as this exporter sees it (hostPID), or None when it cannot be proven."""
        if entry.pid_ns is None or entry.pid_ns == self._own_ns:
            pid = entry.root_pid
        elif entry.start_ticks is None:
            self._refuse(entry, registered_at, "unprovable", "from another PID namespace without the root's start time")
            return None
        else:
            # Once found, the translation stands: the start time names that process for good, so
            # when it is gone the engine is down (and its death can be counted), never someone else.
            key = (entry.pid_ns, entry.root_pid, entry.start_ticks)
            with self._lock:
                pid = self._translated.get(key)
                if pid is None:
                    self._wanted.add(key)
            if pid is None:
                self._wake.set()
                return None
        if pid == 1 and (entry.start_ticks is None or not view.is_instance(1, entry.start_ticks)):
            # Every process descends from PID 1: an entry naming it would claim the whole node.
            self._refuse(entry, registered_at, "unproven_init", "names PID 1 without the start time that proves it")
            return None
        return pid

    def _refuse(self, entry: EngineEntry, registered_at: float, reason: str, why: str) -> None:
        if (entry.name, registered_at) not in self._refused:
            self._refused.add((entry.name, registered_at))
            self._errors.inc("registry", reason)
            log.warning("engine %s: root PID %d not accepted: %s", entry.name, entry.root_pid, why)

    # --- resolution ---

    def resolve(self, view: ProcView) -> list[Engine]:
        """Every known engine, once per name: registry first, then static, then discovered."""
        with self._resolve_lock:
            engines = self._resolve(view)
        for listener in self.listeners:  # one that fails is counted, never the collection's failure
            run_supervised("catalog-listener", lambda told=listener: told(engines), self._errors)
        return engines

    def _resolve(self, view: ProcView) -> list[Engine]:
        engines: dict[str, Engine] = {}
        live_refusals = set()
        entries = self._registry_entries()
        for entry, registered_at in entries:
            live_refusals.add((entry.name, registered_at))
            pid = self._host_pid(entry, view, registered_at)
            url, url_problem = reachable_url(entry, self._own_net_ns)
            engines[entry.name] = _engine(
                view, entry.name, entry.kind, url, "registry", pid, entry.start_ticks,
                registered_at=registered_at, state=entry.state, state_since=entry.state_since, url_problem=url_problem,
            )  # fmt: skip
        self._refused &= live_refusals
        live_keys = {(e.pid_ns, e.root_pid, e.start_ticks) for e, _ in entries}
        with self._lock:
            self._translated = {k: v for k, v in self._translated.items() if k in live_keys}
            self._wanted &= live_keys
        for static in self._static:
            if static.name in engines:
                self._errors.inc("registry", "duplicate_name")
                continue
            pid = static.root_pid or (pid_from_file(static.pid_file) if static.pid_file else None)
            engines[static.name] = _engine(view, static.name, static.kind, static.url, "static", pid, None)
        with self._lock:
            discovered = list(self._discovered)
        claimed = {engine.root_pid for engine in engines.values() if engine.up}
        candidates = {found.entry.root_pid for found in discovered}
        for found in discovered:
            entry = found.entry
            ancestors = [info.pid for info in view.ancestry(entry.root_pid)]
            if entry.name in engines or claimed.intersection(ancestors) or candidates.intersection(ancestors[1:]):
                continue  # a registered engine's launch process, or a forked child of another launch
            engine = _engine(view, entry.name, entry.kind, entry.url, "discovered", entry.root_pid, found.start_ticks,
                             url_problem=found.url_problem)  # fmt: skip
            if engine.up:  # a discovered engine that exited is simply gone
                engines[entry.name] = engine
        return list(engines.values())


def _engine(
    view: ProcView,
    name: str,
    kind: str,
    url: str | None,
    source: str,
    pid: int | None,
    start: int | None,
    **more: object,
) -> Engine:
    """An engine is up when its root is alive and, where a start time is known, the same process.
    `more`: the rest of Engine's fields, as the source knows them."""
    up = pid is not None and view.is_instance(pid, start)
    return Engine(name=name, kind=kind, url=url, source=source, root_pid=pid, start_ticks=start, up=up, **more)
