"""Which processes are engines: the registry, a static config file, and auto-discovery.

Every source yields `EngineEntry`s; `EngineCatalog.resolve` turns them into `Engine`s whose
root is a host PID (through NSpid for entries written in another PID namespace) and says
whether that root is still the same live process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat as stat_module
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import ErrorCounter
from exporter.proctable import ProcView, parse_nspid, pid_namespace, read_proc, scan_pids
from exporter.registry import ENTRY_SUFFIX, MAX_ENTRY_BYTES, EngineEntry, RegistryError

log = logging.getLogger(__name__)

SGLANG_DEFAULT_PORT = 30000
SGLANG_DEFAULT_HOST = "127.0.0.1"


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


class ConfigError(ValueError):
    """A static engine config that cannot be used; the message names the file and field."""


# ---------- static config ----------


@dataclass(frozen=True)
class StaticEngine:
    """An engine of a fixed deployment, found by a PID file or a fixed PID."""

    name: str
    kind: str
    url: str | None
    pid_file: str | None
    root_pid: int | None


def load_static_config(path: str) -> list[StaticEngine]:
    """Read `[[engines]]` tables (name, kind, url, pid_file | root_pid) from a TOML file."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    tables = data.get("engines", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: 'engines' must be an array of tables ([[engines]])")
    engines = []
    for number, table in enumerate(tables, start=1):
        where = f"{path}: engines #{number}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        unknown = set(table) - {"name", "kind", "url", "pid_file", "root_pid"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if ("pid_file" in table) == ("root_pid" in table):
            raise ConfigError(f"{where}: give exactly one of pid_file or root_pid")
        try:
            # Validate name, kind and url with the registry's own rules.
            EngineEntry(
                name=table.get("name", ""),
                root_pid=table.get("root_pid", 1),
                kind=table.get("kind", "sglang"),
                url=table.get("url"),
            ).validate()
        except RegistryError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        engines.append(
            StaticEngine(
                name=table["name"],
                kind=table.get("kind", "sglang"),
                url=table.get("url"),
                pid_file=table.get("pid_file"),
                root_pid=table.get("root_pid"),
            )
        )
    names = [engine.name for engine in engines]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{path}: duplicate engine names {duplicates}")
    return engines


def _pid_from_file(path: str) -> int | None:
    try:
        text = Path(path).read_text()[:64].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


# ---------- auto-discovery ----------


