"""Read-only views of /proc: process identity, ancestry, PID namespaces and containers.

A collection only needs the ancestry of the few PIDs NVML lists, so `ProcView` reads
/proc lazily and caches each entry for one collection: walking up from a GPU process to
an engine root touches a handful of files, where building the whole parent map touches
every process on the node (thousands on a training host). Whole-table passes
(`scan_pids`) are left to the slower background work: discovery and namespace lookups.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from exporter.errors import ErrorCounter

PROC = "/proc"

# Process titles SGLang sets on the processes that hold GPU memory.
_TITLE = re.compile(r"^sglang::[A-Za-z0-9_:.\-]{1,64}$")

# Container ids in cgroup paths: docker-<id>.scope, cri-containerd-<id>.scope,
# crio-<id>.scope, /docker/<id>, /kubepods/.../<id>.
_CONTAINER = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    state: str
    start_ticks: int  # since boot; with the PID it names one process for good

    @property
    def alive(self) -> bool:
        """Zombies (Z) and dead (X) entries hold nothing and will not come back."""
        return self.state not in ("Z", "X")


def parse_stat(pid: int, text: str) -> ProcInfo | None:
    """Parse /proc/<pid>/stat; the comm may hold spaces and ')' so split at the last ')'."""
    open_paren, close_paren = text.find("("), text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        return None
    fields = text[close_paren + 2 :].split()
    if len(fields) < 20:
        return None
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            comm=text[open_paren + 1 : close_paren],
            state=fields[0],
            start_ticks=int(fields[19]),
        )
    except ValueError:
        return None


def _read(path: str, limit: int = 65536) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def read_proc(pid: int, proc_root: str = PROC) -> ProcInfo | None:
    text = _read(f"{proc_root}/{pid}/stat", 4096)
    return parse_stat(pid, text) if text else None


def scan_pids(proc_root: str = PROC) -> list[int]:
    """Every PID visible in /proc (one directory listing)."""
    try:
        return [int(name) for name in os.listdir(proc_root) if name.isdigit()]
    except OSError:
        return []


def parse_nspid(status_text: str) -> tuple[int, ...]:
    """The NSpid line of /proc/<pid>/status: the PID in each namespace, outermost first."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            try:
                return tuple(int(v) for v in line.split()[1:])
            except ValueError:
                return ()
    return ()


def own_namespace(kind: str) -> int | None:
    """Inode of this process's namespace of `kind` (pid, net).

    Only one's own: another process's /proc/<pid>/ns/* needs CAP_SYS_PTRACE, which the
    exporter as deployed does not have, so other processes are matched by NSpid instead."""
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return None


def read_nspid(pid: int, proc_root: str = PROC) -> tuple[int, ...]:
    text = _read(f"{proc_root}/{pid}/status", 8192)
    return parse_nspid(text) if text else ()


def parse_container(cgroup_text: str) -> str:
    """Container id from /proc/<pid>/cgroup ('' when the process is not in a container)."""
    for line in cgroup_text.splitlines():
        path = line.rsplit(":", 1)[-1].rstrip("/")
        for part in reversed(path.split("/")):
            match = _CONTAINER.search(part)
            if match:
                return match.group(1)
    return ""


class ProcView:
    """One collection's view of /proc: each entry read at most once, then cached."""

    def __init__(self, errors: ErrorCounter | None = None, proc_root: str = PROC) -> None:
        self._root = proc_root
        self._errors = errors
        self._infos: dict[int, ProcInfo | None] = {}

    def info(self, pid: int) -> ProcInfo | None:
        if pid not in self._infos:
            self._infos[pid] = read_proc(pid, self._root)
        return self._infos[pid]

    def is_instance(self, pid: int, start_ticks: int | None) -> bool:
        """True when `pid` is alive and, if a start time is known, still the same process."""
        info = self.info(pid)
        if info is None or not info.alive:
            return False
        return start_ticks is None or info.start_ticks == start_ticks

    def ancestry(self, pid: int, limit: int = 256):
        """The process itself, then its parent, up to PID 1 (bounded against loops)."""
        seen = 0
        while pid > 0 and seen < limit:
            info = self.info(pid)
            if info is None:
                return
            yield info
            if info.ppid == pid:
                return
            pid = info.ppid
            seen += 1

    def title(self, info: ProcInfo) -> str:
        """The comm, or SGLang's fuller process title (e.g. sglang::scheduler_DP1_TP3),
        which the kernel truncates to 15 characters in comm. Nothing else of the command
        line is ever read into a label."""
        if not info.comm.startswith("sglang::"):
            return info.comm
        cmdline = _read(f"{self._root}/{info.pid}/cmdline", 256) or ""
        first = cmdline.split("\0", 1)[0].strip()
        return first if _TITLE.match(first) else info.comm

    def container(self, pid: int) -> str:
        text = _read(f"{self._root}/{pid}/cgroup")
        if text is None:
            if self._errors is not None and self.info(pid) is not None:
                self._errors.inc("proc", "unreadable")
            return ""
        return parse_container(text)
