"""Who holds each GPU's memory: processes, the engines whose trees they belong to, the other
holders (Ray actors, trainer ranks, titled workers) named from what the node shows, the rest.

Pure assembly over what the sources returned; nothing here talks to NVML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from exporter.engines.catalog import Engine
from exporter.errors import ErrorCounter
from exporter.sources.nvml import GpuProcess, GpuReading, NvmlReading
from exporter.sources.proctable import ProcInfo, ProcView
from gpu_residency_common.holders import HolderId, holder_of
from gpu_residency_common.nvml_mig import MigReading

UNKNOWN = HolderId("unknown", "")  # a process that left /proc before we looked


@dataclass(frozen=True)
class ProcessUsage:
    gpu: GpuReading
    pid: int
    used_bytes: int | None
    comm: str  # the process's own title, else its comm; "" when it left /proc before we looked
    container_id: str  # from the cgroup path; not `container`, which Prometheus' operator sets
    engine: str  # "" when the process belongs to no known engine
    holder: HolderId = UNKNOWN  # its engine, or who it is without one
    pod_uid: str = ""
    mig: MigReading | None = None  # the MIG device it runs on; None on a whole GPU or where unknown


@dataclass(frozen=True)
class EngineUsage:
    engine: str
    gpu: GpuReading
    used_bytes: int | None  # None when one of its processes' memory is unknown
    mig: MigReading | None = None  # its share on this MIG device (one row per device it holds)


@dataclass(frozen=True)
class HolderUsage:
    holder: HolderId
    pod_uid: str
    gpu: GpuReading
    used_bytes: int | None


@dataclass(frozen=True)
class Snapshot:
    nvml: NvmlReading
    engines: tuple[Engine, ...]
    processes: tuple[ProcessUsage, ...]
    engine_usage: tuple[EngineUsage, ...]
    unattributed: tuple[tuple[GpuReading, int], ...]  # only GPUs where it is known
    taken_at: float = 0.0  # wall-clock time of the collection
    holder_usage: tuple[HolderUsage, ...] = ()
    mig_unattributed: tuple[tuple[GpuReading, MigReading, int], ...] = ()  # per MIG device, where known

    @property
    def complete(self) -> bool:
        """Every GPU's processes are known: an engine missing from engine_usage really holds nothing."""
        return self.nvml.complete


@dataclass(frozen=True)
class _Identity:
    """What does not change while a process lives: read once per (pid, start time)."""

    container_id: str
    pod_uid: str
    launchers: tuple[tuple[int, str], ...]  # torchrun / Megatron processes among it and its ancestors