def parse_sglang_launch(argv: list[str]) -> tuple[str, int] | None:
    """(host, port) when argv launches an SGLang server, else None.

    Recognises `python -m sglang.launch_server ...` and `sglang serve ...`; only the
    --host/--port values are kept, nothing else of the command line.
    """
    launches = "sglang.launch_server" in argv or (
        len(argv) >= 2 and os.path.basename(argv[0]) == "sglang" and argv[1] == "serve"
    )
    if not launches:
        return None
    values = {"--host": SGLANG_DEFAULT_HOST, "--port": str(SGLANG_DEFAULT_PORT)}
    for position, arg in enumerate(argv):
        for flag in values:
            if arg == flag and position + 1 < len(argv):
                values[flag] = argv[position + 1]
            elif arg.startswith(flag + "="):
                values[flag] = arg.split("=", 1)[1]
    port = values["--port"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = values["--host"]
    if host in ("0.0.0.0", "", "::"):
        host = SGLANG_DEFAULT_HOST  # listening everywhere: reach it on loopback
    return host, int(port)


def _read_argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read(16384)
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def _format_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def discover_sglang(pids: list[int]) -> list[tuple[EngineEntry, int]]:
    """SGLang launch processes among `pids`, as (entry, start_ticks)."""
    found = []
    for pid in pids:
        launch = parse_sglang_launch(_read_argv(pid))
        info = read_proc(pid) if launch else None
        if info is None or not info.alive:
            continue
        host, port = launch
        entry = EngineEntry(name=f"sglang-{port}", root_pid=pid, kind="sglang", url=_format_url(host, port))
        found.append((entry, info.start_ticks))
    return found


# ---------- the catalog ----------


class EngineCatalog:
    """Reads every engine source and resolves each engine's host root PID."""

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
        self._own_ns = pid_namespace("self")
        self._entry_cache: dict[str, tuple[tuple, EngineEntry | None]] = {}
        self._ns_cache: dict[tuple[int, int], int | None] = {}
        self._discovered: list[tuple[EngineEntry, int]] = []
        self._lock = threading.Lock()
        self._resolve_lock = threading.Lock()  # scrapes and the SGLang poller both resolve
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- discovery runs in the background: it reads every process's command line ---

    def start(self) -> None:
        if self._discover and self._thread is None:
            self.run_discovery()
            self._thread = threading.Thread(target=self._discovery_loop, name="engine-discovery", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _discovery_loop(self) -> None:
        while not self._stop.wait(self._discovery_interval):
            self.run_discovery()

    def run_discovery(self) -> None:
        found = discover_sglang(scan_pids())
        with self._lock:
            self._discovered = found

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
            names = sorted(n for n in os.listdir(self._registry_dir) if n.endswith(ENTRY_SUFFIX))
        except FileNotFoundError:
            return []
        except OSError:
            self._errors.inc("registry", "unreadable")
            return []
        entries, seen = [], set()
        for name in names:
            entry = self._registry_entry(self._registry_dir / name)
            seen.add(name)
            if entry is not None:
                entries.append((entry, self._entry_cache[name][0][1] / 1e9))
        for stale in set(self._entry_cache) - seen:
            del self._entry_cache[stale]
        return entries

    def _registry_entry(self, path: Path) -> EngineEntry | None:
        """Parse one entry, re-reading only when the file changed; bad files are refused."""
        try:
            stat = path.lstat()
        except OSError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._entry_cache.get(path.name)
        if cached and cached[0] == key:
            return cached[1]
        entry = None
        if not stat_module.S_ISREG(stat.st_mode):
            reason = "refused"  # a symlink could point anywhere on the host
        elif stat.st_size > MAX_ENTRY_BYTES:
            reason = "too_large"
        else:
            try:
                entry = EngineEntry.from_json(path.read_text(errors="replace"))
                reason = None
            except RegistryError as exc:
                reason = "malformed"
                log.warning("registry entry %s ignored: %s", path, exc)
            except OSError:
                reason = "unreadable"
        if reason:
            self._errors.inc("registry", reason)
        self._entry_cache[path.name] = (key, entry)
        return entry

    # --- PID namespaces ---

    def _host_pid(self, entry: EngineEntry) -> int | None:
        """The root's PID as this exporter sees it (hostPID), translating through NSpid."""
        if entry.pid_ns is None or entry.pid_ns == self._own_ns:
            return entry.root_pid
        key = (entry.pid_ns, entry.root_pid)
        if key not in self._ns_cache:
            self._ns_cache[key] = self._find_in_namespace(entry.pid_ns, entry.root_pid)
        host_pid = self._ns_cache[key]
        if host_pid is not None and read_proc(host_pid) is None:
            del self._ns_cache[key]  # gone; look again next time
        return host_pid

    @staticmethod
    def _find_in_namespace(namespace: int, inner_pid: int) -> int | None:
        for pid in scan_pids():
            if pid_namespace(pid) != namespace:
                continue
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspids = parse_nspid(status)
            if nspids and nspids[-1] == inner_pid:
                return pid
        return None

    # --- resolution ---

    def resolve(self, view: ProcView) -> list[Engine]:
        """Every known engine, once per name: registry first, then static, then discovered."""
        with self._resolve_lock:
            return self._resolve(view)

    def _resolve(self, view: ProcView) -> list[Engine]:
        engines: dict[str, Engine] = {}
        for entry, registered_at in self._registry_entries():
            pid = self._host_pid(entry)
            engine = _engine(view, entry.name, entry.kind, entry.url, "registry", pid, entry.start_ticks)
            engines[entry.name] = dataclasses.replace(
                engine, registered_at=registered_at, state=entry.state, state_since=entry.state_since
            )
        for static in self._static:
            if static.name in engines:
                self._errors.inc("registry", "duplicate_name")
                continue
            pid = static.root_pid or (_pid_from_file(static.pid_file) if static.pid_file else None)
            engines[static.name] = _engine(view, static.name, static.kind, static.url, "static", pid, None)
        with self._lock:
            discovered = list(self._discovered)
        claimed = {engine.root_pid for engine in engines.values() if engine.up}
        candidates = {entry.root_pid for entry, _ in discovered}
        for entry, start_ticks in discovered:
            ancestors = [info.pid for info in view.ancestry(entry.root_pid)]
            if entry.name in engines or claimed.intersection(ancestors) or candidates.intersection(ancestors[1:]):
                continue  # a registered engine's launch process, or a forked child of another launch
            engine = _engine(view, entry.name, entry.kind, entry.url, "discovered", entry.root_pid, start_ticks)
            if engine.up:  # a discovered engine that exited is simply gone
                engines[entry.name] = engine
        return list(engines.values())


def _engine(
    view: ProcView, name: str, kind: str, url: str | None, source: str, pid: int | None, start: int | None
) -> Engine:
    up = pid is not None and view.is_instance(pid, start)
    return Engine(name=name, kind=kind, url=url, source=source, root_pid=pid, start_ticks=start, up=up)
