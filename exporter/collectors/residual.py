"""The two residuals the fleet reads, computed where the numbers already are: per GPU, the memory
outside every engine, and the memory no recognised holder claims. Published by the exporter so the
rules no longer rebuild them from four families on every evaluation (issue 26: those two recording
rules were ~28 ms of every evaluation at 100 nodes). Unknown is absent: a GPU whose used memory, or
one of whose engines' or holders' memory, NVML could not give has no residual this collection."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.collectors.names import PREFIX
from exporter.snapshot.attribution import Snapshot
from exporter.sources.nvml import GpuReading

LABELS = ["node", "gpu", "uuid"]


def _residuals(snapshot: Snapshot, held: Iterable[tuple[str, int | None]]) -> Iterable[tuple[GpuReading, int]]:
    """(gpu, used minus what `held` says is held on it) for every GPU where all of it is known."""
    by_gpu: dict[str, int | None] = {}
    for uuid, used in held:
        by_gpu[uuid] = None if used is None or by_gpu.get(uuid, 0) is None else by_gpu.get(uuid, 0) + used
    for gpu in snapshot.nvml.gpus:
        claimed = by_gpu.get(gpu.uuid, 0)
        if gpu.used_bytes is not None and gpu.processes is not None and claimed is not None:
            yield gpu, gpu.used_bytes - claimed


def per_gpu_family(name: str, documentation: str, node: str, rows: Iterable[tuple[GpuReading, int]]) -> Metric:
    """A family of one figure per GPU (node, gpu, uuid): the residuals and the unattributed memory."""
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=LABELS)
    for gpu, value in rows:
        family.add_metric([node, str(gpu.index), gpu.uuid], value)
    return family


def residual_families(node: str, snapshot: Snapshot) -> Iterable[Metric]:
    engines = ((usage.gpu.uuid, usage.used_bytes) for usage in snapshot.engine_usage)
    yield per_gpu_family(
        "residual_outside_engines_bytes",
        "Whole-GPU used minus what every engine's process tree holds on it: memory outside any engine (what blocks "
        "the next wake-up when no engine is to blame). A GPU with no engine memory counts in full.",
        node,
        _residuals(snapshot, engines),
    )
    holders = ((u.gpu.uuid, u.used_bytes) for u in snapshot.holder_usage if u.holder.kind != "process")
    yield per_gpu_family(
        "residual_unclaimed_bytes",
        "Whole-GPU used minus what every recognised holder holds (engines, trainers, Ray actors, titled vLLM/SGLang "
        "workers): memory of plain processes nobody recognised (orphans) or of no listed process (leaked contexts).",
        node,
        _residuals(snapshot, holders),
    )
