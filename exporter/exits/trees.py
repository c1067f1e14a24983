"""Engines' process trees, watched by events: every member has a pidfd (exporter/sources/kernel_events.py)
that polls readable the moment it exits, so a death is handled at once, with the member's status
read from its zombie (before its parent reaps it) and the tree's own memory cgroup OOM counters read
then, once, instead of on every tick.

New members come from the GPU process lists (a GPU process whose ancestry reaches a watched root:
`owner`), and from a pass over the process table when an engine is first watched (every process's
parent), when a new GPU process joins a tree and every `tree_interval` for children that never touch
a GPU (the parents of processes new since the last pass only). A dead
process leaves its tree once it is older than the child window: it can no longer be a cause.
Not thread-safe: exporter/exits/forensics.py locks around every call.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from exporter.exits.causes import OOM_MARGIN_SECONDS, Member, zombie_exitcode
from exporter.sources.kernel_events import open_pidfd
from exporter.sources.oom_evidence import memory_counter_files, read_oom_kills
from exporter.sources.proctable import ProcView, read_proc, scan_pids

MAX_TREE = 4096


@dataclass
class Watch:
    engine: str
    root_pid: int
    members: dict[tuple[int, int], Member] = field(default_factory=dict)
    fds: dict[tuple[int, int], int] = field(default_factory=dict)  # member -> its pidfd
    counters: dict[Path, int | None] = field(default_factory=dict)
    oom_counted: list[tuple[float, str]] = field(default_factory=list)


class Trees:
    def __init__(
        self,
        selector: selectors.BaseSelector,
        on_death: Callable[[Watch, Member], None],
        cgroup_root: Path,
        tree_interval: float,
        child_window: float,
    ) -> None:
        """`selector`: where the pidfds are registered (with (engine, member) as data); `on_death`:
        called with a watch whose root just died, before the watch is dropped."""
        self._selector = selector
        self._on_death = on_death
        self._cgroup_root = cgroup_root
        self._tree_interval = tree_interval
        self._child_window = child_window
        self.watches: dict[str, Watch] = {}
        self.counters_seen = False  # an engine's OOM counter file was readable at least once
        self._last_scan = 0.0
        self._scan_wanted = False
        self._whole = True  # the next pass reads every process (a new engine's tree is all there already)
        self._seen_pids: set[int] = set()

    @property
    def scan_wanted(self) -> bool:
        """A new GPU process joined a tree: a pass is wanted before the next due one."""
        return self._scan_wanted

    def watch(self, name: str, root_pid: int) -> bool:
        """Watch an engine's root (again, if the root changed; True then); its tree is read at the next look."""
        old = self.watches.get(name)
        if old is not None and old.root_pid == root_pid:
            return False
        if old is not None:
            self.forget(old)
        self.watches[name] = Watch(name, root_pid)
        self._add_member(self.watches[name], root_pid, "")
        self._scan_wanted = self._whole = True
        return True

    def owner(self, pid: int, view: ProcView) -> str:
        """The watched engine whose tree `pid` is in (it becomes a member), or ''."""
        roots = {watch.root_pid: watch for watch in self.watches.values()}
        for info in view.ancestry(pid):
            watch = roots.get(info.pid)
            if watch is not None and (info.pid, info.start_ticks) in watch.members:
                self._add_member(watch, pid, "")
                self._scan_wanted = True  # the tree grows: its other new children are looked for
                return watch.engine
        return ""

    def died(self, engine: str, key: tuple[int, int], now: float) -> None:
        """A member's pidfd polled readable."""
        watch = self.watches.get(engine)
        if watch is not None and key in watch.members:
            self._gone(watch, key, now)

    def look(self, now: float, force: bool = False) -> bool:
        """When due (True then): the whole process table for new members, members without a pidfd
        looked at. The caller hears the deaths that arrived meanwhile, then calls `rebase`."""
        due = force or time.monotonic() - self._last_scan >= self._tree_interval
        if not self.watches or not (due or self._scan_wanted):
            return False
        self._last_scan, self._scan_wanted = time.monotonic(), False
        self._scan()
        for watch in list(self.watches.values()):
            self.poll(watch, now)
        return True

    def rebase(self, now: float) -> None:
        """OOM counters read again with no death: a rise since was another process of the group, no
        cause of a later death. Only after every death already heard was handled (its rise is evidence)."""
        for watch in self.watches.values():
            self._read_counters(watch, now, rebase=True)

    def poll(self, watch: Watch, now: float) -> None:
        """Members without a pidfd (a kernel without them) are looked at instead of heard."""
        for key, member in list(watch.members.items()):
            if member.gone_at is None and key not in watch.fds:
                info = read_proc(key[0])
                if info is None or not info.alive or info.start_ticks != key[1]:
                    self._gone(watch, key, now)
                    if watch.engine not in self.watches:
                        return

    def forget(self, watch: Watch) -> None:
        for fd in watch.fds.values():
            self._selector.unregister(fd)
            os.close(fd)
        watch.fds.clear()
        self.watches.pop(watch.engine, None)

    def _add_member(self, watch: Watch, pid: int, title: str) -> None:
        fd = open_pidfd(pid)  # first: a PID read after it could already be another process's
        info = read_proc(pid)
        if info is None or not info.alive or (pid, info.start_ticks) in watch.members:
            if fd is not None:
                os.close(fd)
            return
        key = (pid, info.start_ticks)
        watch.members[key] = Member(pid, info.start_ticks, title or ProcView().title(pid) or info.comm)
        if fd is not None:
            watch.fds[key] = fd
            self._selector.register(fd, selectors.EVENT_READ, (watch.engine, key))
        for counter in self._counter_files(pid):
            count = watch.counters.setdefault(counter, read_oom_kills(counter))
            self.counters_seen |= count is not None

    def _counter_files(self, pid: int) -> list[Path]:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return []
        return memory_counter_files(text, self._cgroup_root)

    def _scan(self) -> None:
        """New members from the process table's parent links. A newly watched engine needs every
        process's; after that only processes new since the last pass can have joined a tree (a
        process never gets a new parent inside one), so only their stat is read."""
        pids = set(scan_pids())
        fresh = pids if self._whole else pids - self._seen_pids
        self._seen_pids, self._whole = pids, False
        children: dict[int, list[int]] = {}
        for pid in fresh:
            info = read_proc(pid)
            if info is not None and info.alive:
                children.setdefault(info.ppid, []).append(pid)
        for watch in self.watches.values():
            stack = [child for m in watch.members.values() if m.gone_at is None for child in children.get(m.pid, ())]
            seen = 0
            while stack and seen < MAX_TREE:
                pid = stack.pop()
                seen += 1
                self._add_member(watch, pid, "")
                stack.extend(children.get(pid, ()))

    def _gone(self, watch: Watch, key: tuple[int, int], now: float) -> None:
        """Its status from its zombie, the OOM counters now; the root's death is the engine's."""
        pid, start = key
        member = watch.members[key]
        info = read_proc(pid)
        same = info is not None and info.start_ticks == start
        member.gone_at, member.exitcode = now, zombie_exitcode(info.exit_status) if same else None
        fd = watch.fds.pop(key, None)
        if fd is not None:
            self._selector.unregister(fd)
            os.close(fd)
        self._read_counters(watch, now, rebase=False)
        for old, gone in list(watch.members.items()):
            if gone.gone_at is not None and now - gone.gone_at > self._child_window and gone.pid != watch.root_pid:
                del watch.members[old]  # too old to be a cause: a long-lived engine's tree does not grow
        if pid == watch.root_pid:
            self._on_death(watch, member)
            self.forget(watch)

    def _read_counters(self, watch: Watch, now: float, rebase: bool) -> None:
        """The tree's own OOM counters: a rise seen at a member's death is evidence of that moment."""
        for path, before in list(watch.counters.items()):
            count = read_oom_kills(path)
            if not rebase and count is not None and before is not None and count > before:
                watch.oom_counted.append((now, str(path)))
            if count is not None:
                watch.counters[path] = count
        keep = now - self._child_window - OOM_MARGIN_SECONDS
        watch.oom_counted = [(when, path) for when, path in watch.oom_counted if when >= keep]
