"""The exporter's one background thread between scrapes, asleep in `select` until something happens.

What wakes it, and what it does then:
- a watched process exits (its pidfd) or the kernel logs (/dev/kmsg): the GPUs of the engines are
  read (the state at the death), the death is handled with its evidence (exporter/exits/forensics.py),
  then one collection is shared by the exit log and the sleep/wake tracker;
- the registry directory changes (inotify: an entry written, a state marked, an exit reported) or
  the catalog's scan found an engine: one collection, shared likewise;
- a timer, only while there is something to time or to wait for: a release or wake in progress
  (every --engines.state-interval), exits waiting for their evidence or their grace period, vLLM
  engines whose own state report may change; and while engines live, every --forensics.tree-interval,
  one collection (the catalog again) and the process table for children that never touch a GPU.
The GPU history tick (--forensics.interval, while engines live) is not this thread's: it runs on the
NVML thread when no scrape has read NVML for a while (`_quiet_tick`), reading the used memory of the
engines' GPUs alone, and their process lists only when that changed; nothing from /proc.
With no engine and nothing pending nothing runs at all. Each step is supervised: a failure is
logged and counted, and the thread goes on.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
import time
from pathlib import Path

from exporter.collectors.assembly import ResidencyCollector
from exporter.engines.catalog import EngineCatalog
from exporter.errors import ErrorCounter
from exporter.exits.forensics import Forensics
from exporter.exits.log import ExitLog
from exporter.sleep_wake.transitions import TransitionTracker
from exporter.sources.kernel_events import DirectoryWatch
from exporter.sources.nvml import NvmlSource
from exporter.supervisor import run_supervised

REARM_SECONDS = 1.0  # a registry directory that does not exist yet is looked for this often
BUSY_SECONDS = 0.25  # the pace while exits wait for evidence or a grace period
SCRAPE_FED = 1.5  # history intervals after a read of NVML (a scrape's) before the tick reads on its own
FAILED_RETRY_SECONDS = 1.0  # after a step failed (logged and counted), the next try
FULL_READ_EVERY = 30  # history ticks: every GPU is read now and then (an engine may spread to another)


class Watcher:
    def __init__(
        self,
        collector: ResidencyCollector,
        catalog: EngineCatalog,
        nvml: NvmlSource,
        errors: ErrorCounter,
        registry_dir: Path | None,
        transitions: TransitionTracker | None,
        exits: ExitLog | None,
        forensics: Forensics | None,
        state_interval: float,
        history_interval: float,
        refresh_interval: float,
    ) -> None:
        self._collector, self._catalog, self._nvml, self._errors = collector, catalog, nvml, errors
        self._transitions, self._exits, self._forensics = transitions, exits, forensics
        self._state_interval, self._history_interval = state_interval, history_interval
        self._refresh_interval = refresh_interval
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._registry = DirectoryWatch(registry_dir) if registry_dir is not None else None
        if self._registry is not None and self._registry.fileno() is not None:
            self._selector.register(self._registry.fileno(), selectors.EVENT_READ, "registry")
        if forensics is not None:
            self._selector.register(forensics.fileno(), selectors.EVENT_READ, "death")
        catalog.on_change = self.wake
        self._mtime: int | None = None
        self._changes = -1
        self._vllm = False  # vLLM engines up: their own state reports may change between scrapes
        self._next_refresh = 0.0  # a collection now (the first step), then every refresh_interval
        self._history_ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        self.steps = 0  # how many times it woke (tests and benchmarks)

    def start(self) -> None:
        self._thread.start()
        if self._forensics is not None:
            self._nvml.when_quiet(SCRAPE_FED * self._history_interval, self._quiet_tick)

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._forensics is not None:
            self._nvml.when_quiet(0.0, None)

    def wake(self) -> None:
        """Look now (the catalog found something)."""
        with contextlib.suppress(BlockingIOError):  # full: already woken
            os.write(self._wake_write, b"!")

    def _run(self) -> None:
        wait: float | None = 0.0  # the first step at once: the engines as they are at start-up
        while not self._stop.is_set():
            ready = {key.data for key, _ in self._selector.select(wait)}
            if self._stop.is_set():
                return
            self.steps += 1
            box: list[float | None] = []
            run_supervised("watcher", lambda r=ready, b=box: b.append(self._step_and_wait(r)), self._errors)
            wait = box[0] if box else FAILED_RETRY_SECONDS

    def _step_and_wait(self, ready: set[str]) -> float | None:
        self.step(ready)
        return self._timeout()

    def _timeout(self) -> float | None:
        """Until the next timed look; None (block until an event) when nothing needs one."""
        now = time.monotonic()
        due: list[float] = []
        if self._transitions is not None and (self._transitions.pending() or self._vllm):
            due.append(self._state_interval)
        if self._registry is not None and not self._registry.armed:
            # No inotify: the directory is looked at instead. A directory not there yet: tried again now and then.
            due.append(self._state_interval if self._registry.fileno() is None else REARM_SECONDS)
        if self._exits is not None and self._exits.busy():
            due.append(BUSY_SECONDS)
        if self._forensics is not None and self._forensics.watched():
            due.append(max(0.0, self._next_refresh - now))
        return min(due) if due else None

    def step(self, ready: set[str]) -> None:
        now = time.monotonic()
        if "wake" in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_read, 4096):
                    pass
        changed = "wake" in ready or now >= self._next_refresh or self._registry_changed(ready)
        if "death" in ready and self._forensics is not None:
            pending = self._forensics.pending()
            if self._forensics.deaths_in(pending):
                self._history()  # what the GPUs held as the death came, before it is handled
            changed |= self._forensics.handle(pending)
        changes = self._transitions.states.changes() if self._transitions is not None else 0
        changed |= changes != self._changes
        busy = self._exits is not None and self._exits.busy()
        timing = self._transitions is not None and self._transitions.pending()
        if changed or busy or timing:
            self._changes = changes
            self._collect(max_age=0.0 if changed else min(BUSY_SECONDS, self._state_interval) / 2)
            if now >= self._next_refresh:
                self._next_refresh = now + self._refresh_interval

    def _registry_changed(self, ready: set[str]) -> bool:
        if self._registry is None:
            return False
        if self._registry.armed:
            return "registry" in ready and self._registry.changed()
        if self._registry.fileno() is not None:
            return self._registry.arm()  # the directory appeared: from now on it is heard
        mtime = self._catalog.registry_mtime()
        changed, self._mtime = mtime != self._mtime, mtime
        return changed

    def _collect(self, max_age: float) -> None:
        """One collection shared by every consumer of this step (its GPU reading feeds the history)."""
        snapshot, _ = self._collector.snapshot(max_age=max_age)
        self._vllm = any(engine.up and engine.kind == "vllm" for engine in snapshot.engines)
        if self._forensics is not None:
            if self._forensics.sync(snapshot.engines):
                # Its GPU processes were read before the engine was watched: theirs now, if the engine dies at once.
                self._forensics.record(snapshot.nvml, snapshot.taken_at)
            self._forensics.look()
        if self._transitions is not None:
            self._transitions.observe(snapshot)
        if self._exits is not None:
            self._exits.update(snapshot)

    def _history(self) -> None:
        """What the GPUs of the engines hold as a death comes, process lists and all."""
        wanted = self._forensics.wanted_gpus()
        if wanted != set():
            self._forensics.record(self._nvml.read(wanted))

    def _quiet_tick(self) -> float | None:
        """The GPU history tick, on the NVML thread (no scrape read NVML for SCRAPE_FED intervals): the
        used memory of the engines' GPUs; their process lists only when that changed, and every GPU now
        and then (an engine may spread to another). None while no engine is watched: no tick at all."""
        if self._stop.is_set() or not self._forensics.watched():
            return None
        run_supervised("history", self._tick, self._errors)  # a failed tick is counted; the next one comes
        return self._history_interval

    def _tick(self) -> None:
        self._history_ticks += 1
        wanted = None if self._history_ticks % FULL_READ_EVERY == 0 else self._forensics.wanted_gpus()
        if wanted is None or (wanted and not self._forensics.confirm(self._nvml.used(wanted))):
            self._forensics.record(self._nvml.read(wanted))
            if self._forensics.pass_wanted():
                self.wake()  # a GPU process joined a tree: the watcher looks for its siblings now
