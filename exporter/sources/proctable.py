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
from gpu_residency_common.holders import launcher_of, title_from_cmdline

PROC = "/proc"
# How much of each /proc file is read (docs/SECURITY.md lists each; a test holds the two together).
STAT_BYTES = 4096
STATUS_BYTES = 8192  # for its NSpid line
CGROUP_BYTES = 65536
TITLE_BYTES = 512  # cmdline of a GPU process: a title (ray::…, sglang::…) is its first field
LAUNCHER_ARGV_BYTES = 4096  # cmdline of a GPU process and each ancestor: is it torchrun or Megatron?
DISCOVERY_ARGV_BYTES = 16384  # cmdline of every process, in discovery: an engine launch's --host/--port
ENVIRON_BYTES = 65536  # environ of a GPU process on a MIG GPU that NVML does not place on an instance

# Container ids in cgroup paths: docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope
# (not crio-conmon-<id>.scope: that is the runtime's monitor), libpod-<id>.scope, /docker/<id>,
# /kubepods/.../<id>, and runc's unexpanded "<slice>:cri-containerd:<id>".
_CONTAINER = re.compile(r"(?:^|[/:-])([0-9a-f]{64})(?:\.scope)?$")
# Pod UIDs: the systemd driver writes kubepods[-qos]-pod<uid with _ for ->.slice, cgroupfs /pod<uid>/.
_POD_SYSTEMD = re.compile(
    r"kubepods(?:-[a-z]+)?-pod([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice"
)
_POD_CGROUPFS = re.compile(r"/pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?=/|$)")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    state: str
    start_ticks: int  # since boot; with the PID it names one process for good
    exit_status: int = 0  # a zombie's wait status; the kernel shows 0 to whoever may not trace it

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
            exit_status=int(fields[49]) if len(fields) > 49 else 0,
        )
    except ValueError:
        return None


def _read_bytes(path: str, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read(path: str, limit: int) -> str | None:
    raw = _read_bytes(path, limit)
    return None if raw is None else raw.decode("utf-8", "replace")


def read_proc(pid: int, proc_root: str = PROC) -> ProcInfo | None:
    text = _read(f"{proc_root}/{pid}/stat", STAT_BYTES)
    return parse_stat(pid, text) if text else None


def read_argv(pid: int, limit: int = DISCOVERY_ARGV_BYTES, proc_root: str = PROC) -> list[str]:
    """The command line's first `limit` bytes as arguments, to recognise launches; never published."""
    raw = _read_bytes(f"{proc_root}/{pid}/cmdline", limit) or b""
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


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
    text = _read(f"{proc_root}/{pid}/status", STATUS_BYTES)
    return parse_nspid(text) if text else ()


def _cgroup_paths(cgroup_text: str) -> list[str]:
    """The path of each /proc/<pid>/cgroup line, the cgroup v2 line first. A path may hold colons
    (runc's "slice:prefix:id" form on some cgroup v1 hosts): split at the first two only."""
    paths = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.insert(0, parts[2]) if parts[0] == "0" else paths.append(parts[2])
    return paths


def parse_container(cgroup_text: str) -> str:
    """Container id from /proc/<pid>/cgroup ('' when the process is not in a container)."""
    for path in _cgroup_paths(cgroup_text):
        for part in reversed(path.rstrip("/").split("/")):
            if part.startswith("crio-conmon-") or part == "container":
                continue  # the runtime's monitor; podman's inner leaf below libpod-<id>.scope
            match = _CONTAINER.search(part)
            if match:
                return match.group(1)
    return ""


def parse_pod_uid(cgroup_text: str) -> str:
    """Kubernetes pod UID from /proc/<pid>/cgroup, as kube_pod_info{uid} spells it ('' outside a pod).

    Found anywhere in the path (kubelet's --cgroup-root, kind, nested runtimes and paths relative
    to another cgroup namespace all prefix it); the innermost pod wins."""
    for path in _cgroup_paths(cgroup_text):
        found = [m.group(1).replace("_", "-") for m in _POD_SYSTEMD.finditer(path)]
        found += [m.group(1) for m in _POD_CGROUPFS.finditer(path)]
        if found:
            return max(found, key=path.rfind)
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

    def title(self, pid: int) -> str | None:
        """The title the process set for itself (ray::…, sglang::…, VLLM::…), read from its
        cmdline: comm keeps only 15 bytes of it, and only for the thread that set it. None for an
        ordinary command line, which never reaches a label."""
        raw = _read_bytes(f"{self._root}/{pid}/cmdline", TITLE_BYTES)
        return title_from_cmdline(raw) if raw else None

    def argv(self, pid: int) -> list[str]:
        return read_argv(pid, LAUNCHER_ARGV_BYTES, self._root)

    def launchers(self, pid: int) -> tuple[tuple[int, str], ...]:
        """(pid, 'torchrun' | 'megatron') for the process and its ancestors that are launchers, nearest first."""
        chain = [(ancestor.pid, launcher_of(self.argv(ancestor.pid))) for ancestor in self.ancestry(pid)]
        return tuple((found, kind) for found, kind in chain if kind)

    def visible_devices(self, pid: int) -> tuple[str, ...]:
        """CUDA_VISIBLE_DEVICES from the process's environment, only to match it against the
        node's MIG UUIDs (never published); () where unreadable: another user's environ needs
        CAP_SYS_PTRACE, which the chart drops."""
        raw = _read_bytes(f"{self._root}/{pid}/environ", ENVIRON_BYTES) or b""
        entry = next((e for e in raw.split(b"\0") if e.startswith(b"CUDA_VISIBLE_DEVICES=")), b"=")
        return tuple(v.strip() for v in entry.split(b"=", 1)[1].decode("utf-8", "replace").split(",") if v.strip())

    def cgroup(self, pid: int) -> tuple[str, str]:
        """(container id, pod UID) from the process's cgroup path ('' where not in one)."""
        text = _read(f"{self._root}/{pid}/cgroup", CGROUP_BYTES)
        if text is None:
            if self._errors is not None and self.info(pid) is not None:
                self._errors.inc("proc", "unreadable")
            return "", ""
        return parse_container(text), parse_pod_uid(text)


def translate_nspids(wanted: set[tuple[int, int, int]], pids: list[int]) -> dict[tuple[int, int, int], int]:
    """Host PIDs for (pid_ns, inner pid, start ticks): the process whose NSpid ends with the
    inner PID and whose start time matches. Two candidates (two containers' PID 57 started in
    the same tick) prove nothing: neither is taken."""
    by_start: dict[int, list[tuple[int, int, int]]] = {}
    for key in wanted:
        by_start.setdefault(key[2], []).append(key)
    matches: dict[tuple[int, int, int], list[int]] = {}
    for pid in pids:
        info = read_proc(pid)
        if info is None or info.start_ticks not in by_start or not info.alive:
            continue
        nspid = read_nspid(pid)
        if len(nspid) < 2:
            continue  # in our own namespace: not a translation
        for key in by_start[info.start_ticks]:
            if nspid[-1] == key[1]:
                matches.setdefault(key, []).append(pid)
    return {key: found[0] for key, found in matches.items() if len(found) == 1}