class Attributor:
    """Maps GPU processes to engines by walking up from each process to an engine root, and names
    every other holder from what the node shows (titles, launchers), with its pod.

    Container, pod and launcher chain are cached by (pid, start time) and pruned to the processes
    of the last pass; titles are read every pass (Ray retitles a worker that becomes an actor).
    """

    def __init__(self, errors: ErrorCounter | None = None) -> None:
        self._errors = errors or ErrorCounter()
        self._identities: dict[tuple[int, int], _Identity] = {}

    def _identity(self, info: ProcInfo, view: ProcView) -> _Identity:
        container_id, pod_uid = view.cgroup(info.pid)
        return _Identity(container_id, pod_uid, view.launchers(info.pid))

    def attribute(self, nvml: NvmlReading, engines: list[Engine], view: ProcView) -> Snapshot:
        # An engine is up only if its root PID is, in this same view, the registered process.
        roots = {e.root_pid: e for e in engines if e.up and e.root_pid}
        identities: dict[tuple[int, int], _Identity] = {}
        processes: list[ProcessUsage] = []
        engine_usage: list[EngineUsage] = []
        holder_usage: list[HolderUsage] = []
        unattributed: list[tuple[GpuReading, int]] = []
        mig_unattributed: list[tuple[GpuReading, MigReading, int]] = []
        for gpu in nvml.gpus:
            if gpu.processes is None:
                continue
            # Each process counts once, on the MIG device it runs on: summing an engine's rows
            # over a GPU's devices gives its GPU figure, never twice it.
            per_engine: dict[tuple[str, MigReading | None], int | None] = {}
            per_holder: dict[tuple[HolderId, str], int | None] = {}
            for proc in gpu.processes:
                usage = self._process(gpu, proc, roots, view, identities)
                processes.append(usage)
                if usage.engine:
                    key = (usage.engine, usage.mig)
                    per_engine[key] = _add(per_engine.get(key, 0), proc.used_bytes)
                key = (usage.holder, usage.pod_uid)
                per_holder[key] = _add(per_holder.get(key, 0), proc.used_bytes)
            engine_usage.extend(EngineUsage(name, gpu, used, mig) for (name, mig), used in per_engine.items())
            holder_usage.extend(HolderUsage(h, pod, gpu, used) for (h, pod), used in per_holder.items())
            rest = self._unattributed(gpu)
            if rest is not None:
                unattributed.append((gpu, rest))
            # Per GPU instance (its compute instances share its memory), on its first device.
            on_gpu = [usage for usage in processes if usage.gpu is gpu]
            for mig in (m for m in gpu.mig or () if not m.shared):
                gi = mig.instance.gpu_instance
                held = [usage.used_bytes for usage in on_gpu if usage.mig and usage.mig.instance.gpu_instance == gi]
                rest = self._rest(mig.used_bytes, held, placed=all(usage.mig for usage in on_gpu))
                if rest is not None:
                    mig_unattributed.append((gpu, mig, rest))
        self._identities = identities
        return Snapshot(
            nvml=nvml,
            engines=tuple(engines),
            processes=tuple(processes),
            engine_usage=tuple(engine_usage),
            unattributed=tuple(unattributed),
            taken_at=time.time(),
            holder_usage=tuple(holder_usage),
            mig_unattributed=tuple(mig_unattributed),
        )

    def _process(
        self,
        gpu: GpuReading,
        proc: GpuProcess,
        roots: dict[int, Engine],
        view: ProcView,
        identities: dict[tuple[int, int], _Identity],
    ) -> ProcessUsage:
        info = view.info(proc.pid)
        mig = gpu.mig_instance(proc.mig)
        if info is None:  # gone before we looked, or outside our PID namespace (no hostPID)
            return ProcessUsage(gpu, proc.pid, proc.used_bytes, "", "", "", mig=mig)
        if mig is None and gpu.mig:
            mig = _named_slice(gpu, view, proc.pid)
        key = (info.pid, info.start_ticks)
        identity = identities[key] = self._identities.get(key) or self._identity(info, view)
        title = view.title(info.pid)
        engine = next((roots[a.pid] for a in view.ancestry(proc.pid) if a.pid in roots), None)
        if engine is not None:
            holder = HolderId(engine.kind, engine.name)
        else:
            holder = holder_of(title, info.comm, list(identity.launchers))
        return ProcessUsage(
            gpu,
            proc.pid,
            proc.used_bytes,
            title or info.comm,
            identity.container_id,
            engine.name if engine else "",
            holder,
            identity.pod_uid,
            mig,
        )

    def _unattributed(self, gpu: GpuReading) -> int | None:
        """Used minus every listed process; unknown when any part is unknown.

        With memory info v1 `used` includes the driver-reserved memory, which would show up
        here as memory nobody holds: unknown. A negative difference (the process list and the
        used figure come from two NVML calls that can straddle a free) is an inconsistent
        reading: absent for this collection and counted, never clamped to 0."""
        if gpu.processes is None or gpu.v1_memory:
            return None
        return self._rest(gpu.used_bytes, [proc.used_bytes for proc in gpu.processes])

    def _rest(self, used: int | None, held: list[int | None], placed: bool = True) -> int | None:
        """`used` minus what `held` lists; unknown when any part is, or when some process could
        not be placed on a MIG device (`placed` False: its memory may be this device's)."""
        if used is None or None in held or not placed:
            return None
        rest = used - sum(held)  # type: ignore[arg-type]
        if rest < 0:
            self._errors.inc("attribution", "inconsistent")
            return None
        return rest


def _named_slice(gpu: GpuReading, view: ProcView, pid: int) -> MigReading | None:
    """For a process NVML did not place: the slice CUDA_VISIBLE_DEVICES=MIG-... names in the
    environment of it or its nearest ancestor that has the variable (a retitled process, such as
    SGLang's schedulers, has its environ overwritten by the title; its launcher's is intact)."""
    for ancestor in view.ancestry(pid):
        visible = {name.lower() for name in view.visible_devices(ancestor.pid)}
        if visible:
            return next((m for m in gpu.mig or () if m.instance.uuid.lower() in visible), None)
    return None


def _add(total: int | None, value: int | None) -> int | None:
    """A sum with an unknown part is unknown."""
    return None if total is None or value is None else total + value
