"""What was on an engine's GPUs before it died: a short, bounded history of GPU readings.

Fed by NVML readings alone (used memory and the process lists: what a tick reads, and every
scrape's reading too), never a whole collection: a GPU process is tied to an engine by its
ancestry, read once per process and kept while the process stays on a GPU. At a death the peak
used memory of each GPU the engine held within the window, with the top holders then, is kept
with the exit.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from exporter.exits.causes import GpuPeak, HolderAt
from exporter.sources.nvml import NvmlReading

HISTORY_MAX = 240  # readings kept, whatever the rate: the history's memory is bounded
TOP_HOLDERS = 5

Owner = Callable[[int], tuple[str, str]]  # pid -> (engine or "", the process's name)


@dataclass(frozen=True)
class _GpuState:
    index: int
    uuid: str
    used: int | None
    total: int | None
    holders: tuple[HolderAt, ...]


@dataclass(frozen=True)
class _Reading:
    at: float
    gpus: tuple[_GpuState, ...]
    engines: dict[str, frozenset[str]]  # engine -> uuids it held memory on
    confirmed: float = 0.0  # a later tick found every GPU's used memory unchanged then (0: never)

    @property
    def seen(self) -> float:
        """The last time this state is known to have held."""
        return max(self.at, self.confirmed)


def _summarise(reading: NvmlReading, owner: Owner, at: float) -> _Reading:
    gpus, engines = [], {}
    for gpu in reading.gpus:
        holders: list[HolderAt] = []
        by_engine: dict[str, int] = {}
        listed = 0
        for process in gpu.processes or ():
            if not process.used_bytes:
                continue
            listed += process.used_bytes
            engine, name = owner(process.pid)
            if engine:
                by_engine[engine] = by_engine.get(engine, 0) + process.used_bytes
                engines.setdefault(engine, set()).add(gpu.uuid)
            else:
                holders.append(HolderAt("process", name, process.used_bytes, process.pid))
        holders += [HolderAt("engine", engine, used) for engine, used in by_engine.items()]
        if gpu.used_bytes is not None and gpu.processes is not None and gpu.used_bytes > listed:
            holders.append(HolderAt("unattributed", "", gpu.used_bytes - listed))
        top = tuple(sorted(holders, key=lambda h: -h.used_bytes)[:TOP_HOLDERS])
        gpus.append(_GpuState(gpu.index, gpu.uuid, gpu.used_bytes, gpu.total_bytes, top))
    return _Reading(at, tuple(gpus), {name: frozenset(uuids) for name, uuids in engines.items()})


class GpuHistory:
    """The readings of the last `window` seconds (at most HISTORY_MAX), each standing until the next;
    the last one until it was last confirmed. Not thread-safe: its owner locks."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._readings: deque[_Reading] = deque(maxlen=HISTORY_MAX)

    def __len__(self) -> int:
        return len(self._readings)

    def record(self, reading: NvmlReading, owner: Owner, at: float | None = None) -> None:
        summary = _summarise(reading, owner, time.time() if at is None else at)
        if self._readings and self._readings[-1].at == summary.at:
            self._readings.pop()  # the same reading again, its processes' owners known better now
        self._readings.append(summary)
        # A reading stands until the next one: it leaves once its successor is older than the window.
        while len(self._readings) > 1 and summary.at - self._readings[1].at > self._window:
            self._readings.popleft()

    def confirm(self, used: dict[int, int | None], at: float) -> bool:
        """True, and the last reading stands until `at`, when each of these GPUs (by index) uses what it
        used then: the tick need not read process lists (a pool allocated once stays the same to the byte)."""
        if not self._readings or not used:
            return False
        last = {gpu.index: gpu.used for gpu in self._readings[-1].gpus}
        if any(index not in last or value is None or last[index] != value for index, value in used.items()):
            return False
        self._readings[-1] = dataclasses.replace(self._readings[-1], confirmed=at)
        return True

    def engine_gpus(self, engines: set[str]) -> set[int] | None:
        """Indices of the GPUs these engines held memory on at the last reading; None when there is
        none yet, or an engine held nothing then (it may be about to: read every GPU)."""
        if not self._readings:
            return None
        last = self._readings[-1]
        if any(name not in last.engines for name in engines):
            return None
        held = set().union(*(last.engines[name] for name in engines)) if engines else set()
        return {gpu.index for gpu in last.gpus if gpu.uuid in held}

    def peaks(self, engine: str, at: float) -> list[GpuPeak]:
        """For each GPU the engine held in the window before `at`: its peak used memory and the holders then
        (seen last at the time given: a reading stands until the next, the last one until confirmed)."""
        readings = list(self._readings)
        ends = [r.at for r in readings[1:]] + [readings[-1].seen] if readings else []
        spans = zip(readings, ends, strict=True)
        recent = [(min(r.seen, at), r) for r, end in spans if end >= at - self._window and r.at <= at + 1.0]
        held = set().union(*(r.engines.get(engine, frozenset()) for _, r in recent)) if recent else set()
        peaks = []
        for uuid in sorted(held):
            states = [
                (gpu.used, uuid in r.engines.get(engine, ()), seen, gpu)
                for seen, r in recent
                for gpu in r.gpus
                if gpu.uuid == uuid and gpu.used is not None
            ]
            if states:
                # Of equal peaks, one where the engine's own processes were known as its (after its death
                # they are plain processes), then the latest.
                _, _, when, top = max(states, key=lambda item: item[:3])
                peaks.append(GpuPeak(top.index, uuid, top.used, top.total, when, top.holders))
        return peaks
