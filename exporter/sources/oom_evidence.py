"""Where an OOM kill leaves evidence: the kernel log, and the engine's own memory cgroups.

Only counters that belong to the engine count. A cgroup v2 `memory.events` is hierarchical: the
`oom_kill` of `kubepods.slice` counts kills in every pod of the node, so it would make any other
pod's OOM kill the cause of our next SIGTERM. So each process's own group is read, and only it:
cgroup v2 `memory.events.local` (the group's own kills), cgroup v1 `memory.oom_control` of the
group itself (its `oom_kill` is that group's own count), never an ancestor's.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

_KMSG_KILL = re.compile(r"(?:Killed process|oom-kill:.*?\bpid=)\s*(\d+)(?:\s+\(([^)]{0,64})\))?")
V1_COUNTER = "memory.oom_control"
V2_COUNTER = "memory.events.local"


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

    def fileno(self) -> int | None:
        """Polls readable when a new record is in: the log is read then, not on a tick."""
        return self._fd

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
    """The OOM-kill counter files of a process's own memory cgroup (one per hierarchy, no ancestor):
    cgroup v1 memory.oom_control under <root>/memory, v2 memory.events.local under the unified root.
    Paths shown relative to another cgroup namespace (../..) are found by their longest existing tail."""
    files: list[Path] = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            base, name = root / "memory", V1_COUNTER
        elif parts[0] == "0":
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            name = V2_COUNTER
        else:
            continue
        directory = _resolve(base, parts[2])
        if directory is not None and (directory / name).exists():
            files.append(directory / name)
    return files


def _resolve(base: Path, path: str) -> Path | None:
    """The group's directory; never the root for a group that is not found (that is not its own)."""
    components = [c for c in path.split("/") if c and c != ".."]
    if not components:
        return base
    for start in range(len(components)):
        candidate = base.joinpath(*components[start:])
        if candidate.is_dir():
            return candidate
    return None


def read_oom_kills(path: Path) -> int | None:
    """The `oom_kill` count in a counter file; None when unreadable (unknown, never 0)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None
