"""Who holds each GPU's memory: processes, the engines whose trees they belong to, the rest.

Pure assembly over what the sources returned; nothing here talks to NVML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from exporter.engines import Engine
from exporter.errors import ErrorCounter
from exporter.nvml_source import GpuReading, NvmlReading
from exporter.proctable import ProcView


@dataclass(frozen=True)
class ProcessUsage:
    gpu: GpuReading
    pid: int
    used_bytes: int | None
    comm: str  # "" when the process left /proc before we looked (or is outside our PID view)
    container: str
    engine: str  # "" when the process belongs to no known engine


@dataclass(frozen=True)
class EngineUsage:
    engine: str
    gpu: GpuReading
    used_bytes: int | None  # None when one of its processes' memory is unknown


@dataclass(frozen=True)
class Snapshot:
    nvml: NvmlReading
    engines: tuple[Engine, ...]
    processes: tuple[ProcessUsage, ...]
    engine_usage: tuple[EngineUsage, ...]
    unattributed: tuple[tuple[GpuReading, int], ...]  # only GPUs where it is known
    taken_at: float = 0.0  # wall-clock time of the collection

    @property
    def complete(self) -> bool:
        """Every GPU's processes are known: an engine missing from engine_usage really holds nothing."""
        return self.nvml.complete


class Attributor:
    """Maps GPU processes to engines by walking up from each process to an engine root.

    A process's title and container are cached by (pid, start time): they do not change
    while it lives, and the cache is pruned to the processes seen in the last pass.
    """

    def __init__(self, errors: ErrorCounter | None = None) -> None:
        self._errors = errors or ErrorCounter()
        self._labels: dict[tuple[int, int], tuple[str, str]] = {}  # -> (comm, container)

    def attribute(self, nvml: NvmlReading, engines: list[Engine], view: ProcView) -> Snapshot:
        # An engine is up only if its root PID is, in this same view, the registered process.
        roots = {e.root_pid: e.name for e in engines if e.up and e.root_pid}
        labels: dict[tuple[int, int], tuple[str, str]] = {}
        processes: list[ProcessUsage] = []
        engine_usage: list[EngineUsage] = []
        unattributed: list[tuple[GpuReading, int]] = []
        for gpu in nvml.gpus:
            if gpu.processes is None:
                continue
            per_engine: dict[str, int | None] = {}
            for proc in gpu.processes:
                info = view.info(proc.pid)
                engine = comm = container = ""
                if info is not None:
                    key = (info.pid, info.start_ticks)
                    known = self._labels.get(key) or (view.title(info), view.container(info.pid))
                    labels[key] = known
                    comm, container = known
                    engine = next((roots[a.pid] for a in view.ancestry(proc.pid) if a.pid in roots), "")
                processes.append(ProcessUsage(gpu, proc.pid, proc.used_bytes, comm, container, engine))
                if engine:
                    per_engine[engine] = _add(per_engine.get(engine, 0), proc.used_bytes)
            engine_usage.extend(EngineUsage(name, gpu, used) for name, used in per_engine.items())
            rest = self._unattributed(gpu)
            if rest is not None:
                unattributed.append((gpu, rest))
        self._labels = labels
        return Snapshot(
            nvml=nvml,
            engines=tuple(engines),
            processes=tuple(processes),
            engine_usage=tuple(engine_usage),
            unattributed=tuple(unattributed),
            taken_at=time.time(),
        )

    def _unattributed(self, gpu: GpuReading) -> int | None:
        """Used minus every listed process; unknown when any part is unknown.

        With memory info v1 `used` includes the driver-reserved memory, which would show up
        here as memory nobody holds: unknown. A negative difference (the process list and the
        used figure come from two NVML calls that can straddle a free) is an inconsistent
        reading: absent for this collection and counted, never clamped to 0."""
        known = [proc.used_bytes for proc in gpu.processes or ()]
        if gpu.processes is None or gpu.used_bytes is None or gpu.v1_memory or None in known:
            return None
        rest = gpu.used_bytes - sum(known)
        if rest < 0:
            self._errors.inc("attribution", "inconsistent")
            return None
        return rest


def _add(total: int | None, value: int | None) -> int | None:
    """A sum with an unknown part is unknown."""
    return None if total is None or value is None else total + value
